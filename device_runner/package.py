"""`vqt-edge package` (vqt_edge/cli/package.py, `api.package`): a finished run's model where apps already are (docs/deploy.md).

- `--format hf`: a Hugging Face folder that optimum's `ORTModelForImageClassification.from_pretrained`
  and `transformers.pipeline("image-classification")` load: `model.onnx` (the run's, copied: one file,
  no external data), `config.json` (a ViT image-classification config with the run's `id2label`),
  `preprocessor_config.json` (a `ViTImageProcessor` doing vqt-edge's preprocessing: bicubic squash to
  SxS, no crop, 1/255, the bundle's mean/std, RGB) and a model card `README.md`.
- `--format onnx`: the one self-describing file, model.onnx with its metadata_props
  (vqt_edge/model_metadata.py), for a bare onnxruntime or `vqt-edge predict --model`.

The run is verified first (RunFolder.open_finished: every hash). The metadata is recomputed from the
run's files, so a run written before model.onnx carried it gets a self-describing copy too. Needs
neither torch nor transformers: the files are JSON and a byte copy of model.onnx.
"""

from __future__ import annotations

import json
from pathlib import Path

from device_runner.onnx_io.stream import copy_with_metadata
from vqt_edge import __version__, model_metadata
from vqt_edge import manifest as mf
from vqt_edge.errors import UserError
from vqt_edge.fileio import atomic_write_text
from vqt_edge.manifest import Manifest
from vqt_edge.run_folder import ADAPTER, MODEL, RunFolder

FORMATS = model_metadata.PACKAGE_FORMATS
#: One line per method for the model card (vqt-edge's docs/design.md sections 4 and 5).
METHODS = {
    "vqt": "Visual Query Tuning (Tu et al., CVPR 2023): learned query tokens per layer read the frozen layer's "
    "keys and values; a linear head reads their outputs and the final CLS token.",
    "linear": "linear probe: a linear head on the frozen final CLS token.",
    "vpt": "VPT-Deep: learned prompt tokens in each of the last k layers; a linear head on the final CLS token.",
    "adaptformer": "AdaptFormer: a bottleneck adapter beside the MLP of each of the last k layers; a linear head.",
    "finetune": "partial fine-tuning: the last k layers and the final norm trained; a linear head.",
    "head2toe": "Head2Toe: pooled features of every layer, group-lasso selected, read by a linear head.",
    "vqt+vpt": "VQT on a backbone whose last k layers carry VPT-Deep prompts.",
    "vqt+adaptformer": "VQT on a backbone whose last k layers carry AdaptFormer adapters.",
}
#: PIL.Image.Resampling.BICUBIC, as transformers' `resample` field spells it.
PIL_BICUBIC = 3


def hf_config(manifest: Manifest, classes: list[str], metadata: dict[str, str]) -> dict:
    """config.json: what `AutoConfig` needs (`model_type`) and the pipeline reads (`id2label`); the
    ViT fields describe the backbone; `vqt_edge` says what the ONNX graph really is (a ViT with a
    VQT adapter, not `ViTForImageClassification`, so no `architectures` entry a PyTorch loader would follow)."""
    a = manifest.spec.arch
    return {
        "model_type": "vit",
        "image_size": a.image_size,
        "patch_size": a.patch,
        "num_channels": a.channels,
        "hidden_size": a.dim,
        "num_hidden_layers": a.depth,
        "num_attention_heads": a.heads,
        "intermediate_size": a.mlp_dim,
        "layer_norm_eps": a.eps,
        "hidden_act": "gelu",
        "id2label": {str(i): name for i, name in enumerate(classes)},
        "label2id": {name: i for i, name in enumerate(classes)},
        "vqt_edge": {
            k: (json.loads(v) if k in ("adapter_spec", "class_names", "mean", "std") else v)
            for k, v in metadata.items()
        },
    }


def preprocessor_config(manifest: Manifest) -> dict:
    """preprocessor_config.json: a slow `ViTImageProcessor` doing exactly vqt_edge/preprocess.py's
    resize (pillow bicubic on 8-bit RGB to SxS, no crop) and normalization."""
    size = manifest.spec.arch.image_size
    return {
        "image_processor_type": "ViTImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"height": size, "width": size},
        "resample": PIL_BICUBIC,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(x) for x in manifest.mean],
        "image_std": [float(x) for x in manifest.std],
    }


def _accuracy_lines(summary: dict) -> list[str]:
    """What the run recorded about accuracy, each with where it was measured."""
    lines = []
    if summary.get("test_accuracy") is not None:
        lines.append(
            f"- test accuracy: {summary['test_accuracy']:.4f} on {summary.get('test_images', '?')} held-out images"
        )
    final = summary.get("final") or {}
    if final.get("val_acc") is not None:
        lines.append(
            f"- validation accuracy (last epoch): {final['val_acc']:.4f} on {summary.get('val_images', '?')} images"
        )
    if final.get("train_acc") is not None:
        lines.append(f"- training accuracy (last epoch, with dropout): {final['train_acc']:.4f}")
    selection = summary.get("feature_selection") or {}
    if selection.get("val_acc") is not None:
        lines.append(f"- validation accuracy after feature selection: {selection['val_acc']:.4f}")
    return lines or ["- none recorded (train with --test or --val to record it)"]


def model_card(manifest: Manifest, classes: list[str], info: dict, summary: dict, metadata: dict[str, str]) -> str:
    spec, a = manifest.spec, manifest.spec.arch
    weights = manifest.weights or {}
    origin = str(weights.get("source") or "")
    if origin and not origin.startswith("hf-hub:"):
        origin = Path(origin).name  # a local path says nothing to a reader of the card, and tells where it was built
    source = " ".join(x for x in (str(weights.get("format") or ""), origin) if x) or "random initialization"
    layers = ", ".join(map(str, spec.query_layers)) or "-"
    config = info.get("config") or {}
    tags = "\n".join(f"- {t}" for t in ("vqt-edge", "onnx", "image-classification", "vision-transformer", spec.method))
    return f"""---
library_name: onnx
pipeline_tag: image-classification
tags:
{tags}
---

# {manifest.model} adapted with vqt-edge ({spec.method})

An image classifier for {len(classes)} classes: a frozen Vision Transformer (`{manifest.model}`) with an
adapter trained on the device by vqt-edge {__version__}. `model.onnx`
maps `pixel_values` float32 [B,3,{a.image_size},{a.image_size}] to `logits` [B,{len(classes)}].

## Use

```python
from optimum.onnxruntime import ORTModelForImageClassification
from transformers import AutoImageProcessor, pipeline

model = ORTModelForImageClassification.from_pretrained("THIS_FOLDER")
classify = pipeline("image-classification", model=model,
                    image_processor=AutoImageProcessor.from_pretrained("THIS_FOLDER"))
print(classify("image.png"))
```

Without Python packages beyond onnxruntime: `model.onnx` carries its class names and preprocessing in
its metadata (`vqt-edge predict --model model.onnx IMAGES`, or `session.get_modelmeta().custom_metadata_map`).

## Preprocessing (vqt-edge's, reproduced by preprocessor_config.json)

{model_metadata.RESIZE}; {model_metadata.COLOR}; pixel_values = (RGB / 255 - mean) / std with
mean {[round(x, 6) for x in manifest.mean]} and std {[round(x, 6) for x in manifest.std]}.
transformers' own image loading converts RGBA by dropping the alpha channel and clips 16-bit images;
give the pipeline images decoded with `vqt_edge.preprocess.load_rgb` for identical pixels on such files.

## Backbone

`{manifest.model}`: ViT with {a.depth} layers, width {a.dim}, {a.heads} heads, MLP {a.mlp_dim}, patch {a.patch},
{a.image_size} px; weights: {source}; quantization: {manifest.quantize}. Frozen, except what the method
below trains.

## Adapter

Method `{spec.method}`: {METHODS.get(spec.method, "see vqt-edge's docs/design.md section 5")}
Query layers {layers}, tokens T={spec.query_tokens}, feature norm `{spec.feature_norm}`, aggregate
`{spec.aggregate}`, last_k {spec.last_k}; the trained tensors are in the run's adapter.safetensors.

## Training data

{summary.get("train_images", "?")} training images, {summary.get("val_images", 0)} validation images
({summary.get("skipped_images", 0)} unreadable ones skipped); classes, in logit order: {", ".join(f"`{c}`" for c in classes)}.
Epochs {config.get("epochs", summary.get("epochs", "?"))}, batch {config.get("batch_size", "?")}, lr {config.get("lr", "?")},
weight decay {config.get("weight_decay", "?")}{", federated" if summary.get("fleet") else ""}.

## Accuracy recorded by the run

{chr(10).join(_accuracy_lines(summary))}

## Hashes (sha256)

- bundle manifest: `{metadata["bundle_sha256"]}`
- frozen.onnx: `{metadata["frozen_sha256"]}`
- adapter.safetensors: `{metadata["adapter_sha256"]}`
"""


def _metadata(folder: RunFolder, manifest: Manifest, classes: list[str]) -> dict[str, str]:
    """model.onnx's metadata for this run, from its verified files (the same values build_model writes)."""
    info = folder.info()
    bundle_sha = info.get("bundle_manifest_sha256") or mf.sha256_file(folder.path / "bundle_manifest.json")
    return model_metadata.build(
        manifest, classes, bundle_sha256=bundle_sha, adapter_sha256=folder.summary()["files"][ADAPTER]
    )


def package(run: Path, fmt: str, out: Path) -> list[Path]:
    """Write the run's model in `fmt` to the folder `out` (new or empty); returns the files written."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    folder = RunFolder(run)
    manifest, classes = folder.open_finished()  # every file's sha256 checked
    metadata = _metadata(folder, manifest, classes)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (MODEL + ".tmp")
    copy_with_metadata(folder.path / MODEL, tmp, metadata)
    tmp.replace(out / MODEL)
    written = [out / MODEL]
    if fmt == "hf":
        files = {
            "config.json": json.dumps(hf_config(manifest, classes, metadata), indent=2) + "\n",
            "preprocessor_config.json": json.dumps(preprocessor_config(manifest), indent=2) + "\n",
            "README.md": model_card(manifest, classes, folder.info(), folder.summary(), metadata),
        }
        for name, text in files.items():
            atomic_write_text(out / name, text)
            written.append(out / name)
    return written
