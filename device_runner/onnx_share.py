"""Which head weights are already in frozen.onnx: model.onnx without a second copy of them.

The inference head (train/head.onnx) holds the query path's frozen weights stacked per layer
(`query_path.wq` [Lq, D, D], `w1` [Lq, D, mlp], ...; exporters/vit.py QueryPath), and frozen.onnx
holds the same numbers once more, per layer, under the names the exporter chose (constant folding
stores `x @ W.T` as a transposed `onnx::MatMul_N` [D, D'], and the query weight is the first D
columns of the fused qkv matrix). Merged as they are, model.onnx carried both: 600 MB for ViT-B/16
against frozen.onnx's 327 MB (docs/design.md section 10).

`find_shared` matches by value, not by name: each layer's piece of a stacked head tensor is hashed
and looked up among the frozen initializers (and the head's own, e.g. the adapted blocks of
vqt+adaptformer), as they are, transposed, or as their first columns. A match is the same bytes,
so reading the source instead changes no prediction, whatever the names were or whether the
exporter merged equal tensors. The merge (onnx_stream.merge_streaming) then writes, instead of
the tensor, a few nodes that rebuild it from its sources (Transpose, Slice, Unsqueeze, Concat);
onnxruntime folds them into one constant when it loads model.onnx. Works on bundles exported
before this existed: nothing in the bundle format changes.

Bounded memory, as the merge (onnx_stream's docstring): head tensors are hashed piece by piece from
the file, and frozen tensors are read one at a time (the largest, an MLP matrix of ViT-B/16, is
9 MiB).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import onnx

from device_runner.onnx_stream import _GRAPH_INIT, _fields, _graph_span, _read

_TENSOR_DIMS, _TENSOR_TYPE, _TENSOR_NAME, _TENSOR_RAW, _TENSOR_LOCATION = 1, 2, 8, 9, 14
MIN_PIECE_BYTES = 4096
"""Share head tensors whose per-layer pieces are at least this large: weight matrices (ViT-B/16:
2.3-9 MiB per layer; 4 KiB on the tests' 32-wide ViT). Vectors (LayerNorm, biases: 3 KiB per layer
on ViT-B/16) save little and would add nodes."""


@dataclass(frozen=True)
class Piece:
    """One layer's slice of a shared head tensor: `source`[.T][..., :width]."""

    source: str  # initializer name as it is in its own graph
    in_head: bool  # the source is a head initializer (renamed with the merge's prefix)
    transpose: bool
    width: int | None  # keep the first `width` entries of the last axis (None: all)


@dataclass(frozen=True)
class Shared:
    """A head initializer rebuilt from sources: one piece per entry of axis 0 (`stacked`), or one
    piece that is the whole tensor."""

    pieces: tuple[Piece, ...]
    stacked: bool


@dataclass(frozen=True)
class _Header:
    name: str
    shape: tuple[int, ...]
    data_type: int
    raw: tuple[int, int] | None  # span of raw_data in the file


def _header(f: BinaryIO, start: int, end: int) -> _Header:
    """A TensorProto's name, shape and type, and where its raw bytes are, without reading them."""
    meta, raw = bytearray(), None
    for field, s, b, e in _fields(f, start, end):
        if field == _TENSOR_RAW:
            raw = (b, e)
        elif field in (_TENSOR_DIMS, _TENSOR_TYPE, _TENSOR_NAME, _TENSOR_LOCATION):
            meta += _read(f, s, e)
    t = onnx.TensorProto.FromString(bytes(meta))
    external = t.data_location == onnx.TensorProto.EXTERNAL
    return _Header(t.name, tuple(t.dims), t.data_type, None if external else raw)


def _initializers(f: BinaryIO, size: int) -> list[_Header]:
    g0, g1 = _graph_span(f, size)
    return [_header(f, b, e) for field, _, b, e in _fields(f, g0, g1) if field == _GRAPH_INIT]


def _digest(data) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _usable(h: _Header) -> bool:
    return h.raw is not None and h.data_type == onnx.TensorProto.FLOAT and len(h.shape) >= 1


def find_shared(frozen: Path, head: Path, replace: set[str], min_piece_bytes: int = MIN_PIECE_BYTES) -> dict[str, Shared]:
    """Head initializers (not in `replace`, the learned ones) that can be rebuilt from frozen.onnx's
    initializers or the head's own kept ones, by name, with how."""
    frozen, head = Path(frozen), Path(head)
    with open(frozen, "rb") as fz, open(head, "rb") as hd:
        f_inits = [h for h in _initializers(fz, frozen.stat().st_size) if _usable(h)]
        h_inits = [h for h in _initializers(hd, head.stat().st_size) if _usable(h) and h.name not in replace]
        # What to look for: each candidate's pieces (per layer when stacked, else the whole tensor).
        wanted: dict[tuple[tuple[int, ...], bytes], list[tuple[str, int]]] = {}
        candidates: dict[str, list[tuple[tuple[int, ...], bytes]]] = {}
        for h in h_inits:
            nbytes = 4 * int(np.prod(h.shape))
            stacked = len(h.shape) >= 2
            shape = h.shape[1:] if stacked else h.shape
            step = nbytes // h.shape[0] if stacked else nbytes
            if step < min_piece_bytes:
                continue
            keys = []
            for i in range(h.shape[0] if stacked else 1):
                key = (shape, _digest(_read(hd, h.raw[0] + i * step, h.raw[0] + (i + 1) * step)))
                keys.append(key)
                wanted.setdefault(key, []).append((h.name, i))
            candidates[h.name] = keys
        if not candidates:
            return {}
        widths: dict[tuple[int, ...], set[int]] = {}  # leading shape -> widths of the wanted pieces
        for shape, _ in wanted:
            widths.setdefault(shape[:-1], set()).add(shape[-1])
        found: dict[tuple[tuple[int, ...], bytes], list[Piece]] = {}
        for in_head, f, inits in ((False, fz, f_inits), (True, hd, h_inits)):
            for src in inits:
                _match_source(f, src, in_head, wanted, widths, found)
    return _resolve(candidates, found, h_inits)


def _match_source(f: BinaryIO, src: _Header, in_head: bool, wanted: dict, widths: dict, found: dict) -> None:
    """Record every wanted piece that `src`, `src.T` or their first columns equal."""
    shapes = [src.shape] + ([src.shape[::-1]] if len(src.shape) == 2 else [])
    if not any(s[:-1] in widths for s in shapes):
        return  # nothing wanted has this shape: do not read it
    value = np.frombuffer(_read(f, *src.raw), dtype="<f4").reshape(src.shape)
    for transpose in (False, True)[: len(shapes)]:
        view = value.T if transpose else value
        for width in sorted(widths.get(view.shape[:-1], ())):
            if width > view.shape[-1]:
                continue
            part = view if width == view.shape[-1] else view[..., :width]
            key = (part.shape, _digest(np.ascontiguousarray(part).data))
            if key in wanted:
                found.setdefault(key, []).append(
                    Piece(src.name, in_head, transpose, None if width == view.shape[-1] else width))


def _resolve(candidates: dict[str, list], found: dict, h_inits: list[_Header]) -> dict[str, Shared]:
    """Shared tensors whose every piece has a source that stays an initializer (no cycles)."""
    stacked = {h.name: len(h.shape) >= 2 for h in h_inits}
    shared: dict[str, Shared] = {}
    for name, keys in candidates.items():
        pieces = []
        for key in keys:
            options = [p for p in found.get(key, []) if not (p.in_head and p.source == name)]
            options.sort(key=lambda p: (p.in_head, p.transpose, p.width is not None))  # frozen, plain first
            if not options:
                break
            pieces.append(options)
        else:
            shared[name] = pieces  # type: ignore[assignment]
    while True:  # a head tensor rebuilt from nodes cannot also be a source
        changed = False
        for name, options in list(shared.items()):
            kept = [[p for p in opts if not (p.in_head and p.source in shared)] for opts in options]
            if not all(kept):
                del shared[name]
                changed = True
            else:
                shared[name] = kept
        if not changed:
            break
    return {name: Shared(tuple(opts[0] for opts in options), stacked[name]) for name, options in shared.items()}
