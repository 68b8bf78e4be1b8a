"""What model.onnx says about itself: its `metadata_props` (docs/design.md section 3).

model.onnx maps `pixel_values` to `logits`; using it needs what the graph cannot hold: the class names
in logit order, the image size, how an image becomes pixel_values (vqt_edge/preprocess.py), and which
bundle and adapter it was made of. Every model.onnx a run writes carries them as ONNX metadata
(string -> string; onnxruntime shows them as `session.get_modelmeta().custom_metadata_map`, Netron in
its model properties), so the file alone is enough for `vqt-edge predict --model` or an app.

Values are plain strings or JSON. Pure JSON here (no onnx, no onnxruntime): the device side writes
and reads the bytes (device_runner/onnx_io/stream.py, device_runner/model_file.py).
"""

from __future__ import annotations

import json
import math

from vqt_edge import __version__
from vqt_edge import manifest as mf
from vqt_edge.errors import UserError
from vqt_edge.manifest import Manifest
from vqt_edge.spec import AdapterSpec

#: How vqt_edge/preprocess.py turns an image into pixel_values; `parse` refuses any other rule, so a
#: future change of the preprocessing cannot be applied silently to an old file.
RESIZE = "bicubic squash: pillow Image.resize((S, S), BICUBIC) of the whole image, no crop, aspect ratio not kept"
COLOR = (
    "8-bit RGB after EXIF orientation; transparency composited over white; 16-bit and float gray scaled "
    "to 0-255 (16-bit: 65535 -> 255), not clipped"
)
INPUT = "pixel_values float32 [B,3,S,S], channels first: (RGB / 255 - mean) / std"
OUTPUT = "logits float32 [B,C]: one per class, in class_names order"

#: Keys every vqt-edge model.onnx carries, in the order they are written.
KEYS = (
    "vqt_edge.version",
    "vqt_edge.format",
    "base_model",
    "class_names",
    "image_size",
    "resize",
    "color",
    "rescale",
    "mean",
    "std",
    "input",
    "output",
    "method",
    "adapter_spec",
    "quantize",
    "bundle_sha256",
    "frozen_sha256",
    "adapter_sha256",
)


PACKAGE_FORMATS = ("hf", "onnx")  # `vqt-edge package --format`: a Hugging Face folder, or model.onnx alone


def build(manifest: Manifest, classes: list[str], *, bundle_sha256: str, adapter_sha256: str) -> dict[str, str]:
    """The metadata of a model.onnx made from this bundle (`bundle_sha256`: of its manifest.json, which
    lists every file's hash) and adapter (`adapter_sha256`: of adapter.safetensors as written)."""
    if len(classes) != manifest.spec.num_classes:
        raise ValueError(f"{len(classes)} class names for {manifest.spec.num_classes} classes")
    return {
        "vqt_edge.version": __version__,
        "vqt_edge.format": mf.FORMAT,
        "base_model": manifest.model,
        "class_names": json.dumps(list(classes)),
        "image_size": str(manifest.spec.arch.image_size),
        "resize": RESIZE,
        "color": COLOR,
        "rescale": "1/255",
        "mean": json.dumps([float(x) for x in manifest.mean]),
        "std": json.dumps([float(x) for x in manifest.std]),
        "input": INPUT,
        "output": OUTPUT,
        "method": manifest.spec.method,
        "adapter_spec": json.dumps(manifest.spec.to_dict(), sort_keys=True),
        "quantize": manifest.quantize,
        "bundle_sha256": bundle_sha256,
        "frozen_sha256": manifest.files.get(mf.FROZEN, ""),
        "adapter_sha256": adapter_sha256,
    }


def parse(props: dict[str, str], source: str) -> tuple[Manifest, list[str]]:
    """The bundle description (spec, mean, std) and class names a model.onnx's metadata holds.

    The file is input: every field is checked, and a file without them (written before vqt-edge
    recorded them, or by another tool) is refused with what to do instead."""
    missing = [k for k in KEYS if k not in props]
    if missing:
        hint = (
            "it was not written by vqt-edge, or by one older than metadata_props; use `predict --run RUN`, "
            "or `vqt-edge package --run RUN --format onnx` to write a self-describing copy"
        )
        raise UserError(
            f"{source}: no vqt-edge metadata ({', '.join(missing[:3])}{'...' if len(missing) > 3 else ''} "
            f"missing): {hint}"
        )

    def bad(key: str, why: str) -> UserError:
        return UserError(f"{source}: metadata {key!r} {why}: {props[key][:200]!r}")

    if props["vqt_edge.format"] != mf.FORMAT:
        raise bad("vqt_edge.format", f"is not {mf.FORMAT!r}")
    for key, want in (("resize", RESIZE), ("color", COLOR), ("rescale", "1/255"), ("input", INPUT)):
        if props[key] != want:
            raise bad(key, "is a preprocessing this vqt-edge does not implement")
    values = {}
    for key in ("class_names", "mean", "std", "adapter_spec"):
        try:
            values[key] = json.loads(props[key])
        except (ValueError, RecursionError):
            raise bad(key, "is not JSON") from None
    if not isinstance(values["adapter_spec"], dict):
        raise bad("adapter_spec", "is not a JSON object")
    try:
        spec = AdapterSpec.from_dict(values["adapter_spec"])
    except UserError as e:
        raise UserError(f"{source}: metadata 'adapter_spec': {e}") from None
    names = values["class_names"]
    if not (isinstance(names, list) and len(names) == spec.num_classes and all(isinstance(n, str) for n in names)):
        raise bad("class_names", f"must be a list of {spec.num_classes} strings")
    if props["image_size"] != str(spec.arch.image_size):
        raise bad("image_size", f"does not match the adapter spec's {spec.arch.image_size}")
    for key in ("mean", "std"):
        v = values[key]
        if not (
            isinstance(v, list)
            and len(v) == 3
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
        ):
            raise bad(key, "must be a list of 3 numbers")
    if any(s <= 0 for s in values["std"]):
        raise bad("std", "must be positive")
    if props["method"] != spec.method:
        raise bad("method", f"does not match the adapter spec's {spec.method!r}")
    manifest = Manifest(
        model=props["base_model"],
        spec=spec,
        mean=[float(x) for x in values["mean"]],
        std=[float(x) for x in values["std"]],
        class_names=list(names),
        quantize=props["quantize"],
    )
    manifest.validate(f"{source} (metadata)")
    return manifest, list(names)
