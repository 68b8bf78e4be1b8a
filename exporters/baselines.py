"""The trainable part of every method, in torch: what the training graph and head.onnx hold.

docs/design.md sections 4-5. A bundle splits the adapted ViT in two at the first layer a method
changes; `FrozenPart` is everything before (frozen.onnx), `MethodHead` everything after, including
the head and the loss (train/). What crosses the split is named by `manifest.frozen_outputs_for`:

| method            | frozen outputs              | trainable                                          |
|-------------------|-----------------------------|----------------------------------------------------|
| linear            | cls                         | head                                               |
| vqt               | cls, keys, values           | query tokens, head                                 |
| vpt               | hidden                      | prompts [k,T,D], head                              |
| adaptformer       | hidden                      | adapters.{l}.down/up (k layers), head              |
| finetune          | hidden                      | blocks.{l}.* (k layers), norm.*, head              |
| vqt+vpt           | hidden, keys, values (l<L-k)| query tokens, prompts, head                        |
| vqt+adaptformer   | hidden, keys, values (l<L-k)| query tokens, adapters, head                       |
| head2toe          | features                    | head                                               |

`hidden` [B,N,D] is the input of layer L-k; keys/values cover the query layers below L-k (the
adapted layers produce their own K/V inside the training graph). The head reads
`head_features(cls, z)`: [n(cls)] without query tokens, [n(cls), n(z_l1), ...] with them (z_l a
layer's T outputs concatenated, averaged or summed with `wsum_weights`: `aggregate`). head2toe's
head reads `features` as they are: the frozen graph pooled and normalized them (exporters/head2toe.py).

VQT combined with an adaptation (our reading of the VQT paper, section 4.4: the query tokens
summarize the intermediate features of the *adapted* backbone):
- The adapted layers change only the K/V the query path reads. Query tokens still run VQT's query
  path of section 4 on the layer's frozen weights (`QueryPath`, unchanged): in vqt+adaptformer the
  adapter acts on the backbone's own tokens, not on the query tokens.
- In vqt+vpt a layer's K/V are those of the N original tokens (CLS + patches) only, not of the
  layer's prompts: the query tokens summarize what the prompted layer computed for the image, and
  every layer gives K/V of the same shape [B,H,N,dh], as the frozen layers do.
- Query tokens, prompts/adapters and head are trained jointly, in one graph.

Parameter names inside the graphs equal the adapter names of `adapter.safetensors`, except the
query tokens (`query_path.query_tokens`, as in VQTHead). Adapted layers are keyed by their absolute
index (`blocks.10.attn.qkv.weight`, `adapters.10.down.weight`), so a finetune adapter reads like
a partial timm state dict. Every LayerNorm in these graphs is applied once per layer (on whole
token sequences), as onnxruntime-training needs (docs/design.md section 7).
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from exporters.vit import Block, QueryPath, VisionTransformer, head_features
from vqt_edge import manifest as mf
from vqt_edge.head2toe import feature_width

ADAPTER_BOTTLENECK = 64  # AdaptFormer's bottleneck width (docs/design.md section 5)
ADAPTER_SCALE = 0.1  # its scale s


def prompt_bound(dim: int) -> float:
    """VPT/VQT init: U(-v, v), v = sqrt(6 / (3 * 16 * 16 + D)) (as QueryPath's query tokens)."""
    return math.sqrt(6.0 / (3 * 16 * 16 + dim))


def weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-sum(log_softmax(logits) * targets), `targets` the one-hot labels already weighted by 1/batch
    (so micro-batches and a short last batch add up exactly; exporters/export.py)."""
    return -(torch.log_softmax(logits, dim=-1) * targets).sum()


class Adapter(nn.Module):
    """AdaptFormer's parallel adapter: s * up(ReLU(down(x))), up initialized to zero (so the adapted
    model starts as the pre-trained one), down as nn.Linear (kaiming uniform, a=sqrt(5))."""

    def __init__(self, dim: int, bottleneck: int = ADAPTER_BOTTLENECK, scale: float = ADAPTER_SCALE) -> None:
        super().__init__()
        self.scale = scale
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.down(x))) * self.scale


def adapted_block(block: Block, x: torch.Tensor, adapter: Adapter | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pre-norm layer, with AdaptFormer's branch when given an adapter:
    x' = x + MLP(LN2(x)) + s * up(ReLU(down(x))), x the post-attention residual."""
    if adapter is None:
        return block(x)
    attn_out, k, v = block.attn(block.norm1(x))
    x = x + attn_out
    return x + block.mlp(block.norm2(x)) + adapter(x), k, v


class FrozenPart(nn.Module):
    """frozen.onnx: pixel_values -> the method's frozen outputs, in `outputs` order.

    cls [B,D] (final CLS after the final LayerNorm), keys/values [B,Lk,H,N,dh] of `kv_layers`, and
    hidden [B,N,D] (the input of layer `split`). Runs only the layers those outputs need.
    """

    def __init__(self, backbone: VisionTransformer, outputs: Sequence[str], kv_layers: Sequence[int], split: int) -> None:
        super().__init__()
        self.backbone, self.outputs, self.kv_layers = backbone, list(outputs), list(kv_layers)
        if "hidden" in self.outputs and ("cls" in self.outputs or any(i >= split for i in self.kv_layers)):
            raise ValueError("hidden is the last frozen output: no cls, and K/V only of layers before it")
        self.stop = split if "hidden" in self.outputs else backbone.arch.depth

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.backbone.embed(pixel_values)
        out: dict[str, torch.Tensor] = {}
        keys, values = [], []
        for i in range(self.stop):
            x, k, v = self.backbone.blocks[i](x)
            if i in self.kv_layers:
                keys.append(k)
                values.append(v)
        out["hidden"] = x  # the input of layer `stop` (used when asked for)
        if "cls" in self.outputs:
            out["cls"] = self.backbone.norm(x)[:, 0]
        if keys:
            out["keys"], out["values"] = torch.stack(keys, 1), torch.stack(values, 1)
        return tuple(out[name] for name in self.outputs)


def _join(frozen: torch.Tensor | None, adapted: list[torch.Tensor]) -> torch.Tensor:
    """[B,Lf,...] frozen layers' tensor followed by the adapted layers' [B,...] along dim 1."""
    parts = ([frozen] if frozen is not None else []) + ([torch.stack(adapted, 1)] if adapted else [])
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


class MethodHead(nn.Module):
    """The frozen outputs -> logits (and the loss, given targets) for any method of `mf.METHODS`.

    `forward(*inputs)` takes the inputs named by `self.input_names`, in that order: the frozen
    outputs, then `query_keep` (methods with query tokens), then `targets`. Given only the frozen
    outputs (head.onnx) it returns the logits with query dropout off; given everything it returns
    (loss, logits). See the module docstring for what each method holds.
    """

    def __init__(
        self,
        backbone: VisionTransformer,
        method: str,
        *,
        last_k: int = 0,
        query_layers: Sequence[int] = (),
        tokens: int = 1,
        num_classes: int,
        feature_norm: str = "l2",
        aggregate: str = "concat",
        h2t_target: int = 0,
    ) -> None:
        super().__init__()
        if method not in mf.METHODS:
            raise ValueError(f"unknown method {method!r}")
        arch = backbone.arch
        self.arch, self.method, self.feature_norm, self.last_k, self.tokens = arch, method, feature_norm, last_k, tokens
        self.aggregate = aggregate
        self.split = arch.depth - last_k
        self.adaptation = mf.adaptation(method)
        self.query_layers = list(query_layers) if method in mf.QUERY_METHODS else []
        self.frozen_kv = mf.frozen_kv_layers(method, self.query_layers, last_k, arch.depth)
        self.adapted_kv = [i for i in self.query_layers if i not in self.frozen_kv]
        if self.query_layers and self.query_layers != self.frozen_kv + self.adapted_kv:
            raise ValueError(f"query_layers must list the frozen layers before the adapted ones, not {self.query_layers}")
        self.frozen_outputs = mf.frozen_outputs_for(method, self.query_layers, last_k, arch.depth)
        self.input_names = self.frozen_outputs + (["query_keep"] if self.query_layers else []) + ["targets"]
        layers = [str(i) for i in range(self.split, arch.depth)]
        if self.adaptation is not None:
            # Copies: the backbone stays untouched (finetune trains these; torch tests set grads).
            self.blocks = nn.ModuleDict({i: copy.deepcopy(backbone.blocks[int(i)]) for i in layers})
            self.norm = copy.deepcopy(backbone.norm)
            trainable = self.adaptation == "finetune"
            for p in [*self.blocks.parameters(), *self.norm.parameters()]:
                p.requires_grad_(trainable)
        if self.adaptation == "vpt":
            bound = prompt_bound(arch.dim)
            self.prompts = nn.Parameter(torch.empty(last_k, tokens, arch.dim).uniform_(-bound, bound))
        if self.adaptation == "adaptformer":
            self.adapters = nn.ModuleDict({i: Adapter(arch.dim) for i in layers})
        if self.query_layers:
            self.query_path = QueryPath(backbone, self.query_layers, tokens)
        if aggregate == "wsum":  # official WEIGHTED_SUM_FEATS: per-layer weights of the T outputs, ones
            self.wsum_weights = nn.Parameter(torch.ones(len(self.query_layers), tokens))
        if method == "head2toe":
            width = feature_width(arch, h2t_target)
        else:
            width = arch.dim * (1 + len(self.query_layers) * (tokens if aggregate == "concat" else 1))
        self.head = nn.Linear(width, num_classes)
        nn.init.zeros_(self.head.bias)

    # -- names -------------------------------------------------------------------------------
    def trainable(self) -> dict[str, str]:
        """Adapter tensor name -> parameter name in the graphs (docs/design.md section 3)."""
        names = [n for n, p in self.named_parameters() if self._is_trainable(n)]
        return {("query_tokens" if n == "query_path.query_tokens" else n): n for n in names}

    def _is_trainable(self, name: str) -> bool:
        if name.startswith(("head.", "adapters.")) or name in ("prompts", "query_path.query_tokens", "wsum_weights"):
            return True
        return self.adaptation == "finetune" and name.startswith(("blocks.", "norm."))

    # -- forward -----------------------------------------------------------------------------
    def adapted_layers(self, hidden: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Run the last k layers from `hidden`: final CLS [B,D] and the K/V [B,H,N,dh] of the adapted
        query layers (original tokens only)."""
        x, keys, values = hidden, [], []
        t = self.tokens
        for j, (name, block) in enumerate(self.blocks.items()):
            if self.adaptation == "vpt":  # prompts after CLS; the previous layer's prompt outputs were dropped
                prompts = self.prompts[j].unsqueeze(0).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1)
            x, k, v = adapted_block(block, x, self.adapters[name] if self.adaptation == "adaptformer" else None)
            if self.adaptation == "vpt":  # drop the prompt outputs (and, for the query path, their K/V)
                x = torch.cat([x[:, :1], x[:, 1 + t :]], dim=1)
                k, v = (torch.cat([a[:, :, :1], a[:, :, 1 + t :]], dim=2) for a in (k, v))
            if int(name) in self.adapted_kv:
                keys.append(k)
                values.append(v)
        return self.norm(x[:, 0]), keys, values

    def forward(self, *inputs: torch.Tensor):
        named = dict(zip(self.input_names, inputs))
        keys = values = None
        if self.method == "head2toe":  # a linear probe on the frozen, already normalized taps
            logits = self.head(named["features"])
            return logits if "targets" not in named else (weighted_cross_entropy(logits, named["targets"]), logits)
        if self.adaptation is None:
            cls = named["cls"]
            keys, values = named.get("keys"), named.get("values")
        else:
            cls, ks, vs = self.adapted_layers(named["hidden"])
            if self.query_layers:  # frozen layers' K/V first, then the adapted ones (query_layers order)
                keys, values = _join(named.get("keys"), ks), _join(named.get("values"), vs)
        if self.query_layers:
            z = self.query_path(keys, values, named.get("query_keep"))
        else:
            # No query groups: the head reads [n(cls)]. A constant, not a slice of cls: a gradient
            # through an empty slice of cls breaks ORT's gradient graph (Reshape {1,1} -> {B,1}).
            z = torch.zeros(0, 0, 0)
        logits = self.head(head_features(cls, z, self.feature_norm, self.aggregate, getattr(self, "wsum_weights", None)))
        if "targets" not in named:
            return logits
        return weighted_cross_entropy(logits, named["targets"]), logits
