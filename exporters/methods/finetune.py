"""Fine-tuning of the last k layers: every weight of layers L-k..L-1 and the final LayerNorm.

docs/design.md section 5. Trainable: `blocks.{l}.*` (l the absolute layer index, timm's names, so
the adapter reads like a partial timm state dict), `norm.*` and the head.
"""

from __future__ import annotations

from exporters.methods.base import AdaptedHead
from exporters.vit import VisionTransformer


class FinetuneHead(AdaptedHead):
    def add_adaptation(self, backbone: VisionTransformer) -> None:
        super().add_adaptation(backbone)  # copies: the backbone stays untouched
        for p in [*self.blocks.parameters(), *self.norm.parameters()]:
            p.requires_grad_(True)
