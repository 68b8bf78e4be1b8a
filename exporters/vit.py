"""ViT and VQT's query path in torch: one readable file, in the spirit of timm's ViT.

Module names follow timm's layout (`blocks.{i}.attn.qkv`, `norm`, ...) so timm/MAE state dicts load
as they are. Two pieces:

- `VisionTransformer`: the frozen backbone. `forward` returns the final CLS token and every layer's
  keys and values, which is all VQT needs from it.
- `QueryPath`: the VQT part of every query layer, computed for all layers at once on stacked frozen
  weights. It only reads K/V, so the backbone's own tokens never see the query tokens and training
  never back-propagates through the backbone. This is what the on-device training graph holds.

How each method uses them (the head, the aggregation of query outputs, VPT, AdaptFormer, ...) is in
exporters/methods/, one module per method.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vqt_edge.arch import ViTArch
from vqt_edge.kv_cache import head_groups
from vqt_edge.spec import AdapterSpec


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # rows [q; k; v], as in timm
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention output plus this layer's keys and values, each [B, H, N, dh]."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, d)
        return self.proj(out), k, v


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as the original ViT


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN1(x)), then + MLP(LN2(.))."""

    def __init__(self, arch: ViTArch) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(arch.dim, eps=arch.eps)
        self.attn = Attention(arch.dim, arch.heads)
        self.norm2 = nn.LayerNorm(arch.dim, eps=arch.eps)
        self.mlp = Mlp(arch.dim, arch.mlp_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn_out, k, v = self.attn(self.norm1(x))
        x = x + attn_out
        return x + self.mlp(self.norm2(x)), k, v


class VisionTransformer(nn.Module):
    def __init__(self, arch: ViTArch) -> None:
        super().__init__()
        self.arch = arch
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(arch.channels, arch.dim, arch.patch, stride=arch.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, arch.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, arch.num_tokens, arch.dim))
        self.blocks = nn.ModuleList(Block(arch) for _ in range(arch.depth))
        self.norm = nn.LayerNorm(arch.dim, eps=arch.eps)
        self.reset_parameters()

    def reset_parameters(self, seed: int | None = None) -> None:
        """timm-like random init (used by `--random-init` and tests): features that carry signal."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.ndim == 1:
                    p.copy_(
                        torch.ones_like(p)
                        if name.endswith(("norm1.weight", "norm2.weight", "norm.weight"))
                        else torch.zeros_like(p)
                    )
                else:
                    fan_in = p[0].numel() if p.ndim > 1 else 1
                    std = 0.02 if "pos_embed" in name or "cls_token" in name else 1.0 / math.sqrt(fan_in)
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed.proj(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.pos_embed

    def forward(
        self, pixel_values: torch.Tensor, kv_layers: Sequence[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CLS after the final LayerNorm [B, D], and keys, values [B, Lq, H, N, dh] of `kv_layers`."""
        layers = range(self.arch.depth) if kv_layers is None else kv_layers
        x = self.embed(pixel_values)
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x)
            if i in layers:
                keys.append(k)
                values.append(v)
        return self.norm(x)[:, 0], torch.stack(keys, 1), torch.stack(values, 1)


def _layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm written out, with a per-layer weight broadcast over the stacked layers.

    Decomposed on purpose: onnxruntime-training has no gradient for LayerNormalization (opset 17),
    and one stacked LN per position avoids applying a frozen module twice (docs/design.md section 7).
    """
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) * (x - mean)).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


class _QueryKeyScores(torch.autograd.Function):
    """Attention scores s = q K^T [..., T, N] whose backward reads K as it is: dq = ds K.

    Written with autograd, the backward multiplies by the transpose of the forward's K^T view, so
    the traced step graph (exporters/step.py) holds a Transpose node that copies all of K because
    two MatMuls read it (vit_b16, batch 32: 232 MB of fp32 written and 0.06 s every step). Here the
    only transposed read of K is the forward's, which onnxruntime fuses into its MatMul (transB).
    Same math; docs/design.md section 10. dK is computed only when K requires a gradient (never for
    cached K/V). The exports through onnxruntime-training and model.onnx see only the forward.
    """

    @staticmethod
    def forward(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        # As a 3-D bmm so that the Transpose feeds the MatMul directly (a Reshape between them
        # would stop onnxruntime's fusion).
        *batch, t, dh = q.shape
        k = keys.reshape(-1, keys.shape[-2], dh)
        return torch.bmm(q.reshape(-1, t, dh), k.transpose(1, 2)).reshape(*batch, t, keys.shape[-2])

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, keys = ctx.saved_tensors
        grad_q = grad @ keys if ctx.needs_input_grad[0] else None
        grad_keys = grad.transpose(-2, -1) @ q if ctx.needs_input_grad[1] else None
        return grad_q, grad_keys


class _FrozenMatmul(torch.autograd.Function):
    """x @ w for a frozen stacked weight w [Lq, K, N], whose backward reads w as stored: dx = (w dy^T)^T.

    Written with autograd, the backward is dy @ w^T, which onnxruntime runs as a MatMul with w as its
    B operand (FusedMatMul, transB); MLAS packs the B operand on every call, here the whole weight
    (9.4 MB per layer of fc1 / fc2 on vit_b16). With w as the A operand it is read in place and only
    the small dy^T is packed. onnxruntime 1.19.2, 1 thread, 12 layers of 768 x 3072 against 32 rows
    (bench/frozen_matmul.py): 0.028 s as dy w^T, 0.019 s as (w dy^T)^T; the vit_b16 portable step
    0.334 -> 0.310 CPU s (docs/design.md section 10). Same math up to float reassociation (3e-6).
    dw only when w requires a gradient (never for QueryPath's frozen weights). The exports through
    onnxruntime-training and model.onnx see only the forward, `x @ w`.
    """

    @staticmethod
    def forward(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x @ w

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        # bmm, not @: matmul's decomposition reshapes w first, a second copy of it in small graphs.
        grad_x = torch.bmm(w, grad.transpose(1, 2)).transpose(1, 2) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(x.transpose(1, 2), grad) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w


def _group_codes(codes: torch.Tensor, first: int, size: int, dtype: torch.dtype, backward: bool) -> torch.Tensor:
    """Heads [first, first + size) of one layer's int8 codes [B, H, N, dh] as [B * size, N, dh] floats.
    The backward pass widens again rather than keeping the forward's copy (kept, every copy would
    live until the backward pass: all of the fp32 K/V), and takes the heads with another op (Gather,
    where the forward slices) so that no common-subexpression pass merges the two into one kept tensor."""
    b, _, n, dh = codes.shape
    if backward:
        index = torch.arange(first, first + size, device=codes.device)
        return codes.index_select(1, index).to(dtype).reshape(b * size, n, dh)
    return codes.narrow(1, first, size).to(dtype).reshape(b * size, n, dh)


def _by_head_group(codes: torch.Tensor, small: torch.Tensor, backward: bool, codes_first: bool) -> torch.Tensor:
    """Batched products of one layer's int8 codes [B, H, N, dh] with a small per-head tensor [B, H, r, c],
    a head group at a time (`head_groups`): codes @ small (`codes_first`) or small @ codes, each group's
    codes widened to the small tensor's dtype (`_group_codes`) just before its product. -> [B, H, ., .]."""
    b, h, n, dh = codes.shape
    out = []
    for first, size in head_groups(h, n, dh):
        part = small.narrow(1, first, size).reshape(b * size, *small.shape[2:])
        widened = _group_codes(codes, first, size, small.dtype, backward)
        product = torch.bmm(widened, part) if codes_first else torch.bmm(part, widened)
        out.append(product.reshape(b, size, *product.shape[1:]))
    return torch.cat(out, 1)


class _Int8Scores(torch.autograd.Function):
    """One layer's attention scores from its int8 K codes c [B, H, N, dh] and per-channel scales s
    [B, H, 1, dh] (the int8 cache's layout, device_runner/kv_int8.py): q K^T = (q * s) c^T, so the
    scale lands on the small q and only c is widened, a few heads at a time (`head_groups`). Computed
    as (c (q s)^T)^T, c as the A operand (read in place, as `_FrozenMatmul`'s weights) and only small
    tensors transposed; the backward, dq = (ds c) * s, widens c again. Same math as
    `_QueryKeyScores` on the dequantized K up to float reassociation."""

    @staticmethod
    def forward(q: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        qs = (q * scale).transpose(2, 3)  # [B, H, dh, T]
        return _by_head_group(codes, qs, backward=False, codes_first=True).transpose(2, 3)  # [B, H, T, N]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1], inputs[2])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        codes, scale = ctx.saved_tensors
        return _by_head_group(codes, grad, backward=True, codes_first=False) * scale, None, None


class _Int8AttnValues(torch.autograd.Function):
    """One layer's attention output A V from its int8 V codes c and per-channel scales s: A V =
    (A c) * s; the backward dA = ((dO s) c^T) = (c (dO s)^T)^T widens c again, a few heads at a time
    (`head_groups`), c as the A operand as in `_Int8Scores`."""

    @staticmethod
    def forward(attn: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return _by_head_group(codes, attn, backward=False, codes_first=False) * scale

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1], inputs[2])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        codes, scale = ctx.saved_tensors
        gs = (grad * scale).transpose(2, 3)  # [B, H, dh, T]
        return _by_head_group(codes, gs, backward=True, codes_first=True).transpose(2, 3), None, None


def _int8_attention(
    q: torch.Tensor,
    keys: Sequence[torch.Tensor],
    keys_scale: torch.Tensor,
    values: Sequence[torch.Tensor],
    values_scale: torch.Tensor,
) -> torch.Tensor:
    """softmax(q K^T / sqrt(dh)) V [B, Lq, H, T, dh] from each layer's int8 K/V codes [B, H, N, dh]
    and the per-channel scales [B, Lq, H, 1, dh], layer by layer: at most one layer's K or V is
    ever fp32 (exporters/step.py feeds each layer's codes as an input of its own)."""
    out = []
    for layer, q_l in enumerate(q.unbind(1)):
        scores = _Int8Scores.apply(q_l, keys[layer], keys_scale[:, layer])
        attn = torch.softmax(scores * q.shape[-1] ** -0.5, dim=-1)
        out.append(_Int8AttnValues.apply(attn, values[layer], values_scale[:, layer]))
    return torch.stack(out, 1)


class QueryPath(nn.Module):
    """VQT's query tokens for all query layers, run on stacked frozen weights of those layers.

    Per layer l (docs/design.md section 4), with P_l the T learned tokens and K_l, V_l from the backbone:
        Q = LN1(P_l) Wq + bq;  A = softmax(Q K_l^T / sqrt(dh));  z = P_l + (A V_l) Wo + bo
        z_l = z + MLP(LN2(z))
    Stacking the Lq layers makes every step one batched matmul and applies each frozen weight once.
    """

    def __init__(self, backbone: VisionTransformer, spec: AdapterSpec) -> None:
        super().__init__()
        arch = backbone.arch
        self.arch = arch
        self.query_layers = list(spec.query_layers)
        blocks = [backbone.blocks[i] for i in self.query_layers]
        d = arch.dim

        def stack(get) -> nn.Parameter:
            return nn.Parameter(torch.stack([get(b).detach().clone() for b in blocks]), requires_grad=False)

        # Linear weights are stored transposed ([in, out]) so that x @ w works with stacked layers.
        self.ln1_w = stack(lambda b: b.norm1.weight)
        self.ln1_b = stack(lambda b: b.norm1.bias)
        self.wq = stack(lambda b: b.attn.qkv.weight[:d].t())  # only Wq: K/V come from the backbone
        self.bq = stack(lambda b: b.attn.qkv.bias[:d])
        self.wo = stack(lambda b: b.attn.proj.weight.t())
        self.bo = stack(lambda b: b.attn.proj.bias)
        self.ln2_w = stack(lambda b: b.norm2.weight)
        self.ln2_b = stack(lambda b: b.norm2.bias)
        self.w1 = stack(lambda b: b.mlp.fc1.weight.t())
        self.b1 = stack(lambda b: b.mlp.fc1.bias)
        self.w2 = stack(lambda b: b.mlp.fc2.weight.t())
        self.b2 = stack(lambda b: b.mlp.fc2.bias)
        # Official init: U(-v, v), v = sqrt(6 / (3 * 16 * 16 + D)) (the VPT/VQT "xavier" for prompts).
        bound = math.sqrt(6.0 / (3 * 16 * 16 + d))
        self.query_tokens = nn.Parameter(
            torch.empty(len(self.query_layers), spec.query_tokens, d).uniform_(-bound, bound)
        )

    def forward(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        query_keep: torch.Tensor | None = None,
        keys_scale: torch.Tensor | None = None,
        values_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """keys, values [B, Lq, H, N, dh] -> query outputs z [B, Lq, T, D].

        `query_keep` [B, Lq, T, D] is a dropout mask already scaled by 1/(1-p) (ones at eval). It is
        an input rather than a Dropout node so that the runner owns the random numbers: training is
        then reproducible and resumable bit for bit.

        Computed layer-major (docs/design.md section 10): the query tokens of all images are laid out
        [Lq, B*T, D], so each frozen-weight MatMul against the stacked [Lq, D, D'] weights is Lq
        matrix-matrix products. Laid out [B, Lq, T, D] the same MatMul is B*Lq matrix-vector products
        (T = 1), which onnxruntime runs 4x slower. Only the attention reads K/V in their own [B, Lq,
        ...] layout; the small per-token tensors are permuted around it, and z leaves in [B, Lq, T, D].

        With `keys_scale` and `values_scale` [B, Lq, H, 1, dh], keys and values are sequences of each
        layer's int8 codes [B, H, N, dh] (the int8 cache's per-channel layout), dequantized inside
        the attention one layer at a time (`_int8_attention`; the int8-fed step graph, exporters/step.py).
        """
        if keys_scale is not None and values_scale is not None:  # per-layer codes [B, H, N, dh]
            b, h, n, dh = keys[0].shape
            lq = len(keys)
        else:
            b, lq, h, n, dh = keys.shape
        t, d = self.query_tokens.shape[1:]
        p = self.query_tokens.unsqueeze(1)  # [Lq, 1, T, D]
        if query_keep is not None:
            p = p * query_keep.transpose(0, 1)  # [Lq, B, T, D]
        p = p.expand(lq, b, t, d).reshape(lq, b * t, d)  # layer-major rows: (image, token)
        eps = self.arch.eps
        mm = _FrozenMatmul.apply  # x @ w, backward with w as the A operand (docs/design.md section 10)
        q = mm(_layer_norm(p, self.ln1_w[:, None], self.ln1_b[:, None], eps), self.wq) + self.bq[:, None]
        q = q.reshape(lq, b, t, h, dh).permute(1, 0, 3, 2, 4)  # [B, Lq, H, T, dh], as keys
        if keys_scale is not None and values_scale is not None:
            out = _int8_attention(q, keys, keys_scale, values, values_scale)
        else:
            attn = torch.softmax(_QueryKeyScores.apply(q, keys) * dh**-0.5, dim=-1)  # [B, Lq, H, T, N]
            out = attn @ values
        out = out.permute(1, 0, 3, 2, 4).reshape(lq, b * t, d)  # [Lq, B*T, D]
        z = p + mm(out, self.wo) + self.bo[:, None]
        hid = F.gelu(mm(_layer_norm(z, self.ln2_w[:, None], self.ln2_b[:, None], eps), self.w1) + self.b1[:, None])
        z = z + mm(hid, self.w2) + self.b2[:, None]
        return z.reshape(lq, b, t, d).transpose(0, 1)  # [B, Lq, T, D]
