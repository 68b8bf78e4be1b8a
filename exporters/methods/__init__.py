"""The trainable part of every method, in torch, one module per method (docs/design.md sections 3-5).

| method            | frozen outputs              | trainable                                  | module         |
|-------------------|-----------------------------|--------------------------------------------|----------------|
| linear            | cls                         | head                                       | linear, base   |
| vqt               | cls, keys, values           | query_tokens [Lq,T,D], head                | vqt            |
| vpt               | hidden                      | prompts [k,T,D], head                      | vpt            |
| adaptformer       | hidden                      | adapters.{l}.down/up (k layers), head      | adaptformer    |
| finetune          | hidden                      | blocks.{l}.* (k layers), norm.*, head      | finetune       |
| vqt+vpt           | hidden, keys, values (l<L-k)| query_tokens, prompts, head                | vqt + vpt      |
| vqt+adaptformer   | hidden, keys, values (l<L-k)| query_tokens, adapters, head               | vqt + adaptf.  |
| head2toe          | features                    | head                                       | head2toe       |

(`wsum_weights` [Lq,T] too with `--aggregate wsum`.) What each column holds, by name and shape, is
the adapter spec's (vqt_edge/spec.py); `build_head` and `build_frozen` are the exporter's entry points.
Parameter names inside the graphs equal the adapter names of `adapter.safetensors`.
"""

from __future__ import annotations

from torch import nn

from exporters.methods.adaptformer import AdaptFormerHead
from exporters.methods.base import FrozenPart, MethodHead
from exporters.methods.finetune import FinetuneHead
from exporters.methods.head2toe import Head2ToeFeatures, Head2ToeHead
from exporters.methods.vpt import VPTHead
from exporters.vit import VisionTransformer
from vqt_edge.spec import AdapterSpec

_ADAPTED = {"vpt": VPTHead, "adaptformer": AdaptFormerHead, "finetune": FinetuneHead}


def build_head(backbone: VisionTransformer, spec: AdapterSpec) -> MethodHead:
    """The trainable part + head of `spec`'s method: frozen outputs -> logits (and loss)."""
    if spec.method == "head2toe":
        return Head2ToeHead(backbone, spec)
    return _ADAPTED.get(spec.adaptation, MethodHead)(backbone, spec)


def build_frozen(backbone: VisionTransformer, spec: AdapterSpec) -> nn.Module:
    """What frozen.onnx computes for `spec`: pixel_values -> its frozen outputs."""
    return Head2ToeFeatures(backbone, spec) if spec.method == "head2toe" else FrozenPart(backbone, spec)
