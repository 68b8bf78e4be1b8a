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
exporter merged equal tensors. Works on bundles exported before this existed: nothing in the
bundle format changes.

The merge (stream.merge_streaming) then leaves the tensor out and `Sharing` rewrites its
readers. A MatMul against a stacked weight [Lq, D, D'] becomes Split over the layer axis, one
MatMul per layer on the source itself, Concat: nothing is materialized, so a loaded model.onnx holds
each weight once (the query weight reads the whole qkv matrix and keeps the first D output columns:
3x the FLOPs of T query tokens, no copy). Any other reader (a bias) gets the tensor rebuilt by
Unsqueeze + Concat, which onnxruntime folds into a constant at load time; that is kept to small
tensors because folding holds each intermediate too.

Bounded memory, as the merge (stream.py's docstring): head tensors are hashed from the file 1 MiB
at a time, and source tensors are read one at a time (the largest, an MLP matrix of ViT-B/16, is
9 MiB), their transposed and sliced views hashed in 1 MiB slabs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import onnx

from device_runner.onnx_io.wire import CHUNK, GRAPH_INIT, fields, graph_span, read

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
    for field, s, b, e in fields(f, start, end):
        if field == _TENSOR_RAW:
            raw = (b, e)
        elif field in (_TENSOR_DIMS, _TENSOR_TYPE, _TENSOR_NAME, _TENSOR_LOCATION):
            meta += read(f, s, e)
    t = onnx.TensorProto.FromString(bytes(meta))
    external = t.data_location == onnx.TensorProto.EXTERNAL
    return _Header(t.name, tuple(t.dims), t.data_type, None if external else raw)


def _initializers(f: BinaryIO, size: int) -> list[_Header]:
    g0, g1 = graph_span(f, size)
    return [_header(f, b, e) for field, _, b, e in fields(f, g0, g1) if field == GRAPH_INIT]


def _digest_file(f: BinaryIO, start: int, end: int) -> bytes:
    """Digest of the file's bytes [start, end), read 1 MiB at a time."""
    h = hashlib.blake2b(digest_size=16)
    for pos in range(start, end, CHUNK):
        h.update(read(f, pos, min(pos + CHUNK, end)))
    return h.digest()


def _digest_array(a: np.ndarray) -> bytes:
    """Digest of `a`'s C-order bytes (as `_digest_file` of the same numbers), copying at most about
    1 MiB of a strided view at a time."""
    h = hashlib.blake2b(digest_size=16)
    rows = max(1, CHUNK // max(1, a[0].nbytes)) if a.ndim > 1 else len(a)
    for i in range(0, len(a), rows):
        h.update(np.ascontiguousarray(a[i : i + rows]).data)
    return h.digest()


def _usable(h: _Header) -> bool:
    return h.raw is not None and h.data_type == onnx.TensorProto.FLOAT and len(h.shape) >= 1


def find_shared(frozen: Path, head: Path, replace: set[str], min_piece_bytes: int = MIN_PIECE_BYTES) -> Sharing:
    """Head initializers (not in `replace`, the learned ones) that equal frozen.onnx's initializers
    or the head's own kept ones, piece by piece, and how to read them there."""
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
                start = h.raw[0] if h.raw is not None else 0  # _usable: every candidate has raw data
                key = (shape, _digest_file(hd, start + i * step, start + (i + 1) * step))
                keys.append(key)
                wanted.setdefault(key, []).append((h.name, i))
            candidates[h.name] = keys
        if not candidates:
            return Sharing({})
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
    assert src.raw is not None  # _usable: only tensors with raw data are candidates
    value = np.frombuffer(read(f, *src.raw), dtype="<f4").reshape(src.shape)
    for transpose in (False, True)[: len(shapes)]:
        view = value.T if transpose else value
        for width in sorted(widths.get(view.shape[:-1], ())):
            if width > view.shape[-1]:
                continue
            part = view if width == view.shape[-1] else view[..., :width]
            key = (part.shape, _digest_array(part))
            if key in wanted:
                found.setdefault(key, []).append(
                    Piece(src.name, in_head, transpose, None if width == view.shape[-1] else width)
                )


def _resolve(candidates: dict[str, list], found: dict, h_inits: list[_Header]) -> Sharing:
    """Shared tensors whose every piece has a source that stays an initializer (no cycles)."""
    stacked = {h.name: len(h.shape) >= 2 for h in h_inits}
    shared: dict[str, list[list[Piece]]] = {}
    for name, keys in candidates.items():
        pieces = []
        for key in keys:
            options = [p for p in found.get(key, []) if not (p.in_head and p.source == name)]
            options.sort(key=lambda p: (p.in_head, p.transpose, p.width is not None))  # frozen, plain first
            if not options:
                break
            pieces.append(options)
        else:
            shared[name] = pieces
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
    return Sharing(
        {name: Shared(tuple(opts[0] for opts in options), stacked[name]) for name, options in shared.items()}
    )


class Sharing:
    """The shared head tensors (name -> how to read them) and the nodes that read them in
    model.onnx (module docstring). `prefix`: the merge's prefix for head names."""

    def __init__(self, tensors: dict[str, Shared], prefix: str = "head/") -> None:
        self.tensors, self.base = tensors, prefix + "share/"
        self._consts: dict[str, np.ndarray] = {}

    def __bool__(self) -> bool:
        return bool(self.tensors)

    def reads_layers(self, node: onnx.NodeProto) -> bool:
        """A MatMul of activations against a stacked shared weight: rewritten per layer."""
        return (
            node.op_type == "MatMul"
            and node.input[1] in self.tensors
            and self.tensors[node.input[1]].stacked
            and node.input[0] not in self.tensors
        )

    def per_layer(self, node: onnx.NodeProto, rename: Callable[[str], str]) -> list[onnx.NodeProto]:
        """x @ W with W [Lq, D, D'] stacked: x split along its layer axis (-3, the axis numpy-style
        broadcasting pairs with W's first: 0 for the layer-major [Lq, B*T, D], 1 for older bundles'
        [B, Lq, T, D]), one MatMul per layer on W's source, concatenated back."""
        how = self.tensors[node.input[1]]
        step = self.base + (node.name or node.output[0])
        n = len(how.pieces)
        xs, ys = [f"{step}/x{i}" for i in range(n)], []
        out = [
            onnx.helper.make_node(
                "Split", [rename(node.input[0]), self._const(f"ones{n}", [1] * n)], xs, step + "/Split", axis=-3
            )
        ]
        for i, piece in enumerate(how.pieces):
            w = self._source(piece, f"{step}/{i}", rename, out)
            y = f"{step}/y{i}"
            out.append(onnx.helper.make_node("MatMul", [xs[i], w], [y], f"{step}/{i}/MatMul"))
            if piece.width is not None:  # x @ W[:, :w] = (x @ W)[..., :w]
                out.append(self._first_columns(y, piece.width, f"{step}/{i}"))
                y = out[-1].output[0]
            ys.append(y)
        out.append(onnx.helper.make_node("Concat", ys, [rename(node.output[0])], step + "/Concat", axis=-3))
        return out

    def rebuild_nodes(self, nodes: Iterable[onnx.NodeProto], rename: Callable[[str], str]) -> list[onnx.NodeProto]:
        """Nodes that compute the shared tensors some reader needs whole (all but `reads_layers`
        MatMuls) from their sources: [Transpose] [Slice] Unsqueeze per piece, Concat."""
        whole = {name for node in nodes if not self.reads_layers(node) for name in node.input if name in self.tensors}
        out: list[onnx.NodeProto] = []
        for name in sorted(whole):
            how = self.tensors[name]
            parts = []
            for i, piece in enumerate(how.pieces):
                step = f"{self.base}{name}/{i}"
                x = self._source(piece, step, rename, out)
                if piece.width is not None:
                    out.append(self._first_columns(x, piece.width, step))
                    x = out[-1].output[0]
                if how.stacked:
                    out.append(
                        onnx.helper.make_node(
                            "Unsqueeze", [x, self._const("zero", [0])], [step + "/u"], step + "/Unsqueeze"
                        )
                    )
                    x = step + "/u"
                parts.append(x)
            attrs: dict[str, Any] = {"axis": 0} if how.stacked else {}
            op = "Concat" if how.stacked else "Identity"
            out.append(onnx.helper.make_node(op, parts, [rename(name)], f"{self.base}{name}/{op}", **attrs))
        return out

    def constants(self) -> list[onnx.TensorProto]:
        """The int64 constants the nodes above use (only those: an unused initializer makes
        onnxruntime warn at every load)."""
        return [onnx.numpy_helper.from_array(v, name) for name, v in self._consts.items()]

    def _const(self, key: str, value: list[int]) -> str:
        name = self.base + key
        self._consts[name] = np.array(value, np.int64)
        return name

    def _source(self, piece: Piece, step: str, rename: Callable[[str], str], out: list[onnx.NodeProto]) -> str:
        x = rename(piece.source) if piece.in_head else piece.source
        if piece.transpose:  # a head Linear weight [out, in]; folded by onnxruntime (one layer's matrix)
            out.append(onnx.helper.make_node("Transpose", [x], [step + "/t"], step + "/Transpose", perm=[1, 0]))
            x = step + "/t"
        return x

    def _first_columns(self, x: str, width: int, step: str) -> onnx.NodeProto:
        return onnx.helper.make_node(
            "Slice",
            [x, self._const("zero", [0]), self._const(f"width{width}", [width]), self._const("last", [-1])],
            [step + "/s"],
            step + "/Slice",
        )
