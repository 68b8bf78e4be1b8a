"""`export --aggregate mean|wsum` against the official formulation (docs/design.md section 11).

The reference here is written the way andytu28/VQT computes it, not the way the exporter does: the
query tokens are prepended to each layer's token sequence and go through the whole block (LN1,
attention whose keys and values come from the original tokens only, residual, LN2, MLP, residual),
their outputs are cut off before the next layer, and a layer's T outputs are then averaged
(POOLING_FEATS) or summed with per-layer weights (WEIGHTED_SUM_FEATS), each group L2-normalized
with F.normalize, after the final CLS. The bundle's frozen.onnx + head.onnx, its merged model.onnx
and its ORT training graph (loss and every gradient) must all equal it.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from device_runner import ort
from device_runner.data import iter_batches
from device_runner.deploy import build_model, load_adapter
from exporters.export import export_bundle
from tests.conftest import TINY, TINY_EXPORT, invoke, run_cli
from vqt_edge import manifest as mf
from vqt_edge.spec import AdapterSpec

T = 3
AGGREGATES = ("mean", "wsum")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_backbone):
    root = tmp_path_factory.mktemp("aggregate")
    for agg in AGGREGATES:
        export_bundle(
            tiny_backbone,
            root / agg,
            AdapterSpec.create(TINY, "vqt", 3, query_tokens=T, aggregate=agg),
            model_name="tiny",
            int8_step=False,  # the int8-fed step graph: 15 s of export, tiny_bundle has it
            log=lambda _: None,
        )
    return {agg: root / agg for agg in AGGREGATES}


def _official_logits(backbone, adapter: dict[str, torch.Tensor], aggregate: str, pixels: torch.Tensor) -> torch.Tensor:
    """h2t_vit.py's forward, written from its definition on the backbone's own modules."""
    heads, d = TINY.heads, TINY.dim
    x = backbone.embed(pixels)
    b = x.shape[0]
    outputs = []
    for i, block in enumerate(backbone.blocks):
        seq = torch.cat([adapter["query_tokens"][i].expand(b, -1, -1), x], 1)  # prepended
        h = block.norm1(seq)
        w, bias = block.attn.qkv.weight, block.attn.qkv.bias
        q = F.linear(h, w[:d], bias[:d])
        k = F.linear(h[:, T:], w[d : 2 * d], bias[d : 2 * d])  # keys/values of the original tokens only
        v = F.linear(h[:, T:], w[2 * d :], bias[2 * d :])
        split = lambda t: t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
        probs = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (d // heads) ** 0.5, -1)
        ctx = (probs @ split(v)).transpose(1, 2).reshape(b, seq.shape[1], d)
        seq = seq + block.attn.proj(ctx)
        seq = seq + block.mlp(block.norm2(seq))
        outputs.append(seq[:, :T])
        x = seq[:, T:]
    feats = [backbone.norm(x)[:, 0]]
    for i, out in enumerate(outputs):
        if aggregate == "mean":
            feats.append(out.mean(dim=1))
        else:
            feats.append(torch.sum(adapter["wsum_weights"][i].expand(b, -1).unsqueeze(-1) * out, dim=1))
    feats = torch.cat([F.normalize(f) for f in feats], 1)
    return F.linear(feats, adapter["head.weight"], adapter["head.bias"])


def _adapter(m: mf.Manifest, seed: int) -> dict[str, np.ndarray]:
    """Trained-looking tensors: wsum weights away from their initial ones, differing per token."""
    rng = np.random.default_rng(seed)
    out = {name: rng.normal(0, 0.5, shape).astype(np.float32) for name, shape in m.spec.trainable_shapes.items()}
    if "wsum_weights" in out:
        out["wsum_weights"] += 1
    return out


def _pixels(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(seed))


def test_manifest_records_the_aggregate_and_the_narrower_head(bundles):
    for agg, bundle in bundles.items():
        m = mf.read_manifest(bundle)
        assert m.spec.aggregate == agg and m.spec.head_input is None
        assert m.spec.head_width == TINY.dim * (1 + TINY.depth)  # F = D + Lq*D, not D + Lq*T*D
        shapes = m.spec.trainable_shapes
        assert shapes["head.weight"] == (3, m.spec.head_width) and shapes["query_tokens"] == (TINY.depth, T, TINY.dim)
        assert ("wsum_weights" in shapes) == (agg == "wsum")
        if agg == "wsum":
            assert shapes["wsum_weights"] == (TINY.depth, T)
            initial = ort.training_api().CheckpointState.load_checkpoint(str(bundle / mf.CHECKPOINT)).parameters
            assert np.array_equal(np.array(initial["wsum_weights"].data), np.ones((TINY.depth, T), np.float32))


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_frozen_then_head_and_merged_model_equal_the_official_formulation(aggregate, bundles, tiny_backbone, tmp_path):
    bundle = bundles[aggregate]
    m = mf.read_manifest(bundle)
    adapter = _adapter(m, seed=1)
    pixels = _pixels(4, seed=2)
    with torch.no_grad():
        want = _official_logits(
            tiny_backbone, {k: torch.from_numpy(v) for k, v in adapter.items()}, aggregate, pixels
        ).numpy()

    providers = ["CPUExecutionProvider"]
    frozen = onnxruntime.InferenceSession(str(bundle / mf.FROZEN), providers=providers)
    feats = dict(zip(m.spec.frozen_outputs, frozen.run(m.spec.frozen_outputs, {"pixel_values": pixels.numpy()})))
    head_model = onnx.load(str(bundle / mf.HEAD_MODEL))
    for init in head_model.graph.initializer:
        if init.name in m.spec.trainable_shapes:  # one name: torch parameter = graph initializer = adapter tensor
            init.CopyFrom(numpy_helper.from_array(adapter[init.name], init.name))
    got = onnxruntime.InferenceSession(head_model.SerializeToString(), providers=providers).run(["logits"], feats)[0]
    assert np.abs(got - want).max() <= 1e-4

    build_model(bundle, m, adapter, tmp_path / "model.onnx")
    merged = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=providers)
    assert np.abs(merged.run(["logits"], {"pixel_values": pixels.numpy()})[0] - want).max() <= 1e-4


@pytest.mark.parametrize("aggregate", AGGREGATES)
def test_training_graph_loss_and_gradients_equal_the_official_formulation(aggregate, bundles, tiny_backbone):
    bundle = bundles[aggregate]
    m = mf.read_manifest(bundle)
    adapter = _adapter(m, seed=3)
    api = ort.training_api()
    state = api.CheckpointState.load_checkpoint(str(bundle / mf.CHECKPOINT))
    module = api.Module(str(bundle / mf.TRAINING_MODEL), state, str(bundle / mf.EVAL_MODEL))
    for name in m.spec.trainable_shapes:
        state.parameters[name].data = adapter[name]

    b = 5
    pixels = _pixels(b, seed=4)
    targets = F.one_hot(torch.arange(b) % 3, 3).float() / b
    frozen = onnxruntime.InferenceSession(str(bundle / mf.FROZEN), providers=["CPUExecutionProvider"])
    feats = frozen.run(m.spec.frozen_outputs, {"pixel_values": pixels.numpy()})
    keep = np.ones((b, TINY.depth, T, TINY.dim), np.float32)  # dropout off: the official eval-mode forward
    module.train()
    loss, logits = module(*feats, keep, targets.numpy())

    params = {k: torch.from_numpy(v).requires_grad_() for k, v in adapter.items()}
    t_logits = _official_logits(tiny_backbone, params, aggregate, pixels)
    t_loss = -(torch.log_softmax(t_logits, -1) * targets).sum()
    t_loss.backward()
    assert abs(float(loss) - t_loss.item()) <= 1e-4
    assert np.abs(logits - t_logits.detach().numpy()).max() <= 1e-4
    for name in m.spec.trainable_shapes:
        want = params[name].grad.numpy()
        assert np.abs(want).max() > 0, name
        np.testing.assert_allclose(np.array(state.parameters[name].grad), want, atol=1e-4, rtol=1e-3, err_msg=name)


def test_cli_export_aggregate_and_refusals(tmp_path):

    result = invoke("export", *TINY_EXPORT, "--out", tmp_path / "b", "--query-tokens", 2, "--aggregate", "wsum")
    assert result.exit_code == 0, result.output
    assert "wsum of each layer's query outputs" in result.output
    data = json.loads((tmp_path / "b" / mf.MANIFEST).read_text())
    assert data["aggregate"] == "wsum" and data["trainable_shapes"]["wsum_weights"] == [3, 2]
    for args, message in (
        (["--method", "linear", "--aggregate", "mean"], "--aggregate"),
        (["--aggregate", "max"], "--aggregate"),
    ):
        result = invoke("export", *TINY_EXPORT, "--out", tmp_path / "c", *args)
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "c").exists()
    data["aggregate"] = "mean"
    data["method"], data["query_layers"], data["frozen_outputs"] = "linear", [], ["cls"]
    with pytest.raises(mf.UserError, match="aggregate"):
        mf.Manifest.from_dict(data)


def test_cli_trains_wsum_into_a_model_equal_to_the_official_formulation(bundles, tiny_backbone, task, tmp_path):
    bundle, run = bundles["wsum"], tmp_path / "run"
    out = run_cli("train", "--bundle", bundle, "--data", task["train"], "--run", run, "--epochs", 2, "--lr", "3e-2")
    assert out.returncode == 0, out.stderr
    m = mf.read_manifest(bundle)
    adapter = load_adapter(run / "adapter.safetensors", m)
    assert not np.array_equal(adapter["wsum_weights"], np.ones((TINY.depth, T), np.float32))  # learned
    images = sorted(task["test"].rglob("*.png"))[::9]
    pixels, _ = next(iter_batches([(p, 0) for p in images], len(images), TINY.image_size, m.mean, m.std))
    got = onnxruntime.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"pixel_values": pixels}
    )[0]
    with torch.no_grad():
        want = _official_logits(
            tiny_backbone, {k: torch.from_numpy(v) for k, v in adapter.items()}, "wsum", torch.from_numpy(pixels)
        ).numpy()
    assert np.abs(got - want).max() <= 1e-4
