"""What a finished run hands over: `adapter.safetensors` and a self-contained `model.onnx`.

The adapter is the few learned tensors (docs/design.md section 3), readable without vqt-edge. model.onnx
is frozen.onnx with the bundle's inference head graph (train/head.onnx, its learned tensors replaced
by the trained ones) merged behind it: pixel_values -> logits, for any onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save

from device_runner.onnx_io.share import find_shared
from device_runner.onnx_io.stream import merge_streaming
from device_runner.selection import FEATURE_INDEX, selected_head
from vqt_edge import manifest as mf
from vqt_edge import model_metadata
from vqt_edge.errors import UserError
from vqt_edge.fileio import atomic_path, atomic_write_bytes
from vqt_edge.manifest import Manifest


def save_adapter(path: Path, tensors: dict[str, np.ndarray], manifest: Manifest) -> None:
    """Write the adapter (docs/design.md section 3); the same tensors give the same bytes."""
    atomic_write_bytes(path, adapter_bytes(tensors, manifest))


def adapter_bytes(tensors: dict[str, np.ndarray], manifest: Manifest) -> bytes:
    """The bytes of adapter.safetensors (model.onnx's metadata records their sha256)."""
    raw = save(
        {k: np.ascontiguousarray(v, dtype=np.int64 if k == FEATURE_INDEX else np.float32) for k, v in tensors.items()},
        metadata={
            "format": mf.FORMAT,
            "method": manifest.spec.method,
            "last_k": str(manifest.spec.last_k),
            "feature_norm": manifest.spec.feature_norm,
            "query_layers": ",".join(map(str, manifest.spec.query_layers)),
            "aggregate": manifest.spec.aggregate,
        },
    )
    return _sorted_header(raw)


def _sorted_header(raw: bytes) -> bytes:
    """safetensors writes its `__metadata__` map in a random order each time (a Rust HashMap,
    safetensors issue #584), so two identical runs gave adapter files with different hashes. The
    header is re-written as JSON with sorted keys, padded with spaces to 8 bytes as safetensors
    pads it; the tensor bytes and their offsets (relative to the end of the header) are unchanged."""
    size = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + raw[8 + size :]


def load_adapter(path: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """Read an adapter and check every tensor's shape against the bundle it belongs to."""
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    expected: dict[str, tuple[tuple[int, ...], type[np.generic]]] = {
        name: (shape, np.float32) for name, shape in manifest.spec.trainable_shapes.items()
    }
    index = tensors.get(FEATURE_INDEX)
    if index is not None:  # feature selection (device_runner/selection.py): the head reads k features
        k = index.shape[0] if index.ndim == 1 else -1
        if k < 1 or index.min() < 0 or index.max() >= expected["head.weight"][0][1]:
            raise UserError(f"{path}: tensor {FEATURE_INDEX!r} must list feature indices of the head's input")
        expected[FEATURE_INDEX] = ((k,), np.int64)
        expected["head.weight"] = ((expected["head.weight"][0][0], k), np.float32)
    for name, (shape, dtype) in expected.items():
        if name not in tensors:
            raise UserError(f"{path}: tensor {name!r} is missing")
        if tensors[name].dtype != dtype or tensors[name].shape != shape:
            raise UserError(
                f"{path}: tensor {name!r} is {tensors[name].dtype}{list(tensors[name].shape)}, "
                f"expected {np.dtype(dtype).name}{list(shape)}"
            )
    extra = set(tensors) - set(expected)
    if extra:
        raise UserError(f"{path}: unexpected tensors {sorted(extra)}")
    return tensors


def build_model(
    bundle: Path,
    manifest: Manifest,
    adapter: dict[str, np.ndarray],
    out: Path,
    classes: list[str] | None = None,
    adapter_sha256: str | None = None,
) -> None:
    """Write model.onnx: frozen.onnx -> head.onnx (with the adapter's tensors), one graph; each head
    input is wired to the frozen output of the same name (`manifest.spec.frozen_outputs`), every other
    head name is prefixed with "head/", and the only output is `logits`. The head's frozen weights
    that frozen.onnx already holds are read there, not copied (device_runner/onnx_io/share.py).

    Streamed at the protobuf level (device_runner/onnx_io/stream.py), one tensor at a time: loading,
    merging and saving the graphs with onnx.compose held every weight several times (3.2 GiB above
    the process baseline for ViT-B/16), the largest peak of a whole training run.

    The file describes itself (vqt_edge/model_metadata.py): class names in logit order (`classes`;
    default the bundle's, else "0".."C-1"), preprocessing, adapter spec, and the sha256 of the bundle's
    manifest and of the adapter file: `adapter_sha256` when it is written already (hashed from disk:
    serializing a fine-tuned model's adapter again would hold it twice), else of the bytes these tensors give."""
    names = classes or manifest.class_names or [str(i) for i in range(manifest.spec.num_classes)]
    metadata = model_metadata.build(
        manifest,
        names,
        bundle_sha256=mf.sha256_file(bundle / mf.MANIFEST),
        adapter_sha256=adapter_sha256 or hashlib.sha256(adapter_bytes(adapter, manifest)).hexdigest(),
    )
    learned = {name: np.asarray(adapter[name], np.float32) for name in manifest.spec.trainable_shapes}
    with atomic_path(out) as tmp, selected_head(bundle, manifest, adapter, out.parent) as head:
        # the bundle's head.onnx unless selecting
        merge_streaming(
            bundle / mf.FROZEN,
            head,
            tmp,
            learned,
            shared=find_shared(bundle / mf.FROZEN, head, set(learned)),
            doc_string=f"vqt-edge {manifest.model}: pixel_values [B,3,S,S] normalized with mean {manifest.mean}, "
            f"std {manifest.std} -> logits",
            metadata=metadata,
        )
