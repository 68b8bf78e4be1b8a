"""The baselines (docs/design.md section 5) as bundles the same device runner trains.

For every method on the tiny ViT: the bundle's split is exact (frozen.onnx -> head.onnx and the
merged model.onnx equal a straight-through torch model), one ORT training step equals torch (loss
and every gradient), and the real CLI trains it torch-free into a model.onnx equal to the torch
model rebuilt from adapter.safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

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
from exporters.methods import MethodHead, build_head
from tests.conftest import TINY, TINY_EXPORT, invoke, run_cli
from vqt_edge import manifest as mf
from vqt_edge.errors import UserError

# method -> last_k: splits inside the network (k < L), the no-frozen-K/V case (vqt+vpt, k = L) and
# the frozen-plus-adapted K/V case (vqt+adaptformer, k = 2: layer 0's K/V come from frozen.onnx).
METHODS = {"linear": None, "vqt": None, "vpt": 2, "adaptformer": 2, "finetune": 1, "vqt+vpt": 3, "vqt+adaptformer": 2}
T = 2  # the query tokens of tests/conftest.py's tiny_method_bundle


@pytest.fixture(scope="module")
def bundles(tiny_method_bundle) -> dict[str, Path]:
    """Each method's bundle (T query tokens), exported once per session (tests/conftest.py)."""
    return {method: tiny_method_bundle(method, k) for method, k in METHODS.items()}


def _head(backbone, manifest: mf.Manifest, tensors: dict[str, np.ndarray] | None = None) -> MethodHead:
    """The bundle's trainable part in torch, with `tensors` (adapter names) copied in."""
    head = build_head(backbone, manifest.spec)
    params = dict(head.named_parameters())
    with torch.no_grad():
        for name in manifest.spec.trainable_shapes:
            if tensors is not None:
                params[name].copy_(torch.from_numpy(np.asarray(tensors[name])))
    return head.eval()


def _reference_logits(backbone, head: MethodHead, pixels: torch.Tensor) -> torch.Tensor:
    """The adapted ViT written straight through from pixels, without the bundle's split: VPT-Deep
    prompts inserted after CLS before each adapted layer and dropped after it, AdaptFormer's
    x + MLP(LN2(x)) + s*up(ReLU(down(x))), query tokens on the (adapted) layers' K/V of the
    original tokens, head on [n(cls), n(z_l)...]."""
    spec = head.spec
    method, depth, t = spec.method, backbone.arch.depth, spec.query_tokens
    vpt, adaptformer = method.endswith("vpt"), method.endswith("adaptformer")
    x = backbone.embed(pixels)
    keys, values = [], []
    for i in range(depth):
        adapted = i >= spec.split and spec.adaptation is not None
        block = head.blocks[str(i)] if adapted else backbone.blocks[i]
        if adapted and vpt:
            x = torch.cat([x[:, :1], head.prompts[i - spec.split].expand(x.shape[0], t, -1), x[:, 1:]], 1)
        if adapted and adaptformer:
            a = head.adapters[str(i)]
            attn, k, v = block.attn(block.norm1(x))
            x = x + attn
            x = x + block.mlp(block.norm2(x)) + 0.1 * a.up(torch.relu(a.down(x)))
        else:
            x, k, v = block(x)
        if adapted and vpt:
            x = torch.cat([x[:, :1], x[:, 1 + t :]], 1)
            k, v = torch.cat([k[:, :, :1], k[:, :, 1 + t :]], 2), torch.cat([v[:, :, :1], v[:, :, 1 + t :]], 2)
        if i in spec.query_layers:
            keys.append(k)
            values.append(v)
    norm = head.norm if spec.adaptation is not None else backbone.norm
    groups = [norm(x)[:, 0]]
    if spec.query_layers:
        z = head.query_path(torch.stack(keys, 1), torch.stack(values, 1))
        groups += list(z.flatten(2).unbind(1))
    return head.head(torch.cat([F.normalize(g, dim=-1, eps=1e-12) for g in groups], -1))


def _random_adapter(manifest: mf.Manifest, backbone, seed: int) -> dict[str, np.ndarray]:
    """Trained-looking tensors: the export's initial values plus noise (so zero-initialized adapter
    weights are not zero, and fine-tuned layers move away from the backbone's)."""
    rng = np.random.default_rng(seed)
    init = {n: p.detach().numpy() for n, p in _head(backbone, manifest).named_parameters()}
    return {
        name: (init[name] + rng.normal(0, 0.2, init[name].shape)).astype(np.float32)
        for name in manifest.spec.trainable_shapes
    }


def _pixels(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, TINY.image_size, TINY.image_size, generator=torch.Generator().manual_seed(seed))


def test_manifest_names_what_each_method_trains(bundles):
    want_outputs = {
        "linear": ["cls"],
        "vqt": ["cls", "keys", "values"],
        "vpt": ["hidden"],
        "adaptformer": ["hidden"],
        "finetune": ["hidden"],
        "vqt+vpt": ["hidden"],
        "vqt+adaptformer": ["hidden", "keys", "values"],
    }
    for method, bundle in bundles.items():
        m = mf.read_manifest(bundle)
        assert m.spec.method == method and m.spec.frozen_outputs == want_outputs[method]
        assert m.spec.last_k == (METHODS[method] or 0)
        assert m.spec.query_layers == ((0, 1, 2) if "vqt" in method else ())
        sess = onnxruntime.InferenceSession(str(bundle / mf.FROZEN), providers=["CPUExecutionProvider"])
        assert [o.name for o in sess.get_outputs()] == m.spec.frozen_outputs
        training = onnx.load(str(bundle / mf.TRAINING_MODEL))
        inputs = m.spec.frozen_outputs + (["query_keep"] if m.spec.query_layers else []) + ["targets"]
        assert [i.name for i in training.graph.input][: len(inputs)] == inputs  # then the parameters
        assert [o.name for o in training.graph.output][:2] == ["loss", "logits"]
        shapes = m.spec.trainable_shapes
        assert shapes["head.weight"] == (3, m.spec.head_width)
        trainable = set(m.spec.trainable_shapes) - {"head.weight", "head.bias"}
        if method == "linear":
            assert not trainable and m.spec.head_width == TINY.dim
        if "vqt" in method:
            assert shapes["query_tokens"] == (3, T, TINY.dim)
        if method.endswith("vpt"):
            assert shapes["prompts"] == (m.spec.last_k, T, TINY.dim)
        if method.endswith("adaptformer"):
            assert shapes["adapters.1.down.weight"] == (64, TINY.dim) and shapes["adapters.2.up.weight"] == (
                TINY.dim,
                64,
            )
            assert not any(n.startswith("adapters.0.") for n in trainable)
        if method == "finetune":
            assert (
                trainable == {n for n in trainable if n.startswith(("blocks.2.", "norm."))}
                and "blocks.2.attn.qkv.weight" in trainable
            )
        assert trainable == {
            n for n in trainable if n.startswith(("query_tokens", "prompts", "adapters.", "blocks.", "norm."))
        }


@pytest.mark.parametrize("method", list(METHODS))
def test_split_is_exact_frozen_then_head_and_merged_model(method, bundles, tiny_backbone, tmp_path):
    bundle = bundles[method]
    m = mf.read_manifest(bundle)
    adapter = _random_adapter(m, tiny_backbone, seed=1)
    pixels = _pixels(3, seed=2)
    with torch.no_grad():
        want = _reference_logits(tiny_backbone, _head(tiny_backbone, m, adapter), pixels).numpy()

    providers = ["CPUExecutionProvider"]
    frozen = onnxruntime.InferenceSession(str(bundle / mf.FROZEN), providers=providers)
    feats = dict(zip(m.spec.frozen_outputs, frozen.run(m.spec.frozen_outputs, {"pixel_values": pixels.numpy()})))
    head_model = onnx.load(str(bundle / mf.HEAD_MODEL))
    for init in head_model.graph.initializer:
        for name in m.spec.trainable_shapes:
            if init.name == name:
                init.CopyFrom(numpy_helper.from_array(adapter[name], name))
    head = onnxruntime.InferenceSession(head_model.SerializeToString(), providers=providers)
    assert [i.name for i in head.get_inputs()] == m.spec.frozen_outputs
    got = head.run(["logits"], feats)[0]
    assert np.abs(got - want).max() <= 1e-4

    build_model(bundle, m, adapter, tmp_path / "model.onnx")
    merged = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=providers)
    assert np.abs(merged.run(["logits"], {"pixel_values": pixels.numpy()})[0] - want).max() <= 1e-4


@pytest.mark.parametrize("method", list(METHODS))
def test_one_training_step_matches_torch(method, bundles, tiny_backbone):
    bundle = bundles[method]
    m = mf.read_manifest(bundle)
    api = ort.training_api()
    state = api.CheckpointState.load_checkpoint(str(bundle / mf.CHECKPOINT))
    module = api.Module(str(bundle / mf.TRAINING_MODEL), state, str(bundle / mf.EVAL_MODEL))
    adapter = _random_adapter(m, tiny_backbone, seed=3)
    for name in m.spec.trainable_shapes:
        state.parameters[name].data = adapter[name]
    head = _head(tiny_backbone, m, adapter).train()

    b, g = 5, torch.Generator().manual_seed(4)
    frozen = onnxruntime.InferenceSession(str(bundle / mf.FROZEN), providers=["CPUExecutionProvider"])
    feats = [
        torch.from_numpy(x) for x in frozen.run(m.spec.frozen_outputs, {"pixel_values": _pixels(b, seed=5).numpy()})
    ]
    keep = [(torch.rand(b, 3, T, TINY.dim, generator=g) >= 0.1).float() / 0.9] if m.spec.query_layers else []
    targets = F.one_hot(torch.randint(0, 3, (b,), generator=g), 3).float() / b
    inputs = [*feats, *keep, targets]

    module.train()
    loss, logits = module(*[x.numpy() for x in inputs])
    t_loss, t_logits = head(*inputs)
    t_loss.backward()
    assert abs(float(loss) - t_loss.item()) <= 1e-4
    assert np.abs(logits - t_logits.detach().numpy()).max() <= 1e-4
    params = dict(head.named_parameters())
    for graph_name in m.spec.trainable_shapes:
        grad, want = np.array(state.parameters[graph_name].grad), params[graph_name].grad.numpy()
        assert np.abs(want).max() > 0, graph_name  # every trainable tensor is reached
        np.testing.assert_allclose(grad, want, atol=1e-4, rtol=1e-4, err_msg=graph_name)
    frozen_grads = [n for n, p in params.items() if p.grad is not None and n not in m.spec.trainable_shapes]
    assert not frozen_grads


def test_cli_export_writes_the_method_and_refuses_mismatched_options(tmp_path):
    # The real `vqt-edge export` command, in-process (a new exporting process costs seconds of torch import).

    result = invoke(
        "export",
        *TINY_EXPORT,
        "--out",
        tmp_path / "b",
        "--method",
        "vqt+adaptformer",
        "--last-k",
        1,
        "--query-layers",
        "1,2",
    )
    assert result.exit_code == 0, result.output
    assert "method vqt+adaptformer, last 1 of 3 layers adapted" in result.output
    data = json.loads((tmp_path / "b" / mf.MANIFEST).read_text())
    assert (data["method"], data["last_k"], data["query_layers"]) == ("vqt+adaptformer", 1, [1, 2])
    assert data["frozen_outputs"] == ["hidden", "keys", "values"]
    for args, message in (
        (["--method", "vqt", "--last-k", 2], "--last-k"),
        (["--method", "vpt", "--last-k", 4], "--last-k 4"),
        (["--method", "linear", "--query-layers", "0"], "--query-layers"),
        (["--method", "lora"], "--method"),
    ):
        result = invoke("export", *TINY_EXPORT, "--out", tmp_path / "c", *args)
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "c").exists()


def test_manifest_allows_empty_query_layers_exactly_without_query_tokens(bundles):
    for bundle in bundles.values():
        data = json.loads((bundle / mf.MANIFEST).read_text())
        mf.Manifest.from_dict(data)
        data["query_layers"] = [] if data["query_layers"] else [0]
        with pytest.raises(UserError, match="query_layers"):
            mf.Manifest.from_dict(data)
    data = json.loads((bundles["vpt"] / mf.MANIFEST).read_text())
    for key, value in (("last_k", 0), ("frozen_outputs", ["cls"]), ("trainable_shapes", {"head.bias": [3]})):
        with pytest.raises(UserError, match=key):
            mf.Manifest.from_dict({**data, key: value})


@pytest.mark.parametrize("method", list(METHODS))
def test_cli_trains_each_method_into_a_model_equal_to_torch_from_its_adapter(
    method, bundles, tiny_backbone, task, tmp_path
):
    bundle, run = bundles[method], tmp_path / "run"
    out = run_cli(
        "train",
        "--bundle",
        bundle,
        "--data",
        task["train"],
        "--run",
        run,
        "--epochs",
        2,
        "--batch-size",
        32,
        "--lr",
        "3e-3",
    )
    assert out.returncode == 0, out.stderr
    m = mf.read_manifest(bundle)
    adapter = load_adapter(run / "adapter.safetensors", m)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 2 and all(np.isfinite(x["train_loss"]) for x in metrics)
    initial = ort.training_api().CheckpointState.load_checkpoint(str(bundle / mf.CHECKPOINT)).parameters
    assert all(
        not np.array_equal(adapter[name], np.array(initial[name].data))
        for name in m.spec.trainable_shapes
        if name.endswith("weight") or name in ("prompts", "query_tokens")
    )

    images = sorted(task["test"].rglob("*.png"))[::9]
    pixels, _ = next(iter_batches([(p, 0) for p in images], len(images), TINY.image_size, m.mean, m.std))
    session = onnxruntime.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"pixel_values": pixels})[0]
    with torch.no_grad():
        want = _reference_logits(tiny_backbone, _head(tiny_backbone, m, adapter), torch.from_numpy(pixels)).numpy()
    assert np.abs(got - want).max() <= 1e-4
