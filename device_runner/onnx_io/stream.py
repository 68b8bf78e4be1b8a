"""Merge frozen.onnx and the head graph into model.onnx in bounded memory, at the protobuf wire level.

`onnx.load` + `onnx.compose.merge_models` + `onnx.save` hold every weight several times at once
(the file's bytes, the parsed model, the prefixed copy, the merged copy, the serialized bytes): for
ViT-B/16 that step alone peaked at 3.2 GiB over the process baseline, far more than training. A
memory budget is a promise about the whole process (docs/design.md section 6), so model.onnx is written
here without ever holding more than one tensor of either graph:

- protobuf merges a message that appears twice: two `graph` fields in one ModelProto parse as one
  graph holding the nodes and initializers of both (repeated fields concatenate). So model.onnx is
  frozen.onnx's fields copied through in chunks, minus its graph outputs, plus a second `graph` field
  holding the head's nodes and initializers (renamed with a prefix, learned tensors replaced) and
  the single output `logits`;
- the head is read one node / one initializer at a time.

The result is the graph `compose.merge_models(frozen, add_prefix(head), io_map, outputs=[logits])`
builds (tests/test_memory.py compares the two), without value_info of the head (optional shape hints).
Head initializers other than the learned ones are copied through renamed without being parsed, so
the largest allocation is one learned tensor or one node (ViT-B/16: +2 MiB, measured). Or they are
not copied at all: those that `shared` names (device_runner/onnx_io/share.py: the query path's weights,
equal to frozen.onnx's) are read from the initializers they equal, by rewritten nodes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper

from device_runner.onnx_io.wire import (
    GRAPH_DOC,
    GRAPH_INIT,
    GRAPH_INPUT,
    GRAPH_NAME,
    GRAPH_NODE,
    GRAPH_OUTPUT,
    GRAPH_VALUE_INFO,
    MODEL_DOC,
    MODEL_GRAPH,
    MODEL_METADATA,
    MODEL_OPSET,
    copy_range,
    fields,
    graph_span,
    key,
    opsets,
    read,
    read_varint,
)
from vqt_edge.errors import UserError

if TYPE_CHECKING:
    from device_runner.onnx_io.share import Sharing


def _check_no_subgraphs(node: onnx.NodeProto) -> None:
    for attr in node.attribute:
        if attr.HasField("g") or len(attr.graphs):
            raise ValueError(
                f"node {node.name or node.op_type} has a subgraph; streaming merge does not rename inside it"
            )


def merge_streaming(
    frozen: Path,
    head: Path,
    out: Path,
    replace: dict[str, np.ndarray],
    *,
    prefix: str = "head/",
    output: str = "logits",
    doc_string: str | None = None,
    shared: Sharing | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write `out` = frozen -> head: every head input is wired to the frozen output of the same
    name, every other head name gets `prefix`, head initializers named in `replace` get those
    values, and the graph's only output is the head's `output` (kept unprefixed). Head
    initializers that `shared` names (device_runner/onnx_io/share.py) are not copied: the nodes that
    read them are rewritten to read the initializers they equal. `metadata` becomes the model's
    metadata_props (frozen.onnx's own, if any, are then dropped)."""
    frozen, head, out = Path(frozen), Path(head), Path(out)
    fsize, hsize = frozen.stat().st_size, head.stat().st_size
    tmp_head = out.with_name(out.name + ".head.tmp")
    try:
        with open(frozen, "rb") as fz, open(head, "rb") as hd:
            g0, g1 = graph_span(fz, fsize)
            frozen_outputs = {
                onnx.ValueInfoProto.FromString(read(fz, b, e)).name
                for field, _, b, e in fields(fz, g0, g1)
                if field == GRAPH_OUTPUT
            }
            h0, h1 = graph_span(hd, hsize)
            head_inputs, out_info = set(), None
            for field, _, b, e in fields(hd, h0, h1):
                if field == GRAPH_INPUT:
                    head_inputs.add(onnx.ValueInfoProto.FromString(read(hd, b, e)).name)
                elif field == GRAPH_OUTPUT:
                    info = onnx.ValueInfoProto.FromString(read(hd, b, e))
                    if info.name == output:
                        out_info = info
            head_inits = set()
            for field, _, b, e in fields(hd, h0, h1):
                if field == GRAPH_INIT:
                    head_inits.add(_tensor_name(hd, b, e))
            wired = head_inputs - head_inits  # older exporters list initializers as inputs too
            if not wired <= frozen_outputs:
                raise ValueError(f"head inputs {sorted(wired - frozen_outputs)} are not outputs of {frozen.name}")
            if out_info is None:
                raise ValueError(f"{head.name} has no output {output!r}")
            missing = (set(replace) | set(shared.tensors if shared else ())) - head_inits
            if missing:
                raise ValueError(f"{head.name} has no initializers {sorted(missing)}")
            fz_ops, hd_ops = opsets(fz, fsize), opsets(hd, hsize)
            clash = {d for d in hd_ops if d in fz_ops and hd_ops[d] != fz_ops[d]}
            if clash:
                raise ValueError(f"opset versions differ between the graphs for domains {sorted(clash)}")

            def rename(name: str) -> str:
                if not name or name in wired:
                    return name
                return output if name == output else prefix + name

            # The head's part of the graph, to a temporary file (its length must precede it).
            with open(tmp_head, "wb") as th:
                if shared:
                    if fz_ops.get("", 0) < 13 or hd_ops.get("", 0) < 13:
                        raise ValueError(
                            "sharing weights needs opset 13 or later (Split/Slice/Unsqueeze with tensor inputs)"
                        )
                    nodes = (
                        onnx.NodeProto.FromString(read(hd, b, e))
                        for f, _, b, e in fields(hd, h0, h1)
                        if f == GRAPH_NODE
                    )
                    for node in shared.rebuild_nodes(nodes, rename):  # first: their inputs are initializers
                        _write(th, GRAPH_NODE, node)
                for field, _, b, e in fields(hd, h0, h1):
                    if field == GRAPH_NODE:
                        node = onnx.NodeProto.FromString(read(hd, b, e))
                        _check_no_subgraphs(node)
                        if shared and shared.reads_layers(node):
                            for part in shared.per_layer(node, rename):
                                _write(th, GRAPH_NODE, part)
                            continue
                        if node.name:
                            node.name = prefix + node.name
                        node.input[:] = [rename(n) for n in node.input]
                        node.output[:] = [rename(n) for n in node.output]
                        data = node.SerializeToString()
                    elif field == GRAPH_INIT:
                        name = _tensor_name(hd, b, e)
                        if shared and name in shared.tensors:  # read from its sources instead
                            continue
                        if name not in replace:  # copied through, renamed, never held whole
                            _copy_renamed_tensor(hd, b, e, rename(name), th)
                            continue
                        data = _replacement(read(hd, b, e), replace[name], rename(name), same_shape=True)
                    elif field in (GRAPH_INPUT, GRAPH_OUTPUT, GRAPH_VALUE_INFO, GRAPH_NAME, GRAPH_DOC):
                        continue
                    else:
                        raise ValueError(f"head graph field {field} is not supported by the streaming merge")
                    th.write(key(field, len(data)) + data)
                for tensor in shared.constants() if shared else ():
                    _write(th, GRAPH_INIT, tensor)
                info = onnx.ValueInfoProto()
                info.CopyFrom(out_info)
                data = info.SerializeToString()
                th.write(key(GRAPH_OUTPUT, len(data)) + data)
            head_len = tmp_head.stat().st_size

            kept = [(s, e) for field, s, _, e in fields(fz, g0, g1) if field != GRAPH_OUTPUT]
            with open(out, "wb") as o:
                for field, s, _, e in fields(fz, 0, fsize):
                    if field == MODEL_METADATA and metadata is not None:
                        continue
                    if field != MODEL_GRAPH:
                        copy_range(fz, s, e, o)
                        continue
                    o.write(key(MODEL_GRAPH, sum(e2 - s2 for s2, e2 in kept)))
                    for s2, e2 in kept:
                        copy_range(fz, s2, e2, o)
                o.write(key(MODEL_GRAPH, head_len))
                with open(tmp_head, "rb") as head_in:
                    copy_range(head_in, 0, head_len, o)
                for domain, version in hd_ops.items():
                    if domain not in fz_ops:
                        data = onnx.helper.make_opsetid(domain, version).SerializeToString()
                        o.write(key(MODEL_OPSET, len(data)) + data)
                if doc_string is not None:
                    data = doc_string.encode()
                    o.write(key(MODEL_DOC, len(data)) + data)  # a scalar field seen twice: the last one wins
                _write_metadata(o, metadata or {})
    except ValueError as e:
        raise UserError(f"cannot merge {frozen} and {head} into {out}: {e}") from None
    finally:
        if tmp_head.exists():
            os.unlink(tmp_head)


def _write_metadata(dst: BinaryIO, metadata: dict[str, str]) -> None:
    """ModelProto.metadata_props entries; a repeated field, so they may follow the graph."""
    for name, value in metadata.items():
        _write(dst, MODEL_METADATA, onnx.StringStringEntryProto(key=name, value=value))


def read_metadata(path: Path) -> dict[str, str]:
    """A model's metadata_props, read without parsing its graph or weights."""
    size = Path(path).stat().st_size
    out = {}
    try:
        with open(path, "rb") as f:
            for field, _, b, e in fields(f, 0, size):
                if field == MODEL_METADATA:
                    entry = onnx.StringStringEntryProto.FromString(read(f, b, e))
                    out[entry.key] = entry.value
    except (ValueError, DecodeError) as e:  # DecodeError: a damaged entry (also bad UTF-8)
        raise UserError(f"{path}: not an ONNX model ({e})") from None
    return out


def copy_with_metadata(src: Path, out: Path, metadata: dict[str, str]) -> None:
    """Write `out` = `src` with its metadata_props replaced by `metadata`; everything else is copied
    through in chunks, byte for byte."""
    size = Path(src).stat().st_size
    try:
        with open(src, "rb") as f, open(out, "wb") as o:
            for field, s, _, e in fields(f, 0, size):
                if field != MODEL_METADATA:
                    copy_range(f, s, e, o)
            _write_metadata(o, metadata)
    except ValueError as e:
        raise UserError(f"cannot copy {src} to {out}: {e}") from None


def _replacement(serialized: bytes, value: np.ndarray, name: str, same_shape: bool) -> bytes:
    """A serialized initializer `name` holding `value` in the dtype of the tensor it replaces
    (`serialized`, a small learned tensor); `same_shape`: its shape must not change."""
    tensor = onnx.TensorProto.FromString(serialized)
    value = np.asarray(value)
    if same_shape and list(value.shape) != list(tensor.dims):
        raise ValueError(f"{name}: shape {list(value.shape)} != {list(tensor.dims)}")
    dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return numpy_helper.from_array(value.astype(dtype), name).SerializeToString()


def _write(dst: BinaryIO, field: int, message) -> None:
    data = message.SerializeToString()
    dst.write(key(field, len(data)) + data)


def _copy_renamed_tensor(src: BinaryIO, start: int, end: int, name: str, dst: BinaryIO) -> None:
    """Write the TensorProto at [start, end) of `src` as a graph initializer named `name`: its
    other fields (dims, type, raw data, ...) are copied through in chunks, so a stacked weight of
    100+ MiB costs no memory. Tensors stored outside the file are refused."""
    keep, size = [], 0
    for field, s, b, e in fields(src, start, end):
        if field == 14:  # data_location
            src.seek(b)
            if read_varint(src) == onnx.TensorProto.EXTERNAL:
                raise ValueError("head graph with external data is not supported")
        if field != 8:  # everything but the name
            keep.append((s, e))
            size += e - s
    encoded = name.encode()
    name_field = key(8, len(encoded)) + encoded
    dst.write(key(GRAPH_INIT, size + len(name_field)) + name_field)
    for s, e in keep:
        copy_range(src, s, e, dst)


def _tensor_name(f: BinaryIO, start: int, end: int) -> str:
    """The name (field 8) of a serialized TensorProto, without reading its data."""
    for field, _, b, e in fields(f, start, end):
        if field == 8:
            return read(f, b, e).decode()
    return ""


def rewrite_streaming(
    src: Path,
    out: Path,
    *,
    replace: dict[str, np.ndarray] | None = None,
    add: Sequence[onnx.TensorProto] = (),
    edit_nodes=None,
    outputs: list[onnx.ValueInfoProto] | None = None,
) -> None:
    """Write `out` = the model `src` with the initializers named in `replace` given those values
    (their shapes may change), `add` appended, its node list passed through `edit_nodes` (nodes
    are small; none holds a weight) and, if given, `outputs` as the graph's outputs. Every other
    initializer is copied through in chunks, never parsed: rewriting head.onnx of ViT-B/16 (271 MiB)
    costs a few MiB, where `onnx.load` + edit + `onnx.save` held it three times (docs/design.md
    section 6: the feature-selection phase of a run under --memory-budget)."""
    replace = replace or {}
    size = Path(src).stat().st_size
    try:
        with open(src, "rb") as f:
            g0, g1 = graph_span(f, size)
            pieces: list[tuple[int, int] | bytes] = []
            nodes, found = [], set()
            for field, s, b, e in fields(f, g0, g1):
                if field == GRAPH_NODE:
                    node = onnx.NodeProto.FromString(read(f, b, e))
                    _check_no_subgraphs(node)
                    nodes.append(node)
                elif field == GRAPH_INIT and (name := _tensor_name(f, b, e)) in replace:
                    found.add(name)
                    data = _replacement(read(f, b, e), replace[name], name, same_shape=False)
                    pieces.append(key(GRAPH_INIT, len(data)) + data)
                elif field == GRAPH_OUTPUT and outputs is not None:
                    continue
                else:
                    pieces.append((s, e))
            if set(replace) - found:
                raise ValueError(f"no initializers {sorted(set(replace) - found)}")
            for message, field in (
                [(n, GRAPH_NODE) for n in (edit_nodes(nodes) if edit_nodes else nodes)]
                + [(t, GRAPH_INIT) for t in add]
                + [(o, GRAPH_OUTPUT) for o in outputs or ()]
            ):
                data = message.SerializeToString()
                pieces.append(key(field, len(data)) + data)
            length = sum(len(p) if isinstance(p, bytes) else p[1] - p[0] for p in pieces)
            with open(out, "wb") as o:
                for field, s, _, e in fields(f, 0, size):
                    if field != MODEL_GRAPH:
                        copy_range(f, s, e, o)
                        continue
                    o.write(key(MODEL_GRAPH, length))
                    for p in pieces:
                        if isinstance(p, bytes):
                            o.write(p)
                        else:
                            copy_range(f, p[0], p[1], o)
    except ValueError as e:
        raise UserError(f"cannot rewrite {src} into {out}: {e}") from None


def read_graph_skeleton(path: Path) -> tuple[list[onnx.NodeProto], list[str]]:
    """The nodes and input names of a model's graph, without reading its initializers."""
    size = Path(path).stat().st_size
    nodes, inputs = [], []
    with open(path, "rb") as f:
        g0, g1 = graph_span(f, size)
        for field, _, b, e in fields(f, g0, g1):
            if field == GRAPH_NODE:
                nodes.append(onnx.NodeProto.FromString(read(f, b, e)))
            elif field == GRAPH_INPUT:
                inputs.append(onnx.ValueInfoProto.FromString(read(f, b, e)).name)
    return nodes, inputs
