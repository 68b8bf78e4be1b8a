"""The scale run: a real `vqt-edge train` on thousands of generated images, per K/V cache dtype.

Generates `--images` 224 px images (tests/conftest.py make_task style: a colour per class, noise, a
bright square) over the bundle's classes, then for each `--kv-dtypes` runs `vqt-edge train --kv disk`
(batch `--batch-size`, `--threads`, `--epochs`, optionally `--memory-budget`) under `/usr/bin/time -v`,
all runs in parallel or in turn (`--parallel`). Measured per run: the frozen pass (wall and the train
process's CPU seconds, from /proc every 2 s, up to the moment the K/V cache's index.json is written:
image hashing included), seconds per
epoch (wall from metrics.jsonl, CPU between the epoch lines), disk used (`du -sB1` of the run folder: blocks really used),
peak RSS (time -v and summary.json), the planner's choice. Then projects to `--project` images from
the measured parts: disk = bytes per image x N + the run's fixed files; hours = frozen CPU s per image
x N + epoch CPU s per image x N x epochs (one thread, CPU seconds: what a quiet core would take).

    nice -n 15 .venv/bin/python bench/scale_run.py --bundle BUNDLE_VIT_B16 --images 2000 --epochs 2 \\
        --memory-budget 512MB --work /tmp/scale
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def make_images(root: Path, n: int, classes: int, size: int, seed: int = 0) -> Path:
    """make_task's recipe at `size` px over `classes` colours; PNG, as a camera roll export would be."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(30, 220, (classes, 3))
    for i in range(n):
        c = i % classes
        folder = root / f"c{c:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.png"
        if path.exists():
            continue
        img = rng.integers(0, 70, (size, size, 3)) + colours[c] * rng.uniform(0.5, 1.0)
        x, y = rng.integers(0, size - 32, 2)
        img[y : y + 32, x : x + 32] = rng.integers(150, 256, 3)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)
    return root


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system) of `pid` and its live descendants (here: time -v's child)."""
    total = 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / TICK
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += tree_cpu(int(child))
    except (FileNotFoundError, ProcessLookupError, IndexError):
        pass
    return total


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def du(path: Path) -> int:
    return int(subprocess.run(["du", "-sB1", str(path)], capture_output=True, text=True).stdout.split()[0])


def one_run(args, data: Path, kv_dtype: str) -> dict:
    run = args.work / f"run-{kv_dtype}"
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "vqt_edge.cli", "train", "--bundle", str(args.bundle)]
    cmd += ["--data", str(data), "--run", str(run), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size)]
    cmd += ["--kv", "disk", "--kv-dtype", kv_dtype, "--threads", str(args.threads), "--backend", "portable"]
    if args.memory_budget:
        cmd += ["--memory-budget", args.memory_budget]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    samples: list[tuple[float, float, bool]] = []  # wall, CPU, K/V cache index written (the pass is over)
    lines: list[tuple[float, float, str]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            samples.append((time.perf_counter() - t0, tree_cpu(proc.pid), any(run.glob("kv_cache/*/index.json"))))
            stop.wait(2.0)

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.perf_counter() - t0, tree_cpu(proc.pid), line.rstrip()))
            print(kv_dtype, line.rstrip(), flush=True)

    threads = [threading.Thread(target=poll, daemon=True), threading.Thread(target=read, daemon=True)]
    for t in threads:
        t.start()
    err = proc.stderr.read() if proc.stderr else ""
    proc.wait()
    stop.set()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] if summary else []
    kv_bytes = dir_bytes(run / "kv_cache")
    full = next((s for s in samples if s[2]), samples[-1])
    epoch_lines = [(w, c) for w, c, text in lines if text.startswith("epoch=")]
    cpu_marks = [full[1]] + [c for _, c in epoch_lines]
    timev = {
        k.strip(): v.strip()
        for k, v in (ln.rsplit(": ", 1) for ln in err.splitlines() if ln.startswith("\t") and ": " in ln)
    }
    rec = {
        "kv_dtype": kv_dtype,
        "returncode": proc.returncode,
        "wall_seconds": round(wall, 1),
        "cpu_seconds": round(
            float(timev.get("User time (seconds)", 0)) + float(timev.get("System time (seconds)", 0)), 1
        ),
        "peak_rss_mib_time_v": round(int(timev.get("Maximum resident set size (kbytes)", 0)) / 1024, 1),
        "peak_rss_mib_summary": summary.get("peak_rss_mb"),
        "predicted_peak_mib": summary.get("predicted_peak_mb"),
        "budget_exceeded": summary.get("budget_exceeded"),
        "plan": re.findall(r"memory budget .*", "\n".join(t for _, _, t in lines))[:1],
        "micro_batch": summary.get("micro_batch"),
        "frozen_batch": (summary.get("memory_plan") or {}).get("frozen_batch"),
        "frozen_wall_seconds": round(full[0], 1),
        "frozen_cpu_seconds": round(full[1], 1),
        "epoch_wall_seconds": [m["seconds"] for m in metrics],
        "epoch_cpu_seconds": [round(b - a, 1) for a, b in zip(cpu_marks, cpu_marks[1:])],
        "cpu_seconds_per_step": summary.get("cpu_seconds_per_step"),
        "cpu_seconds_per_step_median": summary.get("cpu_seconds_per_step_median"),
        "seconds_per_step_median": summary.get("seconds_per_step_median"),
        "kv_cache_bytes": kv_bytes,
        "du_run_bytes": du(run),
        "stderr_tail": err.splitlines()[-40:] if proc.returncode else [],
    }
    if not args.keep:
        subprocess.run(["rm", "-rf", str(run / "kv_cache")])
    print(kv_dtype, json.dumps(rec), flush=True)
    return rec


def table(args, recs: list[dict], load: list[float]) -> str:
    n = args.images
    out = [
        f"vit_b16 (random init), {n} generated 224 px PNG images, batch {args.batch_size}, --threads {args.threads}, "
        f"--kv disk, {args.epochs} epochs, --memory-budget {args.memory_budget or 'none'}, portable backend; "
        f"runs {'in parallel' if args.parallel else 'in turn'} under nice; load average {load[0]:.1f} -> {load[1]:.1f}",
        "",
        "| --kv-dtype | plan | frozen pass wall s | frozen CPU s | CPU s / image | epoch wall s | epoch CPU s | "
        "step CPU s (median) | K/V cache MB | du run MB | peak RSS MiB (time -v) | exit |",
        "|---|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in recs:
        plan = f"micro-batch {r['micro_batch']}, frozen batch {r['frozen_batch']}"
        out.append(
            f"| {r['kv_dtype']} | {plan} | {r['frozen_wall_seconds']:.0f} | {r['frozen_cpu_seconds']:.0f} | "
            f"{r['frozen_cpu_seconds'] / n:.3f} | {', '.join(f'{s:.0f}' for s in r['epoch_wall_seconds'])} | "
            f"{', '.join(f'{s:.0f}' for s in r['epoch_cpu_seconds'])} | {r['cpu_seconds_per_step_median']} | "
            f"{r['kv_cache_bytes'] / 1e6:.0f} | {r['du_run_bytes'] / 1e6:.0f} | {r['peak_rss_mib_time_v']:.0f} | "
            f"{r['returncode']} |"
        )
    out += [
        "",
        f"Projection from the measured parts (one thread; hours = CPU seconds, what a quiet core takes; disk = "
        f"K/V bytes per image x N + the run's other files; {', '.join(map(str, args.project_epochs))} epochs):",
        "",
        "| --kv-dtype | images | disk GB | frozen pass h | "
        + " | ".join(f"{e} epochs h" for e in args.project_epochs)
        + " |",
        "|---|---:|---:|---:|" + "---:|" * len(args.project_epochs),
    ]
    for r in recs:
        per_image = r["kv_cache_bytes"] / n
        fixed = r["du_run_bytes"] - r["kv_cache_bytes"]
        frozen = r["frozen_cpu_seconds"] / n
        epoch = float(np.median(r["epoch_cpu_seconds"])) / n if r["epoch_cpu_seconds"] else float("nan")
        for big in args.project:
            hours = [(frozen * big + epoch * big * e) / 3600 for e in args.project_epochs]
            out.append(
                f"| {r['kv_dtype']} | {big:,} | {(per_image * big + fixed) / 1e9:.1f} | {frozen * big / 3600:.1f} | "
                + " | ".join(f"{h:.1f}" for h in hours)
                + " |"
            )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv-dtypes", default="fp16,int8")
    ap.add_argument("--memory-budget", default="")
    ap.add_argument("--parallel", action="store_true", help="all dtypes at once (one core each)")
    ap.add_argument("--keep", action="store_true", help="keep the K/V caches (else removed after measuring)")
    ap.add_argument("--project", default="10000,100000")
    ap.add_argument("--project-epochs", default="30,100")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "scale_run", help="writes OUT.md and OUT.json"
    )
    args = ap.parse_args()
    args.project = [int(x) for x in args.project.split(",")]
    args.project_epochs = [int(x) for x in args.project_epochs.split(",")]
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    data = make_images(args.work / "data", args.images, manifest["num_classes"], manifest["arch"]["image_size"])
    load = [os.getloadavg()[0]]
    dtypes = args.kv_dtypes.split(",")
    recs: dict[str, dict] = {}
    if args.parallel:
        workers = [threading.Thread(target=lambda d=d: recs.__setitem__(d, one_run(args, data, d))) for d in dtypes]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    else:
        for d in dtypes:
            recs[d] = one_run(args, data, d)
    load.append(os.getloadavg()[0])
    text = table(args, [recs[d] for d in dtypes], load)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "load": load, "runs": recs}, indent=2) + "\n"
    )
    args.out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
