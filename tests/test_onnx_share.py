"""model.onnx reads the head's frozen weights from frozen.onnx instead of carrying a second copy
(device_runner/onnx_io/share.py, docs/design.md section 10): same predictions as the copying merge and
as torch, smaller file, and nothing is shared that is not equal."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import numpy_helper

from device_runner.deploy import build_model
from device_runner.onnx_io.share import find_shared
from device_runner.onnx_io.stream import merge_streaming
from exporters.export import export_bundle
from exporters.vit import VisionTransformer
from tests.test_baselines import _head, _pixels, _random_adapter, _reference_logits
from vqt_edge import manifest as mf
from vqt_edge.arch import ViTArch
from vqt_edge.spec import AdapterSpec

# ViT-Ti/16's width (dim 192, 3 heads, MLP 768) on two layers and 32 px: weights of the real size.
WIDE = ViTArch(depth=2, dim=192, heads=3, mlp_dim=768, patch=16, image_size=32)
QUERY_WEIGHTS = {"query_path.wq", "query_path.wo", "query_path.w1", "query_path.w2"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny_backbone, tiny_method_bundle):
    """The tiny bundles of vqt and vqt+adaptformer (k = 2) from tests/conftest.py, and VQT at WIDE."""
    wide = VisionTransformer(WIDE)
    wide.reset_parameters(seed=0)
    out = tmp_path_factory.mktemp("share") / "wide"
    export_bundle(
        wide.eval(),
        out,
        AdapterSpec.create(WIDE, "vqt", 3, query_tokens=2),
        model_name="wide",
        int8_step=False,
        log=lambda _: None,
    )
    return {
        "vqt": (tiny_method_bundle("vqt"), tiny_backbone),
        "vqt+adaptformer": (tiny_method_bundle("vqt+adaptformer", 2), tiny_backbone),
        "wide": (out, wide.eval()),
    }


def _logits(path, pixels: np.ndarray) -> np.ndarray:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"pixel_values": pixels}
    )[0]


def _learned(m: mf.Manifest, adapter: dict) -> dict[str, np.ndarray]:
    return {n: adapter[n] for n in m.spec.trainable_shapes}


@pytest.mark.parametrize("key", ["vqt", "vqt+adaptformer"])
def test_shared_model_predicts_as_the_copying_merge_and_torch(key, bundles, tmp_path):
    bundle, backbone = bundles[key]
    m = mf.read_manifest(bundle)
    adapter = _random_adapter(m, backbone, seed=1)
    build_model(bundle, m, adapter, tmp_path / "model.onnx")
    merge_streaming(bundle / mf.FROZEN, bundle / mf.HEAD_MODEL, tmp_path / "copy.onnx", _learned(m, adapter))

    shared = find_shared(bundle / mf.FROZEN, bundle / mf.HEAD_MODEL, set(m.spec.trainable_shapes)).tensors
    assert QUERY_WEIGHTS <= set(shared)
    if key == "vqt+adaptformer":  # layer 0 from frozen.onnx, the adapted layers from the head's own blocks
        pieces = shared["query_path.wq"].pieces
        assert not pieces[0].in_head and pieces[1].source == "blocks.1.attn.qkv.weight" and pieces[1].transpose
    model = onnx.load(str(tmp_path / "model.onnx"))
    onnx.checker.check_model(model)
    names = {t.name for t in model.graph.initializer}
    assert not any("head/" + n in names for n in shared)
    saved = sum(
        4 * int(np.prod(t.dims)) for t in onnx.load(str(bundle / mf.HEAD_MODEL)).graph.initializer if t.name in shared
    )
    nodes = 16 * 1024  # the nodes that read the sources instead (names included)
    assert (tmp_path / "model.onnx").stat().st_size <= (tmp_path / "copy.onnx").stat().st_size - saved + nodes

    pixels = _pixels(3, seed=2)
    got, copied = _logits(tmp_path / "model.onnx", pixels.numpy()), _logits(tmp_path / "copy.onnx", pixels.numpy())
    np.testing.assert_allclose(got, copied, rtol=0, atol=1e-5 * np.abs(copied).max())
    with torch.no_grad():
        want = _reference_logits(backbone, _head(backbone, m, adapter), pixels).numpy()
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_model_onnx_at_vit_ti_width_is_frozen_onnx_plus_the_learned_tensors(bundles, tmp_path):
    bundle, backbone = bundles["wide"]
    m = mf.read_manifest(bundle)
    adapter = _random_adapter(m, backbone, seed=1)
    build_model(bundle, m, adapter, tmp_path / "model.onnx")
    frozen, head = (bundle / mf.FROZEN).stat().st_size, (bundle / mf.HEAD_MODEL).stat().st_size
    size = (tmp_path / "model.onnx").stat().st_size
    assert size <= 1.1 * frozen < frozen + 0.8 * head  # without sharing it would be about frozen + head
    pixels = _pixels(2, seed=3)
    with torch.no_grad():
        want = _reference_logits(backbone, _head(backbone, m, adapter), pixels).numpy()
    assert np.abs(_logits(tmp_path / "model.onnx", pixels.numpy()) - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_a_head_weight_that_differs_from_the_backbone_is_copied_not_shared(bundles, tmp_path):
    bundle, backbone = bundles["vqt"]
    m = mf.read_manifest(bundle)
    edited = tmp_path / "bundle"
    shutil.copytree(bundle, edited)
    head = onnx.load(str(edited / mf.HEAD_MODEL))
    for t in head.graph.initializer:
        if t.name == "query_path.w1":
            value = numpy_helper.to_array(t).copy()
            value[1, 0, 0] += 1e-3  # one number of one layer
            t.CopyFrom(numpy_helper.from_array(value, t.name))
    onnx.save(head, str(edited / mf.HEAD_MODEL))
    learned = _learned(m, _random_adapter(m, backbone, seed=1))
    shared = find_shared(edited / mf.FROZEN, edited / mf.HEAD_MODEL, set(learned))
    assert "query_path.w1" not in shared.tensors and QUERY_WEIGHTS - {"query_path.w1"} <= set(shared.tensors)
    merge_streaming(edited / mf.FROZEN, edited / mf.HEAD_MODEL, tmp_path / "model.onnx", learned, shared=shared)
    merge_streaming(edited / mf.FROZEN, edited / mf.HEAD_MODEL, tmp_path / "copy.onnx", learned)
    pixels = _pixels(2, seed=4).numpy()
    np.testing.assert_array_equal(_logits(tmp_path / "model.onnx", pixels), _logits(tmp_path / "copy.onnx", pixels))
