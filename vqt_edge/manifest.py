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

from vqt_edge.arch import ViTArch
from vqt_edge.errors import UserError
from vqt_edge.fileio import atomic_write_text
from vqt_edge.head2toe import feature_width

FORMAT = "vqt-edge/1"
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

# What each method trains (docs/design.md sections 4-5). Methods "with query tokens" run VQT's query
# path; methods with an adaptation change the last `last_k` layers, which then run in the training
# graph from the frozen output `hidden` (the input of layer L-k). head2toe is a linear head on
# pooled taps of every layer, which the frozen graph computes (vqt_edge/head2toe.py).
METHODS = ("linear", "vqt", "vpt", "adaptformer", "finetune", "vqt+vpt", "vqt+adaptformer", "head2toe")
QUERY_METHODS = ("vqt", "vqt+vpt", "vqt+adaptformer")
LAST_K_METHODS = ("vpt", "adaptformer", "finetune", "vqt+vpt", "vqt+adaptformer")
FEATURE_NORMS = ("l2", "none")
# How a layer's T query outputs enter the head (docs/design.md section 11; the official code's
# default, POOLING_FEATS and WEIGHTED_SUM_FEATS): concat keeps all T*D values, mean averages them
# into one D vector, wsum sums them with learned per-layer weights `wsum_weights` [Lq, T].
AGGREGATES = ("concat", "mean", "wsum")
# `export --quantize`: none, or the bundle's frozen graph and head quantized (exporters/quantize.py).
QUANTIZE_MODES = ("none", "int8", "int4")


def adaptation(method: str) -> str | None:
    """The part of a method that adapts the last k layers ("vpt", "adaptformer", "finetune"), if any."""
    return method.split("+")[-1] if method in LAST_K_METHODS else None


def frozen_kv_layers(method: str, query_layers: list[int], last_k: int, depth: int) -> list[int]:
    """The query layers whose K/V the frozen graph outputs: those below the adapted layers."""
    return [i for i in query_layers if i < depth - last_k] if method in QUERY_METHODS else []


def frozen_outputs_for(method: str, query_layers: list[int], last_k: int, depth: int) -> list[str]:
    """The outputs of frozen.onnx a method's training graph reads, in input order (docs/design.md section 3)."""
    if method == "head2toe":
        return ["features"]
    if method in ("vqt", "linear"):
        return ["cls", "keys", "values"] if method == "vqt" else ["cls"]
    kv = ["keys", "values"] if frozen_kv_layers(method, query_layers, last_k, depth) else []
    return ["hidden"] + kv


def head_input(method: str) -> str | None:
    """The frozen output that *is* the head's input, unchanged (feature selection reads it): the
    pooled, normalized taps `features` for head2toe. None where the head's input is computed in the
    training graph (VQT's query outputs; linear's normalized CLS, see `head_features`)."""
    return "features" if method == "head2toe" else None


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Manifest:
    model: str
    arch: ViTArch
    method: str
    query_layers: list[int]
    query_tokens: int
    num_classes: int
    mean: list[float]
    std: list[float]
    feature_norm: str = "l2"
    dropout: float = 0.1
    class_names: list[str] | None = None
    # Outputs of frozen.onnx that the training graph reads (docs/design.md section 3).
    frozen_outputs: list[str] = field(default_factory=lambda: ["cls", "keys", "values"])
    # Names of the trainable tensors inside the ORT checkpoint, keyed by their adapter name.
    trainable: dict[str, str] = field(default_factory=dict)
    # Shape of each adapter tensor, keyed by adapter name.
    trainable_shapes: dict[str, list[int]] = field(default_factory=dict)
    # Adapted last layers (0 for vqt and linear, which adapt none).
    last_k: int = 0
    # How a layer's T query outputs enter the head (AGGREGATES; "concat" without query tokens).
    aggregate: str = "concat"
    # head2toe: the pooled size of each token tap (vqt_edge/head2toe.py); 0 for other methods.
    h2t_target: int = 0
    weights: dict = field(default_factory=dict)
    # "none", "int8" or "int4", and what exporters/quantize.py did to each file (docs/design.md section 6).
    quantize: str = "none"
    quantization: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    format: str = FORMAT

    def to_json(self) -> str:
        d = {k: v for k, v in self.__dict__.items() if k != "arch"}
        d["arch"] = self.arch.to_dict()
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: dict, source: str = MANIFEST) -> "Manifest":
        if not isinstance(d, dict):
            raise UserError(f"{source}: not a JSON object")
        if d.get("format") != FORMAT:
            raise UserError(f"{source}: unknown bundle format {d.get('format')!r} (this vqt-edge reads {FORMAT!r})")
        known = set(cls.__dataclass_fields__)
        check_field_types(d, source)  # a manifest is input: types first, so nothing below can crash on it
        try:
            kwargs = {k: v for k, v in d.items() if k in known}
            kwargs["arch"] = ViTArch.from_dict(d["arch"])
            m = cls(**kwargs)
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise UserError(f"{source}: missing or malformed field: {e}") from None
        try:
            m.validate(source)
            if not m.trainable or not m.trainable_shapes:
                raise ValueError("a bundle lists its trainable tensors and their shapes (trainable, trainable_shapes)")
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as e:
            raise UserError(f"{source}: malformed field ({type(e).__name__}: {e})") from None
        return m

    def validate(self, source: str = MANIFEST) -> None:
        """Field-level checks, so that a hand-edited manifest fails here and not deep inside ORT."""

        def bad(msg: str) -> UserError:
            return UserError(f"{source}: {msg}")

        if self.method not in METHODS:
            raise bad(f"unknown method {self.method!r}")
        if self.quantize not in QUANTIZE_MODES:
            raise bad(f"quantize must be one of {QUANTIZE_MODES}, not {self.quantize!r}")
        if self.feature_norm not in FEATURE_NORMS:
            raise bad(f"feature_norm must be one of {FEATURE_NORMS}, not {self.feature_norm!r}")
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise bad(f"num_classes must be an integer >= 2, not {self.num_classes!r}")
        if not isinstance(self.query_tokens, int) or self.query_tokens < 1:
            raise bad(f"query_tokens must be a positive integer, not {self.query_tokens!r}")
        if self.method in LAST_K_METHODS:
            if not isinstance(self.last_k, int) or not 1 <= self.last_k <= self.arch.depth:
                raise bad(f"last_k must be an integer in [1, {self.arch.depth}] for {self.method}, not {self.last_k!r}")
        elif self.last_k != 0:
            raise bad(f"last_k must be 0 for {self.method}, not {self.last_k!r}")
        if self.aggregate not in AGGREGATES or (self.aggregate != "concat" and self.method not in QUERY_METHODS):
            raise bad(f"aggregate must be one of {AGGREGATES} (concat for {self.method}), not {self.aggregate!r}")
        if (self.method == "head2toe") != (self.h2t_target > 0):
            raise bad(f"h2t_target must be a positive integer for head2toe and 0 otherwise, not {self.h2t_target!r}")
        layers = self.query_layers
        if self.method not in QUERY_METHODS:
            if layers != []:
                raise bad(f"{self.method} has no query tokens: query_layers must be [], not {layers!r}")
        elif (
            not isinstance(layers, list)
            or not layers
            or any(not isinstance(i, int) or not 0 <= i < self.arch.depth for i in layers)
            or len(set(layers)) != len(layers)
        ):
            raise bad(f"query_layers must be distinct layer indices in [0, {self.arch.depth}), not {layers!r}")
        for name, v in (("mean", self.mean), ("std", self.std)):
            if not isinstance(v, list) or len(v) != self.arch.channels or not all(isinstance(x, (int, float)) for x in v):
                raise bad(f"{name} must be a list of {self.arch.channels} numbers")
        want = frozen_outputs_for(self.method, layers, self.last_k, self.arch.depth)
        if self.frozen_outputs != want:
            raise bad(f"frozen_outputs of {self.method} must be {want}, not {self.frozen_outputs!r}")
        shapes = self.trainable_shapes
        if not isinstance(shapes, dict) or (shapes and (
            set(shapes) != set(self.trainable)
            or any(not isinstance(v, list) or not all(isinstance(n, int) and n > 0 for n in v) for v in shapes.values())
        )):
            raise bad("trainable_shapes must map every trainable tensor, and only those, to a list of positive sizes")
        if any(s <= 0 for s in self.std):
            raise bad("std must be positive")
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise bad(f"{len(self.class_names)} class_names for {self.num_classes} classes")
        if not isinstance(self.files, dict) or not all(isinstance(v, str) for v in self.files.values()):
            raise bad("files must map names to sha256 strings")

    @property
    def head_features(self) -> int:
        """F = D + Lq*T*D: the head's input width (docs/design.md section 3); D without query tokens,
        D + Lq*D when a layer's T outputs are aggregated (mean, wsum), and Head2Toe's own width."""
        if self.method == "head2toe":
            return feature_width(self.arch, self.h2t_target)
        per_layer = self.query_tokens if self.aggregate == "concat" else 1
        return self.arch.dim * (1 + len(self.query_layers) * per_layer)

    @property
    def head_input(self) -> str | None:
        """See `head_input()`: the frozen output the head reads as it is, if any."""
        return head_input(self.method)

    @property
    def frozen_kv_layers(self) -> list[int]:
        """Layers whose keys/values frozen.onnx outputs (all query layers for vqt)."""
        return frozen_kv_layers(self.method, self.query_layers, self.last_k, self.arch.depth)

    @property
    def adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every adapter tensor, by adapter name."""
        return {k: tuple(v) for k, v in self.trainable_shapes.items()}


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
# Upper bounds far above any real ViT, low enough that no field can ask for absurd allocations.
_ARCH_LIMITS = {"depth": 1024, "dim": 1 << 16, "heads": 1024, "mlp_dim": 1 << 18, "patch": 4096,
                "image_size": 8192, "channels": 64}
_INT_LIMITS = {"query_tokens": 4096, "num_classes": 1_000_000, "last_k": 1024, "h2t_target": 1 << 24}


def bad_file_name(name: object) -> bool:
    """True unless `name` is a plain relative path inside the bundle (no '..', no absolute path)."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name or name.startswith("/"):
        return True
    return any(part in ("", ".", "..") for part in name.split("/"))


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    """A finite JSON number (json.loads reads NaN and Infinity; a huge int overflows a float)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e30 and math.isfinite(v)


def check_field_types(d: dict, source: str) -> None:
    """Type and range checks of the raw JSON fields (those present; missing ones are caught later)."""

    def bad(msg: str) -> UserError:
        return UserError(f"{source}: {msg}")

    arch = d.get("arch")
    if not isinstance(arch, dict):
        raise bad(f"arch must be an object with {', '.join(_ARCH_LIMITS)}, not {type(arch).__name__}")
    for key, limit in _ARCH_LIMITS.items():
        if key in arch and not (_is_int(arch[key]) and 1 <= arch[key] <= limit):
            raise bad(f"arch.{key} must be an integer in [1, {limit}], not {arch[key]!r}")
    if "eps" in arch and not (_is_number(arch["eps"]) and 0 < arch["eps"] < 1):
        raise bad(f"arch.eps must be a small positive number, not {arch['eps']!r}")
    for key in ("model", "method", "feature_norm", "aggregate", "quantize"):
        if key in d and not isinstance(d[key], str):
            raise bad(f"{key} must be a string, not {d[key]!r}")
    for key, limit in _INT_LIMITS.items():
        if key in d and not (_is_int(d[key]) and 0 <= d[key] <= limit):
            raise bad(f"{key} must be an integer in [0, {limit}], not {d[key]!r}")
    if "query_layers" in d and not (isinstance(d["query_layers"], list) and all(map(_is_int, d["query_layers"]))):
        raise bad(f"query_layers must be a list of layer indices, not {d['query_layers']!r}")
    for key in ("mean", "std"):
        if key in d and not (isinstance(d[key], list) and all(map(_is_number, d[key]))):
            raise bad(f"{key} must be a list of finite numbers, not {d[key]!r}")
    if "dropout" in d and not (_is_number(d["dropout"]) and 0 <= d["dropout"] < 1):
        raise bad(f"dropout must be a number in [0, 1), not {d['dropout']!r}")
    names = d.get("class_names")
    if names is not None and not (
        isinstance(names, list) and all(isinstance(n, str) and n for n in names) and len(set(names)) == len(names)
    ):
        raise bad("class_names must be a list of distinct, non-empty strings")
    if "frozen_outputs" in d and not (isinstance(d["frozen_outputs"], list) and all(isinstance(n, str) for n in d["frozen_outputs"])):
        raise bad(f"frozen_outputs must be a list of output names, not {d['frozen_outputs']!r}")
    trainable = d.get("trainable", {})
    if not (isinstance(trainable, dict) and all(isinstance(v, str) and v for v in trainable.values())):
        raise bad("trainable must map adapter tensor names to graph tensor names")
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
