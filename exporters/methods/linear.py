"""The linear head every method ends with (and all of `--method linear`): F -> classes.

docs/design.md section 3. The head reads [n(g_0), n(g_1), ...]: the final CLS token, then (methods
with query tokens) each query layer's aggregated outputs (exporters/methods/vqt.py), each group
L2-normalized on its own ("l2") or left as it is ("none"). Its width F is the spec's `head_width`.
"""

from __future__ import annotations

import torch
from torch import nn

from vqt_edge.spec import AdapterSpec


def attach(module: nn.Module, spec: AdapterSpec) -> None:
    """Give `module` its head `head` [classes, F], bias zero (weight as nn.Linear initializes it)."""
    module.head = nn.Linear(spec.head_width, spec.num_classes)
    nn.init.zeros_(module.head.bias)


def head_features(groups: list[torch.Tensor], feature_norm: str) -> torch.Tensor:
    """The head's input [B, F]: the groups [B, *] concatenated, each normalized by `feature_norm`."""
    if feature_norm == "l2":
        groups = [g / torch.sqrt((g * g).sum(-1, keepdim=True) + 1e-12) for g in groups]
    elif feature_norm != "none":
        raise ValueError(f"feature_norm must be 'l2' or 'none', not {feature_norm!r}")
    return torch.cat(groups, dim=-1)


def weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-sum(log_softmax(logits) * targets), `targets` the one-hot labels already weighted by 1/batch
    (so micro-batches and a short last batch add up exactly; exporters/export.py)."""
    return -(torch.log_softmax(logits, dim=-1) * targets).sum()
