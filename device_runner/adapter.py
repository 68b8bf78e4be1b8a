"""An adapter applied to its bundle: the frozen graph plus the few trained tensors, no model.onnx.

`AdapterModel.open` reads a folder that holds `adapter.safetensors` and `adapter_config.json` (a run
folder, or the two files copied anywhere), checks the config against the bundle's manifest and
frozen.onnx hash, and runs two sessions: frozen.onnx (pixel_values -> the outputs the head reads)
and the bundle's inference head (train/head.onnx) with its trainable initializers replaced by the
adapter's tensors (`SessionOptions.add_initializer`). That is the same computation as the run's
model.onnx, which merges the same two graphs with the same replacement (device_runner/deploy.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from device_runner import ort
from device_runner.deploy import load_adapter
from vqt_edge import adapter_config
from vqt_edge import manifest as mf
from vqt_edge.errors import UserError
from vqt_edge.manifest import Manifest
from vqt_edge.preprocess import load_rgb, preprocess
from vqt_edge.run_folder import ADAPTER, RUN_FILE, RunFolder

ImageLike = str | os.PathLike[str] | Image.Image


@dataclass
class AdapterModel:
    """Predicts from pixels or images with a bundle's frozen graph and an adapter's tensors."""

    manifest: Manifest
    config: dict
    classes: list[str]
    frozen: Any  # onnxruntime InferenceSessions (onnxruntime ships no type hints)
    head: Any
    _values: list  # the OrtValues behind the head's replaced initializers: they must outlive it

    @classmethod
    def open(
        cls, folder: Path, bundle: Path | None = None, device: str = "cpu", threads: int | None = None
    ) -> AdapterModel:
        folder = Path(folder)
        if not (folder / ADAPTER).is_file():
            raise UserError(
                f"{folder}: no {ADAPTER}; give a run folder or a folder with {ADAPTER} and "
                f"{adapter_config.ADAPTER_CONFIG}"
            )
        run = RunFolder(folder)
        if run.is_run():  # a run folder: its recorded hashes first, always (a summary without them is refused)
            run.verify()
        elif bundle is None:
            raise UserError(
                f"{folder}: give the bundle this adapter was trained on (bundle=...); no {RUN_FILE} names it"
            )
        config = adapter_config.read(folder)
        bundle = Path(bundle) if bundle is not None else run.bundle()
        manifest = mf.read_manifest(bundle, verify=True, only=[mf.FROZEN, mf.HEAD_MODEL])
        adapter_config.check_matches(config, manifest, folder / adapter_config.ADAPTER_CONFIG)
        tensors = load_adapter(folder / ADAPTER, manifest)  # shapes checked against the bundle
        providers = ort.providers(device)
        rt = ort.onnxruntime()
        frozen = rt.InferenceSession(
            str(bundle / mf.FROZEN), sess_options=ort.session_options(threads), providers=providers
        )
        options = ort.session_options(threads)
        # Graph optimizations off: with them, ORT constant-folds the query path of the graph's own
        # (initial) query tokens before add_initializer's values apply; measured on a tiny bundle:
        # logits off by 0.2 from model.onnx with them, 6e-8 without.
        options.graph_optimization_level = rt.GraphOptimizationLevel.ORT_DISABLE_ALL
        values = []
        for name in manifest.spec.trainable_shapes:
            value = rt.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(tensors[name], np.float32))
            options.add_initializer(name, value)
            values.append(value)
        head = rt.InferenceSession(str(bundle / mf.HEAD_MODEL), sess_options=options, providers=providers)
        return cls(manifest, config, list(config["class_names"]), frozen, head, values)

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        """pixels float32 [B,3,S,S], normalized with the bundle's mean/std -> logits [B,C]."""
        outputs = self.frozen.run(self.manifest.spec.frozen_outputs, {"pixel_values": np.asarray(pixels, np.float32)})
        feed = dict(zip(self.manifest.spec.frozen_outputs, outputs))
        wired = [i.name for i in self.head.get_inputs() if i.name in feed]
        return self.head.run(["logits"], {name: feed[name] for name in wired})[0]

    def pixels(self, images: Sequence[ImageLike]) -> np.ndarray:
        """Decode (paths) and preprocess images exactly as training did; PIL images are used as given."""
        a, m = self.manifest.spec.arch, self.manifest
        out = np.empty((len(images), a.channels, a.image_size, a.image_size), np.float32)
        for i, image in enumerate(images):
            img = image if isinstance(image, Image.Image) else load_rgb(image)
            out[i] = preprocess(img, a.image_size, m.mean, m.std)
        return out

    def predict(self, images: Sequence[ImageLike]) -> list[dict]:
        """One {label, logits} per image, in order (an unreadable file raises UnreadableImage)."""
        logits = self.logits(self.pixels(images)) if len(images) else np.zeros((0, len(self.classes)), np.float32)
        return [{"label": self.classes[int(row.argmax())], "logits": [float(x) for x in row]} for row in logits]
