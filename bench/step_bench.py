"""Seconds per training step, side by side: portable backend, onnxruntime-training, plain PyTorch.

docs/design.md sections 9-10. One VQT bundle (random init; T=1, query tokens in every layer), one
batch of cached K/V (random fp16 rows, as the disk/RAM cache holds them), and in a process of its
own each:

- portable      device_runner's portable backend: the step graph (train/step.onnx) on a plain
                InferenceSession, AdamW in numpy, the feed gathered from the fp16 cache as is
- ort-training  device_runner's onnxruntime-training backend: Module/Optimizer, the feed
                gathered from the same cache and converted to fp32 (what its graph takes)
- torch         what a user could write instead: the same query path + head written plainly in
                eager PyTorch (a loop over the layers) on the same cached K/V (converted to fp32),
                cross-entropy, backward, torch.optim.AdamW

A step is everything the trainer does per batch: gather the rows, forward + backward, optimizer.
The first `--warmup` steps are reported apart (onnxruntime plans and allocates on its first calls);
the median of the next `--steps` is the number, in CPU seconds of the (one-thread) process, so that
other jobs on the machine do not inflate it (wall seconds are recorded too). Peak = VmHWM.

    .venv/bin/python bench/step_bench.py [--model vit_b16] [--batch-size 32] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
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
LR, WD, CLASSES = 1e-3, 1e-4, 10


def _cache(manifest, batch: int):
    """One batch of cached features (fp16 K/V as the cache stores them) and its labels."""
    import numpy as np

    from device_runner.features import FeatureStore

    rng = np.random.default_rng(0)
    arrays = {name: rng.standard_normal((batch, *shape), dtype=np.float32).astype(dtype)
              for name, (shape, dtype) in manifest.spec.frozen_output_specs.items()}
    targets = np.zeros((batch, manifest.spec.num_classes), np.float32)
    targets[np.arange(batch), rng.integers(0, manifest.spec.num_classes, batch)] = 1.0 / batch
    keep = (rng.random((batch, *manifest.spec.query_keep_shape)) >= 0.1)
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

    return {"first_calls_cpu_s": [round(t, 3) for t in cpu[:warmup]], "steps_cpu_s": [round(t, 3) for t in cpu[warmup:]],
            "steps_wall_s": [round(t, 3) for t in wall[warmup:]],
            "seconds_per_step": round(statistics.median(cpu[warmup:]), 4),
            "wall_seconds_per_step": round(statistics.median(wall[warmup:]), 4), "peak_rss_mb": round(peak_rss_mb(), 1)}


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
    from vqt_edge.run_folder import RunFolder
    from vqt_edge.memory import peak_rss_mb

    ort.block_torch()
    backend = backends.open_backend(runner, bundle, manifest, "cpu", threads, None)

    def step() -> None:
        feed = store.gather(rows, backend.input_dtypes)
        feed["targets"], feed["query_keep"] = targets, keep
        backend.forward(feed)
        backend.step(LR, WD)

    result = _timed(step, warmup, steps)
    with tempfile.TemporaryDirectory(dir=bundle.parent) as tmp:  # the run folder's file system
        t0 = time.perf_counter()
        path = RunFolder(tmp).checkpoint(runner)
        backend.save(path, {"epoch": 1, "step": 0, "loss_sum": 0.1, "correct": 3.0, "seen": 32.0})
        result["checkpoint_save_s"] = round(time.perf_counter() - t0, 3)
        result["checkpoint_bytes"] = path.stat().st_size
    result["peak_rss_mb_after_save"] = round(peak_rss_mb(), 1)
    return result


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
        feed = store.gather(rows)  # fp32, as a PyTorch user would convert the fp16 cache
        logits = forward(*(torch.from_numpy(feed[n]) for n in ("cls", "keys", "values")))
        loss = -(torch.log_softmax(logits, -1) * t_targets).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return _timed(step, warmup, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_b16")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--bundle", type=Path, help="A VQT bundle; exported here (random init) if it does not exist.")
    ap.add_argument("--child", choices=RUNNERS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.bundle, args.threads, args.warmup, args.steps)))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "BENCH_BATCH": str(args.batch_size)}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or Path(tmp) / "bundle"
        if not (bundle / "manifest.json").exists():
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "vqt_edge.cli", "export", "--model", args.model, "--random-init",
                            "--num-classes", str(CLASSES), "--out", str(bundle)], check=True, cwd=REPO, env=env)
            print(f"exported {bundle} in {time.perf_counter() - t0:.0f} s", flush=True)
        model = json.loads((bundle / "manifest.json").read_text())["model"]
        results = {}
        for runner in RUNNERS:
            out = subprocess.run([sys.executable, __file__, "--child", runner, "--bundle", str(bundle),
                                  "--threads", str(args.threads), "--warmup", str(args.warmup), "--steps", str(args.steps)],
                                 capture_output=True, text=True, env=env, cwd=REPO)
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                results[runner] = {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
            else:
                results[runner] = json.loads(out.stdout.strip().splitlines()[-1])
            print(runner, json.dumps(results[runner]), flush=True)
    base = results["torch"].get("seconds_per_step")
    lines = [f"{model}, batch {args.batch_size}, T=1, {args.threads} thread(s); median of {args.steps} steps "
             f"after {args.warmup} warm-up steps, CPU seconds (wall in parentheses); each runner in its own process", "",
             "| runner | s/step | x PyTorch | first calls (CPU s) | peak MiB | checkpoint | save s |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for runner, r in results.items():
        if "error" in r:
            lines.append(f"| {runner} | failed: {r['error']} | | | | | |")
            continue
        ratio = f"{r['seconds_per_step'] / base:.2f}" if base else "-"
        ckpt = f"{r['checkpoint_bytes'] / 2**20:.2f} MiB | {r['checkpoint_save_s']}" if "checkpoint_bytes" in r else "- | -"
        lines.append(f"| {runner} | {r['seconds_per_step']:.3f} ({r['wall_seconds_per_step']:.3f}) | {ratio} | "
                     f"{', '.join(map(str, r['first_calls_cpu_s']))} "
                     f"| {r['peak_rss_mb']:.0f} | {ckpt} |")
    print("\n".join(lines))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "step_bench.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "results": results}, indent=2) + "\n")
    (RESULTS / "step_bench.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
