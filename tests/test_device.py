"""The device runner through the real CLI, in processes where torch cannot be imported.

`make test` runs this file twice: with onnxruntime-training (and torch, for the references), and
in an environment with stock onnxruntime and no torch (VQT_EDGE_TEST_BUNDLES; tests/conftest.py),
where the portable backend trains without being asked for."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from safetensors.numpy import load_file

from device_runner import ort
from device_runner.backends import BACKENDS
from device_runner.data import iter_batches, load_dataset
from tests.conftest import REPO, run_cli
from tests.test_faults import assert_same_adapter, kill_mid_epoch, metrics_lines, start_cli, wait_for
from vqt_edge import manifest as mf


@pytest.fixture(scope="module")
def trained(tested_run) -> Path:
    return tested_run[0]  # 12 epochs, --test (tests/conftest.py)


def test_train_reaches_90_percent_and_eval_reproduces_it(trained, task):
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.9
    assert summary["train_images"] == 120 and summary["skipped_images"] == 0
    assert summary["peak_rss_mb"] > 0
    out = run_cli("eval", "--run", trained, "--data", task["test"], "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["accuracy"] == summary["test_accuracy"]
    assert 0 <= result["accuracy"] <= 1 and np.array(result["confusion_matrix"]).sum() == 60
    metrics = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == list(range(1, 13))


def test_predict_json_equals_torch_from_adapter_and_model_onnx(trained, task, tiny_bundle, request):
    images = sorted(task["test"].rglob("*.png"))[::7]
    out = run_cli("predict", "--run", trained, "--json", *images)
    assert out.returncode == 0, out.stderr
    predictions = json.loads(out.stdout)
    assert [p["path"] for p in predictions] == [str(p) for p in images]
    got = np.array([p["logits"] for p in predictions], dtype=np.float32)

    manifest = mf.read_manifest(tiny_bundle)
    adapter = load_file(str(trained / "adapter.safetensors"))
    assert adapter["query_tokens"].shape == (3, 2, 32) and adapter["head.weight"].shape == (3, manifest.spec.head_width)
    pixels, _ = next(iter_batches([(p, 0) for p in images], len(images), 32, manifest.mean, manifest.std))
    session = onnxruntime.InferenceSession(str(trained / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(got, session.run(["logits"], {"pixel_values": pixels})[0], atol=1e-6)
    classes = load_dataset(task["test"]).classes
    assert [p["label"] for p in predictions] == [classes[i] for i in got.argmax(-1)]
    if sys.modules.get("torch", 0) is None:  # the torch-free run (tests/conftest.py): no torch reference
        return
    import torch

    from exporters.methods import build_head
    from exporters.methods.vqt import VQTClassifier

    tiny_backbone = request.getfixturevalue("tiny_backbone")
    head = build_head(tiny_backbone, manifest.spec)
    with torch.no_grad():
        head.query_path.query_tokens.copy_(torch.from_numpy(adapter["query_tokens"]))
        head.head.weight.copy_(torch.from_numpy(adapter["head.weight"]))
        head.head.bias.copy_(torch.from_numpy(adapter["head.bias"]))
        want = VQTClassifier(tiny_backbone, head).eval()(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_device_modules_never_import_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import device_runner.trainer, device_runner.evaluate, device_runner.deploy, vqt_edge.cli\n"
        "from device_runner import ort\n"
        "if ort.has_training_api(): ort.training_api()\n"
        "assert sys.modules['torch'] is None\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr


def _runnable(backend: str):
    """pytest.param for a backend, skipped where it cannot run (ort-training on stock onnxruntime)."""
    ok = backend == "portable" or ort.has_training_api()
    return pytest.param(backend, marks=pytest.mark.skipif(not ok, reason="no onnxruntime-training here"))


@pytest.mark.parametrize("backend", [_runnable(b) for b in BACKENDS])
def test_sigkill_at_any_point_then_resume_equals_uninterrupted(tmp_path, tiny_bundle, task, backend):
    args = [
        "--bundle",
        tiny_bundle,
        "--data",
        task["train"],
        "--epochs",
        6,
        "--batch-size",
        8,
        "--kv",
        "disk",
        "--checkpoint-every",
        3,
        "--seed",
        7,
        "--backend",
        backend,
    ]
    reference = tmp_path / "reference"
    out = run_cli("train", "--run", reference, *args)
    assert out.returncode == 0, out.stderr

    run = tmp_path / "killed"

    def start(*extra):
        return start_cli("train", "--run", run, *extra, stdout=subprocess.DEVNULL)

    # Kill 1: as soon as the run folder exists (during data loading / the K/V cache pass).
    proc = start(*args)
    wait_for(lambda: (run / "run.json").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Kill 2: mid-epoch, right after a step checkpoint of epoch 2 has been written.
    proc = start("--resume")
    kill_mid_epoch(proc, run)
    # Kill 3: later, whatever it is doing.
    proc = start("--resume")
    wait_for(lambda: metrics_lines(run) >= 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "adapter.safetensors").exists()

    out = run_cli("train", "--run", run, "--resume")
    assert out.returncode == 0, out.stderr
    assert_same_adapter(run, reference)


def test_corrupt_images_are_skipped_with_one_warning_each(tmp_path, tiny_bundle, task):
    data = tmp_path / "data"
    shutil.copytree(task["train"], data)
    good = (data / "red" / "000.png").read_bytes()
    (data / "red" / "truncated.png").write_bytes(good[: len(good) // 2])
    (data / "blue" / "notes.png").write_text("not an image")
    run = tmp_path / "run"
    out = run_cli("train", "--bundle", tiny_bundle, "--data", data, "--run", run, "--epochs", 1)
    assert out.returncode == 0, out.stderr
    for name in ("truncated.png", "notes.png"):
        assert len([line for line in out.stderr.splitlines() if name in line]) == 1, out.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_images"] == 2 and summary["train_images"] == 120


@pytest.mark.parametrize("layout", ["empty_class", "unknown_label", "empty_dataset", "missing", "one_class"])
def test_bad_data_layouts_exit_2_without_traceback(tmp_path, tiny_bundle, task, layout):
    data = tmp_path / "data"
    if layout == "empty_class":
        shutil.copytree(task["train"], data)
        (data / "purple").mkdir()
    elif layout == "unknown_label":
        data.mkdir()
        (data / "list.txt").write_text(
            f"{task['train'] / 'red' / '000.png'},red\n{task['train'] / 'blue' / '000.png'},teal\n"
        )
        data = data / "list.txt"
    elif layout == "empty_dataset":
        data.mkdir()
    elif layout == "one_class":
        shutil.copytree(task["train"] / "red", data / "red")
    out = run_cli("train", "--bundle", tiny_bundle, "--data", data, "--run", tmp_path / "run", "--epochs", 1)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr
    assert not list((tmp_path / "run").glob("checkpoint*"))


def test_cuda_request_on_cpu_build_is_a_clear_error(tmp_path, tiny_bundle, task):
    out = run_cli(
        "train",
        "--bundle",
        tiny_bundle,
        "--data",
        task["train"],
        "--run",
        tmp_path / "run",
        "--device",
        "cuda",
        "--kv",
        "stream",
    )
    assert out.returncode == 2 and "CUDA" in out.stderr and "Traceback" not in out.stderr


def test_existing_run_needs_resume(trained, tiny_bundle, task):
    out = run_cli("train", "--bundle", tiny_bundle, "--data", task["train"], "--run", trained)
    assert out.returncode == 2 and "--resume" in out.stderr
