"""`vqt-edge info` in this environment (tests/test_devices.py runs it on aarch64 and Python 3.13): the
plan it names is the plan `train` chose for the same bundle and data."""

from __future__ import annotations

import json
import platform
import sys

from tests.conftest import run_cli


def test_info_names_the_plan_train_chose(tiny_bundle, task, tiny_run, tmp_path):
    out = run_cli("info", "--bundle", tiny_bundle, "--data", task["train"], "--run", tmp_path / "new" / "run", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["machine"]["architecture"] == platform.machine()
    assert info["python"]["version"] == platform.python_version() and info["python"]["executable"] == sys.executable
    assert info["disk"]["checked"] == str(tmp_path) and info["disk"]["free_mb"] > 0
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert info["bundle"]["images"] == summary["train_images"] == 120
    assert info["bundle"]["default_plan"] == summary["memory_plan"]
    smallest = info["bundle"]["smallest_budget_mb"]
    assert smallest == info["bundle"]["smallest_plan"]["needs_mb"] <= summary["memory_plan"]["needs_mb"]


def test_info_text_and_bad_options(tiny_bundle, task):
    out = run_cli("info")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("vqt-edge ") and "CPUExecutionProvider" in out.stdout
    assert "backend       portable: can run" in out.stdout and "bundle" not in out.stdout
    out = run_cli("info", "--data", task["train"])
    assert out.returncode == 2 and out.stderr.startswith("error: --data needs --bundle")
