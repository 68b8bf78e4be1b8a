"""Reading and writing ONNX files at the protobuf wire level: field spans, varints, chunked copies.

The streaming writers (stream.py, share.py) use these to touch one tensor or node at a time instead
of parsing whole models (docs/design.md section 6: a memory budget covers the whole process).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

import onnx

# Field numbers (onnx.proto3).
MODEL_GRAPH, MODEL_DOC, MODEL_OPSET, MODEL_METADATA = 7, 6, 8, 14
GRAPH_NODE, GRAPH_NAME, GRAPH_INIT, GRAPH_DOC, GRAPH_INPUT, GRAPH_OUTPUT, GRAPH_VALUE_INFO = 1, 2, 5, 10, 11, 12, 13
CHUNK = 1 << 20


def read_varint(f: BinaryIO) -> int:
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            raise ValueError("truncated protobuf varint")
        result |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return result
        shift += 7


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def key(field: int, payload_len: int) -> bytes:
    """Header of a length-delimited field."""
    return varint(field << 3 | 2) + varint(payload_len)


def fields(f: BinaryIO, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, field start, payload start, field end) of each field in [start, end)."""
    pos = start
    while pos < end:
        f.seek(pos)
        tag = read_varint(f)
        field, wire = tag >> 3, tag & 7
        if wire == 2:
            length = read_varint(f)
            body = f.tell()
            stop = body + length
        elif wire == 0:
            read_varint(f)
            body = stop = f.tell()
        elif wire == 1:
            body, stop = f.tell(), f.tell() + 8
        elif wire == 5:
            body, stop = f.tell(), f.tell() + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if stop > end:
            raise ValueError("protobuf field runs past its message")
        yield field, pos, body, stop
        pos = stop


def copy_range(src: BinaryIO, start: int, end: int, dst: BinaryIO) -> None:
    src.seek(start)
    left = end - start
    while left:
        block = src.read(min(CHUNK, left))
        if not block:
            raise ValueError("unexpected end of file")
        dst.write(block)
        left -= len(block)


def read(f: BinaryIO, start: int, end: int) -> bytes:
    f.seek(start)
    return f.read(end - start)


def graph_span(f: BinaryIO, size: int) -> tuple[int, int]:
    spans = [(body, stop) for field, _, body, stop in fields(f, 0, size) if field == MODEL_GRAPH]
    if len(spans) != 1:
        raise ValueError(f"expected one graph, found {len(spans)}")
    return spans[0]


def opsets(f: BinaryIO, size: int) -> dict[str, int]:
    out = {}
    for field, _, body, stop in fields(f, 0, size):
        if field == MODEL_OPSET:
            op = onnx.OperatorSetIdProto.FromString(read(f, body, stop))
            out[op.domain] = op.version
    return out
