"""Byte-level ONNX readers and writers: the streamed merge into model.onnx (stream.py), weight sharing
with frozen.onnx (share.py) and the streamed rewrite of a graph's initializers (stream.py), built on
the protobuf wire helpers in wire.py. Each touches one tensor at a time (docs/design.md section 6)."""
