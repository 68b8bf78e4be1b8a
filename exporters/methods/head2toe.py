"""Head2Toe (Evci et al., 2022): a linear head on pooled taps of every layer.

The frozen graph: pixel_values -> `features` [B, F], the pooled taps of every layer.

What the taps are, how they are pooled and in which order they are concatenated is defined once,
without torch, in vqt_edge/head2toe.py (docs/design.md section 11); this module computes them.
Head2Toe's features never change during training, so they belong to frozen.onnx: the device
computes them once per image (like VQT's K/V) and trains only a linear head on them
(`Head2ToeHead`: the features are already normalized, so the head reads them as they are).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from exporters.methods.base import MethodHead
from exporters.vit import VisionTransformer
from vqt_edge.head2toe import pool_window
from vqt_edge.spec import AdapterSpec


def pool_tokens(x: torch.Tensor, tokens: int, channels: int, target: int) -> torch.Tensor:
    """x [B, tokens, channels] -> [B, W*channels]: mean over non-overlapping windows of
    `pool_window(tokens, channels, target)` consecutive tokens (the incomplete last window dropped),
    flattened window-major; one global mean [B, channels] when the window is 0. The sizes are
    given as ints, not read from x, so that the exported graph has them as constants."""
    window = pool_window(tokens, channels, target)
    if window == 0:
        return x.mean(1)
    w = tokens // window
    return x[:, : w * window].reshape(-1, w, window, channels).mean(2).flatten(1)


class Head2ToeFeatures(nn.Module):
    """frozen.onnx of a head2toe bundle: the backbone run once, every tap pooled and normalized."""

    def __init__(self, backbone: VisionTransformer, spec: AdapterSpec) -> None:
        super().__init__()
        self.backbone, self.target, self.feature_norm = backbone, spec.h2t_target, spec.feature_norm

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        a = self.backbone.arch
        x = self.backbone.embed(pixel_values)
        token_taps = [(x, a.dim)]  # (tap, its channels), in vqt_edge/head2toe.py's order
        for block in self.backbone.blocks:
            pre_attn = block.norm1(x)
            attn = block.attn(pre_attn)[0]
            x = x + attn
            mlp_1 = F.gelu(block.mlp.fc1(block.norm2(x)))
            mlp_2 = block.mlp.fc2(mlp_1)
            x = x + mlp_2
            token_taps += [(pre_attn, a.dim), (attn, a.dim), (mlp_1, a.mlp_dim), (mlp_2, a.dim)]
        taps = [self.backbone.norm(x)[:, 0]] + [pool_tokens(t, a.num_tokens, c, self.target) for t, c in token_taps]
        if self.feature_norm == "l2":
            taps = [t / torch.sqrt((t * t).sum(-1, keepdim=True) + 1e-12) for t in taps]
        return torch.cat(taps, dim=-1)


class Head2ToeHead(MethodHead):
    """A linear probe on the frozen, already normalized `features`."""

    def logits(self, named: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(named["features"])
