"""Head2Toe's feature layout (Evci et al., ICML 2022), shared by the exporter and the device.

Head2Toe (docs/design.md section 11) trains a linear head on features taken from the whole frozen
backbone instead of the final CLS alone. vqt-edge's frozen graph computes them (exporters/methods/head2toe.py)
and emits one `features` [B, F] tensor; this module says which taps that holds and how wide each
one is, without torch, so the device (feature cache, memory model) and the manifest agree on F.

Taps, in the order they are concatenated:
- `cls`: the final CLS token after the encoder LayerNorm ([D], not pooled: Head2Toe's `pre_logits`);
- `embeddings`: the tokens entering layer 0 (patch embedding + CLS + position embedding, [N, D]);
- per layer i: `pre_attn` (after LN1, [N, D]), `attn` (the attention sub-layer's output after Wo,
  before the residual add, [N, D]), `mlp_1` (inside the MLP, after GELU, [N, mlp]), `mlp_2` (the MLP
  sub-layer's output after fc2, before the residual add, [N, D]); the names are Head2Toe's
  (`encoder_{i}_pre_attn`, `encoder_{i}_attn`, `encoder_{i}_mlp_1`, `encoder_{i}_mlp_2`).

Every token tap is average-pooled over tokens to about `target` values, exactly as
google-research/head2toe's `flatten_and_concat` does for [B, N, C] outputs (cls_token_pool
"normal": the CLS token is pooled with the patches): with C >= target, one global mean ([C]);
otherwise windows of `int(N / (target / C))` consecutive tokens, non-overlapping, the last
incomplete window dropped ("valid" AveragePooling1D), flattened window-major; a window size of 0
(target above N*C) falls back to the global mean, as theirs does. Then each tap is L2-normalized on
its own (`feature_norm` "l2"; Head2Toe's "unit_vector") and the taps are concatenated.
"""

from __future__ import annotations

from vqt_edge.arch import ViTArch

#: Per-layer taps, in order (Head2Toe's names, see the module docstring).
LAYER_TAPS = ("pre_attn", "attn", "mlp_1", "mlp_2")
#: Default `--h2t-target`: one of the target sizes Head2Toe searches (512 ... 8192); for
#: vit_fmnist (N = 50, D = 128) it keeps 8 windows of 6 tokens per D-wide tap.
DEFAULT_TARGET = 1024


def pool_window(tokens: int, channels: int, target: int) -> int:
    """Tokens per averaging window for a [tokens, channels] tap; 0 means one global mean."""
    if channels >= target:
        return 0
    return int(tokens / (target / channels))


def pooled_width(tokens: int, channels: int, target: int) -> int:
    """Values a [tokens, channels] tap contributes after pooling and flattening."""
    window = pool_window(tokens, channels, target)
    return channels * (tokens // window if window > 0 else 1)


def taps(arch: ViTArch, target: int) -> list[tuple[str, int]]:
    """(name, width) of every tap in `features`, in order; the widths add up to F."""
    n, d = arch.num_tokens, arch.dim
    out = [("cls", d), ("embeddings", pooled_width(n, d, target))]
    for i in range(arch.depth):
        for name in LAYER_TAPS:
            out.append((f"encoder_{i}_{name}", pooled_width(n, arch.mlp_dim if name == "mlp_1" else d, target)))
    return out


def feature_width(arch: ViTArch, target: int) -> int:
    """F: the width of frozen.onnx's `features` output, the head's input."""
    return sum(width for _, width in taps(arch, target))
