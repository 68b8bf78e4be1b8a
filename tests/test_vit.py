"""The VQT math in torch, against an independent formulation (docs/design.md section 4)."""

from __future__ import annotations

import torch

from exporters.methods import build_head
from exporters.methods.linear import head_features
from exporters.methods.vqt import VQTClassifier, aggregate_tokens
from exporters.vit import QueryPath
from tests.conftest import TINY
from vqt_edge.spec import AdapterSpec


def _block_outputs(model, fn):
    """Run fn() and record every block's output tokens."""
    seen, hooks = [], [b.register_forward_hook(lambda _m, _i, out: seen.append(out[0].clone())) for b in model.blocks]
    try:
        result = fn()
    finally:
        for h in hooks:
            h.remove()
    return seen, result


def test_backbone_features_bit_identical_with_and_without_query_tokens(tiny_backbone):
    x = torch.randn(3, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain_blocks, (plain_cls, _, _) = _block_outputs(tiny_backbone, lambda: tiny_backbone(x))
        model = VQTClassifier(
            tiny_backbone, build_head(tiny_backbone, AdapterSpec.create(TINY, "vqt", 5, query_tokens=4))
        )
        for tokens in (model.vqt.query_path.query_tokens.clone(), torch.randn(3, 4, TINY.dim) * 10):
            model.vqt.query_path.query_tokens.copy_(tokens)
            captured_cls = []
            hook = tiny_backbone.norm.register_forward_hook(
                lambda _m, _i, out, captured_cls=captured_cls: captured_cls.append(out[:, 0].clone())
            )
            vqt_blocks, _ = _block_outputs(tiny_backbone, lambda: model(x))
            hook.remove()
            assert len(vqt_blocks) == TINY.depth
            for a, b in zip(plain_blocks, vqt_blocks):
                assert torch.equal(a, b)
            assert torch.equal(captured_cls[0], plain_cls)


def _appended_formulation(backbone, layers, tokens, x):
    """VQT as the paper writes it: query tokens appended to each layer's sequence, with attention
    masked so queries read only the N original tokens and nobody reads the queries."""
    out = []
    h = backbone.embed(x)
    n = h.shape[1]
    for i, block in enumerate(backbone.blocks):
        if i in layers:
            p = tokens[layers.index(i)].unsqueeze(0).expand(h.shape[0], -1, -1)
            seq = torch.cat([h, p], dim=1)
            b, s, d = seq.shape
            qkv = block.attn.qkv(block.norm1(seq)).reshape(b, s, 3, TINY.heads, d // TINY.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            scores = (q @ k.transpose(-2, -1)) * (d // TINY.heads) ** -0.5
            mask = torch.zeros(s, s, dtype=torch.bool)
            mask[:, n:] = True  # nobody attends to the query tokens
            scores = scores.masked_fill(mask, float("-inf"))
            attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
            z = seq + block.attn.proj(attn)
            z = z + block.mlp(block.norm2(z))
            out.append(z[:, n:])
        h, _, _ = block(h)
    return torch.stack(out, 1)


def test_query_outputs_equal_independent_formulation(tiny_backbone):
    torch.manual_seed(1)
    x = torch.randn(4, 3, TINY.image_size, TINY.image_size)
    layers = [0, 2]
    path = QueryPath(tiny_backbone, AdapterSpec.create(TINY, "vqt", 2, query_layers=layers, query_tokens=3))
    with torch.no_grad():
        path.query_tokens.normal_()
        _, keys, values = tiny_backbone(x, layers)
        ours = path(keys, values)
        reference = _appended_formulation(tiny_backbone, layers, path.query_tokens, x)
    assert ours.shape == (4, 2, 3, TINY.dim)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_head_features_layout_and_normalization():
    cls = torch.randn(2, 4)
    z = torch.randn(2, 3, 2, 4)  # [B, Lq, T, D]

    def groups(z):  # [n(cls), n(z_l1), ...]: each layer's T outputs concatenated (the default)
        return [cls] + list(aggregate_tokens(z, "concat").unbind(1))

    f = head_features(groups(z), "none")
    assert f.shape == (2, 4 + 3 * 2 * 4)
    assert torch.equal(f[:, :4], cls)
    assert torch.equal(f[:, 4 + 8 : 4 + 16], z[:, 1].reshape(2, 8))  # layer 2, tokens flattened token-major
    g = head_features(groups(z), "l2")
    norms = [g[:, :4].norm(dim=-1)] + [g[:, 4 + 8 * j : 12 + 8 * j].norm(dim=-1) for j in range(3)]
    for nrm in norms:
        torch.testing.assert_close(nrm, torch.ones(2))


def test_query_token_init_follows_the_paper(tiny_backbone):
    path = QueryPath(tiny_backbone, AdapterSpec.create(TINY, "vqt", 2, query_tokens=50))
    bound = (6.0 / (3 * 16 * 16 + TINY.dim)) ** 0.5
    assert path.query_tokens.abs().max() <= bound
    assert path.query_tokens.abs().max() > 0.9 * bound
    assert not any(p.requires_grad for n, p in path.named_parameters() if n != "query_tokens")


def test_query_key_scores_gradients_match_finite_differences():
    """QueryPath's scores q K^T carry a hand-written backward (dq = ds K, so the step graph reads K
    as stored): both gradients against finite differences, T = 1 and T = 3."""
    from exporters.vit import _QueryKeyScores

    gen = torch.Generator().manual_seed(0)
    for t in (1, 3):
        q = torch.randn(2, 3, t, 4, dtype=torch.float64, generator=gen, requires_grad=True)
        keys = torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=gen, requires_grad=True)
        assert torch.allclose(_QueryKeyScores.apply(q, keys), q @ keys.transpose(-2, -1))
        assert torch.autograd.gradcheck(_QueryKeyScores.apply, (q, keys))
