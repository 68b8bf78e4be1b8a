"""eval and predict on a finished run, through its deployable model.onnx, one batch at a time.

Streaming keeps the peak memory independent of how many images are asked for.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_runner import ort
from device_runner.data import drop_unreadable, iter_batches, load_dataset
from vqt_edge.errors import UserError
from vqt_edge.manifest import Manifest
from vqt_edge.preprocess import UnreadableImage
from vqt_edge.run_folder import MODEL, RunFolder


@dataclass
class FinishedRun:
    manifest: Manifest
    classes: list[str]
    session: Any  # an onnxruntime InferenceSession (onnxruntime ships no type hints)

    @classmethod
    def open(cls, run: Path, device: str = "cpu") -> FinishedRun:
        run = Path(run)
        manifest, classes = RunFolder(run).open_finished()  # its files' hashes checked
        providers = ort.providers(device)  # a clear UserError when this build lacks the device
        rt = ort.onnxruntime()
        # model.onnx's query path reads the frozen graph's weights (device_runner/onnx_io/share.py), and
        # onnxruntime would keep a weight that two MatMul kernels prepack both as it is and packed.
        # ViT-B/16 (random init, 1 thread): load peak 716 -> 391 MiB, resident 669 -> 344 MiB, for
        # 1.24 instead of 1.16 CPU s per batch of 2 images (the copying merge with prepacking: 1.15).
        options = ort.session_options(prepack=False)
        try:
            session = rt.InferenceSession(str(run / MODEL), sess_options=options, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types (InvalidProtobuf, Fail, ...)
            raise UserError(f"{run / MODEL}: cannot be loaded; the file is damaged ({type(e).__name__}: {e})") from None
        _check_signature(session, manifest, run / MODEL)
        return cls(manifest, list(classes), session)

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {"pixel_values": pixels})[0]


def _check_signature(session, manifest: Manifest, path: Path) -> None:
    """model.onnx must take the bundle's images and give one logit per class; another run's
    model (another image size or class count) is refused here, not mid-way through the images."""
    a = manifest.spec.arch
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    want_in, want_out = [None, a.channels, a.image_size, a.image_size], [None, manifest.spec.num_classes]

    def fits(shape, want) -> bool:
        return len(shape) == len(want) and all(
            not isinstance(d, int) or w is None or d == w for d, w in zip(shape, want)
        )

    if (
        "pixel_values" not in inputs
        or "logits" not in outputs
        or not fits(inputs["pixel_values"], want_in)
        or not fits(outputs["logits"], want_out)
    ):
        raise UserError(
            f"{path}: takes {inputs} and gives {outputs}; the run's bundle needs pixel_values "
            f"[B,{a.channels},{a.image_size},{a.image_size}] -> logits [B,{manifest.spec.num_classes}]. "
            "The file is from another run or damaged."
        )


def predict(run: FinishedRun, paths: Sequence[Path], batch_size: int = 32) -> Iterator[dict]:
    """One result per readable image, in order; unreadable images yield an `error` entry instead."""
    m = run.manifest
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start : start + batch_size])
        good, errors = [], {}
        for p in chunk:
            try:
                good.append(next(iter_batches([(p, 0)], 1, m.spec.arch.image_size, m.mean, m.std))[0])
            except UnreadableImage as e:
                errors[p] = str(e)
        logits = run.logits(np.concatenate(good)) if good else np.zeros((0, m.spec.num_classes), np.float32)
        it = iter(logits)
        for p in chunk:
            if p in errors:
                yield {"path": str(p), "error": errors[p]}
            else:
                row = next(it)
                yield {"path": str(p), "label": run.classes[int(row.argmax())], "logits": [float(x) for x in row]}


def evaluate(run: FinishedRun, data: Path, batch_size: int = 32) -> dict:
    """Accuracy, per-class accuracy and confusion matrix (rows: true class, columns: predicted)."""
    m = run.manifest
    dataset, skipped = drop_unreadable(load_dataset(data, classes=run.classes), m.spec.arch.image_size)
    c = len(run.classes)
    confusion = np.zeros((c, c), dtype=np.int64)
    for pixels, labels in iter_batches(dataset.samples, batch_size, m.spec.arch.image_size, m.mean, m.std):
        np.add.at(confusion, (labels, run.logits(pixels).argmax(-1)), 1)
    total = int(confusion.sum())
    per_class = {
        name: (float(confusion[i, i] / confusion[i].sum()) if confusion[i].sum() else None)
        for i, name in enumerate(run.classes)
    }
    return {
        "accuracy": float(np.trace(confusion) / total) if total else 0.0,
        "images": total,
        "skipped_images": len(skipped),
        "per_class_accuracy": per_class,
        "classes": run.classes,
        "confusion_matrix": confusion.tolist(),
    }
