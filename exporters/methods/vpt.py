"""VPT-deep (Jia et al., 2022) on the last k layers: T learned prompt tokens inserted into each.

docs/design.md section 5. Each adapted layer gets its own prompts [T, D] after the CLS token; the
layer's prompt outputs are dropped before the next layer inserts its own, and so are their K/V
(a query path, in vqt+vpt, reads the K/V of the N original tokens only). Trainable: `prompts`
[k, T, D] and the head.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from exporters.methods.base import AdaptedHead
from exporters.vit import Block, VisionTransformer


def prompt_bound(dim: int) -> float:
    """VPT/VQT init: U(-v, v), v = sqrt(6 / (3 * 16 * 16 + D)) (as QueryPath's query tokens)."""
    return math.sqrt(6.0 / (3 * 16 * 16 + dim))


class VPTHead(AdaptedHead):
    def add_adaptation(self, backbone: VisionTransformer) -> None:
        super().add_adaptation(backbone)
        bound = prompt_bound(self.arch.dim)
        self.prompts = nn.Parameter(
            torch.empty(self.spec.last_k, self.spec.query_tokens, self.arch.dim).uniform_(-bound, bound)
        )

    def layer(
        self, j: int, name: str, block: Block, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        t = self.spec.query_tokens
        prompts = self.prompts[j].unsqueeze(0).expand(x.shape[0], -1, -1)
        x, k, v = block(torch.cat([x[:, :1], prompts, x[:, 1:]], dim=1))  # prompts after CLS
        # drop the prompt outputs (and, for the query path, their K/V)
        k, v = (torch.cat([a[:, :, :1], a[:, :, 1 + t :]], dim=2) for a in (k, v))
        return torch.cat([x[:, :1], x[:, 1 + t :]], dim=1), k, v
