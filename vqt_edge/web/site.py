"""`vqt-edge web`: a static site that adapts a bundle inside a browser tab (docs/browser.md).

The page runs the bundle's frozen graph once per photo and then the portable step graph
(train/step.onnx, docs/design.md section 9) on onnxruntime-web's WASM build, with the optimizer and
the schedule of device_runner/ in JavaScript: the photos never leave the tab. The site is files only:
the page's ES modules (package data beside this module, so `pip install` ships them with the command
that writes them), onnxruntime-web's WASM files copied from the npm package the repository pins
(package.json; `make web` runs `npm ci`), and the bundle's graphs. Pure files and JSON: no
onnxruntime, no torch.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from vqt_edge import adapter_config
from vqt_edge import manifest as mf
from vqt_edge.errors import UserError
from vqt_edge.preprocess import MAX_PIXELS

ASSETS = Path(__file__).parent / "assets"
REPO = Path(__file__).resolve().parent.parent.parent
#: The onnxruntime-web release the page is tested with (package.json pins the same).
ORT_WEB_VERSION = "1.31.1"
#: The files of its WASM-only build: the ES module, its loader and the SIMD (+threads) binary.
ORT_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
ORT_ENV = "VQT_EDGE_ORT_WEB"  # a folder holding onnxruntime-web's dist/ files, where there is no node_modules
#: The page's defaults: those of `vqt-edge train` (device_runner/trainer.py TrainConfig).
DEFAULTS = {"epochs": 30, "batch_size": 32, "lr": 1e-2, "weight_decay": 1e-4, "seed": 0, "val_split": 0.2}


def ort_dist(explicit: Path | None = None) -> Path:
    """The folder of onnxruntime-web's files: `explicit`, $VQT_EDGE_ORT_WEB, or this checkout's
    node_modules (`npm ci`), which must hold the pinned version."""
    if explicit is None and os.environ.get(ORT_ENV):
        explicit = Path(os.environ[ORT_ENV])
    folder = explicit or REPO / "node_modules" / "onnxruntime-web" / "dist"
    missing = [name for name in ORT_FILES if not (folder / name).is_file()]
    if missing:
        raise UserError(
            f"{folder}: onnxruntime-web's files {missing} are missing; run `npm ci` in the repository "
            f"(package.json pins onnxruntime-web {ORT_WEB_VERSION}) or pass --ort-web DIR"
        )
    package = folder.parent / "package.json"
    if explicit is None and package.is_file():
        version = json.loads(package.read_text()).get("version")
        if version != ORT_WEB_VERSION:
            raise UserError(
                f"{package}: onnxruntime-web {version}, the page is tested with {ORT_WEB_VERSION}; run `npm ci`"
            )
    return folder


def site_config(manifest: mf.Manifest) -> dict:
    """What the page needs to know about the bundle, computed here once (site.json)."""
    spec = manifest.spec
    return {
        "model": manifest.model,
        "image_size": spec.arch.image_size,
        "mean": list(manifest.mean),
        "std": list(manifest.std),
        "num_classes": spec.num_classes,
        "class_names": manifest.class_names,
        "trainable_shapes": {k: list(v) for k, v in spec.trainable_shapes.items()},
        "frozen_outputs": {
            name: {"shape": list(shape), "cache_dtype": dtype}
            for name, (shape, dtype) in spec.frozen_output_specs.items()
        },
        "query_keep_shape": list(spec.query_keep_shape) if spec.query_keep_shape else None,
        "dropout": spec.dropout,
        "max_pixels": MAX_PIXELS,
        "defaults": DEFAULTS,
        "adapter_metadata": {
            "format": mf.FORMAT,
            "method": spec.method,
            "last_k": str(spec.last_k),
            "feature_norm": spec.feature_norm,
            "query_layers": ",".join(map(str, spec.query_layers)),
            "aggregate": spec.aggregate,
        },
        # What the page's stored K/V and checkpoints are keyed by (IndexedDB, store.js).
        "bundle_sha256": {
            "frozen": manifest.files[mf.FROZEN],
            "step": manifest.files[mf.STEP_MODEL],
            "step_init": manifest.files[mf.STEP_INIT],
        },
        "adapter_config": adapter_config.from_manifest(manifest, []),  # the page fills class_names
        "ort_web": ORT_WEB_VERSION,
    }


def write_site(bundle: Path, out: Path, ort_web: Path | None = None) -> dict:
    """Write the static site for `bundle` into `out` (created; an existing site there is replaced).
    Returns {relative path: size in bytes}."""
    manifest = mf.read_manifest(bundle, verify=True)
    if mf.STEP_MODEL not in manifest.files or mf.STEP_INIT not in manifest.files:
        raise UserError(
            f"{bundle}: no {mf.STEP_MODEL}; the page trains with the portable step graph: re-export the bundle"
        )
    dist = ort_dist(ort_web)
    if out.exists() and not (out / "site.json").is_file() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not a `vqt-edge web` site; give an empty or new folder")
    out.mkdir(parents=True, exist_ok=True)
    for asset in sorted(ASSETS.iterdir()):
        if asset.suffix in (".html", ".js", ".css"):
            shutil.copyfile(asset, out / asset.name)
    (out / "ort").mkdir(exist_ok=True)
    for name in ORT_FILES:
        shutil.copyfile(dist / name, out / "ort" / name)
    licence = dist.parent / "LICENSE"
    if licence.is_file():
        shutil.copyfile(licence, out / "ort" / "LICENSE")
    (out / "bundle").mkdir(exist_ok=True)
    for name, target in (
        (mf.FROZEN, "frozen.onnx"),
        (mf.STEP_MODEL, "step.onnx"),
        (mf.STEP_INIT, "step_init.safetensors"),
    ):
        shutil.copyfile(bundle / name, out / "bundle" / target)
    (out / "site.json").write_text(json.dumps(site_config(manifest), indent=1) + "\n")
    return {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
