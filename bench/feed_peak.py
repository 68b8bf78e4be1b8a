"""VQT's peak and step on vit_b16 with the sweep's VQT run, configuration by configuration, side by side.

The run is what `vqt-edge sweep --model vit_b16 --random-init --methods vqt --last-k 12
--batch-size 32 --steps 3 --kv disk` makes for VQT: `train --epochs 1 --batch-size 32 --kv disk` on
96 generated 224 px images (here 2 epochs, 6 steps, so that the step's median is over 5 steps after
the first), at `--threads 1` so that CPU seconds compare. Each configuration is a fresh `vqt-edge
train` process in a fresh run folder; the peak and phase peaks are summary.json's (VmHWM), the step
its `cpu_seconds_per_step_median`. `--before CMD` adds the same run by another vqt-edge (e.g. the
previous release's, on the same bundle) as the first row.

    .venv/bin/python bench/feed_peak.py --bundle B16 [--before /path/to/old/.venv/bin/vqt-edge]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {  # label -> extra train arguments
    "defaults": [],
    "--micro-batch 16": ["--micro-batch", "16"],
    "--kv-dtype fp16": ["--kv-dtype", "fp16"],
}


def run(cli: list[str], bundle: Path, images: Path, folder: Path, extra: list[str]) -> dict:
    shutil.rmtree(folder, ignore_errors=True)
    cmd = [*cli, "train", "--bundle", str(bundle), "--data", str(images), "--run", str(folder)]
    cmd += ["--epochs", "2", "--batch-size", "32", "--kv", "disk", "--threads", "1", *extra]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    s = json.loads((folder / "summary.json").read_text())
    return {
        "kv_dtype": s["kv_dtype"],
        "frozen_batch": s["memory_plan"]["frozen_batch"],
        "micro_batch": s["micro_batch"] or 32,
        "peak_mb": s["peak_rss_mb"],
        "predicted_peak_mb": s["predicted_peak_mb"],
        "phases_mb": s["peak_rss_mb_after"],
        "step_cpu_s_median": s["cpu_seconds_per_step_median"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="a vit_b16 vqt bundle (export --random-init)")
    p.add_argument("--before", help="another vqt-edge executable to run first, labelled 'before'")
    p.add_argument("--work", type=Path, default=Path("/tmp/vqt_feed_peak"))
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "feed_peak_defaults")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from vqt_edge.sweep import random_images

    images = args.work / "images"
    if not images.exists():
        random_images(images, 96, 224, 2)
    rows = {}
    cli = [sys.executable, "-m", "vqt_edge.cli"]
    todo = ([("before", [args.before], [])] if args.before else []) + [(k, cli, v) for k, v in CONFIGS.items()]
    load = os.getloadavg()[0]
    for label, command, extra in todo:
        rows[label] = run(command, args.bundle, images, args.work / "runs" / label.strip("-").replace(" ", "_"), extra)
        print(label, json.dumps(rows[label]), flush=True)
    lines = [
        f"vit_b16 random init, `train --epochs 2 --batch-size 32 --kv disk --threads 1` on 96 generated images, "
        f"each configuration a fresh process; load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
        "",
        "| configuration | cache | frozen batch | micro-batch | peak MiB | predicted | frozen phase | step CPU s (median) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in rows.items():
        lines.append(
            f"| {label} | {r['kv_dtype']} | {r['frozen_batch']} | {r['micro_batch']} | {r['peak_mb']:.1f} | "
            f"{r['predicted_peak_mb']:.1f} | {r['phases_mb'].get('frozen', float('nan')):.1f} | {r['step_cpu_s_median']:.3f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
