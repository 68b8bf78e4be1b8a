"""Which int8 scales for the K/V cache: reconstruction error of real K/V, per token vs per channel vs per head.

Runs a bundle's frozen.onnx on real Fashion-MNIST test images (default: classes 5-9, the transfer
task the shipped backbone never saw) and quantizes its K and V three ways (device_runner/kv_int8.py
VARIANTS; one scale per (layer, head, token), per (layer, head, channel) or per (layer, head) of
each image), reporting the relative RMS error ||x - x'|| / ||x||, the largest absolute error, the
error of one attention read-out (softmax(k_i K^T / sqrt(d)) V with every token's key as the query,
what the query tokens do) and the bytes one image takes. docs/kv-cache.md holds the result.

    .venv/bin/vqt-edge export --model vit_fmnist --method vqt --classes a,b,c,d,e --out /tmp/b
    .venv/bin/python bench/kv_int8_error.py --bundle /tmp/b --images 256
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples"))


def kv_of_images(bundle: Path, n: int) -> dict[str, np.ndarray]:
    from fmnist import load_fmnist

    from device_runner.data import iter_batches
    from device_runner.features import FrozenBackbone
    from vqt_edge import manifest as mf

    images, labels = load_fmnist("test")
    picked = np.flatnonzero(labels >= 5)[:n]
    m = mf.read_manifest(bundle, verify=False)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in picked:
            p = Path(tmp) / f"{i}.png"
            Image.fromarray(images[i]).save(p)
            paths.append(p)
        backbone = FrozenBackbone(bundle, m, threads=1)
        # fp32 outputs, not the fp16 cache: the error of int8 against what the graph computed
        outs: dict[str, list[np.ndarray]] = {"keys": [], "values": []}
        for start in range(0, len(paths), 8):
            pixels = next(
                iter_batches([(p, 0) for p in paths[start : start + 8]], 8, m.spec.arch.image_size, m.mean, m.std)
            )[0]
            feats = backbone(pixels)
            for k in outs:
                outs[k].append(feats[k])
    return {k: np.concatenate(v) for k, v in outs.items()}


def attention(k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """softmax(K K^T / sqrt(d)) V per image, layer and head: every key as a query."""
    s = np.einsum("...nd,...md->...nm", k, k) / np.sqrt(k.shape[-1])
    s = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("...nm,...md->...nd", s / s.sum(-1, keepdims=True), v)


def main() -> None:
    from device_runner.kv_int8 import quantize
    from vqt_edge.kv_cache import VARIANTS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--out", type=Path, help="write the table as JSON here")
    args = ap.parse_args()
    kv = kv_of_images(args.bundle, args.images)
    exact = attention(kv["keys"][:32].astype(np.float64), kv["values"][:32].astype(np.float64))
    rows = []
    fp16 = {n: x.astype(np.float16).astype(np.float32) for n, x in kv.items()}
    variants = {"fp16": None, **VARIANTS}
    for label, axes in variants.items():
        rec, row = {}, {"scales": label}
        for name, x in kv.items():
            if axes is None:
                rec[name] = fp16[name]
                row["bytes_per_image_" + name] = int(x[0].size * 2)
            else:
                q, s = quantize(x, axes)
                rec[name] = q.astype(np.float32) * s
                row["bytes_per_image_" + name] = int(q[0].size + s[0].size * 4)
            err = rec[name] - x
            row[f"{name}_rel_rms"] = float(np.sqrt((err**2).sum() / (x**2).sum()))
            row[f"{name}_max_abs"] = float(np.abs(err).max())
        got = attention(rec["keys"][:32].astype(np.float64), rec["values"][:32].astype(np.float64))
        row["attention_rel_rms"] = float(np.sqrt(((got - exact) ** 2).sum() / (exact**2).sum()))
        rows.append(row)
    print(f"{len(kv['keys'])} images, K/V {list(kv['keys'].shape[1:])} per image ({args.bundle})")
    print(
        f"{'scales':<8} {'K rel rms':>10} {'V rel rms':>10} {'K max':>8} {'V max':>8} {'attn rel rms':>13} {'bytes/img':>10}"
    )
    for r in rows:
        print(
            f"{r['scales']:<8} {r['keys_rel_rms']:>10.2e} {r['values_rel_rms']:>10.2e} {r['keys_max_abs']:>8.4f} "
            f"{r['values_max_abs']:>8.4f} {r['attention_rel_rms']:>13.2e} {r['bytes_per_image_keys'] + r['bytes_per_image_values']:>10}"
        )
    if args.out:
        args.out.write_text(
            json.dumps({"images": len(kv["keys"]), "bundle": str(args.bundle), "rows": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
