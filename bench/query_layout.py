"""The VQT query path's layout, batch-major against layer-major, in the onnxruntime-training step.

docs/design.md section 10: with activations laid out [B, Lq, T, D] against the stacked frozen
weights [Lq, D, D'], onnxruntime runs B*Lq matrix-vector products (T = 1); laid out [Lq, B*T, D]
(exporters/vit.py QueryPath, today's layout) the same MatMuls are Lq matrix-matrix products. This
bench exports the training graph of the same VQT head (same seed, same weights) both ways, then
runs both in this process on the same random feed: seconds per `train_step` and per whole step
(train_step + AdamW + reset), the step's CPU seconds (with one thread, what other processes on a
shared machine cannot inflate), and the losses of each step side by side (they must agree).

    PYTHONPATH=$PWD .venv/bin/python bench/query_layout.py [--model vit_b16] [--batch-size 32] [--steps 5]

"batch-major" is the previous QueryPath.forward, kept here verbatim as the reference.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def batch_major_forward(self, keys, values, query_keep=None):
    """QueryPath.forward before the layer-major layout: [B, Lq, T, D] activations throughout."""
    import torch
    import torch.nn.functional as F

    from exporters.vit import _layer_norm

    b, lq, h, n, dh = keys.shape
    p = self.query_tokens.unsqueeze(0)  # [1, Lq, T, D]
    if query_keep is not None:
        p = p * query_keep
    eps = self.arch.eps
    q = _layer_norm(p, self.ln1_w[:, None], self.ln1_b[:, None], eps) @ self.wq + self.bq[:, None]
    t = q.shape[2]
    q = q.reshape(q.shape[0], lq, t, h, dh).transpose(2, 3)
    attn = torch.softmax((q @ keys.transpose(-2, -1)) * dh**-0.5, dim=-1)
    out = (attn @ values).transpose(2, 3).reshape(b, lq, t, h * dh)
    z = p + out @ self.wo + self.bo[:, None]
    hid = F.gelu(_layer_norm(z, self.ln2_w[:, None], self.ln2_b[:, None], eps) @ self.w1 + self.b1[:, None])
    return z + hid @ self.w2 + self.b2[:, None]


def export_training(model: str, layout: str, out: Path, classes: int) -> dict[str, str]:
    """Training artifacts of a VQT head (all layers, T=1) with the given query-path layout."""
    import torch

    from exporters.export import _export, _generate_training_artifacts
    from exporters.methods import build_head
    from exporters.vit import VisionTransformer
    from vqt_edge import manifest as mf
    from vqt_edge.arch import PRESETS
    from vqt_edge.spec import AdapterSpec

    arch = PRESETS[model]
    backbone = VisionTransformer(arch)
    backbone.reset_parameters(seed=0)
    backbone.eval().requires_grad_(False)
    layers = list(range(arch.depth))
    torch.manual_seed(0)
    head = build_head(backbone, AdapterSpec.create(arch, "vqt", classes, query_layers=layers))
    if layout == "batch-major":
        head.query_path.forward = types.MethodType(batch_major_forward, head.query_path)
    b, n = 2, arch.num_tokens
    kv = torch.randn(b, len(layers), arch.heads, n, arch.dim // arch.heads)
    args = (
        torch.randn(b, arch.dim),
        kv,
        kv,
        torch.ones(b, len(layers), 1, arch.dim),
        torch.full((b, classes), 1.0 / (b * classes)),
    )
    out.mkdir(parents=True, exist_ok=True)
    _export(head, args, out / "train_step.onnx", head.input_names, ["loss", "logits"], "train")
    _generate_training_artifacts(out / "train_step.onnx", out, head.trainable())
    (out / "train_step.onnx").unlink()
    del backbone, head
    gc.collect()
    names = {
        "training": mf.TRAINING_MODEL,
        "eval": mf.EVAL_MODEL,
        "optimizer": mf.OPTIMIZER_MODEL,
        "checkpoint": mf.CHECKPOINT,
    }
    return {k: str(out / Path(v).name) for k, v in names.items()}


def time_steps(files: dict[str, str], feed: dict[str, np.ndarray], steps: int, threads: int) -> dict:
    import onnxruntime as ort
    from onnxruntime.training import api

    state = api.CheckpointState.load_checkpoint(files["checkpoint"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    module = api.Module(files["training"], state, files["eval"], device="cpu", session_options=opts)
    optimizer = api.Optimizer(files["optimizer"], module)
    inputs = [feed[name] for name in module.input_names()]
    losses, call, whole, cpu = [], [], [], []
    for i in range(steps + 2):  # two warm-up steps: ORT plans its memory on the first calls
        t0, c0 = time.perf_counter(), time.process_time()
        loss, _ = module(*inputs)
        t1 = time.perf_counter()
        optimizer.set_learning_rate(1e-3)
        optimizer.step()
        module.lazy_reset_grad()
        t2, c2 = time.perf_counter(), time.process_time()
        losses.append(float(loss))
        if i >= 2:
            call.append(t1 - t0)
            whole.append(t2 - t0)
            cpu.append(c2 - c0)
    del module, optimizer, state
    gc.collect()
    return {
        "losses": losses,
        "train_step_s": float(np.median(call)),
        "step_s": float(np.median(whole)),
        "step_cpu_s": float(np.median(cpu)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_b16")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--classes", type=int, default=10)
    args = ap.parse_args()
    from vqt_edge.arch import PRESETS

    arch = PRESETS[args.model]
    rng = np.random.default_rng(0)
    b, lq, n = args.batch_size, arch.depth, arch.num_tokens
    shape = (b, lq, arch.heads, n, arch.dim // arch.heads)
    feed = {
        "cls": rng.standard_normal((b, arch.dim), np.float32),
        "keys": rng.standard_normal(shape, np.float32),
        "values": rng.standard_normal(shape, np.float32),
        "query_keep": (rng.random((b, lq, 1, arch.dim)) >= 0.1).astype(np.float32) / np.float32(0.9),
        "targets": np.eye(args.classes, dtype=np.float32)[rng.integers(0, args.classes, b)] / b,
    }
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layout in ("batch-major", "layer-major"):
            t0 = time.perf_counter()
            files = export_training(args.model, layout, Path(tmp) / layout, args.classes)
            print(f"{layout}: exported in {time.perf_counter() - t0:.0f} s", flush=True)
            results[layout] = time_steps(files, feed, args.steps, args.threads)
    before, after = results["batch-major"], results["layer-major"]
    print(
        f"\n{args.model}, VQT all layers, T=1, batch {b}, {args.threads} thread(s), median of {args.steps} steps "
        "after 2 warm-up steps"
    )
    print(f"{'layout':<12} {'train_step s':>12} {'whole step s':>12} {'step CPU s':>11}")
    for layout, r in results.items():
        print(f"{layout:<12} {r['train_step_s']:>12.3f} {r['step_s']:>12.3f} {r['step_cpu_s']:>11.3f}")
    print(
        f"layer-major / batch-major: train_step {after['train_step_s'] / before['train_step_s']:.2f}x, "
        f"whole step {after['step_s'] / before['step_s']:.2f}x"
    )
    diff = max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(before["losses"], after["losses"]))
    print("losses (batch-major):", " ".join(f"{x:.6f}" for x in before["losses"]))
    print("losses (layer-major):", " ".join(f"{x:.6f}" for x in after["losses"]))
    print(f"largest relative loss difference: {diff:.2e}")


if __name__ == "__main__":
    main()
