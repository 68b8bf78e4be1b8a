"""The portable step graph (train/step.onnx) against torch autograd on the torch model.

For every method the bundle format knows, exporters/step.py's graph, run by a plain onnxruntime
InferenceSession, must give the loss, logits and gradient of every trainable tensor that
`loss.backward()` gives on the same method head (exporters/methods/) (docs/design.md section 9), within 1e-5 of the
largest value. K/V and hidden are rounded to fp16 as the cache stores them and go in as fp32, as the
runner converts them; torch gets the same values.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from device_runner.backends import STEP_DISABLED_OPTIMIZERS
from exporters.methods import build_frozen, build_head
from exporters.step import MAX_IR_VERSION, export_step, grad_name
from exporters.vit import VisionTransformer
from vqt_edge.arch import PRESETS
from vqt_edge.spec import CACHE_DTYPES, AdapterSpec

RTOL = 1e-5  # relative to the largest magnitude of each compared tensor


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _transposes_reading(model: onnx.ModelProto, inputs: set[str]) -> list[str]:
    """Transpose nodes that read `inputs` (through Cast and Reshape): each one is a full copy of K
    or V per step, which the portable step must not make (exporters/vit.py _QueryKeyScores)."""
    derived = set(inputs)
    found = []
    for node in model.graph.node:  # topologically sorted
        if node.input and node.input[0] in derived:
            if node.op_type in ("Cast", "Reshape"):
                derived.update(node.output)
            elif node.op_type == "Transpose":
                found.append(node.name)
    return found


def _weight_operands(model: onnx.ModelProto, weights: dict[str, np.ndarray]) -> dict[str, set[tuple[int, bool]]]:
    """How the MatMuls of `model` read each frozen weight: {(operand 0 = A / 1 = B, transposed?)}.

    Weights are found by value (the exporter may store a reshaped or transposed copy under a new
    name), through Transpose nodes and FusedMatMul's transA/transB."""
    known = {}
    for name, w in weights.items():
        known[(w.shape, w.tobytes())] = (name, False)
        t = np.ascontiguousarray(np.swapaxes(w, -1, -2))
        known.setdefault((t.shape, t.tobytes()), (name, True))
    read = {}
    for t in model.graph.initializer:
        a = onnx.numpy_helper.to_array(t)
        if (a.shape, a.tobytes()) in known:
            read[t.name] = known[(a.shape, a.tobytes())]
    uses: dict[str, set[tuple[int, bool]]] = {name: set() for name in weights}
    for node in model.graph.node:  # topologically sorted
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for pos, x in enumerate(node.input):
            if x not in read:
                continue
            name, transposed = read[x]
            if node.op_type == "Transpose" and list(attrs["perm"][-2:]) == [
                len(attrs["perm"]) - 1,
                len(attrs["perm"]) - 2,
            ]:
                read[node.output[0]] = (name, not transposed)
            elif node.op_type in ("MatMul", "FusedMatMul"):
                uses[name].add((pos, transposed != bool(attrs.get("transB" if pos else "transA", 0))))
            else:
                uses[name].add((pos, None))  # any other reader is unexpected
    return uses


def _check(backbone: VisionTransformer, method: str, last_k: int, tokens: int, tmp_path, batch: int = 5) -> None:
    arch = backbone.arch
    spec = AdapterSpec.create(arch, method, 4, last_k=last_k or None, query_tokens=tokens)
    torch.manual_seed(1)
    head = build_head(backbone, spec)
    trainable = head.trainable()
    params = dict(head.named_parameters())
    with torch.no_grad():  # away from the init (zero up-projections, zero bias): every gradient non-trivial
        for g in trainable:
            params[g].add_(torch.randn_like(params[g]) * 0.05)
    outputs = spec.frozen_outputs
    frozen = build_frozen(backbone, spec)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        example = frozen(torch.randn(2, 3, arch.image_size, arch.image_size, generator=gen))
        feats = frozen(torch.randn(batch, 3, arch.image_size, arch.image_size, generator=gen))
    export_step(head, example, tmp_path / "step.onnx")
    feats = [f.half().float() if CACHE_DTYPES[name] == "float16" else f for name, f in zip(outputs, feats)]
    extra = []
    if spec.has_query_tokens:
        extra.append((torch.rand(batch, *spec.query_keep_shape, generator=gen) >= 0.1).float() / 0.9)
    labels = torch.randint(0, 4, (batch,), generator=gen)
    extra.append(torch.nn.functional.one_hot(labels, 4).float() / batch)

    model = onnx.load(str(tmp_path / "step.onnx"))
    assert model.ir_version <= MAX_IR_VERSION
    assert {n.domain for n in model.graph.node} <= {""}  # standard ops only
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")  # the graph onnxruntime runs
    session = onnxruntime.InferenceSession(
        str(tmp_path / "step.onnx"),
        options,
        providers=["CPUExecutionProvider"],
        disabled_optimizers=STEP_DISABLED_OPTIMIZERS,
    )
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    copies = _transposes_reading(optimized, {"keys", "values"})
    assert not copies, f"the step copies K/V through {copies} (docs/design.md section 10)"
    if (
        spec.has_query_tokens
    ):  # the backward reads the frozen weights as MLAS's A operand (exporters/vit.py _FrozenMatmul)
        frozen_weights = {n: params[f"query_path.{n}"].detach().numpy() for n in ("wq", "wo", "w1", "w2")}
        uses = _weight_operands(optimized, frozen_weights)
        assert uses == dict.fromkeys(frozen_weights, {(1, False), (0, False)}), f"{uses} (docs/design.md section 10)"
    names = [i.name for i in session.get_inputs()]
    assert set(names[: len(trainable)]) == set(trainable)
    feed = {n: params[n].detach().numpy() for n in trainable}
    feed.update({n: t.numpy() for n, t in zip(head.input_names, [*feats, *extra])})
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed)))

    assert_step_matches_autograd(got, head, [*feats, *extra], trainable)


def assert_step_matches_autograd(got: dict[str, np.ndarray], head, inputs: list, trainable) -> None:
    """A step graph's outputs `got` (loss, logits, a gradient per trainable tensor) equal torch
    autograd's on `head` (in train mode, fresh gradients) for the same `inputs`, within RTOL."""
    params = dict(head.named_parameters())
    head.train()
    head.zero_grad()
    loss, logits = head(*inputs)
    loss.backward()
    assert _relative_error(got["loss"], loss.detach().numpy()) <= RTOL
    assert _relative_error(got["logits"], logits.detach().numpy()) <= RTOL
    for n in trainable:
        want = params[n].grad.numpy()
        assert np.abs(want).max() > 0, n
        assert got[grad_name(n)].shape == want.shape, n
        assert _relative_error(got[grad_name(n)], want) <= RTOL, (n, _relative_error(got[grad_name(n)], want))


@pytest.mark.parametrize(
    "method,last_k",
    [
        ("linear", 0),
        ("vqt", 0),
        ("vpt", 2),
        ("adaptformer", 2),
        ("finetune", 2),
        ("vqt+vpt", 2),
        ("vqt+adaptformer", 1),
    ],
)
def test_step_graph_gradients_equal_torch_autograd_tiny(tiny_backbone, method, last_k, tmp_path):
    _check(tiny_backbone, method, last_k, tokens=2, tmp_path=tmp_path)


def test_step_graph_gradients_equal_torch_autograd_vit_ti16(tmp_path):
    backbone = VisionTransformer(PRESETS["vit_ti16"])
    backbone.reset_parameters(seed=5)
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    _check(backbone, "vqt", 0, tokens=1, tmp_path=tmp_path, batch=3)
