"""AdaptFormer (Chen et al., 2022) on the last k layers: a parallel bottleneck adapter beside each MLP.

docs/design.md section 5. x' = x + MLP(LN2(x)) + s * up(ReLU(down(x))), x the post-attention
residual, bottleneck vqt_edge/spec.py ADAPTER_BOTTLENECK, scale s = ADAPTER_SCALE. Trainable:
`adapters.{l}.down/up` (l the absolute layer index) and the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from exporters.methods.base import AdaptedHead
from exporters.vit import Block, VisionTransformer
from vqt_edge.spec import ADAPTER_BOTTLENECK

ADAPTER_SCALE = 0.1  # AdaptFormer's scale s


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


class AdaptFormerHead(AdaptedHead):
    def add_adaptation(self, backbone: VisionTransformer) -> None:
        super().add_adaptation(backbone)
        self.adapters = nn.ModuleDict({i: Adapter(self.arch.dim) for i in self.blocks})

    def layer(
        self, j: int, name: str, block: Block, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn_out, k, v = block.attn(block.norm1(x))
        x = x + attn_out
        return x + block.mlp(block.norm2(x)) + self.adapters[name](x), k, v
