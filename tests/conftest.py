"""Shared fixtures: a tiny random ViT, its exported bundle, and a generated image task.

Everything is made here at test time (no downloads): real ONNX graphs, real PNG files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vqt_edge.arch import ViTArch

REPO = Path(__file__).resolve().parent.parent
TINY = ViTArch(depth=3, dim=32, heads=4, mlp_dim=64, patch=8, image_size=32)
CLASSES = ["blue", "green", "red"]
# The second test run (`make test`: stock onnxruntime, no torch) cannot export: it reads the bundles
# the first run's environment exported there (tests/fixture_bundles.py).
BUNDLES = os.environ.get("VQT_EDGE_TEST_BUNDLES")
if BUNDLES:
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]  # torch blocked, as on a device


def make_task(root: Path, per_class: int, seed: int, size: int = 32) -> Path:
    """Colour classes with noise, random brightness and a random bright square: separable by
    random features, not trivially by one pixel."""
    rng = np.random.default_rng(seed)
    base = {"blue": (50, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40)}
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(0, 70, (size, size, 3)) + np.array(base[name]) * rng.uniform(0.5, 1.0)
            x, y = rng.integers(0, size - 8, 2)
            img[y : y + 8, x : x + 8] = rng.integers(150, 256, 3)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_backbone():
    from exporters.vit import VisionTransformer

    model = VisionTransformer(TINY)
    model.reset_parameters(seed=0)
    return model.eval()


def export_tiny_bundle(out: Path, quantize: str = "none") -> Path:
    """The tiny VQT bundle most device tests train (needs torch); `quantize` as `export --quantize`."""
    from exporters.export import export_bundle
    from exporters.vit import VisionTransformer
    from vqt_edge.spec import AdapterSpec

    model = VisionTransformer(TINY)
    model.reset_parameters(seed=0)
    export_bundle(
        model.eval(),
        out,
        AdapterSpec.create(TINY, "vqt", 3, query_tokens=2),
        model_name="tiny",
        quantize=quantize,
        log=lambda _: None,
    )
    return out


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    if BUNDLES:
        return Path(BUNDLES) / "tiny"
    return export_tiny_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.fixture(scope="session")
def tiny_int4_bundle(tmp_path_factory) -> Path:
    """The tiny bundle quantized to int4: its portable step graph (UINT4 DequantizeLinear, opset 21)
    must run on whichever onnxruntime the tests run with."""
    if BUNDLES:
        return Path(BUNDLES) / "tiny-int4"
    return export_tiny_bundle(tmp_path_factory.mktemp("bundle_int4"), quantize="int4")


@pytest.fixture(scope="session")
def task(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("task")
    return {"train": make_task(root / "train", 40, seed=1), "test": make_task(root / "test", 20, seed=2)}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_bundle, task) -> Path:
    """A finished 2-epoch run of the tiny bundle. Read-only: tests that damage it copy it first."""
    run = tmp_path_factory.mktemp("runs") / "run"
    out = run_cli("train", "--bundle", tiny_bundle, "--data", task["train"], "--run", run, "--epochs", 2)
    assert out.returncode == 0, out.stderr
    return run


def cli_command(*args, torch_free: bool = True) -> list[str]:
    """The argv of the real `vqt-edge`; with `torch_free`, torch is made unimportable first,
    exactly as on a device where it is not installed (docs/design.md section 7)."""
    block = "import sys; sys.modules['torch'] = None; " if torch_free else ""
    code = block + "from vqt_edge.cli import main; sys.argv = ['vqt-edge'] + sys.argv[1:]; main()"
    return [sys.executable, "-c", "import sys; " + code, *map(str, args)]


def cli_env() -> dict[str, str]:
    """One thread, unbuffered, and this checkout's packages first from any working directory."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def run_cli(
    *args: str, torch_free: bool = True, timeout: float = 300, cwd: Path = REPO, **kw
) -> subprocess.CompletedProcess:
    """The real `vqt-edge` in a fresh process, run from `cwd`, waited for."""
    return subprocess.run(
        cli_command(*args, torch_free=torch_free),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
        cwd=cwd,
        **kw,
    )
