"""The exported bundle against the torch model: outputs, gradients and one optimizer step."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime
import pytest
import torch

from device_runner import ort
from exporters.methods import build_head
from tests.conftest import TINY
from vqt_edge import manifest as mf


def _frozen_vs_torch(backbone, path, layers, batch):
    x = torch.randn(
        batch, 3, backbone.arch.image_size, backbone.arch.image_size, generator=torch.Generator().manual_seed(3)
    )
    sess = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(["cls", "keys", "values"], {"pixel_values": x.numpy()})
    with torch.no_grad():
        want = backbone(x, layers)
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape)
        assert np.abs(g - w.numpy()).max() <= 1e-4


def test_frozen_graph_equals_torch_tiny(tiny_bundle, tiny_backbone):
    for batch in (1, 3):  # dynamic batch
        _frozen_vs_torch(tiny_backbone, tiny_bundle / mf.FROZEN, list(range(TINY.depth)), batch)


def test_frozen_graph_equals_torch_vit_ti16(vit_ti16_frozen):
    backbone, path = vit_ti16_frozen  # K/V of all 12 layers (tests/conftest.py)
    _frozen_vs_torch(backbone, path, list(range(12)), 2)


def test_manifest_and_outputs_follow_the_contract(tiny_bundle):
    data = json.loads((tiny_bundle / mf.MANIFEST).read_text())
    for key in (
        "format",
        "arch",
        "method",
        "query_layers",
        "query_tokens",
        "num_classes",
        "mean",
        "std",
        "feature_norm",
        "files",
    ):
        assert key in data
    assert data["format"] == "vqt-edge/2" and data["query_layers"] == [0, 1, 2] and data["query_tokens"] == 2
    for name, digest in data["files"].items():
        assert mf.sha256_file(tiny_bundle / name) == digest
    sess = onnxruntime.InferenceSession(str(tiny_bundle / mf.FROZEN), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["pixel_values"]
    assert [o.name for o in sess.get_outputs()] == ["cls", "keys", "values"]


def _ort_module(bundle):
    api = ort.training_api()
    state = api.CheckpointState.load_checkpoint(str(bundle / mf.CHECKPOINT))
    module = api.Module(str(bundle / mf.TRAINING_MODEL), state, str(bundle / mf.EVAL_MODEL))
    return api, state, module


def _torch_head(backbone, state, manifest):
    head = build_head(backbone, manifest.spec)
    with torch.no_grad():
        for adapter_name in manifest.spec.trainable_shapes:
            dict(head.named_parameters())[adapter_name].copy_(
                torch.from_numpy(np.array(state.parameters[adapter_name].data))
            )
    return head


def _batch(backbone, manifest, b, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, TINY.image_size, TINY.image_size, generator=g)
    with torch.no_grad():
        cls, keys, values = backbone(x, manifest.spec.query_layers)
    keep = (
        torch.rand(b, len(manifest.spec.query_layers), manifest.spec.query_tokens, TINY.dim, generator=g) >= 0.1
    ).float() / 0.9
    labels = torch.randint(0, manifest.spec.num_classes, (b,), generator=g)
    targets = torch.nn.functional.one_hot(labels, manifest.spec.num_classes).float() / b
    return cls, keys, values, keep, targets


def test_one_training_step_matches_torch_loss_and_gradients(tiny_bundle, tiny_backbone):
    manifest = mf.read_manifest(tiny_bundle)
    _, state, module = _ort_module(tiny_bundle)
    head = _torch_head(tiny_backbone, state, manifest)
    inputs = _batch(tiny_backbone, manifest, 6, seed=0)
    module.train()
    loss, logits = module(*[t.numpy() for t in inputs])
    t_logits = head(*inputs[:4])
    t_loss = -(torch.log_softmax(t_logits, -1) * inputs[4]).sum()
    t_loss.backward()
    assert abs(float(loss) - t_loss.item()) <= 1e-4
    np.testing.assert_allclose(logits, t_logits.detach().numpy(), atol=1e-4)
    params = dict(head.named_parameters())
    for graph_name in manifest.spec.trainable_shapes:
        grad = np.array(state.parameters[graph_name].grad)
        assert np.abs(grad).max() > 0
        np.testing.assert_allclose(grad, params[graph_name].grad.numpy(), atol=1e-4, rtol=1e-4)
    # Micro-batches accumulate into the same gradient (targets carry the 1/batch weight).
    module.lazy_reset_grad()
    for s in (slice(0, 2), slice(2, 6)):
        module(*[t[s].numpy() for t in inputs])
    for graph_name in manifest.spec.trainable_shapes:
        np.testing.assert_allclose(
            np.array(state.parameters[graph_name].grad), params[graph_name].grad.numpy(), atol=1e-4, rtol=1e-4
        )


def test_optimizer_step_matches_reference_adamw(tiny_bundle, tiny_backbone):
    """ORT Adam + the runner's decoupled decay == AdamW written out by hand.

    ORT's AdamW is the transformers variant (adam_mode=1): p -= lr*sqrt(1-b2^t)/(1-b1^t) * m/(sqrt(v)+eps),
    i.e. eps is not bias-corrected as in torch.optim.AdamW. Decay (tokens and weight, not bias)
    is applied by the runner before the update, as torch does.
    """
    manifest = mf.read_manifest(tiny_bundle)
    api, state, module = _ort_module(tiny_bundle)
    optimizer = api.Optimizer(str(tiny_bundle / mf.OPTIMIZER_MODEL), module)
    head = _torch_head(tiny_backbone, state, manifest)
    params = dict(head.named_parameters())
    names = list(manifest.spec.trainable_shapes)
    ref = {n: params[n].detach().numpy().astype(np.float64) for n in names}
    m1 = {n: np.zeros_like(ref[n]) for n in names}
    m2 = {n: np.zeros_like(ref[n]) for n in names}
    lr, wd, b1, b2, eps = 0.01, 0.05, 0.9, 0.999, 1e-6
    decayed = {"query_tokens", "head.weight"}
    for t in range(1, 4):
        inputs = _batch(tiny_backbone, manifest, 4, seed=10 + t)
        module(*[x.numpy() for x in inputs])
        for name in decayed:
            p = state.parameters[name]
            p.data = p.data * np.float32(1 - lr * wd)
        optimizer.set_learning_rate(lr)
        optimizer.step()
        module.lazy_reset_grad()
        with torch.no_grad():
            for n in names:
                params[n].copy_(torch.from_numpy(ref[n]))
        head.zero_grad()
        (-(torch.log_softmax(head(*inputs[:4]), -1) * inputs[4]).sum()).backward()
        for n in names:
            g = params[n].grad.numpy().astype(np.float64)
            if n in decayed:
                ref[n] *= 1 - lr * wd
            m1[n] = b1 * m1[n] + (1 - b1) * g
            m2[n] = b2 * m2[n] + (1 - b2) * g * g
            ref[n] -= lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m1[n] / (np.sqrt(m2[n]) + eps)
    for n in names:
        np.testing.assert_allclose(np.array(state.parameters[n].data), ref[n], atol=2e-5)


def test_tampered_bundle_file_is_refused(tiny_bundle, tmp_path):
    import shutil

    from vqt_edge.errors import UserError

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    with open(copy / mf.TRAINING_MODEL, "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserError, match="training_model.onnx"):
        mf.read_manifest(copy)
