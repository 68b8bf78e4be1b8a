"""The frozen pass at full speed: CPU seconds per image, fp32 vs int8 frozen.onnx, by threads and batch.

Takes a bundle's fp32 frozen.onnx (`vqt-edge export --random-init`), quantizes a copy to int8 exactly
as `export --quantize int8` does (exporters/quantize.py), then, in a fresh torch-free process per
(graph, threads), runs device_runner.features.FrozenBackbone as the trainer does (lean malloc,
`--threads` intra-op threads) on real decoded images (`--images`: a folder of PNGs, e.g. the scale
run's; preprocessed by device_runner.data.load_batch). Per batch size: one warm-up call, then
`--per-batch` images' worth of calls; CPU seconds (process) and wall seconds per image. The int8
graph's K/V error against the fp32 graph's outputs on the same batch of 8 images: mean |q - f| /
mean |f| and the largest |q - f| / max |f|, for keys, values and cls.

Also, in its own process, the share of the frozen pass spent decoding and preprocessing: CPU seconds
per image of load_batch (decode, resize, normalize) on the PNGs and on JPEG copies, against the
graph's CPU seconds per image: what overlapping decoding with the frozen pass could save at most.

    nice -n 15 .venv/bin/python bench/frozen_pass.py --bundle BUNDLE_VIT_B16 --images DIR --work /tmp/fp
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
GRAPHS = ("fp32", "int8")


def _images(folder: Path, n: int, ext: str = ".png") -> list[Path]:
    return sorted(folder.rglob(f"*{ext}"))[:n]


def child(args) -> None:
    sys.modules["torch"] = None  # a device process
    sys.path.insert(0, str(REPO))
    import numpy as np

    from device_runner import ort
    from device_runner.data import load_batch
    from device_runner.features import FrozenBackbone
    from vqt_edge.manifest import read_manifest
    from vqt_edge.memory import lean_malloc

    lean_malloc()
    ort.onnxruntime()
    manifest = read_manifest(args.bundle, verify=False)
    a, work = manifest.spec.arch, Path(args.work)
    paths = _images(args.images, max(args.batches))
    if args.child == "decode":
        rec: dict = {"graph": "decode"}
        for ext in (".png", ".jpg"):
            files = _images(work / "jpeg", args.decode_images, ext) if ext == ".jpg" else paths
            files = (files * args.decode_images)[: args.decode_images]
            c0, t0 = time.process_time(), time.perf_counter()
            for i in range(0, len(files), 8):
                load_batch(files[i : i + 8], a.image_size, manifest.mean, manifest.std)
            rec[f"{ext[1:]}_cpu_s_per_image"] = round((time.process_time() - c0) / len(files), 5)
            rec[f"{ext[1:]}_wall_s_per_image"] = round((time.perf_counter() - t0) / len(files), 5)
        print(json.dumps(rec), flush=True)
        return
    fb = FrozenBackbone(work / args.child, manifest, "cpu", args.threads)
    rec = {"graph": args.child, "threads": args.threads}
    for b in args.batches:
        pixels = load_batch(paths[:b], a.image_size, manifest.mean, manifest.std)
        out = fb(pixels)  # warm-up: onnxruntime plans and allocates on a shape's first call
        calls = max(1, args.per_batch // b)
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(calls):
            out = fb(pixels)
        rec[f"b{b}_cpu_s_per_image"] = round((time.process_time() - c0) / (calls * b), 4)
        rec[f"b{b}_wall_s_per_image"] = round((time.perf_counter() - t0) / (calls * b), 4)
        if b == 8:
            ref_path = work / "fp32_b8_outputs.npz"
            if args.child == "fp32" and not ref_path.exists():
                np.savez(ref_path, **out)
            elif args.child != "fp32":
                ref = np.load(ref_path)
                for name, value in out.items():
                    diff = np.abs(value - ref[name])
                    rec[f"{name}_rel_error"] = round(float(diff.mean() / np.abs(ref[name]).mean()), 4)
                    rec[f"{name}_max_rel_error"] = round(float(diff.max() / np.abs(ref[name]).max()), 4)
    print(json.dumps(rec), flush=True)


def run_child(args, name: str, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--bundle", str(args.bundle), "--images", str(args.images)]
    cmd += ["--work", str(args.work), "--threads", str(threads), "--per-batch", str(args.per_batch)]
    cmd += ["--batches", ",".join(map(str, args.batches)), "--decode-images", str(args.decode_images)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
    rec = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(rec), flush=True)
    return rec


def table(args, rows: list[dict], decode: dict, load: list[float]) -> str:
    bs = args.batches
    out = [
        f"Frozen pass of vit_b16 (random init) on decoded 224 px PNG images; each graph and thread count in a fresh "
        f"process, one warm-up call per batch size, then {args.per_batch} images' worth of calls (one call at "
        f"batch {max(bs)}); all in one run, under nice; load average {load[0]:.1f} -> {load[1]:.1f} on 2 cores.",
        "",
        "CPU seconds per image (process CPU time: all threads):",
        "",
        "| frozen.onnx | threads | " + " | ".join(f"batch {b}" for b in bs) + " |",
        "|---|---:|" + "---:|" * len(bs),
    ]
    for r in rows:
        out.append(
            f"| {r['graph']} | {r['threads']} | " + " | ".join(f"{r[f'b{b}_cpu_s_per_image']:.3f}" for b in bs) + " |"
        )
    out += [
        "",
        "Wall seconds per image (inflated by the machine's other jobs; at 2 threads, the speed a quiet device would see "
        "only when both cores are free):",
        "",
        "| frozen.onnx | threads | " + " | ".join(f"batch {b}" for b in bs) + " |",
        "|---|---:|" + "---:|" * len(bs),
    ]
    for r in rows:
        out.append(
            f"| {r['graph']} | {r['threads']} | " + " | ".join(f"{r[f'b{b}_wall_s_per_image']:.3f}" for b in bs) + " |"
        )
    err = next(r for r in rows if r["graph"] == "int8")
    out += [
        "",
        "int8 frozen.onnx against fp32, same 8 images (mean |q - f| / mean |f|; largest |q - f| / max |f|):",
        "",
        "| output | mean rel. error | max rel. error |",
        "|---|---:|---:|",
    ]
    for name in ("keys", "values", "cls"):
        if f"{name}_rel_error" in err:
            out.append(f"| {name} | {err[f'{name}_rel_error']} | {err[f'{name}_max_rel_error']} |")
    fp32_1 = next(r for r in rows if r["graph"] == "fp32" and r["threads"] == 1)
    graph = fp32_1["b8_cpu_s_per_image"]
    out += [
        "",
        "Decoding + preprocessing (device_runner.data.load_batch, batches of 8, one thread) against the fp32 graph "
        "at batch 8, one thread:",
        "",
        "| images | decode CPU s / image | graph CPU s / image | decode share of the pass |",
        "|---|---:|---:|---:|",
    ]
    for ext in ("png", "jpg"):
        d = decode[f"{ext}_cpu_s_per_image"]
        out.append(f"| {ext} | {d:.4f} | {graph:.3f} | {100 * d / (d + graph):.1f}% |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--images", type=Path, required=True, help="a folder of PNG images (searched recursively)")
    p.add_argument("--threads-list", default="1,2")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--per-batch", type=int, default=16, help="images timed per batch size (at least one call)")
    p.add_argument("--decode-images", type=int, default=64)
    p.add_argument("--work", type=Path, default=Path("/tmp/vqt_frozen_pass"))
    p.add_argument(
        "--out", type=Path, default=REPO / "bench" / "results" / "frozen_pass", help="writes OUT.md and OUT.json"
    )
    p.add_argument("--child")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    args.batches = [int(b) for b in str(args.batches).split(",")]
    if args.child:
        return child(args)
    sys.path.insert(0, str(REPO))
    from PIL import Image

    from exporters.quantize import quantize

    for g in GRAPHS:
        (args.work / g).mkdir(parents=True, exist_ok=True)
    fp32 = args.work / "fp32" / "frozen.onnx"
    if not fp32.exists():
        fp32.symlink_to((args.bundle / "frozen.onnx").resolve())
    if not (args.work / "int8" / "frozen.onnx").exists():
        quantize("int8", fp32, args.work / "int8" / "frozen.onnx")
    (args.work / "fp32_b8_outputs.npz").unlink(missing_ok=True)
    jpeg = args.work / "jpeg"
    jpeg.mkdir(exist_ok=True)
    for i, path in enumerate(_images(args.images, args.decode_images)):
        Image.open(path).convert("RGB").save(jpeg / f"{i:04d}.jpg", quality=90)
    load = [os.getloadavg()[0]]
    rows = [run_child(args, g, t) for g in GRAPHS for t in map(int, args.threads_list.split(","))]
    decode = run_child(args, "decode", 1)
    load.append(os.getloadavg()[0])
    text = table(args, rows, decode, load)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "load": load, "rows": rows, "decode": decode}, indent=2
        )
        + "\n"
    )
    args.out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
