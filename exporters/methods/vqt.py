"""Visual Query Tuning's trainable part: T query tokens per query layer, and how they reach the head.

docs/design.md section 4. The query path itself (`exporters.vit.QueryPath`, run on the stacked
frozen weights of the query layers) reads each layer's K/V and returns z [B, Lq, T, D]; here it is
attached to a method's head, its outputs aggregated (`aggregate`, docs/design.md section 11) and
handed to the linear head as one group per layer. Any method with query tokens (vqt, vqt+vpt,
vqt+adaptformer) uses this module; `VQTClassifier` is the whole VQT model for tests.
"""

from __future__ import annotations

import torch
from torch import nn

from exporters.vit import QueryPath, VisionTransformer
from vqt_edge.spec import QUERY_TOKENS, AdapterSpec


def attach(module: nn.Module, backbone: VisionTransformer, spec: AdapterSpec) -> None:
    """Give `module` the query path and its trainable tensors.

    The query tokens are registered on `module` itself as well as inside its query path (the same
    Parameter): named_parameters, state_dict and the exported graphs then call them by their one
    name `query_tokens` (vqt_edge/spec.py QUERY_TOKENS), as the adapter file does, not
    `query_path.query_tokens`."""
    module.query_path = QueryPath(backbone, spec)
    setattr(module, QUERY_TOKENS, module.query_path.query_tokens)
    if spec.aggregate == "wsum":  # official WEIGHTED_SUM_FEATS: per-layer weights of the T outputs, ones
        module.wsum_weights = nn.Parameter(torch.ones(len(spec.query_layers), spec.query_tokens))


def aggregate_tokens(z: torch.Tensor, aggregate: str, wsum_weights: torch.Tensor | None = None) -> torch.Tensor:
    """One layer's T query outputs as the head sees them (docs/design.md section 11), z [B, Lq, T, D]:

    - "concat": [B, Lq, T*D], flattened token-major (the official default);
    - "mean": [B, Lq, D], the mean over the T outputs (official POOLING_FEATS);
    - "wsum": [B, Lq, D], sum_t w[l, t] * z[:, l, t] with learned `wsum_weights` w [Lq, T],
      initialized to ones and not normalized, as the official WEIGHTED_SUM_FEATS (`combine_params`).
    """
    if aggregate == "concat":
        return z.flatten(2)
    if aggregate == "mean":
        return z.mean(2)
    if aggregate == "wsum":
        if wsum_weights is None:
            raise ValueError("aggregate 'wsum' needs wsum_weights [Lq, T]")
        return (wsum_weights[:, :, None] * z).sum(2)
    raise ValueError(f"aggregate must be concat, mean or wsum, not {aggregate!r}")


def query_groups(
    module: nn.Module,
    keys: torch.Tensor,
    values: torch.Tensor,
    query_keep: torch.Tensor | None,
    scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> list[torch.Tensor]:
    """The head's groups from the query layers, one [B, *] per layer, in query_layers order.
    `scales`: (keys_scale, values_scale) when keys and values are int8 codes (exporters/step.py)."""
    z = module.query_path(keys, values, query_keep, *scales)
    return list(aggregate_tokens(z, module.spec.aggregate, getattr(module, "wsum_weights", None)).unbind(1))


class VQTClassifier(nn.Module):
    """The whole VQT model: frozen backbone -> K/V -> a vqt head (pixel_values -> logits), the
    reference the bundle's graphs are tested against."""

    def __init__(self, backbone: VisionTransformer, head: nn.Module) -> None:
        super().__init__()
        if head.spec.method != "vqt":
            raise ValueError(f"VQTClassifier runs a vqt head, not {head.spec.method}")
        self.backbone, self.vqt = backbone, head

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cls, keys, values = self.backbone(pixel_values, self.vqt.spec.query_layers)
        return self.vqt(cls, keys, values)
