"""`vqt-edge export` through the real CLI: what it writes, and clear exit-2 errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import TINY_SIZES, invoke


def test_help_explains_every_command():
    for command in ("export", "train", "eval", "predict"):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output


def test_export_from_a_checkpoint_prints_what_it_wrote(tmp_path, tiny_backbone):
    ckpt = tmp_path / "weights.bin"  # misleading name: the format is detected from the content
    torch.save({"model": tiny_backbone.state_dict()}, ckpt)
    out = tmp_path / "bundle"
    result = invoke(
        "export",
        *TINY_SIZES,
        "--no-int8-step",
        "--weights",
        ckpt,
        "--classes",
        "a,b,c,d",
        "--query-layers",
        "last:2",
        "--query-tokens",
        3,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_classes"] == 4 and manifest["class_names"] == ["a", "b", "c", "d"]
    assert manifest["query_layers"] == [1, 2] and manifest["query_tokens"] == 3
    assert manifest["weights"]["format"] == "pth"
    assert "parameters: trainable" in result.output and "frozen.onnx" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--random-init", "--out", "{out}"], "--num-classes"),
        (["--random-init", "--weights", "{ckpt}", "--num-classes", 3, "--out", "{out}"], "not both"),
        (["--num-classes", 3, "--out", "{out}"], "--weights"),
        (["--random-init", "--num-classes", 3, "--out", "{nonempty}"], "not an empty folder"),
        (["--random-init", "--num-classes", 3, "--query-layers", "7", "--out", "{out}"], "--query-layers"),
        (["--weights", "{bad_ckpt}", "--num-classes", 3, "--out", "{out}"], "blocks.0.attn.qkv.weight"),
    ],
)
def test_export_bad_input_exits_2_with_a_message(tmp_path, tiny_backbone, args, message):
    ckpt, bad = tmp_path / "w.pth", tmp_path / "bad.pth"
    torch.save(tiny_backbone.state_dict(), ckpt)
    sd = dict(tiny_backbone.state_dict())
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(5, 5)
    torch.save(sd, bad)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    paths = {"out": tmp_path / "bundle", "ckpt": ckpt, "bad_ckpt": bad, "nonempty": tmp_path / "full"}
    result = invoke("export", *TINY_SIZES, *[str(a).format(**paths) for a in args])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert (tmp_path / "full" / "x").read_text() == "keep me"


def test_unknown_model_is_refused():
    result = invoke("export", "--model", "vit_x99", "--random-init", "--num-classes", 2, "--out", "/tmp/never")
    assert result.exit_code == 2 and "vit_b16" in result.output
