"""The backbone shipped in vqt_edge/pretrained/: intact, documented, and loadable the ordinary way."""

from __future__ import annotations

import json

from exporters.command import PRETRAINED_DIR, shipped_weights
from exporters.loaders import load_weights
from exporters.vit import VisionTransformer
from vqt_edge.arch import PRESETS
from vqt_edge.manifest import sha256_file


def test_shipped_backbone_matches_its_record_and_loads_strictly():
    ckpt, meta = shipped_weights("vit_fmnist")
    assert ckpt == PRETRAINED_DIR / "vit_fmnist.safetensors"
    assert sha256_file(ckpt) == meta["sha256"]
    assert ckpt.stat().st_size <= 10 * 2**20
    assert meta["upstream_test_accuracy"] >= 0.85
    assert meta["arch"] == PRESETS["vit_fmnist"].to_dict()
    report = load_weights(VisionTransformer(PRESETS["vit_fmnist"]), ckpt)
    assert report.format == "safetensors" and not report.unused
    assert (PRETRAINED_DIR / "vit_fmnist.train_log.txt").read_text().strip()
    assert json.loads((PRETRAINED_DIR / "vit_fmnist.json").read_text())["mean"] == meta["mean"]


def test_export_without_weights_uses_the_shipped_backbone(tmp_path):
    from click.testing import CliRunner

    from vqt_edge.cli import cli

    result = CliRunner().invoke(
        cli, ["export", "--model", "vit_fmnist", "--num-classes", "5", "--out", str(tmp_path / "b"), "--no-int8-step"]
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    _, meta = shipped_weights("vit_fmnist")
    assert manifest["weights"]["source"].endswith("vit_fmnist.safetensors") and manifest["mean"] == meta["mean"]
