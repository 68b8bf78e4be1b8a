"""The portable backend: same trajectory as onnxruntime-training, a checkpoint of what is trained,
and no onnxruntime.training anywhere on its path (docs/design.md section 9). Torch-free: `make test`
runs it in the stock-onnxruntime environment too."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from device_runner import ort
from tests.conftest import REPO, run_cli
from vqt_edge.run_folder import CHECKPOINTS

TRAINING = ort.has_training_api()
needs_training = pytest.mark.skipif(not TRAINING, reason="no onnxruntime-training here")


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@needs_training
def test_both_backends_follow_the_same_trajectory(tmp_path, tiny_bundle, task):
    """20 steps (5 epochs of 4) with query-token dropout on (the bundle's 0.1) and weight decay:
    per-epoch losses and the final parameters agree within 1e-5, and so does validation (the
    portable step graph run for its logits only)."""
    runs = {}
    for backend in ("portable", "ort-training"):
        runs[backend] = tmp_path / backend
        out = run_cli(
            "train",
            "--bundle",
            tiny_bundle,
            "--data",
            task["train"],
            "--run",
            runs[backend],
            "--epochs",
            5,
            "--batch-size",
            24,
            "--val-split",
            0.2,
            "--kv",
            "ram",
            "--seed",
            5,
            "--weight-decay",
            0.05,
            "--backend",
            backend,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads((runs[backend] / "summary.json").read_text())["backend"] == backend
    metrics = {b: [json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for b, r in runs.items()}
    assert [m["step"] for m in metrics["portable"]] == [4, 8, 12, 16, 20]
    for got, want in zip(metrics["portable"], metrics["ort-training"]):
        assert abs(got["train_loss"] - want["train_loss"]) <= 1e-5 * abs(want["train_loss"])
        assert got["val_acc"] == want["val_acc"]
    got, want = (load_file(str(runs[b] / "adapter.safetensors")) for b in ("portable", "ort-training"))
    assert set(got) == set(want)
    for name in want:
        assert _relative(got[name], want[name]) <= 1e-5, name
    # The run moved the parameters: agreement is not two untouched initializations.
    init = load_file(str(tiny_bundle / "train" / "step_init.safetensors"))
    assert all(_relative(got[n], init[n]) > 1e-2 for n in init)


def test_portable_checkpoint_is_what_is_trained_and_never_imports_ort_training(tmp_path, tiny_bundle, task):
    """Trainable tensors + Adam moments + optimizer step + position, in one small safetensors file;
    and the whole run (train, checkpoint, model.onnx) never imports onnxruntime.training."""
    run = tmp_path / "run"
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from pathlib import Path\n"
        "from device_runner.trainer import train\nfrom vqt_edge.config import TrainConfig\n"
        f"train(Path({str(tiny_bundle)!r}), Path({str(run)!r}), TrainConfig(epochs=2, batch_size=16, backend='portable', "
        "checkpoint_every=3), Path(sys.argv[1]), echo=lambda _: None)\n"
        # (The training build's own `import onnxruntime` loads parts of onnxruntime.training; the
        # training API, what the portable path must never need, is onnxruntime.training.api.)
        "assert 'onnxruntime.training.api' not in sys.modules, 'imported the training API'\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(task["train"])], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    path = run / CHECKPOINTS["portable"]
    adapter = load_file(str(run / "adapter.safetensors"))
    with safe_open(str(path), framework="np") as f:
        keys, meta = set(f.keys()), f.metadata()
        assert keys == {f"{kind}/{n}" for kind in ("param", "exp_avg", "exp_avg_sq") for n in adapter}
        for n in adapter:
            assert np.array_equal(f.get_tensor(f"param/{n}"), adapter[n])
            assert np.abs(f.get_tensor(f"exp_avg_sq/{n}")).max() > 0
    assert int(meta["optimizer_step"]) == 2 * 8 and int(meta["epoch"]) == 2 and int(meta["step"]) == 0
    assert path.stat().st_size < 3 * 4 * sum(a.size for a in adapter.values()) + 4096  # nothing frozen inside
    assert not (run / "checkpoint").exists() and not (run / "checkpoint.safetensors.tmp").exists()


def test_damaged_portable_checkpoint_is_a_clean_error_on_resume(tmp_path, tiny_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)  # a finished run of the default (portable) backend
    assert json.loads((run / "summary.json").read_text())["backend"] == "portable"
    (run / "adapter.safetensors").unlink()
    path = run / CHECKPOINTS["portable"]
    path.write_bytes(path.read_bytes()[:200])
    out = run_cli("train", "--run", run, "--resume")
    assert (
        out.returncode == 2 and out.stderr.splitlines()[-1].startswith("error: ") and "Traceback" not in out.stderr
    ), out.stderr
    assert str(path) in out.stderr


def test_backend_choice_follows_what_this_onnxruntime_can_run(tmp_path, tiny_bundle, tiny_run, task):
    """auto: portable (the measured default) on every onnxruntime (tiny_run: `train` without
    --backend); asking for ort-training where the installed onnxruntime has no training API is a
    one-line error (exit 2)."""
    chosen = json.loads((tiny_run / "summary.json").read_text())["backend"]
    assert chosen == "portable"
    if not TRAINING:
        out = run_cli(
            "train",
            "--bundle",
            tiny_bundle,
            "--data",
            task["train"],
            "--run",
            tmp_path / "ort",
            "--epochs",
            1,
            "--backend",
            "ort-training",
        )
        assert out.returncode == 2 and "no training API" in out.stderr and "Traceback" not in out.stderr


def test_tampered_step_graph_is_refused(tmp_path, tiny_bundle, task):
    """train/step.onnx and its initial values are listed in the manifest and checked like every file."""
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    for name in ("step.onnx", "step_init.safetensors"):
        path = bundle / "train" / name
        original = path.read_bytes()
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        out = run_cli(
            "train",
            "--bundle",
            bundle,
            "--data",
            task["train"],
            "--run",
            tmp_path / name,
            "--epochs",
            1,
            "--backend",
            "portable",
        )
        assert out.returncode == 2 and "sha256 does not match" in out.stderr and "Traceback" not in out.stderr
        path.write_bytes(original)


def test_quantized_bundle_trains_on_the_portable_backend_with_this_onnxruntime(tiny_int4_run, task):
    """An int4 bundle trains (tiny_int4_run, tests/conftest.py) and evaluates with the portable backend
    on whichever onnxruntime runs the tests (`make test`: the training build, then stock onnxruntime;
    exporters/quantize_step.py)."""
    ev = run_cli("eval", "--run", tiny_int4_run, "--data", task["test"], "--json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["accuracy"] >= 0.9
