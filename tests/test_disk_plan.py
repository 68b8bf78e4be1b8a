"""Disk planned like memory (vqt_edge/memory/disk.py): `plan` prints the disk side, `train --disk-budget`
refuses up front when nothing fits and otherwise keeps the run folder within it (measured with du)."""

from __future__ import annotations

import json
import subprocess

from tests.conftest import run_cli


def _plan(bundle, *args) -> dict:
    out = run_cli("plan", "--bundle", bundle, "--memory-budget", "2GB", "--images", 120, "--json", *args)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_plan_prints_the_disk_side_and_int8_halves_the_cache(tiny_bundle):
    fp16, int8 = (_plan(tiny_bundle, "--kv", "disk", "--kv-dtype", d) for d in ("fp16", "int8"))
    assert fp16["kv_dtype"] == "fp16" and int8["kv_dtype"] == "int8"
    assert 0 < int8["disk_mb"]["kv_cache"] < 0.7 * fp16["disk_mb"]["kv_cache"]
    assert _plan(tiny_bundle, "--kv", "ram")["disk_mb"]["kv_cache"] == 0
    text = run_cli("plan", "--bundle", tiny_bundle, "--memory-budget", "2GB", "--images", 120)
    assert text.returncode == 0 and "disk " in text.stdout and "kv_cache" in text.stdout


def test_train_refuses_a_disk_budget_nothing_fits_before_any_work(tiny_bundle, task, tmp_path):
    out = run_cli(
        "train",
        "--bundle",
        tiny_bundle,
        "--data",
        task["train"],
        "--run",
        tmp_path / "run",
        "--epochs",
        1,
        "--kv",
        "disk",
        "--disk-budget",
        "64KB",
    )
    assert out.returncode == 2, out.stderr
    assert "no configuration fits a disk budget of 0 MiB" in out.stderr and "--disk-budget" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "run" / "run.json").exists()


def test_a_disk_budget_between_int8_and_fp16_trains_int8_within_it(tiny_bundle, task, tmp_path):
    fp16, int8 = (_plan(tiny_bundle, "--kv", "disk", "--kv-dtype", d) for d in ("fp16", "int8"))
    budget = (fp16["disk_total_mb"] + int8["disk_total_mb"]) / 2
    assert int8["disk_total_mb"] <= budget < fp16["disk_total_mb"]
    run = tmp_path / "run"
    out = run_cli(
        "train",
        "--bundle",
        tiny_bundle,
        "--data",
        task["train"],
        "--run",
        run,
        "--epochs",
        2,
        "--kv",
        "disk",
        "--disk-budget",
        f"{budget}MB",
        "--checkpoint-every",
        2,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["kv_dtype"] == "int8" and summary["disk_plan"]["disk_budget_mb"] == round(budget)
    used_kib = int(
        subprocess.run(["du", "-sk", str(run)], capture_output=True, text=True, check=True).stdout.split()[0]
    )
    assert used_kib / 1024 <= budget, (used_kib, budget)
