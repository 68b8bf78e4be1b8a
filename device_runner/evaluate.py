"""eval and predict on a finished run, through its deployable model.onnx, one batch at a time.

Streaming keeps the peak memory independent of how many images are asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from device_runner import ort
from device_runner.data import drop_unreadable, iter_batches, load_dataset
from device_runner.deploy import MODEL
from device_runner.trainer import BUNDLE_MANIFEST, RUN_FILE, RUN_FILES, SUMMARY
from vqt_edge.errors import UserError
from vqt_edge.manifest import Manifest, sha256_file
from vqt_edge.preprocess import UnreadableImage


@dataclass
class FinishedRun:
    manifest: Manifest
    classes: list[str]
    session: object

    @classmethod
    def open(cls, run: Path, device: str = "cpu") -> "FinishedRun":
        run = Path(run)
        for name in (RUN_FILE, BUNDLE_MANIFEST, MODEL):
            if not (run / name).is_file():
                raise UserError(f"{run}: no {name}; is this a finished `vqt-edge train` run?")
        try:
            info = json.loads((run / RUN_FILE).read_text())
            manifest = Manifest.from_dict(json.loads((run / BUNDLE_MANIFEST).read_text()), str(run / BUNDLE_MANIFEST))
            classes = info["classes"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:  # ValueError: bad JSON or UTF-8
            raise UserError(f"{run}: damaged run files ({type(e).__name__}: {e})") from None
        if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes) and len(classes) == manifest.num_classes):
            raise UserError(f"{run / RUN_FILE}: damaged: its classes do not match the {manifest.num_classes} of the bundle")
        verify_run_files(run)
        providers = ort.providers(device)  # a clear UserError when this build lacks the device
        rt = ort.onnxruntime()
        # model.onnx's query path reads the frozen graph's weights (device_runner/onnx_share.py), and
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


def verify_run_files(run: Path) -> None:
    """Check the sha256 of the run's deployable files against summary.json "files".

    A bit flipped in model.onnx's weights still loads and silently predicts something else; only a
    hash catches it. The trainer records the hash of every file in RUN_FILES; a summary that lacks
    one (or lacks "files") is refused, so deleting a line of summary.json cannot turn the check off.
    """
    path = run / SUMMARY
    if not path.is_file():
        raise UserError(f"{path}: missing; is {run} a finished `vqt-edge train` run?")
    try:
        files = json.loads(path.read_text()).get("files")
    except (OSError, ValueError, AttributeError, RecursionError) as e:
        raise UserError(f"{path}: damaged ({type(e).__name__}: {e})") from None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise UserError(f"{path}: damaged: 'files' must map the run's files to their sha256")
    for name in files:
        if name not in RUN_FILES:
            raise UserError(f"{path}: names an unexpected file {name!r}")
    for name in RUN_FILES:
        if name not in files:
            raise UserError(f"{path}: records no sha256 for {name}, so the run cannot be checked; "
                            "copy the run folder again, or train again.")
        if not (run / name).is_file():
            raise UserError(f"{run / name}: missing from the run folder")
        if sha256_file(run / name) != files[name]:
            raise UserError(f"{run / name}: sha256 does not match {SUMMARY}; the file is damaged or was replaced. "
                            "Copy the run folder again, or train again.")


def _check_signature(session, manifest: Manifest, path: Path) -> None:
    """model.onnx must take the bundle's images and give one logit per class; another run's
    model (another image size or class count) is refused here, not mid-way through the images."""
    a = manifest.arch
    inputs = {i.name: i.shape for i in session.get_inputs()}
    outputs = {o.name: o.shape for o in session.get_outputs()}
    want_in, want_out = [None, a.channels, a.image_size, a.image_size], [None, manifest.num_classes]

    def fits(shape, want) -> bool:
        return len(shape) == len(want) and all(not isinstance(d, int) or w is None or d == w for d, w in zip(shape, want))

    if "pixel_values" not in inputs or "logits" not in outputs or not fits(inputs["pixel_values"], want_in) \
            or not fits(outputs["logits"], want_out):
        raise UserError(
            f"{path}: takes {inputs} and gives {outputs}; the run's bundle needs pixel_values "
            f"[B,{a.channels},{a.image_size},{a.image_size}] -> logits [B,{manifest.num_classes}]. "
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
                good.append(next(iter_batches([(p, 0)], 1, m.arch.image_size, m.mean, m.std))[0])
            except UnreadableImage as e:
                errors[p] = str(e)
        logits = run.logits(np.concatenate(good)) if good else np.zeros((0, m.num_classes), np.float32)
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
    dataset, skipped = drop_unreadable(load_dataset(data, classes=run.classes), m.arch.image_size)
    c = len(run.classes)
    confusion = np.zeros((c, c), dtype=np.int64)
    for pixels, labels in iter_batches(dataset.samples, batch_size, m.arch.image_size, m.mean, m.std):
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
