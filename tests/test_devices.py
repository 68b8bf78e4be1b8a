"""The device side on the devices' platforms (docs/devices.md): Debian 13's Python 3.13 on aarch64,
under qemu's user-mode emulator started explicitly for each process, and on x86-64; each runs the
project's own wheel installed with its `device` extra for that platform (stock onnxruntime, no torch,
no onnxruntime-training), from a folder outside this checkout.

`make devices` builds them under build/devices and `make test` runs this file with VQT_EDGE_DEVICES
pointing there; without it the file is skipped. Bundles come from this environment (the exporter
needs torch). Emulated processes are slow to start (seconds): each target runs seven, shared by
all the tests below, on a tiny ViT and 36 images.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.conftest import REPO, make_task, run_cli
from tests.test_faults import kill_mid_epoch

DEVICES = os.environ.get("VQT_EDGE_DEVICES")
pytestmark = pytest.mark.skipif(not DEVICES, reason="needs the device environments: `make devices`, VQT_EDGE_DEVICES")
TARGETS = {"aarch64-cp313": "aarch64", "x86_64-cp313": "x86_64"}
TIMEOUT = 900  # seconds per emulated process: a loaded 2-core machine, an emulator
TRAIN = [
    "--epochs",
    4,
    "--batch-size",
    4,
    "--checkpoint-every",
    2,
    "--seed",
    3,
    "--threads",
    1,
    "--backend",
    "portable",
    "--memory-budget",
    "1GB",
]
API = """
import json, sys
from vqt_edge import api
model = api.load_adapter(sys.argv[1])
print(json.dumps([p["logits"] for p in model.predict(sys.argv[2:])]))
"""


def device_python(target: str) -> Path:
    return Path(DEVICES or "") / target / "bin" / "python"


def device_command(target: str, *args) -> list[str]:
    """`vqt-edge ARGS` as the target runs it: its Python, its site folder, never this checkout."""
    return [str(device_python(target)), "-m", "vqt_edge.cli", *map(str, args)]


def device_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VQT_EDGE_TEST_BUNDLES")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run_on(target: str, *args, cwd: Path) -> subprocess.CompletedProcess:
    out = subprocess.run(
        device_command(target, *args), capture_output=True, text=True, timeout=TIMEOUT, env=device_env(), cwd=cwd
    )
    assert out.returncode == 0, f"{target}: vqt-edge {' '.join(map(str, args))}\n{out.stderr}"
    return out


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _killed_then_resumed(target: str, bundle: Path, data: Path, run: Path, cwd: Path) -> None:
    """SIGKILL right after a mid-epoch step checkpoint, then --resume to the end."""
    proc = subprocess.Popen(
        device_command(target, "train", "--bundle", bundle, "--data", data, "--run", run, *TRAIN),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=device_env(),
        cwd=cwd,
    )
    position = kill_mid_epoch(proc, run, TIMEOUT)
    assert position["step"] > 0 and not (run / "adapter.safetensors").exists()
    run_on(target, "train", "--run", run, "--resume", cwd=cwd)


_RUNS: dict[str, dict] = {}


@pytest.fixture(scope="module")
def small_task(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("devices_task")
    return {"train": make_task(root / "train", 12, seed=11), "test": make_task(root / "test", 6, seed=12)}


@pytest.fixture(scope="module")
def device_runs(tiny_bundle, small_task, tmp_path_factory):
    """target -> what its processes produced; each target runs once, on first use."""

    def get(target: str) -> dict:
        if target not in _RUNS:
            work = tmp_path_factory.mktemp(target)
            ref, killed = work / "reference", work / "killed"
            source = ["--bundle", tiny_bundle, "--data", small_task["train"]]
            info = json.loads(run_on(target, "info", *source, "--run", ref, "--json", cwd=work).stdout)
            train = run_on(target, "train", *source, "--run", ref, "--test", small_task["test"], *TRAIN, cwd=work)
            _killed_then_resumed(target, tiny_bundle, small_task["train"], killed, work)
            evaluated = json.loads(
                run_on(target, "eval", "--run", ref, "--data", small_task["test"], "--json", cwd=work).stdout
            )
            images = [
                small_task["test"] / "blue" / "000.png",
                small_task["test"] / "green",
                small_task["test"] / "red" / "005.png",
            ]
            predicted = json.loads(run_on(target, "predict", "--run", ref, "--json", *images, cwd=work).stdout)
            files = [p["path"] for p in predicted]
            api = subprocess.run(
                [str(device_python(target)), "-c", API, str(ref), *files],
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
                env=device_env(),
                cwd=work,
            )
            assert api.returncode == 0, api.stderr
            _RUNS[target] = {
                "info": info,
                "train": train,
                "reference": ref,
                "killed": killed,
                "eval": evaluated,
                "predict": predicted,
                "api_logits": json.loads(api.stdout),
            }
        return _RUNS[target]

    return get


@pytest.mark.parametrize("target", TARGETS)
def test_wheel_with_device_extra_has_stock_onnxruntime_and_no_torch(target):
    site = Path(DEVICES or "") / target / "site"
    assert (site / "onnxruntime").is_dir() and not (site / "onnxruntime" / "training").exists()
    assert not (site / "torch").exists() and not list(site.glob("onnxruntime_training*"))
    assert list(site.glob("vqt_edge-*.dist-info")), "the project's wheel is not installed"
    for package in ("vqt_edge", "device_runner"):  # the checkout's modules, no stale ones from an older build
        installed = {p.relative_to(site).as_posix() for p in (site / package).rglob("*.py")}
        assert installed == {p.relative_to(REPO).as_posix() for p in (REPO / package).rglob("*.py")}


@pytest.mark.parametrize("target", TARGETS)
def test_info_reports_the_platform_and_the_default_plan(target, device_runs, capsys):
    info = device_runs(target)["info"]
    machine, ort = info["machine"], info["onnxruntime"]
    with capsys.disabled():  # the line CI's log shows for each platform
        print(
            f"\n{target}: machine {machine['architecture']}, Python {info['python']['version']}, "
            f"onnxruntime {ort['version']} ({', '.join(ort['providers'])})"
        )
    assert machine["architecture"] == TARGETS[target]
    assert info["python"]["version"].startswith("3.13.") and info["python"]["executable"] == str(device_python(target))
    assert list(ort["packages"]) == ["onnxruntime"] and ort["version"] == ort["packages"]["onnxruntime"]
    assert "CPUExecutionProvider" in ort["providers"] and ort["training_api"] is False
    assert info["backends"]["portable"]["runs"] and not info["backends"]["ort-training"]["runs"]
    assert info["memory"]["available_mb"] > 0 and info["disk"]["free_mb"] > 0 and machine["cores"] >= 1
    bundle = info["bundle"]
    assert bundle["images"] == 36 and bundle["default_plan"]["backend"] == "portable"
    assert 0 < bundle["smallest_budget_mb"] <= 1024


@pytest.mark.parametrize("target", TARGETS)
def test_train_keeps_its_memory_budget(target, device_runs):
    runs = device_runs(target)
    summary = json.loads((runs["reference"] / "summary.json").read_text())
    assert summary["backend"] == "portable" and summary["memory_budget_mb"] == 1024
    assert summary["budget_exceeded"] is False and "memory budget 1024 MiB" in runs["train"].stdout
    assert [m["step"] for m in _metrics(runs["reference"])] == [9, 18, 27, 36]
    assert summary["test_images"] == 18 and summary["test_accuracy"] > 1 / 3


@pytest.mark.parametrize("target", TARGETS)
def test_sigkill_then_resume_is_bit_identical_to_the_uninterrupted_run(target, device_runs):
    runs = device_runs(target)
    want, got = (load_file(str(runs[r] / "adapter.safetensors")) for r in ("reference", "killed"))
    assert set(want) == set(got)
    for name in want:
        assert np.array_equal(want[name], got[name]), name
    assert [m["train_loss"] for m in _metrics(runs["killed"])] == [m["train_loss"] for m in _metrics(runs["reference"])]


@pytest.mark.parametrize("target", TARGETS)
def test_eval_predict_and_load_adapter_agree(target, device_runs, small_task):
    runs = device_runs(target)
    summary = json.loads((runs["reference"] / "summary.json").read_text())
    assert runs["eval"]["accuracy"] == summary["test_accuracy"] and runs["eval"]["images"] == 18
    predicted = runs["predict"]
    folder = sorted(str(p) for p in (small_task["test"] / "green").glob("*.png"))
    assert [p["path"] for p in predicted] == [
        str(small_task["test"] / "blue" / "000.png"),
        *folder,
        str(small_task["test"] / "red" / "005.png"),
    ]
    np.testing.assert_allclose(np.array(runs["api_logits"]), np.array([p["logits"] for p in predicted]), atol=1e-6)


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def test_aarch64_trains_what_x86_64_trains(device_runs, capsys):
    """Same bundle, data, seed and versions; only the architecture differs: losses within 1e-4 relative,
    final parameters within 1e-3 (int8 K/V codes), the same predicted labels, the same test accuracy."""
    arm, x86 = device_runs("aarch64-cp313"), device_runs("x86_64-cp313")
    losses = {t: [m["train_loss"] for m in _metrics(r["reference"])] for t, r in (("arm", arm), ("x86", x86))}
    loss_gap = max(abs(a - b) / abs(b) for a, b in zip(losses["arm"], losses["x86"]))
    want, got = (load_file(str(r["reference"] / "adapter.safetensors")) for r in (x86, arm))
    param_gap = max(_relative(got[n], want[n]) for n in want)
    logit_gap = _relative(
        np.array([p["logits"] for p in arm["predict"]]), np.array([p["logits"] for p in x86["predict"]])
    )
    with capsys.disabled():
        print(
            f"\naarch64 vs x86_64: losses {losses['arm']} vs {losses['x86']} (largest relative gap {loss_gap:.2e}); "
            f"parameters {param_gap:.2e}, logits {logit_gap:.2e} relative; test accuracy "
            f"{arm['eval']['accuracy']} vs {x86['eval']['accuracy']}"
        )
    assert len(losses["arm"]) == len(losses["x86"]) == 4 and loss_gap <= 1e-4
    # The K/V cache is int8 (the default): where the two frozen passes' float rounding (~1e-6 relative)
    # puts a value on a rounding boundary its code differs by one, 1/127 of its channel's range; measured
    # 1.04e-4 (1.6e-5 with fp16 caches). 1e-3 still catches an architecture that computes differently.
    assert set(got) == set(want) and param_gap <= 1e-3
    assert [p["label"] for p in arm["predict"]] == [p["label"] for p in x86["predict"]]
    assert arm["eval"]["accuracy"] == x86["eval"]["accuracy"]
    init = load_file(str(Path(arm["info"]["bundle"]["path"]) / "train" / "step_init.safetensors"))
    assert all(_relative(got[n], init[n]) > 1e-2 for n in init)  # trained, not two untouched initializations


def test_adapter_trained_on_aarch64_evaluates_the_same_on_this_machine(device_runs, small_task):
    """The run folder an aarch64 device wrote, evaluated by this environment (x86-64, its own Python and
    onnxruntime build)."""
    arm = device_runs("aarch64-cp313")
    out = run_cli("eval", "--run", arm["reference"], "--data", small_task["test"], "--json")
    assert out.returncode == 0, out.stderr
    assert (
        json.loads(out.stdout)["accuracy"]
        == json.loads((arm["reference"] / "summary.json").read_text())["test_accuracy"]
    )
    assert platform.machine() == "x86_64"
