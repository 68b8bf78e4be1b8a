"""The adapter spec: what a bundle trains, validated once, and every shape that follows from it.

A bundle's trainable part is fixed by a handful of choices: the backbone's architecture, the method,
which layers carry query tokens and how many (T), how many last layers an adaptation changes (k),
how a layer's T query outputs enter the head, the head's feature normalization, the query-token
dropout and the number of classes (docs/design.md sections 3-5, 11). `AdapterSpec` holds exactly
those; it refuses a bad combination when it is made (a UserError naming the `export` flag and the
manifest field), and everything derived from it is a property computed here and nowhere else: the
frozen outputs and their per-image shapes, the trainable tensors and their shapes, the head's
width F, the query-token dropout mask's shape. The torch modules (exporters/methods/), the exporter,
the trainer, the memory model and the planner read them from the spec; the manifest stores it.

Method names and K/V modes are defined here once. Pure Python: no numpy, no onnxruntime, no torch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vqt_edge.arch import ViTArch
from vqt_edge.errors import UserError
from vqt_edge.head2toe import DEFAULT_TARGET, feature_width

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
# Where the frozen outputs live while training (docs/design.md section 6), fastest first: cached in
# RAM, cached on disk, recomputed every epoch. `tune` needs one of the cached modes.
CACHED_KV_MODES = ("ram", "disk")
KV_MODES = CACHED_KV_MODES + ("stream",)
# The training backends (device_runner/backends.py; docs/design.md section 9): the portable step
# graph on any onnxruntime, or onnxruntime-training's artifacts. `--backend auto` picks one.
DEFAULT_BACKEND = "portable"  # the fastest and leanest on every onnxruntime (device_runner/backends.py says why)
BACKENDS = ("portable", "ort-training")

#: The trained query tokens' one name: the torch parameter, the graphs' initializer, the step
#: graph's input, the adapter file's tensor (and `head/query_tokens` in model.onnx).
QUERY_TOKENS = "query_tokens"
#: AdaptFormer's bottleneck width (docs/design.md section 5).
ADAPTER_BOTTLENECK = 64

# Upper bounds far above any real ViT, low enough that no field can ask for absurd allocations.
ARCH_LIMITS = {
    "depth": 1024,
    "dim": 1 << 16,
    "heads": 1024,
    "mlp_dim": 1 << 18,
    "patch": 4096,
    "image_size": 8192,
    "channels": 64,
}
_INT_LIMITS = {"query_tokens": 4096, "num_classes": 1_000_000, "last_k": 1024, "h2t_target": 1 << 24}
#: Cache dtype of each frozen output: the CLS vector fp32, the large tensors fp16 (half the memory
#: and disk; docs/design.md section 6). Head2Toe's `features` are large (F values per image).
CACHE_DTYPES = {"cls": "float32", "keys": "float16", "values": "float16", "hidden": "float16", "features": "float16"}


def _flag(field: str) -> str:
    """The `export` flag and the manifest field of one spec field, for messages."""
    return f"--{field.replace('_', '-')} ({field})"


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class AdapterSpec:
    """What a bundle trains (see the module docstring); refuses a bad combination when made."""

    arch: ViTArch
    method: str
    num_classes: int
    query_layers: tuple[int, ...] = ()
    query_tokens: int = 1
    last_k: int = 0
    aggregate: str = "concat"
    feature_norm: str = "l2"
    dropout: float = 0.1
    h2t_target: int = 0

    @classmethod
    def create(
        cls,
        arch: ViTArch,
        method: str,
        num_classes: int,
        *,
        query_layers=None,
        last_k: int | None = None,
        h2t_target: int | None = None,
        **fields,
    ) -> AdapterSpec:
        """A spec with `export`'s defaults filled in: all layers carry query tokens, an adaptation
        changes all layers, head2toe pools to vqt_edge/head2toe.py's DEFAULT_TARGET. A value given
        for a method that has no use for it is refused (by the checks of `__post_init__`)."""
        if method not in METHODS:
            raise UserError(f"unknown --method {method!r}; one of {', '.join(METHODS)}")
        if query_layers is None:
            query_layers = range(arch.depth) if method in QUERY_METHODS else ()
        if last_k is None:
            last_k = arch.depth if method in LAST_K_METHODS else 0
        if h2t_target is None:
            h2t_target = DEFAULT_TARGET if method == "head2toe" else 0
        # Sorted: K/V are stacked in layer order, and the query path stacks its weights in this order.
        layers = tuple(sorted(query_layers)) if all(map(_is_int, query_layers)) else tuple(query_layers)
        return cls(
            arch=arch,
            method=method,
            num_classes=num_classes,
            query_layers=layers,
            last_k=last_k,
            h2t_target=h2t_target,
            **fields,
        )

    def __post_init__(self) -> None:
        """The one validation of these fields (types first: a manifest is untrusted input)."""
        if not isinstance(self.arch, ViTArch):
            raise UserError(f"arch must be a ViT architecture, not {self.arch!r}")
        if self.method not in METHODS:
            raise UserError(f"unknown {_flag('method')} {self.method!r}; one of {', '.join(METHODS)}")
        for name, limit in _INT_LIMITS.items():
            v = getattr(self, name)
            if not (_is_int(v) and 0 <= v <= limit):
                raise UserError(f"{_flag(name)} must be an integer in [0, {limit}], not {v!r}")
        if self.num_classes < 2:
            raise UserError(f"{_flag('num_classes')} must be at least 2, not {self.num_classes}")
        if self.query_tokens < 1:
            raise UserError(f"{_flag('query_tokens')} must be a positive integer, not {self.query_tokens}")
        if self.feature_norm not in FEATURE_NORMS:
            raise UserError(
                f"{_flag('feature_norm')} must be one of {', '.join(FEATURE_NORMS)}, not {self.feature_norm!r}"
            )
        d = self.dropout
        if not (isinstance(d, (int, float)) and not isinstance(d, bool) and 0 <= d < 1):  # NaN compares False
            raise UserError(f"{_flag('dropout')} must be a number in [0, 1), not {d!r}")
        depth = self.arch.depth
        if self.method in LAST_K_METHODS:
            if not 1 <= self.last_k <= depth:
                raise UserError(f"--last-k {self.last_k} (last_k): must be in [1, {depth}] for {self.method}")
        elif self.last_k != 0:
            raise UserError(f"{_flag('last_k')} is for {', '.join(LAST_K_METHODS)}; {self.method} adapts no layers")
        layers = self.query_layers
        if not isinstance(layers, tuple) or not all(map(_is_int, layers)):
            raise UserError(f"{_flag('query_layers')} must be a list of layer indices, not {layers!r}")
        if self.method not in QUERY_METHODS:
            if layers:
                raise UserError(
                    f"{_flag('query_layers')} is for {', '.join(QUERY_METHODS)}; {self.method} has no query tokens"
                )
        elif not layers or any(not 0 <= i < depth for i in layers) or list(layers) != sorted(set(layers)):
            raise UserError(
                f"{_flag('query_layers')} must be distinct layer indices in [0, {depth}), "
                f"in increasing order, not {list(layers)}"
            )
        if self.aggregate not in AGGREGATES or (self.aggregate != "concat" and self.method not in QUERY_METHODS):
            raise UserError(
                f"{_flag('aggregate')} must be one of {', '.join(AGGREGATES)} "
                f"(concat for {self.method}, which has no query tokens), not {self.aggregate!r}"
            )
        if (self.method == "head2toe") != (self.h2t_target > 0):
            raise UserError(
                f"{_flag('h2t_target')} must be at least 1 for head2toe and is for head2toe only "
                f"(method {self.method}, h2t_target {self.h2t_target})"
            )

    # -- the manifest's fields ---------------------------------------------------------------
    FIELDS = (
        "method",
        "num_classes",
        "query_layers",
        "query_tokens",
        "last_k",
        "aggregate",
        "feature_norm",
        "dropout",
        "h2t_target",
    )

    def to_dict(self) -> dict:
        """The spec as JSON fields (query_layers a list), as manifest.json and adapter_config.json hold it."""
        return {
            "arch": self.arch.to_dict(),
            **{k: getattr(self, k) for k in self.FIELDS},
            "query_layers": list(self.query_layers),
        }

    @classmethod
    def from_dict(cls, d: dict) -> AdapterSpec:
        """Parse the spec's fields of a manifest (untrusted: every failure is a UserError)."""
        arch = d.get("arch")
        if not isinstance(arch, dict):
            raise UserError(f"arch must be an object with {', '.join(ARCH_LIMITS)}, not {type(arch).__name__}")
        for key, limit in ARCH_LIMITS.items():
            if key in arch and not (_is_int(arch[key]) and 1 <= arch[key] <= limit):
                raise UserError(f"arch.{key} must be an integer in [1, {limit}], not {arch[key]!r}")
        eps = arch.get("eps", 1e-6)
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < 1):
            raise UserError(f"arch.eps must be a small positive number, not {eps!r}")
        missing = [k for k in ("method", "num_classes") if k not in d]
        if missing:
            raise UserError(f"missing field {missing[0]}")
        fields = {k: d[k] for k in cls.FIELDS if k in d}
        layers = fields.get("query_layers", [])
        if not isinstance(layers, list):
            raise UserError(f"{_flag('query_layers')} must be a list of layer indices, not {layers!r}")
        fields["query_layers"] = tuple(layers)
        for key in ("method", "aggregate", "feature_norm"):
            if key in fields and not isinstance(fields[key], str):
                raise UserError(f"{key} must be a string, not {fields[key]!r}")
        return cls(arch=ViTArch.from_dict(arch), **fields)

    def replace(self, **changes) -> AdapterSpec:
        return dataclasses.replace(self, **changes)

    # -- derived -----------------------------------------------------------------------------
    @property
    def has_query_tokens(self) -> bool:
        return self.method in QUERY_METHODS

    @property
    def adaptation(self) -> str | None:
        """The part of the method that adapts the last k layers ("vpt", "adaptformer", "finetune"), if any."""
        return self.method.split("+")[-1] if self.method in LAST_K_METHODS else None

    @property
    def split(self) -> int:
        """The first adapted layer, L - k (L for methods that adapt none)."""
        return self.arch.depth - self.last_k

    @property
    def frozen_kv_layers(self) -> list[int]:
        """The query layers whose K/V frozen.onnx outputs: those below the adapted layers."""
        return [i for i in self.query_layers if i < self.split]

    @property
    def adapted_kv_layers(self) -> list[int]:
        """The query layers among the adapted ones: the training graph computes their K/V."""
        return [i for i in self.query_layers if i >= self.split]

    @property
    def frozen_outputs(self) -> list[str]:
        """The outputs of frozen.onnx the training graph reads, in input order (docs/design.md section 3)."""
        if self.method == "head2toe":
            return ["features"]
        kv = ["keys", "values"] if self.frozen_kv_layers else []
        return (["cls"] if self.adaptation is None else ["hidden"]) + kv

    @property
    def frozen_output_specs(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Per-image shape and cache dtype (a numpy dtype name) of each frozen output, in order."""
        a = self.arch
        kv = (len(self.frozen_kv_layers), a.heads, a.num_tokens, a.head_dim)
        shapes = {
            "features": (self.head_width,),
            "cls": (a.dim,),
            "keys": kv,
            "values": kv,
            "hidden": (a.num_tokens, a.dim),
        }
        return {name: (shapes[name], CACHE_DTYPES[name]) for name in self.frozen_outputs}

    @property
    def head_input(self) -> str | None:
        """The frozen output that *is* the head's input, unchanged (feature selection reads it): the
        pooled, normalized taps `features` for head2toe. None where the head's input is computed in
        the training graph (VQT's query outputs; linear's normalized CLS)."""
        return "features" if self.method == "head2toe" else None

    @property
    def head_width(self) -> int:
        """F, the head's input width (docs/design.md section 3): D + Lq*T*D with query tokens
        concatenated, D + Lq*D when a layer's T outputs are aggregated (mean, wsum), D without query
        tokens, Head2Toe's pooled taps for head2toe."""
        if self.method == "head2toe":
            return feature_width(self.arch, self.h2t_target)
        per_layer = self.query_tokens if self.aggregate == "concat" else 1
        return self.arch.dim * (1 + len(self.query_layers) * per_layer)

    @property
    def query_keep_shape(self) -> tuple[int, ...] | None:
        """Per-image shape of the query-token dropout mask `query_keep` [Lq, T, D] (None without query tokens)."""
        return (len(self.query_layers), self.query_tokens, self.arch.dim) if self.has_query_tokens else None

    @property
    def train_inputs(self) -> list[str]:
        """The training graphs' inputs, in order: the frozen outputs, `query_keep`, `targets`."""
        return self.frozen_outputs + (["query_keep"] if self.has_query_tokens else []) + ["targets"]

    @property
    def trainable_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every trainable tensor by its one name (torch parameter = graph initializer = adapter
        tensor), with its shape. Adapted layers are keyed by their absolute index, so a finetune
        adapter reads like a partial timm state dict (docs/design.md section 5)."""
        a, t, d = self.arch, self.query_tokens, self.arch.dim
        shapes: dict[str, tuple[int, ...]] = {}
        if self.adaptation == "vpt":
            shapes["prompts"] = (self.last_k, t, d)
        if self.aggregate == "wsum":
            shapes["wsum_weights"] = (len(self.query_layers), t)
        if self.has_query_tokens:
            shapes[QUERY_TOKENS] = (len(self.query_layers), t, d)
        for i in range(self.split, a.depth):
            if self.adaptation == "finetune":
                for name, shape in _block_shapes(a).items():
                    shapes[f"blocks.{i}.{name}"] = shape
            elif self.adaptation == "adaptformer":
                b = ADAPTER_BOTTLENECK
                shapes.update(
                    {
                        f"adapters.{i}.down.weight": (b, d),
                        f"adapters.{i}.down.bias": (b,),
                        f"adapters.{i}.up.weight": (d, b),
                        f"adapters.{i}.up.bias": (d,),
                    }
                )
        if self.adaptation == "finetune":
            shapes.update({"norm.weight": (d,), "norm.bias": (d,)})
        shapes.update({"head.weight": (self.num_classes, self.head_width), "head.bias": (self.num_classes,)})
        return shapes


def _block_shapes(a: ViTArch) -> dict[str, tuple[int, ...]]:
    """The parameters of one pre-norm transformer block (timm names) and their shapes."""
    d, m = a.dim, a.mlp_dim
    return {
        "norm1.weight": (d,),
        "norm1.bias": (d,),
        "attn.qkv.weight": (3 * d, d),
        "attn.qkv.bias": (3 * d,),
        "attn.proj.weight": (d, d),
        "attn.proj.bias": (d,),
        "norm2.weight": (d,),
        "norm2.bias": (d,),
        "mlp.fc1.weight": (m, d),
        "mlp.fc1.bias": (m,),
        "mlp.fc2.weight": (d, m),
        "mlp.fc2.bias": (d,),
    }
