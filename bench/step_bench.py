"""Seconds per training step, side by side: portable backend, onnxruntime-training, plain PyTorch.

docs/design.md sections 9-10. One VQT bundle (random init; T=1, query tokens in every layer), one
batch of cached K/V (random fp16 rows, as the disk/RAM cache holds them), and in a process of its
own each:

- portable      device_runner's portable backend: the step graph (train/step.onnx) on a plain
                InferenceSession, AdamW in numpy; the fp16 cache rows converted to fp32
                (device_runner/fp16.py) into the previous step's arrays, as the trainer does
- ort-training  device_runner's onnxruntime-training backend: Module/Optimizer, the same feed
- torch         what a user could write instead: the same query path + head written plainly in
                eager PyTorch (a loop over the layers) on the same cached K/V (converted to fp32
                into fresh arrays), cross-entropy, backward, torch.optim.AdamW

and, with `--kv-dtypes fp16,int8`, `portable` once more per extra cache dtype (`portable-int8`: int8
rows and per-channel scales fed to the bundle's int8-fed step graph, train/step_int8.onnx, which
dequantizes them layer by layer; `portable-int8dq`: the same rows dequantized by the runner into the
fp32 feed of train/step.onnx, device_runner/kv_int8.py, as bundles without that graph run), and with
`--stock-python PY` (an interpreter whose onnxruntime is a stock release, no training
build, e.g. make test's .venv-stock), `portable` once more there (`portable-stock`).

A step is everything the trainer does per batch: gather the rows, forward + backward, optimizer.
The first `--warmup` steps are reported apart (onnxruntime plans and allocates on its first calls);
the median of the next `--steps` is the number, in CPU seconds of the (one-thread) process, so that
other jobs on the machine do not inflate it (wall seconds are recorded too). Peak = VmHWM.

Also measured, each in its own process: where the portable step's time goes (onnxruntime's
profiler, kernel time per op type), the frozen pass (frozen.onnx, CPU seconds per image) and the
PyTorch VQT baselines of bench/memory_vs_baselines.py (official style: backbone forward with query
tokens every step; no_grad: backbone under no_grad, on fresh images every step). From these parts
the bench projects a whole VTAB-1k-style run (`--images` 1000, `--epochs` 100, batch 32): the
frozen pass once, every step, a checkpoint per epoch (docs/design.md section 10).

    .venv/bin/python bench/step_bench.py [--model vit_b16] [--batch-size 32] [--threads 1]
    .venv/bin/python bench/step_bench.py --runners portable --kv-dtypes fp16,int8 --steps-only  # the K/V cache dtypes
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"
RUNNERS = ("portable", "ort-training", "torch")
BASELINES = ("official", "nograd")  # bench/memory_vs_baselines.py's PyTorch VQT
LR, WD, CLASSES = 1e-3, 1e-4, 10


def _cache(manifest, batch: int):
    """One batch of cached features (fp16 K/V as the cache stores them, or int8 + scales with
    BENCH_KV_DTYPE=int8) and its labels."""
    import numpy as np

    from device_runner.features import FeatureStore
    from device_runner.kv_int8 import encode
    from vqt_edge.kv_cache import cache_specs

    rng = np.random.default_rng(0)
    kv_dtype = os.environ.get("BENCH_KV_DTYPE", "fp16").replace("int8dq", "int8")
    specs = manifest.spec.frozen_output_specs
    fp32 = {name: rng.standard_normal((batch, *shape), dtype=np.float32) for name, (shape, _) in specs.items()}
    arrays = {
        name: value.astype(cache_specs(specs, kv_dtype)[name][1]) for name, value in encode(fp32, kv_dtype).items()
    }
    targets = np.zeros((batch, manifest.spec.num_classes), np.float32)
    targets[np.arange(batch), rng.integers(0, manifest.spec.num_classes, batch)] = 1.0 / batch
    keep = rng.random((batch, *manifest.spec.query_keep_shape)) >= 0.1
    return FeatureStore(arrays), targets, keep.astype(np.float32) / np.float32(0.9)


def _timed(step, warmup: int, steps: int) -> dict:
    """Wall and CPU seconds of each step. With one thread, CPU time is what the step costs even
    while other processes share the cores (wall time then includes waiting for a core)."""
    wall, cpu = [], []
    for _ in range(warmup + steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    from vqt_edge.memory import peak_rss_mb

    return {
        "first_calls_cpu_s": [round(t, 3) for t in cpu[:warmup]],
        "steps_cpu_s": [round(t, 3) for t in cpu[warmup:]],
        "steps_wall_s": [round(t, 3) for t in wall[warmup:]],
        "seconds_per_step": round(statistics.median(cpu[warmup:]), 4),
        "wall_seconds_per_step": round(statistics.median(wall[warmup:]), 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def backend_step(backend, store, rows, targets, keep):
    """One training step of a vqt-edge backend on cached rows, as `_timed` calls it (also
    bench/quantized_step.py's): gather the feed (fp16 rows converted into the last step's arrays,
    as the trainer does), forward + backward, AdamW."""
    buffers: dict = {}

    def step() -> None:
        feed = store.gather(rows, backend.input_dtypes, buffers, backend.layer_major)
        buffers.update(feed)
        feed["targets"], feed["query_keep"] = targets, keep
        backend.forward(feed)
        backend.step(LR, WD)

    return step


def child(runner: str, bundle: Path, threads: int, warmup: int, steps: int) -> dict:
    import numpy as np

    from vqt_edge import manifest as mf

    manifest = mf.read_manifest(bundle, verify=False)
    batch = int(os.environ["BENCH_BATCH"])
    store, targets, keep = _cache(manifest, batch)
    rows = np.random.default_rng(1).permutation(batch)
    if runner == "torch":
        return _torch_child(manifest, store, rows, targets, keep, threads, warmup, steps)
    from device_runner import backends, ort
    from vqt_edge.memory import peak_rss_mb
    from vqt_edge.run_folder import RunFolder

    ort.block_torch()
    int8_feed = os.environ.get("BENCH_KV_DTYPE") == "int8"  # int8dq: the fp32 feed, dequantized by the runner
    backend = backends.open_backend(runner, bundle, manifest, "cpu", threads, None, int8_feed=int8_feed)

    result = _timed(backend_step(backend, store, rows, targets, keep), warmup, steps)
    with tempfile.TemporaryDirectory(dir=bundle.parent) as tmp:  # the run folder's file system
        t0 = time.perf_counter()
        path = RunFolder(tmp).checkpoint(runner)
        backend.save(path, {"epoch": 1, "step": 0, "loss_sum": 0.1, "correct": 3.0, "seen": 32.0})
        result["checkpoint_save_s"] = round(time.perf_counter() - t0, 3)
        result["checkpoint_bytes"] = path.stat().st_size
    result["peak_rss_mb_after_save"] = round(peak_rss_mb(), 1)
    return result


def profile_child(bundle: Path, threads: int, warmup: int, steps: int) -> dict:
    """Kernel seconds per step of the portable step graph by op type (onnxruntime's profiler),
    with the portable backend's own session settings, on the bench's batch."""
    import numpy as np
    from safetensors.numpy import load_file

    from device_runner import backends, ort
    from vqt_edge import manifest as mf

    ort.block_torch()
    manifest = mf.read_manifest(bundle, verify=False)
    batch = int(os.environ["BENCH_BATCH"])
    store, targets, keep = _cache(manifest, batch)
    options = backends.step_session_options(threads)
    options.enable_profiling = True
    options.profile_file_prefix = str(bundle.parent / "step_profile")
    session = ort.onnxruntime().InferenceSession(
        str(bundle / mf.STEP_MODEL),
        sess_options=options,
        providers=ort.providers("cpu"),
        disabled_optimizers=backends.STEP_DISABLED_OPTIMIZERS,
    )
    feed = store.gather(
        np.random.default_rng(1).permutation(batch),
        {i.name: np.float16 for i in session.get_inputs() if i.type == "tensor(float16)"},
    )
    feed.update(load_file(str(bundle / mf.STEP_INIT)), targets=targets, query_keep=keep)  # + the initial trainables
    for _ in range(warmup + steps):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    start = runs[warmup]
    by_op, count, by_node = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            op = e["args"]["op_name"]
            by_op[op] += e["dur"] / 1e6 / steps
            count[op] += 1
            shape = e["args"].get("output_type_shape", [{}])
            by_node[f"{op} {e['name'][:-12]} -> {list(shape[0].values())[0] if shape and shape[0] else ''}"] += (
                e["dur"] / 1e6 / steps
            )
    return {
        "kernel_s_per_step": round(sum(by_op.values()), 4),
        "by_op": {op: {"s": round(t, 4), "nodes": count[op] // steps} for op, t in by_op.most_common()},
        "top_nodes": {n: round(t, 4) for n, t in by_node.most_common(12)},
    }


def frozen_child(bundle: Path, threads: int, batch: int) -> dict:
    """CPU seconds per image of the frozen pass (frozen.onnx as the trainer runs it, one call per
    `batch` images): the part of a run that touches every image once."""
    import numpy as np

    from device_runner import ort
    from device_runner.features import FrozenBackbone
    from vqt_edge import manifest as mf
    from vqt_edge.memory import peak_rss_mb

    ort.block_torch()
    manifest = mf.read_manifest(bundle, verify=False)
    frozen = FrozenBackbone(bundle, manifest, "cpu", threads)
    *_, height, width = frozen.session.get_inputs()[0].shape  # pixel_values [B, 3, H, W]
    pixels = np.random.default_rng(0).standard_normal((batch, 3, height, width), dtype=np.float32)
    frozen(pixels)  # first call: onnxruntime plans and allocates
    cpu = []
    for _ in range(2):
        c0 = time.process_time()
        frozen(pixels)
        cpu.append((time.process_time() - c0) / batch)
    return {
        "batch": batch,
        "cpu_s_per_image": round(statistics.median(cpu), 4),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "onnxruntime": ort.onnxruntime().__version__,
    }


def _torch_child(manifest, store, rows, targets, keep, threads, warmup, steps) -> dict:
    """VQT's query path + head written plainly in PyTorch, one layer at a time (each frozen weight
    is one [B*T, D] x [D, D'] product), on the query path's own weights (exporters/vit.py QueryPath)."""
    import torch
    import torch.nn.functional as F

    from exporters.methods import build_head
    from exporters.methods.linear import head_features
    from exporters.vit import VisionTransformer

    torch.set_num_threads(threads)
    backbone = VisionTransformer(manifest.spec.arch)  # random weights: only the query path's shapes matter
    model = build_head(backbone, manifest.spec)
    del backbone
    qp, eps, d, h = model.query_path, manifest.spec.arch.eps, manifest.spec.arch.dim, manifest.spec.arch.heads
    optimizer = torch.optim.AdamW([qp.query_tokens, *model.head.parameters()], lr=LR, weight_decay=WD)
    t_targets, t_keep = torch.from_numpy(targets), torch.from_numpy(keep)

    def forward(cls, keys, values):
        zs = []
        for i in range(len(qp.query_layers)):
            p = qp.query_tokens[i] * t_keep[:, i]  # [B, T, D]
            b, t = p.shape[:2]
            q = F.layer_norm(p, (d,), qp.ln1_w[i], qp.ln1_b[i], eps) @ qp.wq[i] + qp.bq[i]
            q = q.reshape(b, t, h, d // h).transpose(1, 2)  # [B, H, T, dh]
            attn = torch.softmax(q @ keys[:, i].transpose(-2, -1) * (d // h) ** -0.5, dim=-1)
            z = p + (attn @ values[:, i]).transpose(1, 2).reshape(b, t, d) @ qp.wo[i] + qp.bo[i]
            hid = F.gelu(F.layer_norm(z, (d,), qp.ln2_w[i], qp.ln2_b[i], eps) @ qp.w1[i] + qp.b1[i])
            zs.append(z + hid @ qp.w2[i] + qp.b2[i])
        return model.head(head_features([cls] + [z.flatten(1) for z in zs], manifest.spec.feature_norm))

    def step() -> None:
        # fp32 in fresh arrays, as a plain PyTorch step allocates them, converted by vqt-edge's
        # fp16_to_fp32 (0.045 CPU s per vit_b16 tensor at batch 32 when page-faulted in; torch's
        # own `.float()` of the fp16 rows takes 0.108 s on the reference machine).
        feed = store.gather(rows)
        logits = forward(*(torch.from_numpy(feed[n]) for n in ("cls", "keys", "values")))
        loss = -(torch.log_softmax(logits, -1) * t_targets).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return _timed(step, warmup, steps)


def _subprocess_json(cmd: list[str], env: dict) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        print(out.stderr[-3000:], file=sys.stderr)
        tail = out.stderr.strip().splitlines()
        return {"error": tail[-1] if tail else f"rc {out.returncode}"}
    return json.loads(lines[-1])


def projection(results: dict, frozen: dict, baselines: dict, images: int, epochs: int, batch: int) -> list[dict]:
    """A whole run from its measured parts: vqt-edge = frozen pass once per image + every step + a
    checkpoint per epoch; PyTorch VQT = every step (its backbone runs inside each step)."""
    steps = epochs * math.ceil(images / batch)  # the last batch of an epoch counted as a full one
    rows = []
    for name in ("portable", "portable-stock", "ort-training"):
        r = results.get(name, {})
        if "seconds_per_step" not in r or "cpu_s_per_image" not in frozen:
            continue
        parts = {
            "frozen_s": images * frozen["cpu_s_per_image"],
            "steps_s": steps * r["seconds_per_step"],
            "checkpoints_s": epochs * r["checkpoint_save_s"],
        }
        rows.append(
            {
                "approach": f"vqt-edge, {name}",
                **{k: round(v) for k, v in parts.items()},
                "hours": round(sum(parts.values()) / 3600, 2),
                "peak_mb": round(max(r["peak_rss_mb_after_save"], frozen["peak_rss_mb"])),
            }
        )
    for mode, label in (("official", "PyTorch VQT, official style"), ("nograd", "PyTorch VQT, backbone under no_grad")):
        r = baselines.get(mode, {})
        if "cpu_seconds_per_step" in r:
            rows.append(
                {
                    "approach": label,
                    "frozen_s": 0,
                    "steps_s": round(steps * r["cpu_seconds_per_step"]),
                    "checkpoints_s": 0,
                    "hours": round(steps * r["cpu_seconds_per_step"] / 3600, 2),
                    "peak_mb": round(r["peak_mb"]),
                }
            )
    official = next((r["hours"] for r in rows if r["approach"].endswith("official style")), None)
    for r in rows:
        r["x_official"] = round(r["hours"] / official, 3) if official else None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_b16")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--bundle", type=Path, help="A VQT bundle; exported here (random init) if it does not exist.")
    ap.add_argument(
        "--stock-python", type=Path, help="Also run the portable step with this interpreter (stock onnxruntime)."
    )
    ap.add_argument("--images", type=int, default=1000, help="Images of the projected whole run.")
    ap.add_argument("--epochs", type=int, default=100, help="Epochs of the projected whole run.")
    ap.add_argument(
        "--baseline-steps", type=int, default=2, help="Steps of each PyTorch VQT baseline (the first is not counted)."
    )
    ap.add_argument("--no-baselines", action="store_true", help="Skip the PyTorch VQT baselines (minutes per step).")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--runners", default=",".join(RUNNERS), help="comma-separated runners to time")
    ap.add_argument(
        "--kv-dtypes", default="fp16", help="cache dtypes for the portable runner (fp16,int8,int8dq: all three)"
    )
    ap.add_argument(
        "--steps-only", action="store_true", help="only the steps: no profile, frozen pass, baselines or projection"
    )
    ap.add_argument("--child", choices=[*RUNNERS, "profile", "frozen"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "profile":
        print(json.dumps(profile_child(args.bundle, args.threads, args.warmup, args.steps)))
        return
    if args.child == "frozen":
        print(json.dumps(frozen_child(args.bundle, args.threads, int(os.environ["BENCH_FROZEN_BATCH"]))))
        return
    if args.child:
        print(json.dumps(child(args.child, args.bundle, args.threads, args.warmup, args.steps)))
        return
    from vqt_edge.memory import frozen_batch

    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "BENCH_BATCH": str(args.batch_size),
        "BENCH_FROZEN_BATCH": str(frozen_batch(args.batch_size, None)),
    }
    load = [os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or Path(tmp) / "bundle"
        if not (bundle / "manifest.json").exists():
            t0 = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "vqt_edge.cli",
                    "export",
                    "--model",
                    args.model,
                    "--random-init",
                    "--num-classes",
                    str(CLASSES),
                    "--out",
                    str(bundle),
                ],
                check=True,
                cwd=REPO,
                env=env,
            )
            print(f"exported {bundle} in {time.perf_counter() - t0:.0f} s", flush=True)
        model = json.loads((bundle / "manifest.json").read_text())["model"]
        common = [
            "--bundle",
            str(bundle),
            "--threads",
            str(args.threads),
            "--warmup",
            str(args.warmup),
            "--steps",
            str(args.steps),
        ]
        runners = [(r, sys.executable, r) for r in RUNNERS if r in args.runners.split(",")]
        if args.stock_python:
            runners.insert(1, ("portable-stock", str(args.stock_python), "portable"))
        extra = [d for d in args.kv_dtypes.split(",") if d != "fp16"]
        runners[1:1] = [
            (f"portable-{d}", sys.executable, "portable") for d in extra if "portable" in args.runners.split(",")
        ]
        results = {}
        for name, python, runner in runners:
            dtype = name.split("-")[-1] if name.split("-")[-1] in extra else "fp16"
            results[name] = _subprocess_json(
                [python, __file__, "--child", runner, *common], {**env, "BENCH_KV_DTYPE": dtype}
            )
            print(name, json.dumps(results[name]), flush=True)
        for name, python, _ in runners:
            if name.startswith("portable") and "error" not in results[name]:
                version = subprocess.run(
                    [python, "-c", "import onnxruntime; print(onnxruntime.__version__)"],
                    capture_output=True,
                    text=True,
                    env=env,
                ).stdout.strip()
                results[name]["onnxruntime"] = version
        if args.steps_only:
            _steps_only(model, args, results, load)
            return
        profile = _subprocess_json([sys.executable, __file__, "--child", "profile", *common], env)
        print("profile", json.dumps(profile), flush=True)
        frozen = _subprocess_json([sys.executable, __file__, "--child", "frozen", *common], env)
        print("frozen", json.dumps(frozen), flush=True)
    baselines = {}
    for mode in () if args.no_baselines else BASELINES:
        baselines[mode] = _subprocess_json(
            [
                sys.executable,
                str(REPO / "bench" / "memory_vs_baselines.py"),
                "--torch-child",
                mode,
                "--model",
                args.model,
                "--batch-size",
                str(args.batch_size),
                "--steps",
                str(args.baseline_steps),
                "--classes",
                str(CLASSES),
            ],
            env,
        )
        print(mode, json.dumps(baselines[mode]), flush=True)
    load.append(os.getloadavg())
    whole = projection(results, frozen, baselines, args.images, args.epochs, args.batch_size)
    lines = markdown(model, args, results, profile, frozen, whole, load)
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_bench.json").write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "load_average": load,
                "results": results,
                "profile": profile,
                "frozen": frozen,
                "baselines": baselines,
                "projection": whole,
            },
            indent=2,
        )
        + "\n"
    )
    (args.out / "step_bench.md").write_text("\n".join(lines) + "\n")


def _steps_only(model, args, results, load) -> None:
    """--steps-only: the step table alone, into step_bench_kv_dtype.{json,md}."""
    load.append(os.getloadavg())
    lines = [
        f"{model}, batch {args.batch_size}, T=1, {args.threads} thread(s); median of {args.steps} steps after "
        f"{args.warmup} warm-up steps, CPU seconds (wall in parentheses); each runner in its own process; load average "
        f"{load[0][0]:.1f} at the start, {load[-1][0]:.1f} at the end",
        "",
        "| runner | s/step | x portable (fp16) | first calls (CPU s) | peak MiB |",
        "|---|---:|---:|---|---:|",
    ]
    base = results.get("portable", {}).get("seconds_per_step")
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} | | | |")
            continue
        ratio = f"{r['seconds_per_step'] / base:.2f}" if base else "-"
        lines.append(
            f"| {name} | {r['seconds_per_step']:.3f} ({r['wall_seconds_per_step']:.3f}) | {ratio} | "
            f"{', '.join(map(str, r['first_calls_cpu_s']))} | {r['peak_rss_mb']:.0f} |"
        )
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "step_bench_kv_dtype.json").write_text(
        json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "load_average": load, "results": results}, indent=2
        )
        + "\n"
    )
    (args.out / "step_bench_kv_dtype.md").write_text("\n".join(lines) + "\n")


def markdown(model, args, results, profile, frozen, whole, load) -> list[str]:
    base = results["torch"].get("seconds_per_step")
    lines = [
        f"{model}, batch {args.batch_size}, T=1, {args.threads} thread(s); median of {args.steps} steps "
        f"after {args.warmup} warm-up steps, CPU seconds (wall in parentheses); each runner in its own process; "
        f"load average {load[0][0]:.1f} at the start, {load[-1][0]:.1f} at the end",
        "",
        "| runner | s/step | x PyTorch | first calls (CPU s) | peak MiB | checkpoint | save s |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for runner, r in results.items():
        if "error" in r:
            lines.append(f"| {runner} | failed: {r['error']} | | | | | |")
            continue
        ratio = f"{r['seconds_per_step'] / base:.2f}" if base else "-"
        ckpt = (
            f"{r['checkpoint_bytes'] / 2**20:.2f} MiB | {r['checkpoint_save_s']}"
            if "checkpoint_bytes" in r
            else "- | -"
        )
        label = f"{runner} (onnxruntime {r['onnxruntime']})" if "onnxruntime" in r else runner
        lines.append(
            f"| {label} | {r['seconds_per_step']:.3f} ({r['wall_seconds_per_step']:.3f}) | {ratio} | "
            f"{', '.join(map(str, r['first_calls_cpu_s']))} "
            f"| {r['peak_rss_mb']:.0f} | {ckpt} |"
        )
    if "by_op" in profile:
        lines += [
            "",
            f"Where the portable step's time goes (onnxruntime profiler, kernel seconds per step, "
            f"{profile['kernel_s_per_step']} s in all; wall time of each kernel, so load inflates it):",
            "",
            "| op type | s/step | share | nodes |",
            "|---|---:|---:|---:|",
        ]
        total = profile["kernel_s_per_step"]
        lines += [
            f"| {op} | {r['s']:.4f} | {100 * r['s'] / total:.1f}% | {r['nodes']} |"
            for op, r in list(profile["by_op"].items())[:8]
        ]
        lines += ["", "Largest nodes:", ""] + [f"- {n}: {t:.4f} s" for n, t in profile["top_nodes"].items()]
    if whole:
        lines += [
            "",
            f"Whole run projected from measured parts: {args.images} images, {args.epochs} epochs, batch "
            f"{args.batch_size}, {args.threads} thread(s), CPU seconds; frozen pass "
            f"{frozen.get('cpu_s_per_image')} s/image (frozen.onnx, batch {frozen.get('batch')}, onnxruntime "
            f"{frozen.get('onnxruntime')}, for every vqt-edge row), "
            "one checkpoint per epoch; PyTorch VQT steps on fresh images (backbone inside every step). "
            "Peak: the largest of the measured processes (vqt-edge: frozen pass, step + checkpoint; "
            "K/V from the disk cache, a RAM cache adds its rows).",
            "",
            "| approach | frozen pass s | steps s | checkpoints s | hours | x official | peak MiB |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['approach']} | {r['frozen_s']} | {r['steps_s']} | {r['checkpoints_s']} | {r['hours']} | "
            f"{r['x_official']} | {r['peak_mb']} |"
            for r in whole
        ]
    return lines


if __name__ == "__main__":
    main()
