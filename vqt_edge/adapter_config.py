"""`adapter_config.json`: what an adapter is, written beside `adapter.safetensors` (peft-style).

The safetensors file holds only tensors. Applying them needs the rest: the adapter spec
(vqt_edge/spec.py: the backbone's architecture, the method, which layers carry query tokens and how
many (T), ...), the class names, the input normalization, and which frozen graph the tensors were
trained against (its sha256). With this file an adapter folder describes itself: `load_adapter` checks it against
the bundle it is given and refuses a mismatch before any image is read (docs/design.md section 3).

Pure JSON and the manifest: no onnxruntime, no torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from vqt_edge import manifest as mf
from vqt_edge.errors import UserError
from vqt_edge.fileio import atomic_write_text
from vqt_edge.manifest import Manifest
from vqt_edge.spec import AdapterSpec

ADAPTER_CONFIG = "adapter_config.json"

#: Fields that must equal the bundle's manifest for the adapter to apply to it: the spec's and these.
_MANIFEST_FIELDS = ("mean", "std")


def _bundle_fields(manifest: Manifest) -> dict:
    return {**manifest.spec.to_dict(), **{k: getattr(manifest, k) for k in _MANIFEST_FIELDS}}


def from_manifest(manifest: Manifest, classes: list[str]) -> dict:
    """The config of an adapter trained on `manifest`'s bundle for these class names."""
    return {
        "format": mf.FORMAT,
        "base_model": manifest.model,
        **_bundle_fields(manifest),
        "class_names": list(classes),
        "tensors": {k: list(v) for k, v in manifest.spec.trainable_shapes.items()},
        "frozen_sha256": manifest.files[mf.FROZEN],
    }


def write(folder: Path, config: dict) -> None:
    atomic_write_text(Path(folder) / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")


def read(folder: Path) -> dict:
    """Parse `folder/adapter_config.json`; a missing or malformed file is a UserError."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise UserError(f"{path}: missing; an adapter folder holds adapter.safetensors and {ADAPTER_CONFIG}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise UserError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    needed = {"format", "arch", "class_names", "frozen_sha256", *AdapterSpec.FIELDS, *_MANIFEST_FIELDS}
    if not isinstance(config, dict) or not needed <= set(config):
        raise UserError(f"{path}: damaged: needs the fields {', '.join(sorted(needed))}")
    if config["format"] != mf.FORMAT:
        raise UserError(f"{path}: unknown format {config['format']!r} (this vqt-edge reads {mf.FORMAT!r})")
    names = config["class_names"]
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names) and len(names) == config["num_classes"]):
        raise UserError(f"{path}: damaged: class_names must be {config['num_classes']} strings")
    return config


def check_matches(config: dict, manifest: Manifest, source: Path) -> None:
    """Refuse a bundle the adapter was not trained on: another frozen graph, architecture or head."""
    if config["frozen_sha256"] != manifest.files.get(mf.FROZEN):
        raise UserError(
            f"{source}: was trained on another frozen graph (frozen.onnx sha256 "
            f"{config['frozen_sha256'][:12]}..., the bundle's is {manifest.files.get(mf.FROZEN, '?')[:12]}...); "
            "give the bundle it was trained on"
        )
    for key, value in _bundle_fields(manifest).items():
        if config[key] != value:
            raise UserError(f"{source}: {key} is {config[key]!r}, the bundle's is {value!r}")
