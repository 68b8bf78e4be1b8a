"""The int8 K/V cache: symmetric int8 rows with float32 scales, dequantized into the step's fp32 feed.

`train --kv-dtype int8` stores every cached K/V tensor (and Head2Toe's features, and `hidden`) as
int8 plus one float32 scale per group, about half of the fp16 cache's bytes (docs/kv-cache.md).

Scales are per channel: one per (layer, head, channel) of each image's K and V, over its tokens
(`GROUPS`), the choice measured by bench/kv_int8_error.py on the shipped backbone's real K/V of
real Fashion-MNIST images: 13% less error than one scale per token and 4% fewer bytes
(docs/kv-cache.md has the table). A group's scale is amax / 127 and its values are rounded to the nearest integer:

    q = clip(rint(x / s), -127, 127),   x' = float32(q) * s

Dequantization writes into the caller's fp32 row (the reused feed buffer), chunk by chunk so the
int8 -> fp32 widening stays in the L2 cache before the multiply.
"""

from __future__ import annotations

import numpy as np

from vqt_edge.kv_cache import GROUPS, SCALE_SUFFIX


def quantize(x: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """x [B, ...] (float) -> (int8 q, float32 scale) with one scale per group over the per-image `axes`
    (negative, so the batch axis is never grouped). An all-zero group gets scale 1 (and q = 0)."""
    x = np.asarray(x, np.float32)
    amax = np.abs(x).max(axis=axes, keepdims=True)
    scale = (amax / np.float32(127)).astype(np.float32)
    scale[scale == 0] = 1
    q = np.rint(x / scale)
    np.clip(q, -127, 127, out=q)
    return q.astype(np.int8), scale


def encode(feats: dict[str, np.ndarray], kv_dtype: str) -> dict[str, np.ndarray]:
    """A frozen-pass batch as the cache stores it: int8 + scales for the quantized outputs of an int8
    cache; the rest as they are (the cache's arrays cast on assignment)."""
    if kv_dtype == "fp16":
        return feats
    out: dict[str, np.ndarray] = {}
    for name, value in feats.items():
        if name in GROUPS:
            out[name], out[name + SCALE_SUFFIX] = quantize(value, GROUPS[name])
        else:
            out[name] = value
    return out


CHUNK = 1 << 15
"""Values widened per pass (128 KiB of fp32): stays in L2 between the widening and the multiply."""


def dequantize_into(q: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    """out[...] = float32(q) * scale (scale broadcast over its groups), bit for bit as numpy's
    `q.astype(np.float32) * scale`; `out` may be a row of a larger array."""
    if q.dtype != np.int8 or scale.dtype != np.float32 or out.dtype != np.float32 or q.shape != out.shape:
        raise ValueError(f"dequantize_into: {q.dtype}{list(q.shape)} x {scale.dtype} -> {out.dtype}{list(out.shape)}")
    per_channel = q.ndim >= 2 and scale.shape == (*q.shape[:-2], 1, q.shape[-1])
    if not (per_channel and q.flags.c_contiguous and out.flags.c_contiguous):
        np.multiply(q, scale, out=out, dtype=np.float32)
        return
    # Blocks of [tokens, channels] sharing one row of scales, a few blocks per pass.
    block = q.shape[-2:]
    q3, o3, s3 = q.reshape(-1, *block), out.reshape(-1, *block), scale.reshape(-1, 1, block[1])
    step = max(1, CHUNK // (block[0] * block[1]))
    for start in range(0, len(q3), step):
        o = o3[start : start + step]
        np.copyto(o, q3[start : start + step], casting="unsafe")
        np.multiply(o, s3[start : start + step], out=o)
