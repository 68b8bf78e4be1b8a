"""Import onnxruntime and its training API without torch (docs/design.md section 7).

`onnxruntime/training/__init__.py` imports its `optim` package, which imports torch unconditionally;
and where torch is installed, plain `import onnxruntime` imports it too (via `onnxruntime.tools`,
guarded by `find_spec("torch")`), costing ~230 MB of resident memory. The training classes need
no torch: they live in the pybind module and the `onnxruntime/training/api/` wrappers.

So the device side (1) hides torch while onnxruntime is imported, which saves the memory (the CLI
makes it unimportable for the whole process with `block_torch`, which also proves the wall; a
library caller gets its process back as it was, `import torch` included), and (2) registers an empty `onnxruntime.training` package whose
`__path__` points at the real folder, so that `onnxruntime.training.api` imports without running
the package's own `__init__`.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from vqt_edge.errors import UserError


def block_torch() -> None:
    """Make `import torch` fail in this process (no-op if torch is already imported).

    `sys.modules["torch"] = None` is what `find_spec` reads as "not installed", exactly as on a
    device without torch; a fake package that raises would make onnxruntime try to import it.
    """
    if "torch" not in sys.modules:
        sys.modules["torch"] = None  # type: ignore[assignment]


@contextmanager
def _torch_hidden() -> Iterator[None]:
    """Hide torch while onnxruntime imports (it would import torch, ~230 MB), then undo the hiding
    so that the caller's process can still `import torch` afterwards. A no-op after block_torch()."""
    hide = "torch" not in sys.modules
    if hide:
        sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        yield
    finally:
        if hide and "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]


def _import_onnxruntime() -> Any:
    try:
        with _torch_hidden():
            return importlib.import_module("onnxruntime")
    except ImportError as e:
        raise UserError(
            "onnxruntime is not installed. Install exactly one of: `pip install vqt-edge[cpu]` "
            "(onnxruntime-training-cpu), `pip install vqt-edge[cuda]` (onnxruntime-training), or an "
            f"onnxruntime build with --enable_training (Jetson; see docs/install.md). ({e})"
        ) from None


def has_training_api() -> bool:
    """Whether the installed onnxruntime is a training build, found without importing its training
    package (the portable backend never imports it)."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any(os.path.isdir(os.path.join(folder, "training", "api")) for folder in spec.submodule_search_locations)


def training_api() -> types.ModuleType:
    """`onnxruntime.training.api` (CheckpointState, Module, Optimizer), imported torch-free."""
    ort = _import_onnxruntime()
    if "onnxruntime.training.api" in sys.modules:
        return sys.modules["onnxruntime.training.api"]
    if "onnxruntime.training" not in sys.modules:
        import os

        folder = os.path.join(os.path.dirname(ort.__file__), "training")
        if not os.path.isdir(os.path.join(folder, "api")):
            raise UserError(
                "the installed onnxruntime has no training API; install onnxruntime-training-cpu "
                "(or onnxruntime-training for CUDA), not plain onnxruntime"
            )
        shell = types.ModuleType("onnxruntime.training")
        shell.__path__ = [folder]  # submodules resolve from the real folder; its __init__ never runs
        sys.modules["onnxruntime.training"] = shell
    with _torch_hidden():
        return importlib.import_module("onnxruntime.training.api")


def onnxruntime() -> Any:
    """Plain `onnxruntime` (InferenceSession, SessionOptions), imported torch-free."""
    return _import_onnxruntime()


def providers(device: str) -> list[str]:
    """Execution providers for `--device`; a clear error when this build cannot do CUDA."""
    ort = onnxruntime()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise UserError(
                "--device cuda: this onnxruntime build has no CUDA support "
                f"(available: {', '.join(ort.get_available_providers())}). Install the CUDA build "
                "with `pip install vqt-edge[cuda]` (after uninstalling onnxruntime-training-cpu)."
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise UserError(f"unknown device {device!r}; use cpu or cuda")


def session_options(threads: int | None = None, prepack: bool = True) -> Any:
    """SessionOptions for the frozen graph. The memory arena is off: it keeps the largest batch's
    activations reserved for the life of the session, which is the peak a budget cares about.
    `prepack=False` keeps onnxruntime from storing a packed copy of MatMul weights next to the
    weights themselves where it cannot free the originals (a weight two kernels read, as in
    model.onnx; docs/design.md section 6)."""
    ort = onnxruntime()
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = False
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts
