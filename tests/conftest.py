"""Shared fixtures: a tiny random ViT, its exported bundles, finished runs of them, and a generated
image task.

Everything is made here at test time (no downloads): real ONNX graphs, real PNG files, real `vqt-edge`
processes. Exports and trainings are the suite's cost, so each is session-scoped, made once for every
test file that reads it; they are read-only (a test that damages one copies it first).
"""

from __future__ import annotations

import json
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
# `vqt-edge export` flags that define TINY, and those of a random-init tiny export with 3 classes.
TINY_SIZES = [
    x
    for field in ("depth", "dim", "heads", "mlp_dim", "patch", "image_size")
    for x in ("--" + field.replace("_", "-"), getattr(TINY, field))
]
# --no-int8-step: the int8-fed step graph takes 15 s to export; the session bundles (tiny_bundle) have it
TINY_EXPORT = ["--random-init", *TINY_SIZES, "--num-classes", 3, "--no-int8-step"]
# The second test run (`make test`: stock onnxruntime, no torch) cannot export: it reads the bundles
# the first run's environment exported there (tests/fixture_bundles.py).
BUNDLES = os.environ.get("VQT_EDGE_TEST_BUNDLES")
if BUNDLES:
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]  # torch blocked, as on a device


def invoke(*args):
    """The real CLI in this process (click's runner): no process start or torch import per call."""
    from click.testing import CliRunner

    from vqt_edge.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args])


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
def tiny_method_bundle(tmp_path_factory, tiny_bundle, tiny_backbone):
    """`tiny_method_bundle(method, last_k)`: the tiny ViT exported for another method (3 classes, 2
    query tokens where the method has them), once per session however many test files ask for it.
    Read-only, as tiny_bundle (vqt with the defaults is tiny_bundle itself)."""
    from exporters.export import export_bundle
    from vqt_edge.spec import AdapterSpec

    root, made = tmp_path_factory.mktemp("method_bundles"), {}

    def get(method: str, last_k: int | None = None) -> Path:
        if (method, last_k) == ("vqt", None):
            return tiny_bundle
        if (method, last_k) not in made:
            out = root / f"{method.replace('+', '_')}_{last_k}"
            export_bundle(
                tiny_backbone,
                out,
                AdapterSpec.create(TINY, method, 3, last_k=last_k, query_tokens=2),
                model_name="tiny",
                int8_step=False,  # 15 s of export each; tiny_bundle has it
                log=lambda _: None,
            )
            made[method, last_k] = out
        return made[method, last_k]

    return get


@pytest.fixture(scope="session")
def vit_ti16_frozen(tmp_path_factory) -> tuple:
    """A random ViT-Ti/16 (seed 5) and its frozen.onnx for VQT on every layer (2 classes): the graph at
    a real model's width that the export and quantization tests read. Read-only."""
    from exporters.export import export_frozen
    from exporters.vit import VisionTransformer
    from vqt_edge.arch import PRESETS
    from vqt_edge.spec import AdapterSpec

    backbone = VisionTransformer(PRESETS["vit_ti16"])
    backbone.reset_parameters(seed=5)
    backbone.eval()
    path = tmp_path_factory.mktemp("vit_ti16") / "frozen.onnx"
    export_frozen(backbone, path, AdapterSpec.create(backbone.arch, "vqt", 2))
    return backbone, path


#: How the quantized bundles are trained (tests/test_quantize.py), with `--backend`: 45 steps of batch 8,
#: a checkpoint every 3 (mid-epoch ones, for the kill-and-resume test).
QUANT_TRAIN = ["--epochs", 3, "--batch-size", 8, "--checkpoint-every", 3, "--seed", 3]


@pytest.fixture(scope="session")
def tiny_int4_run(tmp_path_factory, tiny_int4_bundle, task) -> Path:
    """The int4 bundle trained on the portable backend (QUANT_TRAIN), on whichever onnxruntime runs
    the tests. Read-only, as tiny_run."""
    run = tmp_path_factory.mktemp("runs") / "int4"
    out = run_cli(
        "train",
        "--bundle",
        tiny_int4_bundle,
        "--data",
        task["train"],
        "--run",
        run,
        *QUANT_TRAIN,
        "--backend",
        "portable",
    )
    assert out.returncode == 0, out.stderr
    return run


@pytest.fixture(scope="session")
def task(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("task")
    return {"train": make_task(root / "train", 40, seed=1), "test": make_task(root / "test", 20, seed=2)}


#: tiny_run's `train` options besides --bundle, --data and --run: the defaults (backend auto) but 2 epochs.
TINY_RUN = ["--epochs", 2]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_bundle, task) -> Path:
    """A finished 2-epoch run of the tiny bundle. Read-only: tests that damage it copy it first."""
    run = tmp_path_factory.mktemp("runs") / "run"
    out = run_cli("train", "--bundle", tiny_bundle, "--data", task["train"], "--run", run, *TINY_RUN)
    assert out.returncode == 0, out.stderr
    return run


@pytest.fixture(scope="session")
def tested_run(tmp_path_factory, tiny_bundle, task) -> tuple[Path, subprocess.CompletedProcess]:
    """A finished 12-epoch run with `--test` (K/V on disk): the run folder and its `train` process.
    Read-only, as tiny_run."""
    run = tmp_path_factory.mktemp("runs") / "tested"
    out = run_cli(
        "train",
        "--bundle",
        tiny_bundle,
        "--data",
        task["train"],
        "--run",
        run,
        "--test",
        task["test"],
        "--epochs",
        12,
        "--batch-size",
        16,
        "--kv",
        "disk",
    )
    assert out.returncode == 0, out.stderr
    return run, out


#: `train` under a memory budget, as the memory tests of both environments run it (tests/test_memory.py,
#: tests/test_memory_portable.py): 2 epochs, the portable backend, a test pass inside the promise.
BUDGET_TRAIN = ["--epochs", 2, "--batch-size", 16, "--backend", "portable", "--memory-budget", "300MB"]


def train_within_budget(bundle: Path, run: Path, task: dict[str, Path]) -> tuple[subprocess.CompletedProcess, dict]:
    """One BUDGET_TRAIN run: the finished process and its summary.json."""
    out = run_cli(
        "train", "--bundle", bundle, "--data", task["train"], "--run", run, *BUDGET_TRAIN, "--test", task["test"]
    )
    assert out.returncode == 0, out.stderr + out.stdout
    return out, json.loads((run / "summary.json").read_text())


@pytest.fixture(scope="session")
def budget_run(tmp_path_factory, tiny_bundle, task) -> tuple[subprocess.CompletedProcess, dict]:
    """train_within_budget on the tiny bundle, once per session. Read-only."""
    return train_within_budget(tiny_bundle, tmp_path_factory.mktemp("budget") / "run", task)


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


# -- the browser page (tests/test_web*.py): one export, one site, one Chromium for every web test file --
CHROMIUM = "/usr/bin/chromium"
# Headless on a closed network: without the background-networking flags Chromium keeps trying to
# reach Google's hosts (/work/.library/env/machines/python.md).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def fmnist_bundle(tmp_path_factory) -> Path:
    """The shipped vit_fmnist backbone exported for the 3-class colour task (as `vqt-edge export --model vit_fmnist`)."""
    out = tmp_path_factory.mktemp("web") / "bundle"
    # --no-int8-step: 30 s less export; tiny_bundle carries the int8-fed step graph
    result = run_cli(
        "export", "--model", "vit_fmnist", "--num-classes", 3, "--out", out, "--no-int8-step", torch_free=False
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def site_url(fmnist_bundle, tmp_path_factory):
    from vqt_edge.web.serve import serve_in_thread

    site = tmp_path_factory.mktemp("web") / "site"
    result = run_cli("web", "--bundle", fmnist_bundle, "--out", site)
    assert result.returncode == 0, result.stderr
    server, url = serve_in_thread(site)
    yield url + "?threads=1"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


# Tests whose passing the issues ask to see in CI's log by name (pytest -q prints only dots).
NAMED_IN_LOG = ("tests/test_web", "tests/test_fleet")


def pytest_terminal_summary(terminalreporter) -> None:
    passed = [r.nodeid for r in terminalreporter.stats.get("passed", []) if r.nodeid.startswith(NAMED_IN_LOG)]
    if passed:
        terminalreporter.write_line(f"passed, named for the log ({len(passed)}):")
        for nodeid in passed:
            terminalreporter.write_line(f"  {nodeid}")
