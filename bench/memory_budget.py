"""`train --memory-budget` kept or refused, per backend: predicted against measured peaks (docs/design.md section 6).

Each configuration is one real `vqt-edge train` process (one epoch, --threads 1) under
`/usr/bin/time -v`; its "Maximum resident set size" is the measured peak, summary.json holds the
plan the run chose and its predicted peak. Writes bench/results/memory_budget.json and .md.

    .venv/bin/python bench/memory_budget.py --bundle B16_BUNDLE [--images 64] [--budgets 512MB,1000MB,2000MB]
        [--backends auto,ort-training] [--test]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"


def run_one(bundle: Path, data: Path, run: Path, budget: str, backend: str, batch: int, test: bool) -> dict:
    cmd = [
        "/usr/bin/time",
        "-v",
        sys.executable,
        "-m",
        "vqt_edge.cli",
        "train",
        "--bundle",
        str(bundle),
        "--data",
        str(data),
        "--run",
        str(run),
        "--epochs",
        "1",
        "--batch-size",
        str(batch),
        "--threads",
        "1",
        "--memory-budget",
        budget,
        "--backend",
        backend,
        *(["--test", str(data)] if test else []),
    ]
    out = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    return record(budget, backend, test, out.returncode, out.stdout + out.stderr, run)


def record(budget: str, backend: str, test: bool, rc: int, log: str, run: Path) -> dict:
    """One row: what the run chose, its predicted and its measured peak (time -v, MiB)."""
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log)
    rec = {
        "budget": budget,
        "backend_asked": backend,
        "test": test,
        "exit": rc,
        "measured_mb": round(int(peak.group(1)) / 1024, 1) if peak else None,
    }
    refused = re.search(r"error: (.*)", log)
    if refused:
        rec["error"] = refused.group(1)
    summary = run / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        rec.update(
            plan=s["memory_plan"],
            predicted_mb=s["predicted_peak_mb"],
            vmhwm_mb=s["peak_rss_mb"],
            phases_measured=s["peak_rss_mb_after"],
            seconds_per_step=s["seconds_per_step"],
        )
        ckpt = next((p for p in (run / "checkpoint.safetensors", run / "checkpoint") if p.exists()), None)
        rec["checkpoint_bytes"] = ckpt.stat().st_size if ckpt else None
    return rec


def markdown(records: list[dict], title: str) -> str:
    lines = [
        title,
        "",
        "| --memory-budget | --backend | chose | predicted MiB | measured MiB (time -v) | checkpoint |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in records:
        if "plan" in r:
            p = r["plan"]
            chose = f"{p['backend']}, kv {p['kv']}, micro-batch {p['micro_batch']}, frozen batch {p['frozen_batch']}"
            ckpt = f"{r['checkpoint_bytes'] / 2**20:.2f} MiB" if r.get("checkpoint_bytes") else ""
            lines.append(
                f"| {r['budget']}{' + --test' if r['test'] else ''} | {r['backend_asked']} | {chose} | "
                f"{r['predicted_mb']:.0f} | {r['measured_mb']:.0f} | {ckpt} |"
            )
        else:
            lines.append(
                f"| {r['budget']} | {r['backend_asked']} | exit {r['exit']}: {r.get('error', '')} | - | "
                f"{r['measured_mb']} | |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", required=True, type=Path)
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--budgets", default="512MB,1000MB,2000MB")
    p.add_argument("--backends", default="auto,ort-training")
    p.add_argument("--test", action="store_true", help="also one run per backend with --test at the middle budget")
    args = p.parse_args()
    from vqt_edge.manifest import read_manifest
    from vqt_edge.sweep import random_images

    work = Path(tempfile.mkdtemp(prefix="memory_budget_"))
    try:
        m = read_manifest(args.bundle, verify=False)
        data = random_images(work / "images", args.images, m.spec.arch.image_size, m.spec.num_classes)
        todo = [(b, be, False) for be in args.backends.split(",") for b in args.budgets.split(",")]
        if args.test:
            todo += [
                (args.budgets.split(",")[len(args.budgets.split(",")) // 2], be, True)
                for be in args.backends.split(",")
            ]
        records = []
        for i, (budget, backend, test) in enumerate(todo):
            records.append(run_one(args.bundle, data, work / f"run{i}", budget, backend, args.batch_size, test))
            print(json.dumps(records[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory_budget.json").write_text(json.dumps(records, indent=2) + "\n")
    title = (
        f"`train --memory-budget`, {args.bundle.name}, {args.images} images, batch {args.batch_size}, one epoch, "
        "--threads 1; measured: /usr/bin/time -v maximum resident set size"
    )
    (RESULTS / "memory_budget.md").write_text(markdown(records, title))
    print(markdown(records, title))


if __name__ == "__main__":
    main()
