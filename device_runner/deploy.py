"""What a finished run hands over: `adapter.safetensors` and a self-contained `model.onnx`.

The adapter is the few learned tensors (DESIGN.md section 3), readable without vqt-edge. model.onnx
is frozen.onnx with the bundle's inference head graph (train/head.onnx, its learned tensors replaced
by the trained ones) merged behind it: pixel_values -> logits, for any onnxruntime.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from device_runner.onnx_share import find_shared
from device_runner.onnx_stream import merge_streaming
from vqt_edge import manifest as mf
from vqt_edge.errors import UserError
from vqt_edge.manifest import Manifest

ADAPTER = "adapter.safetensors"
MODEL = "model.onnx"


def _atomic(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def save_adapter(path: Path, tensors: dict[str, np.ndarray], manifest: Manifest) -> None:
    tmp = _atomic(path)
    save_file(
        {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
        str(tmp),
        metadata={"format": mf.FORMAT, "method": manifest.method, "last_k": str(manifest.last_k),
                  "feature_norm": manifest.feature_norm, "query_layers": ",".join(map(str, manifest.query_layers))},
    )
    os.replace(tmp, path)


def load_adapter(path: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """Read an adapter and check every tensor's shape against the bundle it belongs to."""
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    expected = manifest.adapter_shapes
    for name, shape in expected.items():
        if name not in tensors:
            raise UserError(f"{path}: tensor {name!r} is missing")
        if tensors[name].dtype != np.float32 or tensors[name].shape != shape:
            raise UserError(
                f"{path}: tensor {name!r} is {tensors[name].dtype}{list(tensors[name].shape)}, expected float32{list(shape)}"
            )
    extra = set(tensors) - set(expected)
    if extra:
        raise UserError(f"{path}: unexpected tensors {sorted(extra)}")
    return tensors


def build_model(bundle: Path, manifest: Manifest, adapter: dict[str, np.ndarray], out: Path) -> None:
    """Write model.onnx: frozen.onnx -> head.onnx (with the adapter's tensors), one graph; each head
    input is wired to the frozen output of the same name (`manifest.frozen_outputs`), every other
    head name is prefixed with "head/", and the only output is `logits`. The head's frozen weights
    that frozen.onnx already holds are read there, not copied (device_runner/onnx_share.py).

    Streamed at the protobuf level (device_runner/onnx_stream.py), one tensor at a time: loading,
    merging and saving the graphs with onnx.compose held every weight several times (3.2 GiB above
    the process baseline for ViT-B/16), the largest peak of a whole training run."""
    tmp = _atomic(out)
    learned = {graph_name: np.asarray(adapter[name], np.float32) for name, graph_name in manifest.trainable.items()}
    merge_streaming(
        bundle / mf.FROZEN, bundle / mf.HEAD_MODEL, tmp, learned,
        shared=find_shared(bundle / mf.FROZEN, bundle / mf.HEAD_MODEL, set(learned)),
        doc_string=f"vqt-edge {manifest.model}: pixel_values [B,3,S,S] normalized with mean {manifest.mean}, "
                   f"std {manifest.std} -> logits",
    )
    os.replace(tmp, out)
