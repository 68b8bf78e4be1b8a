"""The int8-fed step graph (train/step_int8.onnx): the int8 cache's codes and per-channel scales go in,
K/V are dequantized inside the graph one layer at a time (exporters/vit.py `_int8_attention`).

Its loss, logits and gradients must equal those of the fp32 step graph fed the dequantized K/V
(float32(q) * s, what the runner feeds from an int8 cache without it) and those of torch autograd
on the same dequantized K/V, within RTOL of the largest value: the scale is applied to the query
(q * s) c^T instead of to K, which reorders float rounding only. And the graph must widen one head
of one layer at a time, in the forward pass and again in the backward pass (2 x heads widenings of
each layer's K and V codes), never a whole layer, and never keep the forward's fp32 copies alive,
which onnxruntime's common-subexpression elimination would do if the two widenings were the same nodes.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest

from device_runner import backends
from device_runner.features import FeatureStore
from device_runner.kv_int8 import encode, quantize
from vqt_edge import manifest as mf
from vqt_edge.kv_cache import WIDEN_BYTES, head_groups, layer_input

RTOL = 1e-5  # relative to the largest magnitude of each compared tensor


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def _inputs(spec, batch: int, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Random frozen outputs as fp32 and the targets / dropout mask of one batch."""
    rng = np.random.default_rng(seed)
    fp32 = {
        name: rng.standard_normal((batch, *shape), dtype=np.float32)
        for name, (shape, _) in spec.frozen_output_specs.items()
    }
    targets = np.zeros((batch, spec.num_classes), np.float32)
    targets[np.arange(batch), rng.integers(0, spec.num_classes, batch)] = 1.0 / batch
    keep = (rng.random((batch, *spec.query_keep_shape)) >= 0.1).astype(np.float32) / np.float32(0.9)
    return fp32, {"targets": targets, "query_keep": keep}


def _session(path, tmp_path=None):
    options = onnxruntime.SessionOptions()
    if tmp_path is not None:
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    return onnxruntime.InferenceSession(
        str(path), options, providers=["CPUExecutionProvider"], disabled_optimizers=backends.STEP_DISABLED_OPTIMIZERS
    )


def _int8_feed(fp32: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(feed of the int8 graph: per-layer codes + scales, feed of the fp32 graph: the dequantized values)."""
    int8, deq = {}, {}
    for name, x in fp32.items():
        if name in ("keys", "values"):
            q, s = quantize(x, (-2,))
            int8.update({layer_input(name, i): np.ascontiguousarray(q[:, i]) for i in range(q.shape[1])})
            int8[name + "_scale"] = s
            deq[name] = q.astype(np.float32) * s
        else:
            int8[name] = deq[name] = x
    return int8, deq


def test_int8_step_equals_fp32_step_on_dequantized_kv(tiny_bundle, tmp_path):
    manifest = mf.read_manifest(tiny_bundle, verify=False)
    spec = manifest.spec
    assert mf.STEP_INT8_MODEL in manifest.files
    fp32, extra = _inputs(spec, batch=5)
    int8, deq = _int8_feed(fp32)
    rng = np.random.default_rng(1)
    from safetensors.numpy import load_file

    params = {
        n: p + rng.standard_normal(p.shape).astype(np.float32) * 0.05
        for n, p in load_file(str(tiny_bundle / mf.STEP_INIT)).items()
    }
    old = _session(tiny_bundle / mf.STEP_MODEL)
    new = _session(tiny_bundle / mf.STEP_INT8_MODEL, tmp_path)
    want = dict(zip([o.name for o in old.get_outputs()], old.run(None, {**params, **deq, **extra})))
    got = dict(zip([o.name for o in new.get_outputs()], new.run(None, {**params, **int8, **extra})))
    assert set(got) == set(want)
    for name in want:
        assert np.abs(want[name]).max() > 0, name
        assert _relative_error(got[name], want[name]) <= RTOL, (name, _relative_error(got[name], want[name]))
    # Each head of each layer's K and V codes widened twice (forward, backward) in the graph
    # onnxruntime runs, each from a one-head slice: none merged, no whole layer ever widened.
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    codes = {layer_input(n, i) for n in ("keys", "values") for i in range(len(spec.query_layers))}
    producers = {o: node for node in optimized.graph.node for o in node.output}
    groups = head_groups(spec.arch.heads, spec.arch.num_tokens, spec.arch.head_dim)
    widened = {}
    for node in optimized.graph.node:
        if node.op_type == "Cast":
            source, path = node.input[0], []
            while source not in codes and source in producers:  # through the group's Slice / Gather, Reshape
                path.append(producers[source].op_type)
                source = producers[source].input[0]
            if source in codes:
                assert len(groups) == 1 or {"Slice", "Gather"} & set(path), (node.name, path)  # not the layer
                widened[source] = widened.get(source, 0) + 1
    assert widened == dict.fromkeys(codes, 2 * len(groups)), widened


def test_vit_b16_widens_one_head_at_a_time_and_a_small_vit_its_whole_layer():
    """A vit_b16 head at batch 32 is 1.6 MB of fp32 (one per piece); the tiny ViT's layer is smaller
    than WIDEN_BYTES (one piece)."""
    from tests.conftest import TINY

    assert head_groups(12, 197, 64) == [(h, 1) for h in range(12)]
    assert 32 * 197 * 64 * 4 <= WIDEN_BYTES < 2 * 32 * 197 * 64 * 4
    assert head_groups(TINY.heads, TINY.num_tokens, TINY.head_dim) == [(0, TINY.heads)]
    assert head_groups(5, 10, 10, batch=1) == [(0, 5)] and head_groups(3, 197, 64, batch=64) == [(0, 1), (1, 1), (2, 1)]


def test_int8_step_gradients_equal_torch_autograd(tmp_path):
    torch = pytest.importorskip("torch")  # the export side; the other tests also run on stock onnxruntime
    from exporters.methods import build_frozen, build_head
    from exporters.step import export_step
    from exporters.vit import VisionTransformer
    from tests.conftest import TINY
    from tests.test_step import assert_step_matches_autograd
    from vqt_edge.spec import AdapterSpec

    tiny_backbone = VisionTransformer(TINY)
    tiny_backbone.reset_parameters(seed=0)
    arch = tiny_backbone.eval().arch
    spec = AdapterSpec.create(arch, "vqt", 4, query_tokens=2)
    torch.manual_seed(1)
    head = build_head(tiny_backbone, spec)
    params = dict(head.named_parameters())
    trainable = head.trainable()
    with torch.no_grad():
        for n in trainable:
            params[n].add_(torch.randn_like(params[n]) * 0.05)
        frozen = build_frozen(tiny_backbone, spec)
        gen = torch.Generator().manual_seed(2)
        example = frozen(torch.randn(2, 3, arch.image_size, arch.image_size, generator=gen))
        feats = frozen(torch.randn(5, 3, arch.image_size, arch.image_size, generator=gen))
    export_step(head, example, tmp_path / "step_int8.onnx", int8_kv=True)
    assert {n.domain for n in onnx.load(str(tmp_path / "step_int8.onnx")).graph.node} <= {""}
    _, extra = _inputs(spec, batch=5)
    int8, deq = _int8_feed({n: f.numpy() for n, f in zip(spec.frozen_outputs, feats)})
    session = _session(tmp_path / "step_int8.onnx")
    feed = {n: params[n].detach().numpy() for n in trainable}
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {**feed, **int8, **extra})))
    inputs = [deq[n] for n in spec.frozen_outputs] + [extra["query_keep"], extra["targets"]]
    assert_step_matches_autograd(got, head, [torch.from_numpy(x) for x in inputs], trainable)


def test_portable_backend_int8_feed_trains_as_the_fp32_feed(tiny_bundle):
    """Two AdamW steps of the portable backend from an int8 cache: the int8-fed graph (codes gathered
    layer-major, scales as they are) against the fp32 feed the runner dequantizes; the last batch
    smaller, so the gather writes into the first rows of the previous step's arrays."""
    manifest = mf.read_manifest(tiny_bundle, verify=False)
    fp32, _ = _inputs(manifest.spec, batch=7)
    store = FeatureStore(encode(fp32, "int8"))
    losses = {}
    for int8_feed in (False, True):
        backend = backends.open_backend("portable", tiny_bundle, manifest, "cpu", 1, None, int8_feed=int8_feed)
        assert (backend.input_dtypes["keys"] == np.int8) is int8_feed
        buffers: dict = {}
        out = []
        for rows in (np.array([4, 0, 6, 2]), np.array([5, 1, 3])):
            feed = store.gather(rows, backend.input_dtypes, buffers, backend.layer_major)
            buffers.update(feed)
            _, extra = _inputs(manifest.spec, batch=len(rows), seed=len(rows))
            out.append(backend.forward({**feed, **extra})[0])
            backend.step(1e-2, 1e-4)
        out.append(backend.parameters())
        losses[int8_feed] = out
    assert losses[True][:2] == pytest.approx(losses[False][:2], rel=RTOL)
    for n, want in losses[False][2].items():
        assert _relative_error(losses[True][2][n], want) <= RTOL, n
