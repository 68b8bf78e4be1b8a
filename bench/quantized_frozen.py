"""Frozen pass fp32 vs int8 vs int4, side by side in one run (docs/design.md sections 6 and 10).

Exports one frozen.onnx (random init, all layers' K/V), quantizes it with exporters/quantize.py,
then runs each file in its own fresh, torch-free process exactly as the trainer does
(device_runner.features.FrozenBackbone: arena off, `--threads` intra-op threads, lean_malloc):
session load peak and resident memory (VmHWM / VmRSS above the process before the load, VmHWM
reset through /proc/self/clear_refs), seconds per image at `--batch` (one warm-up call, then the
mean of `--rounds` calls on the same random batch), and K/V error against the fp32 graph's outputs
(mean |q - f| / mean |f|). Writes results.json and a markdown table to --out.

    .venv/bin/python bench/quantized_frozen.py --model vit_b16 --batch 8 --threads 1 --out bench/results/quantized_frozen
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ("fp32", "int8", "int4")


def child(args) -> None:
    sys.modules["torch"] = None  # a device process
    sys.path.insert(0, str(REPO))
    import numpy as np

    from bench.calibrate_memory import reset_peak, status
    from device_runner import ort
    from device_runner.features import FrozenBackbone
    from vqt_edge.arch import resolve_arch
    from vqt_edge.manifest import Manifest
    from vqt_edge.memory import lean_malloc
    from vqt_edge.spec import AdapterSpec

    lean_malloc()
    ort.onnxruntime()  # imported before the measurement, as in the trainer
    arch = resolve_arch(args.model)
    work = Path(args.work)
    bundle = work / args.child
    manifest = Manifest(model=args.model, spec=AdapterSpec.create(arch, "vqt", 2), mean=[0.5] * 3, std=[0.5] * 3)
    pixels = np.random.default_rng(0).standard_normal(
        (args.batch, 3, arch.image_size, arch.image_size), dtype=np.float32
    )
    base = reset_peak()
    fb = FrozenBackbone(bundle, manifest, "cpu", args.threads)
    st = status()
    rec = {
        "mode": args.child,
        "file_mib": round((bundle / "frozen.onnx").stat().st_size / 2**20, 1),
        "load_peak_mib": round(st["VmHWM"] - base, 1),
        "resident_mib": round(st["VmRSS"] - base, 1),
    }
    before = reset_peak()
    out = fb(pixels)  # warm-up
    rec["run_peak_mib"] = round(status()["VmHWM"] - before, 1)
    rec["run_outputs_mib"] = round(sum(v.nbytes for v in out.values()) / 2**20, 1)
    t0 = time.perf_counter()
    for _ in range(args.rounds):
        out = fb(pixels)
    rec["seconds_per_image"] = round((time.perf_counter() - t0) / (args.rounds * args.batch), 4)
    ref_path = work / "fp32_outputs.npz"
    if args.child == "fp32":
        np.savez(ref_path, keys=out["keys"], values=out["values"])
    else:
        ref = np.load(ref_path)
        for name in ("keys", "values"):
            rec[f"{name}_rel_error"] = round(float(np.abs(out[name] - ref[name]).mean() / np.abs(ref[name]).mean()), 4)
    print(json.dumps(rec), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="vit_b16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work", default="/tmp/vqt_quantized_frozen")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "quantized_frozen"))
    p.add_argument("--child")
    args = p.parse_args()
    if args.child:
        return child(args)
    sys.path.insert(0, str(REPO))
    from exporters.export import export_frozen
    from exporters.quantize import quantize
    from exporters.vit import VisionTransformer
    from vqt_edge.arch import resolve_arch
    from vqt_edge.spec import AdapterSpec

    work = Path(args.work)
    for mode in MODES:
        (work / mode).mkdir(parents=True, exist_ok=True)
    arch = resolve_arch(args.model)
    prep = {}
    if not (work / "fp32" / "frozen.onnx").is_file():  # files of an earlier invocation are reused
        backbone = VisionTransformer(arch)
        backbone.reset_parameters(0)
        t0 = time.perf_counter()
        export_frozen(backbone.eval(), work / "fp32" / "frozen.onnx", AdapterSpec.create(arch, "vqt", 2))
        del backbone
        prep["export_s"] = round(time.perf_counter() - t0, 1)
    for mode in MODES[1:]:
        if not (work / mode / "frozen.onnx").is_file():
            t0 = time.perf_counter()
            quantize(mode, work / "fp32" / "frozen.onnx", work / mode / "frozen.onnx")
            prep[f"quantize_{mode}_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(prep), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    for mode in MODES:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                mode,
                "--model",
                args.model,
                "--batch",
                str(args.batch),
                "--threads",
                str(args.threads),
                "--rounds",
                str(args.rounds),
                "--work",
                str(work),
            ],
            check=True,
            env=env,
            capture_output=True,
            text=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    settings = {
        "model": args.model,
        "weights": "random init, seed 0",
        "batch": args.batch,
        "threads": args.threads,
        "rounds": args.rounds,
        **prep,
    }
    (dest / "results.json").write_text(
        json.dumps({"settings": settings, "rows": rows, "load_average": os.getloadavg()}, indent=2) + "\n"
    )
    lines = [
        f"Frozen pass of {args.model} (random init), batch {args.batch}, {args.threads} thread(s), "
        f"mean of {args.rounds} calls after a warm-up; memory above the process before the session load.",
        "",
        "| frozen.onnx | file MiB | load peak MiB | resident MiB | one call's peak MiB | s / image | K rel. error | V rel. error |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['file_mib']} | {r['load_peak_mib']} | {r['resident_mib']} | "
            f"{r['run_peak_mib']} | {r['seconds_per_image']} | {r.get('keys_rel_error', '-')} | {r.get('values_rel_error', '-')} |"
        )
    (dest / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
