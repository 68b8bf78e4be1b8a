"""Issue 12, feature selection: group lasso on the head, and a run whose model.onnx reads only the kept features."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from safetensors.numpy import load_file

from device_runner.data import iter_batches, load_dataset, split
from device_runner.evaluate import FinishedRun
from device_runner.features import FrozenBackbone
from device_runner.selection import FEATURE_INDEX, HeadConfig, group_lasso_grad, select_features, train_head
from tests.conftest import run_cli
from vqt_edge import manifest as mf


def planted_task(seed: int, n: int = 120, f: int = 300, k: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """3 classes; k planted features carry the class (each one shifts its mean by -0.8, 0 or +0.8
    per class), the other f - k are pure noise. Few samples for many features: a plain head puts
    weight on noise features too."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, f)).astype(np.float32)
    planted = np.sort(rng.choice(f, k, replace=False))
    means = np.stack([rng.permutation([-0.8, 0.0, 0.8]) for _ in range(k)], 1)
    x[:, planted] += means[y]
    return x, y, planted


@pytest.mark.parametrize("seed", [1, 3, 5])
def test_group_lasso_recovers_the_planted_features(seed):
    x, y, planted = planted_task(seed)
    cfg = HeadConfig(epochs=60, batch_size=32, lr=0.01, weight_decay=0.0, warmup_epochs=6, seed=seed)
    w, _ = train_head(x, y, 3, cfg, lasso=0.1, phase=1)
    assert list(select_features(w, len(planted) / x.shape[1])) == list(planted)
    # Without the penalty the same head ranks noise features among the top 8: the lasso does the work.
    w0, _ = train_head(x, y, 3, cfg, lasso=0.0, phase=1)
    assert len(set(select_features(w0, len(planted) / x.shape[1])) & set(planted)) < len(planted)


def test_group_lasso_subgradient_is_the_penalty_gradient():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 6))
    w[:, 2] = 0  # a zero column: subgradient 0
    lasso, eps = 0.3, 1e-6
    penalty = lambda m: lasso * np.sqrt((m * m).sum(0)).sum()  # noqa: E731
    grad = group_lasso_grad(w, lasso)
    for i, j in [(0, 0), (3, 1), (2, 5)]:
        d = np.zeros_like(w)
        d[i, j] = eps
        assert grad[i, j] == pytest.approx((penalty(w + d) - penalty(w - d)) / (2 * eps), rel=1e-5)
    assert not grad[:, 2].any()


def test_select_features_keeps_the_largest_columns():
    w = np.array([[0.1, -3.0, 0.0, 2.0, 0.5], [0.1, 0.0, 0.0, -2.0, 0.5]], np.float32)
    assert list(select_features(w, 0.4)) == [1, 3]
    assert list(select_features(w, 0.01)) == [1]  # at least one
    assert list(select_features(w, 1.0)) == [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def selected_run(tmp_path_factory, tiny_bundle, task) -> Path:
    run = tmp_path_factory.mktemp("runs") / "keep03"
    out = run_cli(
        "train",
        "--bundle",
        tiny_bundle,
        "--data",
        task["train"],
        "--run",
        run,
        "--epochs",
        3,
        "--val-split",
        0.2,
        "--keep-fraction",
        0.3,
    )
    assert out.returncode == 0, out.stderr
    return run


def _gemm_weight(model: onnx.ModelProto) -> tuple[onnx.NodeProto, list[int]]:
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm" and "logits" in n.output)
    dims = next(list(i.dims) for i in model.graph.initializer if i.name == gemm.input[1])
    return gemm, dims


def test_keep_fraction_shrinks_the_head_to_30_percent(selected_run, tiny_run, tiny_bundle):
    manifest = mf.read_manifest(tiny_bundle)
    f = manifest.spec.head_width
    k = round(0.3 * f)
    adapter = load_file(str(selected_run / "adapter.safetensors"))
    index = adapter[FEATURE_INDEX]
    assert index.dtype == np.int64 and list(index) == sorted(set(index.tolist())) and len(index) == k
    assert 0 <= index.min() and index.max() < f
    assert adapter["head.weight"].shape == (3, k) and adapter["head.bias"].shape == (3,)
    summary = json.loads((selected_run / "summary.json").read_text())
    assert summary["feature_selection"]["features_in"] == f and summary["feature_selection"]["features_kept"] == k

    model = onnx.load(str(selected_run / "model.onnx"))
    gemm, dims = _gemm_weight(model)
    assert dims == [3, k]  # the deployed head holds only the kept columns
    gather = next(n for n in model.graph.node if n.output[0] == gemm.input[0])
    assert gather.op_type == "Gather"
    stored = next(i for i in model.graph.initializer if i.name == gather.input[1])
    assert list(onnx.numpy_helper.to_array(stored)) == list(index)
    full = onnx.load(str(tiny_run / "model.onnx"))
    assert _gemm_weight(full)[1] == [3, f]
    for name in ("adapter.safetensors", "model.onnx"):
        assert (selected_run / name).stat().st_size < (tiny_run / name).stat().st_size, name


def test_predictions_of_the_run_equal_model_onnx(selected_run, tiny_bundle, task):
    """The run's own head (numpy, on features from the head graph) and the deployed model.onnx
    give the same logits, and the validation accuracy the run recorded is model.onnx's."""
    from device_runner.selection import feature_source

    manifest = mf.read_manifest(tiny_bundle)
    adapter = load_file(str(selected_run / "adapter.safetensors"))
    train_set, val_set = split(load_dataset(task["train"]), 0.2, 0)
    pixels, labels = next(iter_batches(val_set.samples, len(val_set), 32, manifest.mean, manifest.std))
    frozen = FrozenBackbone(tiny_bundle, manifest)(pixels)
    source = feature_source(tiny_bundle, manifest, adapter, lambda rows: {k: v[rows] for k, v in frozen.items()})
    x = source(np.arange(len(labels)))
    ours = x[:, adapter[FEATURE_INDEX]] @ adapter["head.weight"].T + adapter["head.bias"]
    deployed = FinishedRun.open(selected_run).logits(pixels)
    np.testing.assert_allclose(ours, deployed, rtol=1e-4, atol=1e-5)
    summary = json.loads((selected_run / "summary.json").read_text())
    assert summary["feature_selection"]["val_acc"] == float((deployed.argmax(-1) == labels).mean())


def test_bad_keep_fraction_is_a_user_error(tmp_path, tiny_bundle, task):
    out = run_cli(
        "train", "--bundle", tiny_bundle, "--data", task["train"], "--run", tmp_path / "r", "--keep-fraction", 0
    )
    assert out.returncode == 2 and out.stderr.startswith("error:") and "Traceback" not in out.stderr


def test_streaming_rewrite_of_the_head_equals_the_in_memory_edit(tiny_bundle, tmp_path):
    """device_runner/onnx_io/stream.py `rewrite_streaming` (used for the features graph and the
    selected head, so that head.onnx is never held in memory) writes the model that onnx.load,
    editing the proto and onnx.save would: same nodes in order, same initializers, new outputs."""
    from onnx import helper, numpy_helper

    from device_runner.onnx_io.stream import read_graph_skeleton, rewrite_streaming

    head = tiny_bundle / mf.HEAD_MODEL
    m = mf.read_manifest(tiny_bundle)
    learned = {n: np.full(s, 0.25, np.float32) for n, s in m.spec.trainable_shapes.items() if not n.startswith("head.")}
    assert learned
    extra = numpy_helper.from_array(np.arange(3, dtype=np.int64), "extra.index")
    output = helper.make_tensor_value_info("extra.out", onnx.TensorProto.FLOAT, None)
    nodes, inputs = read_graph_skeleton(head)
    source = nodes[-1].input[0]
    identity = helper.make_node("Identity", [source], ["extra.out"], name="extra.out")

    want = onnx.load(str(head))
    for init in want.graph.initializer:
        if init.name in learned:
            init.CopyFrom(numpy_helper.from_array(learned[init.name], init.name))
    want.graph.node.append(identity)
    want.graph.initializer.append(extra)
    del want.graph.output[:]
    want.graph.output.append(output)

    out = tmp_path / "rewritten.onnx"
    rewrite_streaming(head, out, replace=learned, add=[extra], edit_nodes=lambda ns: [*ns, identity], outputs=[output])
    got = onnx.load(str(out))
    assert inputs == [i.name for i in want.graph.input]
    assert [n.SerializeToString() for n in got.graph.node] == [n.SerializeToString() for n in want.graph.node]
    arrays = lambda g: {i.name: numpy_helper.to_array(i) for i in g.initializer}  # noqa: E731
    w, g = arrays(want.graph), arrays(got.graph)
    assert w.keys() == g.keys() and all(np.array_equal(w[k], g[k]) for k in w)
    assert [o.SerializeToString() for o in got.graph.output] == [output.SerializeToString()]
