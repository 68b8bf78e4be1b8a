"""The step as a user sees it: a real `vqt-edge train` against bench/step_bench.py's step, in one run.

Generates `--images` noise images over the bundle's classes, trains `--epochs` epochs with each
`--kv` mode (a real CLI process each, `--threads`, portable backend), and times bench/step_bench.py's
portable step (a process of its own, the same bundle and batch) in between. Reports, from each
run's summary.json, the CPU seconds per step (median, mean, mean after the first step) and their
ratio to the bench's median step (CPU seconds: other jobs on a shared machine inflate wall time;
wall seconds per step are in the table too).

    .venv/bin/python bench/real_step.py --bundle BUNDLE_VIT_B16 --label after
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent


def make_images(root: Path, n: int, classes: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"c{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv", default="ram,disk")
    ap.add_argument("--kv-dtype", default="fp16")
    ap.add_argument("--label", default="now")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = ap.parse_args()
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "BENCH_BATCH": str(args.batch_size),
        "PYTHONPATH": str(REPO),
    }
    load = [os.getloadavg()[0]]
    rows: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_images(Path(tmp) / "data", args.images, manifest["num_classes"], manifest["arch"]["image_size"])
        for kv in args.kv.split(","):
            run = Path(tmp) / f"run-{kv}"
            cmd = [
                sys.executable,
                "-m",
                "vqt_edge.cli",
                "train",
                "--bundle",
                str(args.bundle),
                "--data",
                str(data),
                "--run",
                str(run),
                "--epochs",
                str(args.epochs),
                "--batch-size",
                str(args.batch_size),
                "--kv",
                kv,
                "--threads",
                str(args.threads),
                "--backend",
                "portable",
                "--kv-dtype",
                args.kv_dtype,
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
            if out.returncode != 0:
                raise SystemExit(out.stderr)
            summary = json.loads((run / "summary.json").read_text())
            metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            rows[kv] = {
                k: summary.get(k)
                for k in (
                    "seconds_per_step",
                    "seconds_per_step_median",
                    "cpu_seconds_per_step",
                    "cpu_seconds_per_step_median",
                    "first_step_cpu_seconds",
                    "cpu_seconds_per_step_after_first",
                    "peak_rss_mb",
                )
            }
            rows[kv]["epoch_seconds"] = [m["seconds"] for m in metrics]
            files = [f for f in (run / "kv_cache").rglob("*") if f.is_file()]
            rows[kv]["kv_cache_bytes"] = sum(f.stat().st_size for f in files if f.name != "index.json")
            print(kv, json.dumps(rows[kv]), flush=True)
        bench = subprocess.run(
            [
                sys.executable,
                str(REPO / "bench" / "step_bench.py"),
                "--child",
                "portable",
                "--bundle",
                str(args.bundle),
                "--threads",
                str(args.threads),
                "--warmup",
                "2",
                "--steps",
                "5",
            ],
            capture_output=True,
            text=True,
            env={**env, "BENCH_KV_DTYPE": args.kv_dtype},
            cwd=REPO,
        )
        step = json.loads(bench.stdout.strip().splitlines()[-1])
    load.append(os.getloadavg()[0])
    base = step["seconds_per_step"]
    lines = [
        f"{manifest['model']}, {args.images} images, batch {args.batch_size}, {args.epochs} epochs, {args.threads} thread(s), "
        f"portable backend, {args.kv_dtype} cache ({args.label}); CPU seconds per step; bench/step_bench.py's portable "
        f"step (median of 5 after 2 warm-up) {base:.3f}; load average {load[0]:.1f} -> {load[1]:.1f}",
        "",
        "| --kv | median | mean | mean after the first | first | x bench (median) | x bench (after first) "
        "| wall median | wall mean |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kv, r in rows.items():
        lines.append(
            f"| {kv} | {r['cpu_seconds_per_step_median']:.3f} | {r['cpu_seconds_per_step']:.3f} | "
            f"{r['cpu_seconds_per_step_after_first']:.3f} | {r['first_step_cpu_seconds']:.3f} | "
            f"{r['cpu_seconds_per_step_median'] / base:.2f} | {r['cpu_seconds_per_step_after_first'] / base:.2f} | "
            f"{r['seconds_per_step_median']:.3f} | {r['seconds_per_step']:.3f} |"
        )
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"real_step_{args.label}"
    (args.out / f"{name}.json").write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "load": load, "bench_step": step, "runs": rows},
            indent=2,
        )
        + "\n"
    )
    (args.out / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
