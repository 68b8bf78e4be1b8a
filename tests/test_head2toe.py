"""`export --method head2toe`: Head2Toe's pooled taps in frozen.onnx, a linear head trained on them.

The reference taps are read with forward hooks on the backbone's own modules while its ordinary
forward runs (not through the exporter's code), and pooled with torch's avg_pool1d, the window
computed here again from google-research/head2toe's `flatten_and_concat`: with C >= target a global
mean, else int(N / (target / C)) tokens per window ("valid" windows, the rest dropped), 0 falling
back to the global mean; each tap then unit-normalized (their `zero_aware_normalize`).
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torch.nn.functional as F

from device_runner import ort
from device_runner.data import iter_batches
from device_runner.deploy import load_adapter
from exporters.export import export_bundle
from exporters.methods.head2toe import Head2ToeFeatures
from tests.conftest import TINY, TINY_EXPORT, invoke, run_cli
from vqt_edge import head2toe as h2t
from vqt_edge import manifest as mf
from vqt_edge.memory import BundleFootprint
from vqt_edge.spec import AdapterSpec

# TINY: N = 17 tokens, D = 32, mlp = 64. 64: D taps in 2 windows of 8 (one token dropped), mlp taps
# a global mean; 200: windows of 2 (8 kept) and of 5 (3 kept); 16: all global; 1000: window 0.
TARGETS = (64, 200, 16, 1000)


def _reference_taps(backbone, pixels: torch.Tensor) -> list[torch.Tensor]:
    """[cls, embeddings, then per layer pre_attn, attn, mlp_1, mlp_2], unpooled, from hooks."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [backbone.blocks[0].register_forward_pre_hook(lambda _m, inp: seen.__setitem__("embeddings", inp[0]))]
    for i, block in enumerate(backbone.blocks):

        def keep(name, i=i):
            return lambda _m, _inp, out: seen.__setitem__(f"{i}.{name}", out[0] if isinstance(out, tuple) else out)

        hooks += [
            block.norm1.register_forward_hook(keep("pre_attn")),
            block.attn.register_forward_hook(keep("attn")),
            block.mlp.fc2.register_forward_pre_hook(lambda _m, inp, i=i: seen.__setitem__(f"{i}.mlp_1", inp[0])),
            block.mlp.register_forward_hook(keep("mlp_2")),
        ]
    try:
        cls, _, _ = backbone(pixels)
    finally:
        for h in hooks:
            h.remove()
    names = ["embeddings"] + [f"{i}.{t}" for i in range(TINY.depth) for t in ("pre_attn", "attn", "mlp_1", "mlp_2")]
    return [cls] + [seen[n] for n in names]


def _reference_features(backbone, pixels: torch.Tensor, target: int) -> torch.Tensor:
    taps = _reference_taps(backbone, pixels)
    pooled = [taps[0]]
    for t in taps[1:]:
        _, n, c = t.shape
        window = 0 if c >= target else int(n / (target / c))
        if window > 0:
            pooled.append(F.avg_pool1d(t.transpose(1, 2), window, window).transpose(1, 2).flatten(1))
        else:
            pooled.append(t.mean(1))
    return torch.cat([F.normalize(p, dim=1) for p in pooled], 1)


def _pixels(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_backbone):
    root = tmp_path_factory.mktemp("head2toe")
    for target in TARGETS[:2]:
        export_bundle(
            tiny_backbone,
            root / str(target),
            AdapterSpec.create(TINY, "head2toe", 3, h2t_target=target),
            model_name="tiny",
            log=lambda _: None,
        )
    return {t: root / str(t) for t in TARGETS[:2]}


def test_pooling_windows_follow_head2toe():
    assert h2t.pool_window(17, 32, 64) == 8 and h2t.pooled_width(17, 32, 64) == 64
    assert h2t.pool_window(17, 64, 64) == 0 and h2t.pooled_width(17, 64, 64) == 64
    assert h2t.pool_window(17, 32, 200) == 2 and h2t.pooled_width(17, 32, 200) == 8 * 32
    assert h2t.pool_window(17, 32, 1000) == 0 and h2t.pooled_width(17, 32, 1000) == 32
    # ViT-B/16 at Head2Toe's target 8192: 197 tokens of 768 -> windows of 18 tokens, 10 of them.
    assert h2t.pool_window(197, 768, 8192) == 18 and h2t.pooled_width(197, 768, 8192) == 7680


@pytest.mark.parametrize("target", TARGETS)
def test_torch_taps_equal_an_independent_reference(target, tiny_backbone):
    pixels = _pixels(3, seed=1)
    with torch.no_grad():
        want = _reference_features(tiny_backbone, pixels, target)
        got = Head2ToeFeatures(tiny_backbone, AdapterSpec.create(TINY, "head2toe", 3, h2t_target=target))(pixels)
    assert got.shape == (3, h2t.feature_width(TINY, target)) == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    widths = [w for _, w in h2t.taps(TINY, target)]
    for chunk in torch.split(got, widths, dim=1):  # every tap is unit-normalized on its own
        torch.testing.assert_close(chunk.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("target", TARGETS[:2])
def test_frozen_onnx_features_equal_the_reference_and_the_head_reads_them(target, bundles, tiny_backbone):
    bundle = bundles[target]
    m = mf.read_manifest(bundle)
    assert (m.spec.method, m.spec.frozen_outputs, m.spec.head_input, m.spec.h2t_target) == (
        "head2toe",
        ["features"],
        "features",
        target,
    )
    assert m.spec.head_width == h2t.feature_width(TINY, target) and set(m.spec.trainable_shapes) == {
        "head.weight",
        "head.bias",
    }
    assert m.spec.trainable_shapes["head.weight"] == (3, m.spec.head_width)
    pixels = _pixels(4, seed=2)
    frozen = onnxruntime.InferenceSession(str(bundle / mf.FROZEN), providers=["CPUExecutionProvider"])
    (got,) = frozen.run(["features"], {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        want = _reference_features(tiny_backbone, pixels, target).numpy()
    assert np.abs(got - want).max() <= 1e-5
    training = onnx.load(str(bundle / mf.TRAINING_MODEL))
    assert [i.name for i in training.graph.input][:2] == ["features", "targets"]
    fp = BundleFootprint.from_bundle(bundle)  # the memory model counts the feature width
    assert fp.feed_per_sample == 4 * m.spec.head_width and fp.cache_per_sample == 2 * m.spec.head_width


def test_one_training_step_is_a_linear_probe_on_the_features(bundles, tiny_backbone):
    bundle = bundles[64]
    m = mf.read_manifest(bundle)
    api = ort.training_api()
    state = api.CheckpointState.load_checkpoint(str(bundle / mf.CHECKPOINT))
    module = api.Module(str(bundle / mf.TRAINING_MODEL), state, str(bundle / mf.EVAL_MODEL))
    rng = np.random.default_rng(3)
    w = rng.normal(0, 0.3, (3, m.spec.head_width)).astype(np.float32)
    bias = rng.normal(0, 0.3, 3).astype(np.float32)
    state.parameters["head.weight"].data, state.parameters["head.bias"].data = w, bias
    b = 6
    with torch.no_grad():
        feats = _reference_features(tiny_backbone, _pixels(b, seed=4), 64)
    targets = F.one_hot(torch.arange(b) % 3, 3).float() / b
    module.train()
    loss, logits = module(feats.numpy(), targets.numpy())
    tw, tb = torch.from_numpy(w).requires_grad_(), torch.from_numpy(bias).requires_grad_()
    t_logits = feats @ tw.T + tb
    t_loss = -(torch.log_softmax(t_logits, -1) * targets).sum()
    t_loss.backward()
    assert abs(float(loss) - t_loss.item()) <= 1e-5 and np.abs(logits - t_logits.detach().numpy()).max() <= 1e-5
    np.testing.assert_allclose(np.array(state.parameters["head.weight"].grad), tw.grad.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.array(state.parameters["head.bias"].grad), tb.grad.numpy(), atol=1e-6)


def test_cli_trains_head2toe_into_a_model_equal_to_the_reference(bundles, tiny_backbone, task, tmp_path):
    bundle, run = bundles[64], tmp_path / "run"
    out = run_cli(
        "train",
        "--bundle",
        bundle,
        "--data",
        task["train"],
        "--run",
        run,
        "--epochs",
        3,
        "--lr",
        "3e-2",
        "--test",
        task["test"],
    )
    assert out.returncode == 0, out.stderr
    m = mf.read_manifest(bundle)
    adapter = load_adapter(run / "adapter.safetensors", m)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.6  # 3 colour classes: the features carry the signal
    images = sorted(task["test"].rglob("*.png"))[::7]
    pixels, _ = next(iter_batches([(p, 0) for p in images], len(images), TINY.image_size, m.mean, m.std))
    got = onnxruntime.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"pixel_values": pixels}
    )[0]
    with torch.no_grad():
        feats = _reference_features(tiny_backbone, torch.from_numpy(pixels), 64)
    want = feats.numpy() @ adapter["head.weight"].T + adapter["head.bias"]
    assert np.abs(got - want).max() <= 1e-4


def test_cli_export_head2toe_options(tmp_path):

    result = invoke("export", *TINY_EXPORT, "--out", tmp_path / "b", "--method", "head2toe")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "b" / mf.MANIFEST).read_text())
    assert data["h2t_target"] == h2t.DEFAULT_TARGET and data["frozen_outputs"] == ["features"]
    for args in (
        ["--method", "vqt", "--h2t-target", 64],
        ["--method", "head2toe", "--h2t-target", 0],
        ["--method", "head2toe", "--query-layers", "0"],
    ):
        result = invoke("export", *TINY_EXPORT, "--out", tmp_path / "c", *args)
        assert result.exit_code == 2 and result.output.startswith("error:"), result.output
        assert not (tmp_path / "c").exists()
    for value in (0, 64):
        bad = {**data, "h2t_target": value, "method": "head2toe" if value == 0 else "linear"}
        with pytest.raises(mf.UserError, match="h2t_target"):
            mf.Manifest.from_dict(bad)


def test_keep_fraction_selects_head2toe_features_and_model_onnx_reads_only_those(
    bundles, tiny_backbone, task, tmp_path
):
    """Head2Toe with group-lasso selection (its paper's setting): the head reads a frozen output as
    it is, so the selection takes those features straight from the cache; model.onnx gathers the
    kept columns and equals the reference features times the kept head."""
    bundle, run = bundles[64], tmp_path / "run"
    out = run_cli(
        "train",
        "--bundle",
        bundle,
        "--data",
        task["train"],
        "--run",
        run,
        "--epochs",
        3,
        "--lr",
        "3e-2",
        "--keep-fraction",
        "0.3",
    )
    assert out.returncode == 0, out.stderr
    m = mf.read_manifest(bundle)
    adapter = load_adapter(run / "adapter.safetensors", m)
    index = adapter["head.feature_index"]
    assert len(index) == round(0.3 * m.spec.head_width) and adapter["head.weight"].shape == (3, len(index))
    images = sorted(task["test"].rglob("*.png"))[::7]
    pixels, _ = next(iter_batches([(p, 0) for p in images], len(images), TINY.image_size, m.mean, m.std))
    got = onnxruntime.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"pixel_values": pixels}
    )[0]
    with torch.no_grad():
        feats = _reference_features(tiny_backbone, torch.from_numpy(pixels), 64).numpy()
    want = feats[:, index] @ adapter["head.weight"].T + adapter["head.bias"]
    assert np.abs(got - want).max() <= 1e-4
