"""Issue 12, `vqt-edge tune`: an lr x weight-decay grid on one frozen pass, resumable per configuration."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from device_runner.tune import choose, table, workspace
from tests.conftest import REPO, run_cli
from tests.test_faults import CLI, ENV, wait_for

GRID = ["--lrs", "0.003,0.01,0.03", "--weight-decays", "0,0.01", "--epochs", 2, "--batch-size", 16, "--seed", 1]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_bundle, task) -> Path:
    run = tmp_path_factory.mktemp("tune") / "best"
    out = run_cli("tune", "--bundle", tiny_bundle, "--data", task["train"], "--run", run, *GRID)
    assert out.returncode == 0, out.stderr
    assert "*" in out.stdout and "chosen: lr" in out.stdout
    return run


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def assert_same_result(a: Path, b: Path) -> None:
    """Same model.onnx bytes and same adapter tensors (the adapter file's metadata order is not
    stable across processes: safetensors writes it from a hash map)."""
    assert _summary(a)["files"]["model.onnx"] == _summary(b)["files"]["model.onnx"]
    ta, tb = load_file(str(a / "adapter.safetensors")), load_file(str(b / "adapter.safetensors"))
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)


def test_tune_runs_the_frozen_pass_once_for_a_3x2_grid(tuned, task):
    result = json.loads((workspace(tuned) / "tune.json").read_text())
    assert len(result["grid"]) == 6 and {(r["lr"], r["weight_decay"]) for r in result["grid"]} == {
        (lr, wd) for lr in (0.003, 0.01, 0.03) for wd in (0.0, 0.01)
    }
    # 7 trainings (6 configurations + the final run), one frozen pass over the 120 images.
    assert result["images"] == 120
    assert result["frozen_passes"] == 1 and result["frozen_images"] == 120
    for row in result["grid"]:  # seeded per-class 80/20 split
        assert (row["train_images"], row["val_images"]) == (96, 24)
        assert row["val_acc"] == _summary(workspace(tuned) / row["run"])["final"]["val_acc"]
    best = choose(result["grid"])
    assert result["best"] == {"lr": best["lr"], "weight_decay": best["weight_decay"], "val_acc": best["val_acc"]}
    final = json.loads((tuned / "run.json").read_text())["config"]
    assert (final["lr"], final["weight_decay"], final["val_split"]) == (best["lr"], best["weight_decay"], 0.0)
    assert _summary(tuned)["train_images"] == 120
    assert table(result).count("*") == 1
    out = run_cli("eval", "--run", tuned, "--data", task["test"], "--json")  # an ordinary run folder
    assert out.returncode == 0, out.stderr and 0 <= json.loads(out.stdout)["accuracy"] <= 1


def test_a_configuration_equals_a_separate_train_run(tuned, tmp_path, tiny_bundle, task):
    """The shared K/V serve each run exactly the rows a run of its own would compute."""
    row = json.loads((workspace(tuned) / "tune.json").read_text())["grid"][3]
    run = tmp_path / "alone"
    out = run_cli(
        "train",
        "--bundle",
        tiny_bundle,
        "--data",
        task["train"],
        "--run",
        run,
        "--lr",
        row["lr"],
        "--weight-decay",
        row["weight_decay"],
        "--val-split",
        0.2,
        "--epochs",
        2,
        "--batch-size",
        16,
        "--seed",
        1,
    )
    assert out.returncode == 0, out.stderr
    assert_same_result(run, workspace(tuned) / row["run"])


def test_killed_tune_resumes_per_configuration(tuned, tmp_path, tiny_bundle, task):
    run = tmp_path / "best"
    space = workspace(run)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            CLI,
            "tune",
            "--bundle",
            str(tiny_bundle),
            "--data",
            str(task["train"]),
            "--run",
            str(run),
            *map(str, GRID),
        ],
        cwd=REPO,
        env=ENV,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first = space / "lr0.003_wd0" / "summary.json"
    wait_for(first.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = {p.parent.name: p.stat().st_mtime_ns for p in space.glob("*/summary.json")}
    assert 1 <= len(done) < 6 and not (run / "summary.json").exists()

    again = run_cli("tune", "--bundle", tiny_bundle, "--data", task["train"], "--run", run, *GRID)
    assert again.returncode == 2 and "--resume" in again.stderr  # never silently restarts
    out = run_cli("tune", "--run", run, "--resume")
    assert out.returncode == 0, out.stderr
    for name, mtime in done.items():  # finished configurations were kept, not retrained
        assert (space / name / "summary.json").stat().st_mtime_ns == mtime
    ref = json.loads((workspace(tuned) / "tune.json").read_text())
    got = json.loads((space / "tune.json").read_text())
    assert got["best"] == ref["best"] and got["frozen_passes"] == 1
    for a, b in zip(got["grid"], ref["grid"]):
        assert_same_result(space / a["run"], workspace(tuned) / b["run"])
    assert_same_result(run, tuned)


def test_tune_refuses_bad_grids_and_nothing_to_resume(tmp_path, tiny_bundle, task):
    for extra in (["--lrs", "0.01,x"], ["--lrs", "-1"], ["--weight-decays", "-0.1"]):
        out = run_cli("tune", "--bundle", tiny_bundle, "--data", task["train"], "--run", tmp_path / "r", *extra)
        assert out.returncode == 2 and out.stderr.startswith("error:"), (extra, out.stderr)
    out = run_cli("tune", "--run", tmp_path / "nothing", "--resume")
    assert out.returncode == 2 and out.stderr.startswith("error:")
