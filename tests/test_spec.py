"""The adapter spec (vqt_edge/spec.py): validated once, every shape derived in one place, and the
query tokens called by one name from the torch module to model.onnx (issue 13)."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

from exporters.methods import build_frozen, build_head
from tests.conftest import TINY, TINY_EXPORT
from vqt_edge import manifest as mf
from vqt_edge.cli import cli
from vqt_edge.errors import UserError
from vqt_edge.spec import METHODS, QUERY_TOKENS, AdapterSpec


def _all_specs() -> list[AdapterSpec]:
    specs = []
    for method in METHODS:
        for aggregate in ("concat", "mean", "wsum") if method.startswith("vqt") else ("concat",):
            last_k = None if method in ("linear", "vqt", "head2toe") else 2
            specs.append(AdapterSpec.create(TINY, method, 3, query_tokens=2, aggregate=aggregate, last_k=last_k))
    return specs


@pytest.mark.parametrize("spec", _all_specs(), ids=lambda s: f"{s.method}-{s.aggregate}")
def test_torch_modules_have_exactly_the_shapes_the_spec_derives(spec, tiny_backbone):
    """Trainable tensors (names and shapes), frozen outputs and their per-image shapes, the head's
    width, the dropout mask: what the torch side builds is what the spec says, for every method."""
    head = build_head(tiny_backbone, spec)
    assert {n: tuple(p.shape) for n, p in head.named_parameters() if p.requires_grad} == spec.trainable_shapes
    assert head.head.in_features == spec.head_width and head.input_names == spec.train_inputs
    with torch.no_grad():
        outs = build_frozen(tiny_backbone, spec)(torch.randn(2, 3, TINY.image_size, TINY.image_size))
    outs = outs if isinstance(outs, tuple) else (outs,)
    assert {n: tuple(o.shape[1:]) for n, o in zip(spec.frozen_outputs, outs)} == {
        n: shape for n, (shape, _) in spec.frozen_output_specs.items()
    }
    extra = [torch.ones(2, *spec.query_keep_shape)] if spec.has_query_tokens else []
    loss, logits = head(*outs, *extra, torch.full((2, 3), 0.5))
    assert logits.shape == (2, 3) and torch.isfinite(loss)


def test_head_width_is_d_plus_lq_t_d():
    spec = AdapterSpec.create(TINY, "vqt", 3, query_tokens=4, query_layers=[0, 2])
    assert spec.head_width == TINY.dim * (1 + 2 * 4)
    assert spec.replace(aggregate="mean").head_width == TINY.dim * (1 + 2)
    assert AdapterSpec.create(TINY, "linear", 3).head_width == TINY.dim
    assert spec.query_keep_shape == (2, 4, TINY.dim) and AdapterSpec.create(TINY, "vpt", 3).query_keep_shape is None


@pytest.mark.parametrize(
    "changes,field",
    [
        (dict(query_tokens=0), "query_tokens"),
        (dict(query_tokens=True), "query_tokens"),
        (dict(last_k=1), "last_k"),
        (dict(query_layers=(0, 0)), "query_layers"),
        (dict(query_layers=(2, 1)), "query_layers"),
        (dict(query_layers=(3,)), "query_layers"),
        (dict(aggregate="max"), "aggregate"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=float("nan")), "dropout"),
        (dict(feature_norm="l1"), "feature_norm"),
        (dict(num_classes=1), "num_classes"),
        (dict(h2t_target=8), "h2t_target"),
        (dict(method="lora"), "method"),
    ],
)
def test_a_bad_value_is_refused_when_the_spec_is_made(changes, field):
    spec = AdapterSpec.create(TINY, "vqt", 3)
    with pytest.raises(UserError, match=field):
        spec.replace(**changes)


def test_bad_export_values_exit_2_with_one_line(tmp_path):
    tiny = [*TINY_EXPORT, "--out", tmp_path / "b"]
    for args, flag in (
        (["--query-tokens", 0], "--query-tokens"),
        (["--dropout", 1.5], "--dropout"),
        (["--method", "vpt", "--last-k", 0], "--last-k 0"),
        (["--method", "linear", "--aggregate", "wsum"], "--aggregate"),
    ):
        result = CliRunner().invoke(cli, ["export", *map(str, tiny), *map(str, args)])
        assert result.exit_code == 2 and result.output.startswith("error:") and flag in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "b").exists()


def test_manifest_round_trips_the_spec_and_refuses_edited_derived_fields(tiny_bundle):
    m = mf.read_manifest(tiny_bundle)
    data = json.loads((tiny_bundle / mf.MANIFEST).read_text())
    assert mf.Manifest.from_dict(json.loads(m.to_json())).spec == m.spec
    assert data["trainable_shapes"]["query_tokens"] == [3, 2, TINY.dim] and data["frozen_outputs"] == [
        "cls",
        "keys",
        "values",
    ]
    for key, value in (
        ("trainable_shapes", {**data["trainable_shapes"], "query_tokens": [3, 1, TINY.dim]}),
        ("frozen_outputs", ["cls"]),
        ("query_tokens", 0),
    ):
        with pytest.raises(UserError, match=key):
            mf.Manifest.from_dict({**data, key: value})


def test_query_tokens_have_one_name_from_torch_module_to_model_onnx(tiny_bundle, tiny_run, tiny_backbone):
    """torch parameter, head.onnx and training-graph initializer, step-graph input, step_init and
    adapter tensor, adapter_config.json: `query_tokens`; model.onnx: `head/query_tokens`."""
    m = mf.read_manifest(tiny_bundle)
    assert QUERY_TOKENS in dict(build_head(tiny_backbone, m.spec).named_parameters())
    for graph in (mf.HEAD_MODEL, mf.TRAINING_MODEL):  # an initializer, or an input of ORT's training graph
        g = onnx.load(str(tiny_bundle / graph), load_external_data=False).graph
        names = {i.name for i in [*g.initializer, *g.input]}
        assert QUERY_TOKENS in names and not any(n.endswith("." + QUERY_TOKENS) for n in names), graph
    step_inputs = [i.name for i in onnx.load(str(tiny_bundle / mf.STEP_MODEL), load_external_data=False).graph.input]
    assert QUERY_TOKENS in step_inputs and QUERY_TOKENS in load_file(str(tiny_bundle / mf.STEP_INIT))
    assert QUERY_TOKENS in load_file(str(tiny_run / "adapter.safetensors"))
    assert QUERY_TOKENS in json.loads((tiny_run / "adapter_config.json").read_text())["tensors"]
    model = {i.name for i in onnx.load(str(tiny_run / "model.onnx"), load_external_data=False).graph.initializer}
    assert "head/" + QUERY_TOKENS in model and not any("query_path.query_tokens" in n for n in model)
