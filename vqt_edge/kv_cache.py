"""What one image's cached frozen outputs look like: fp16 rows, or int8 rows with float32 scales.

The layout is shared by the device side, which writes and reads the cache (device_runner/kv_int8.py,
device_runner/features.py), and the memory and disk model, which sizes it (vqt_edge/memory/).
"""

from __future__ import annotations

import numpy as np

KV_DTYPES = ("fp16", "int8")

DEFAULT_KV_DTYPE = "int8"
"""The cache's dtype without --kv-dtype. The rule: int8 if it costs at most 0.3 points on every
transfer task; measured (3 seeds each, docs/kv-cache.md) VQT 0.00 / 0.00 / +0.02 and Head2Toe
-0.01 / 0.00 / -0.02 points, for half the cache's bytes and (vqt) a faster step. fp16 stays an option."""

SCALE_SUFFIX = "_scale"

GROUPS = {"keys": (-2,), "values": (-2,), "hidden": (-2,), "features": (-1,)}
"""Per frozen output: the per-image axes one scale covers (the rest of the row has a scale each).
keys/values [L, H, N, hd]: per channel (over the N tokens); hidden [N, D]: per channel; features [F]: per image."""

STEP_INT8_FED = ("keys", "values")
"""What the int8-fed step graph (manifest STEP_INT8_MODEL, exporters/step.py) takes as int8 codes: each
query layer's codes as an input of its own (`layer_input`), all layers' scales as `<name>_scale`."""


# The widened fp32 piece of K or V the int8-fed step graph holds at once, at the default batch of 32:
# about one vit_b16 head (1.6 MB), so that it is read back from the core's cache.
WIDEN_BYTES = 2 << 20


def head_groups(heads: int, tokens: int, head_dim: int, batch: int = 32) -> list[tuple[int, int]]:
    """(first head, heads) of each piece of a layer the int8-fed step widens at once: as many heads
    as fit WIDEN_BYTES of fp32 at `batch` (one on vit_b16; a small ViT's whole layer, which keeps its
    graph, and its export, as small as a per-layer one)."""
    per_group = max(1, min(heads, WIDEN_BYTES // (batch * tokens * head_dim * 4)))
    return [(h, min(per_group, heads - h)) for h in range(0, heads, per_group)]


def layer_input(name: str, layer: int) -> str:
    """The int8-fed step graph's input holding query layer `layer`'s (0-based) codes [B, H, N, dh] of `name`."""
    return f"{name}.{layer}"


# Variants compared by bench/kv_int8_error.py (axes of the per-image K/V row [L, H, N, hd]).
VARIANTS = {"token": (-1,), "channel": (-2,), "head": (-2, -1)}


def is_scale(name: str) -> bool:
    return name.endswith(SCALE_SUFFIX)


def scale_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    """The per-image shape of a scale array: `shape` with the grouped axes set to 1."""
    out = list(shape)
    for a in axes:
        out[a] = 1
    return tuple(out)


def cache_specs(specs: dict[str, tuple[tuple[int, ...], str]], kv_dtype: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """The cache's arrays (name -> per-image shape, numpy dtype name) for the frozen outputs' `specs`:
    unchanged for fp16; for int8 every quantized output as int8 followed by its `<name>_scale`."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(kv_dtype)
    if kv_dtype == "fp16":
        return dict(specs)
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, (shape, dtype) in specs.items():
        if name in GROUPS and dtype == "float16":
            out[name] = (shape, "int8")
            out[name + SCALE_SUFFIX] = (scale_shape(shape, GROUPS[name]), "float32")
        else:
            out[name] = (shape, dtype)
    return out


def cache_bytes(specs: dict[str, tuple[tuple[int, ...], str]], kv_dtype: str) -> int:
    """Bytes one image takes in a cache of this dtype."""
    return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in cache_specs(specs, kv_dtype).values())
