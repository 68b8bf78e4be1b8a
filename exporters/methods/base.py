"""What every method's torch side shares: the split of the ViT, the head, the adapted last layers.

docs/design.md sections 3-5. A bundle splits the adapted ViT in two at the first layer a method
changes (the spec's `split`, L - k): `FrozenPart` is everything before it (frozen.onnx), a
`MethodHead` everything after, including the head and the loss (train/). What crosses the split,
the trainable tensors and their shapes are the adapter spec's (vqt_edge/spec.py); a MethodHead checks
when it is built that its trainable parameters are exactly the spec's, by name and shape.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from exporters.methods import linear, vqt
from exporters.vit import Block, VisionTransformer
from vqt_edge.kv_cache import layer_input
from vqt_edge.spec import AdapterSpec


class FrozenPart(nn.Module):
    """frozen.onnx: pixel_values -> the spec's frozen outputs, in its order.

    cls [B,D] (final CLS after the final LayerNorm), keys/values [B,Lk,H,N,dh] of the spec's
    `frozen_kv_layers`, and hidden [B,N,D] (the input of layer `split`). Runs only the layers those
    outputs need. (head2toe's frozen graph is exporters/methods/head2toe.py's.)
    """

    def __init__(self, backbone: VisionTransformer, spec: AdapterSpec) -> None:
        super().__init__()
        self.backbone, self.outputs, self.kv_layers = backbone, spec.frozen_outputs, spec.frozen_kv_layers
        self.stop = spec.split if "hidden" in self.outputs else backbone.arch.depth

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


class MethodHead(nn.Module):
    """The frozen outputs -> logits (and the loss, given targets); as it is, `--method linear` and
    `--method vqt` (query tokens on the frozen K/V; exporters/methods/vqt.py).

    `forward(*inputs)` takes the inputs named by the spec's `train_inputs`, in that order: the
    frozen outputs, then `query_keep` (methods with query tokens), then `targets`. Given only the
    frozen outputs (head.onnx) it returns the logits with query dropout off; given everything it
    returns (loss, logits). Subclasses adapt the last k layers (`AdaptedHead`) or read Head2Toe's
    features (exporters/methods/head2toe.py).
    """

    def __init__(self, backbone: VisionTransformer, spec: AdapterSpec) -> None:
        super().__init__()
        self.spec, self.arch = spec, backbone.arch
        self.input_names = spec.train_inputs
        self.add_adaptation(backbone)
        if spec.has_query_tokens:
            vqt.attach(self, backbone, spec)
        linear.attach(self, spec)
        shapes = {n: tuple(p.shape) for n, p in self.named_parameters() if p.requires_grad}
        if shapes != spec.trainable_shapes:  # the spec is the contract; a module that drifts is a bug
            raise RuntimeError(f"{spec.method} head trains {shapes}, its spec says {spec.trainable_shapes}")

    def add_adaptation(self, backbone: VisionTransformer) -> None:
        """Subclasses that adapt the last k layers add their modules here."""

    def trainable(self) -> list[str]:
        """The trainable tensors' names (the same in the graphs and the adapter; docs/design.md section 3)."""
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def tail(self, named: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Final CLS [B,D] and the query layers' K/V [B,Lq,H,N,dh]: here, the frozen outputs as they are."""
        return named["cls"], named.get("keys"), named.get("values")

    def logits(self, named: dict[str, torch.Tensor]) -> torch.Tensor:
        cls, keys, values = self.tail(named)
        groups = [cls]
        if self.spec.has_query_tokens:
            scales = (named.get("keys_scale"), named.get("values_scale"))
            if scales[0] is not None:  # the int8 feed: each layer's codes an input (exporters/step.py)
                keys, values = (layer_inputs(named, n) for n in ("keys", "values"))
            groups += vqt.query_groups(self, keys, values, named.get("query_keep"), scales)
        return self.head(linear.head_features(groups, self.spec.feature_norm))

    def forward(self, *inputs: torch.Tensor):
        named = dict(zip(self.input_names, inputs))
        logits = self.logits(named)
        if "targets" not in named:
            return logits
        return linear.weighted_cross_entropy(logits, named["targets"]), logits


def layer_inputs(named: dict[str, torch.Tensor], name: str) -> list[torch.Tensor]:
    """Each query layer's codes of `name`, fed one input per layer (the int8-fed step graph)."""
    out = []
    while layer_input(name, len(out)) in named:
        out.append(named[layer_input(name, len(out))])
    return out


def _join(frozen: torch.Tensor | None, adapted: list[torch.Tensor]) -> torch.Tensor:
    """[B,Lf,...] frozen layers' tensor followed by the adapted layers' [B,...] along dim 1."""
    parts = ([frozen] if frozen is not None else []) + ([torch.stack(adapted, 1)] if adapted else [])
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


class AdaptedHead(MethodHead):
    """A head that runs the last k layers itself, from the frozen output `hidden` (the input of layer
    L-k), through copies of those layers (the backbone stays untouched): VPT, AdaptFormer and
    fine-tuning (exporters/methods/{vpt,adaptformer,finetune}.py) differ only in `layer`.

    With query tokens (vqt+vpt, vqt+adaptformer; our reading of the VQT paper, section 4.4: the
    query tokens summarize the intermediate features of the *adapted* backbone), the adapted layers
    change only the K/V the query path reads: frozen query layers' K/V come from frozen.onnx, the
    adapted ones' from here, original tokens only ([B,H,N,dh] as every frozen layer's). Query tokens
    still run the query path on the layer's frozen weights. Everything is trained jointly, in one graph.
    Every LayerNorm is applied once per layer (on whole token sequences), as onnxruntime-training
    needs (docs/design.md section 7).
    """

    def add_adaptation(self, backbone: VisionTransformer) -> None:
        layers = [str(i) for i in range(self.spec.split, self.arch.depth)]
        self.blocks = nn.ModuleDict({i: copy.deepcopy(backbone.blocks[int(i)]) for i in layers})
        self.norm = copy.deepcopy(backbone.norm)
        for p in [*self.blocks.parameters(), *self.norm.parameters()]:
            p.requires_grad_(False)

    def layer(
        self, j: int, name: str, block: Block, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Adapted layer j (absolute index `name`): tokens out and the K/V [B,H,N,dh] of the original tokens."""
        return block(x)

    def tail(self, named: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        x, keys, values = named["hidden"], [], []
        adapted_kv = self.spec.adapted_kv_layers
        for j, (name, block) in enumerate(self.blocks.items()):
            x, k, v = self.layer(j, name, block, x)
            if int(name) in adapted_kv:
                keys.append(k)
                values.append(v)
        if not self.spec.has_query_tokens:
            return self.norm(x[:, 0]), None, None
        # frozen layers' K/V first, then the adapted ones (query_layers order)
        return self.norm(x[:, 0]), _join(named.get("keys"), keys), _join(named.get("values"), values)
