"""`manifest.json`: what a bundle is, and the sha256 of every file in it.

The exporter writes it last; the device verifies every hash before it uses a file, so a truncated,
edited or swapped file (or an artifact from another bundle) is refused before any training step.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from vqt_edge.errors import UserError
from vqt_edge.fileio import atomic_write_text
from vqt_edge.spec import AdapterSpec

FORMAT = "vqt-edge/2"
"""Bumped from vqt-edge/1 when the adapter spec gave the trained tensors one name from the torch module
to the adapter (graph names such as `query_path.query_tokens` became `query_tokens`): a /1 bundle's
graphs name them otherwise, so it is refused with a re-export hint instead of failing mid-run."""
RETIRED_FORMATS = ("vqt-edge/1",)
STEP_FEEDS = ("float32", "float16")  # Manifest.step_feed
MANIFEST = "manifest.json"

# Bundle-relative paths of the files the contract names (docs/design.md section 2).
FROZEN = "frozen.onnx"
TRAINING_MODEL = "train/training_model.onnx"
EVAL_MODEL = "train/eval_model.onnx"
OPTIMIZER_MODEL = "train/optimizer_model.onnx"
CHECKPOINT = "train/checkpoint"
HEAD_MODEL = "train/head.onnx"  # inference graph (frozen outputs -> logits), merged into model.onnx
# The portable backend's step graph (forward + gradients, standard ops) and the trainable tensors'
# initial values (docs/design.md section 9). Bundles without them train on onnxruntime-training only.
STEP_MODEL = "train/step.onnx"
STEP_INIT = "train/step_init.safetensors"
# The vqt step graph of the int8 K/V feed: int8 codes + per-channel scales, dequantized in the graph
# layer by layer (exporters/step.py). Optional: a bundle without it feeds an int8 cache to STEP_MODEL
# as fp32, dequantized by the runner (device_runner/kv_int8.py), as before it existed.
STEP_INT8_MODEL = "train/step_int8.onnx"

# `export --quantize`: none, or the bundle's frozen graph and head quantized (exporters/quantize.py).
QUANTIZE_MODES = ("none", "int8", "int4")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Manifest:
    """A bundle: the adapter spec it trains (vqt_edge/spec.py) and what surrounds it.

    manifest.json holds the spec's fields at the top level, and, for a reader of the file, what the
    spec derives that the device relies on (`frozen_outputs`, `trainable_shapes`); parsing checks
    that those equal the spec's, so a hand-edited shape is refused rather than believed."""

    model: str
    spec: AdapterSpec
    mean: list[float]
    std: list[float]
    class_names: list[str] | None = None
    weights: dict = field(default_factory=dict)
    # "none", "int8" or "int4", and what exporters/quantize.py did to each file (docs/design.md section 6).
    quantize: str = "none"
    quantization: dict = field(default_factory=dict)
    # The dtype train/step.onnx takes the cached K/V (and hidden) in: "float32" since the runner
    # converts the fp16 cache rows itself (device_runner/fp16.py, faster than a Cast node); bundles
    # exported before that (no such field) take "float16" and cast inside the graph. The memory
    # planner counts the fed rows by it (vqt_edge/memory.py); the runner reads the graph's own inputs.
    step_feed: str = "float32"
    files: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT

    def to_json(self) -> str:
        d = {k: v for k, v in self.__dict__.items() if k != "spec"}
        d.update(self.spec.to_dict())
        d["frozen_outputs"] = self.spec.frozen_outputs
        d["trainable_shapes"] = {k: list(v) for k, v in self.spec.trainable_shapes.items()}
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict, source: str = MANIFEST) -> Manifest:
        if not isinstance(d, dict):
            raise UserError(f"{source}: not a JSON object")
        if d.get("format") in RETIRED_FORMATS:
            raise UserError(
                f"{source}: exported by an older vqt-edge (format {d['format']!r}; this one reads {FORMAT!r}): "
                "re-export the bundle with `vqt-edge export`"
            )
        if d.get("format") != FORMAT:
            raise UserError(f"{source}: unknown bundle format {d.get('format')!r} (this vqt-edge reads {FORMAT!r})")
        check_field_types(d, source)  # a manifest is input: types first, so nothing below can crash on it
        try:
            spec = AdapterSpec.from_dict(d)
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
        try:
            kwargs = {k: v for k, v in d.items() if k in cls.__dataclass_fields__ and k != "spec"}
            kwargs.setdefault("step_feed", "float16")  # written since 2026-11-30; before, the graph cast fp16
            m = cls(spec=spec, **kwargs)
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise UserError(f"{source}: missing or malformed field: {e}") from None
        m.validate(source)
        for key, want in (
            ("frozen_outputs", spec.frozen_outputs),
            ("trainable_shapes", {k: list(v) for k, v in spec.trainable_shapes.items()}),
        ):
            if d.get(key) != want:
                raise UserError(f"{source}: {key} of this adapter spec must be {want}, not {d.get(key)!r}")
        return m

    def validate(self, source: str = MANIFEST) -> None:
        """Checks of the fields around the spec (the spec checked itself when it was made)."""

        def bad(msg: str) -> UserError:
            return UserError(f"{source}: {msg}")

        if self.quantize not in QUANTIZE_MODES:
            raise bad(f"quantize must be one of {QUANTIZE_MODES}, not {self.quantize!r}")
        if self.step_feed not in STEP_FEEDS:
            raise bad(f"step_feed must be one of {STEP_FEEDS}, not {self.step_feed!r}")
        channels = self.spec.arch.channels
        for name, v in (("mean", self.mean), ("std", self.std)):
            if not isinstance(v, list) or len(v) != channels or not all(isinstance(x, (int, float)) for x in v):
                raise bad(f"{name} must be a list of {channels} numbers")
        if any(s <= 0 for s in self.std):
            raise bad("std must be positive")
        if self.class_names is not None and len(self.class_names) != self.spec.num_classes:
            raise bad(f"{len(self.class_names)} class_names for {self.spec.num_classes} classes")
        if not isinstance(self.files, dict) or not all(isinstance(v, str) for v in self.files.values()):
            raise bad("files must map names to sha256 strings")


def write_manifest(bundle: Path, manifest: Manifest) -> None:
    """Hash every file the manifest lists and write manifest.json (atomically: temp file + rename)."""
    manifest.files = {name: sha256_file(bundle / name) for name in sorted(manifest.files)}
    atomic_write_text(bundle / MANIFEST, manifest.to_json())


def read_manifest(bundle: Path, verify: bool = True, only: list[str] | None = None) -> Manifest:
    """Parse and check a bundle's manifest; with `verify`, check the sha256 of its files first.

    `only` limits the hash check to the files a command is about to use (all listed files by
    default). Every file is opened by the bundle-relative name the manifest lists; a name that
    escapes the bundle folder is refused.
    """
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise UserError(f"{bundle}: no such bundle folder")
    if not path.is_file():
        raise UserError(f"{path}: missing; is {bundle} a vqt-edge bundle?")
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            raise UserError(f"{path}: {path.stat().st_size:,} bytes is too large for a manifest; is it damaged?")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: deep nesting
        raise UserError(f"{path}: not valid JSON ({type(e).__name__}: {e})") from None
    manifest = Manifest.from_dict(data, str(path))
    if verify:
        verify_files(bundle, manifest, only)
    return manifest


def verify_files(bundle: Path, manifest: Manifest, only: list[str] | None = None) -> None:
    """Check the sha256 of `only` (default: every listed file and every file the device uses).

    A file the device uses must be listed: otherwise deleting its line from manifest.json would
    be enough to make the device use any file in its place."""
    root = bundle.resolve()
    names = only if only is not None else sorted(set(manifest.files) | set(REQUIRED_FILES))
    for name in names:
        if name not in manifest.files:
            raise UserError(f"{bundle / MANIFEST}: does not list {name}; the bundle is incomplete")
        if bad_file_name(name):
            raise UserError(f"{bundle / MANIFEST}: file name {name!r} points outside the bundle")
        target = (bundle / name).resolve()
        if root not in target.parents:
            raise UserError(f"{bundle / MANIFEST}: file name {name!r} points outside the bundle")
        if not target.is_file():
            raise UserError(f"{bundle / name}: missing from the bundle")
        if sha256_file(target) != manifest.files[name]:
            raise UserError(
                f"{bundle / name}: sha256 does not match manifest.json; the file is damaged, "
                "edited or from another bundle. Re-copy the bundle or re-export it."
            )


# -- untrusted input -------------------------------------------------------------------------------
# A manifest arrives with the bundle, over a USB stick or a network share: every field is input.
# `check_field_types` runs before anything else reads the fields, so that a damaged or hand-edited
# manifest is a UserError naming the field, never a crash deep inside numpy or onnxruntime.

#: Files every bundle must list (and so have verified) because the device opens them.
REQUIRED_FILES = (FROZEN, HEAD_MODEL, TRAINING_MODEL, EVAL_MODEL, OPTIMIZER_MODEL, CHECKPOINT)
MAX_MANIFEST_BYTES = 16 << 20  # a real manifest is a few KB (class names included)
_SHA256_HEX = frozenset("0123456789abcdef")


def bad_file_name(name: object) -> bool:
    """True unless `name` is a plain relative path inside the bundle (no '..', no absolute path)."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name or name.startswith("/"):
        return True
    return any(part in ("", ".", "..") for part in name.split("/"))


def _is_number(v: object) -> bool:
    """A finite JSON number (json.loads reads NaN and Infinity; a huge int overflows a float)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e30 and math.isfinite(v)


def check_field_types(d: dict, source: str) -> None:
    """Type and range checks of the raw JSON fields (those present; missing ones are caught later)."""

    def bad(msg: str) -> UserError:
        return UserError(f"{source}: {msg}")

    # The adapter spec's fields are checked by AdapterSpec.from_dict (vqt_edge/spec.py).
    for key in ("model", "quantize", "step_feed"):
        if key in d and not isinstance(d[key], str):
            raise bad(f"{key} must be a string, not {d[key]!r}")
    for key in ("mean", "std"):
        if key in d and not (isinstance(d[key], list) and all(map(_is_number, d[key]))):
            raise bad(f"{key} must be a list of finite numbers, not {d[key]!r}")
    names = d.get("class_names")
    if names is not None and not (
        isinstance(names, list) and all(isinstance(n, str) and n for n in names) and len(set(names)) == len(names)
    ):
        raise bad("class_names must be a list of distinct, non-empty strings")
    for key in ("trainable_shapes", "weights", "quantization"):
        if key in d and not isinstance(d[key], dict):
            raise bad(f"{key} must be an object, not {type(d[key]).__name__}")
    files = d.get("files")
    if not isinstance(files, dict):
        raise bad("files must map bundle file names to their sha256")
    for name, digest in files.items():
        if bad_file_name(name):
            raise bad(f"file name {name!r} points outside the bundle")
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _SHA256_HEX):
            raise bad(f"the sha256 of {name} must be 64 lowercase hex digits, not {digest!r}")
