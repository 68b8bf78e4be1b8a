"""The portable step graph of none / int8 / int4 bundles, side by side: file, resident memory, CPU
seconds per step (docs/design.md sections 6 and 9; exporters/quantize_step.py).

Each bundle in a fresh torch-free process, one thread: the portable backend opens train/step.onnx
exactly as `train --backend portable` does (device_runner/backends.py), then runs `--warmup` + `--steps`
training steps (gather from a random fp16 K/V batch, forward + gradients, AdamW), as
bench/step_bench.py does. Reported: VmRSS before and after opening the session (the difference is
what the session holds), the median CPU seconds of a step, and VmHWM at the end.

    .venv/bin/python bench/quantized_step.py BUNDLE_NONE BUNDLE_INT8 BUNDLE_INT4 [--batch-size 32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
OUT = REPO / "bench" / "results" / "quantized_step"


def _status(key: str) -> float:
    """A /proc/self/status field in MiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def child(bundle: Path, threads: int, batch: int, warmup: int, steps: int) -> dict:
    import numpy as np

    from bench.step_bench import _cache, _timed, backend_step
    from device_runner import backends, ort
    from vqt_edge import manifest as mf

    ort.block_torch()
    ort.onnxruntime()
    manifest = mf.read_manifest(bundle, verify=False)
    store, targets, keep = _cache(manifest, batch)
    rows = np.random.default_rng(1).permutation(batch)
    before = _status("VmRSS")
    backend = backends.open_backend("portable", bundle, manifest, "cpu", threads, None)
    loaded = _status("VmRSS")
    hwm_load = _status("VmHWM")

    result = _timed(backend_step(backend, store, rows, targets, keep), warmup, steps)
    return {
        "quantize": manifest.quantize,
        "step_file_mib": round((bundle / mf.STEP_MODEL).stat().st_size / 2**20, 1),
        "rss_before_session_mib": round(before, 1),
        "session_resident_mib": round(loaded - before, 1),
        "peak_after_load_mib": round(hwm_load, 1),
        "rss_after_steps_mib": round(_status("VmRSS"), 1),
        **result,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="*", type=Path)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.threads, args.batch_size, args.warmup, args.steps)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    rows = []
    for bundle in args.bundles:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(bundle),
                "--threads",
                str(args.threads),
                "--batch-size",
                str(args.batch_size),
                "--warmup",
                str(args.warmup),
                "--steps",
                str(args.steps),
            ],
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
        )
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    model = json.loads((args.bundles[0] / "manifest.json").read_text())["model"]
    lines = [
        f"{model} (random init), VQT T=1, portable backend, batch {args.batch_size}, {args.threads} thread(s); "
        f"median CPU seconds of {args.steps} steps after {args.warmup} warm-up steps; each bundle in its own process",
        "",
        "| step graph | file MiB | session resident MiB | peak MiB | s / step (CPU) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['quantize']} | {r['step_file_mib']:.1f} | {r['session_resident_mib']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {r['seconds_per_step']:.3f} |"
        )
    print("\n".join(lines))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": rows}, indent=2) + "\n"
    )
    (OUT / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
