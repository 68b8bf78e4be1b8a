"""`export --weights hf-hub:ORG/NAME` and timm model names, resolved by huggingface_hub offline.

Every test lays out a Hugging Face cache of its own in tmp_path (models--ORG--NAME/refs, snapshots,
blobs, as huggingface_hub writes it) and runs with HF_HUB_OFFLINE=1: nothing touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("huggingface_hub")  # the `export` extra

from exporters.loaders import save_hf_folder  # noqa: E402
from tests.conftest import REPO, TINY_SIZES, cli_command, cli_env  # noqa: E402


def hub_cache(cache: Path, repo: str, files: dict[str, bytes], commit: str) -> None:
    """One repository in huggingface_hub's cache layout: blobs by content hash, snapshots/COMMIT/NAME
    as relative symlinks to them, refs/main naming the commit."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))


def offline_env(cache: Path) -> dict[str, str]:
    return {**cli_env(), "HF_HOME": str(cache.parent / "hf_home"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


def export(out: Path, weights, cache: Path, *extra) -> subprocess.CompletedProcess:
    args = [
        "export",
        "--weights",
        weights,
        "--num-classes",
        3,
        "--query-tokens",
        2,
        "--out",
        out,
        "--no-int8-step",
        *extra,
    ]
    return subprocess.run(
        cli_command(*args, torch_free=False),
        capture_output=True,
        text=True,
        timeout=600,
        env=offline_env(cache),
        cwd=REPO,
    )


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_hf_hub_export_equals_the_same_checkpoint_given_by_path(tmp_path, tiny_backbone):
    folder = tmp_path / "vit"
    save_hf_folder(tiny_backbone, folder)  # a transformers ViT folder: config.json + model.safetensors
    cache = tmp_path / "hub"
    hub_cache(
        cache, "someorg/tiny-vit", {n: (folder / n).read_bytes() for n in ("config.json", "model.safetensors")}, COMMIT
    )

    by_path = export(tmp_path / "a", folder, cache)
    assert by_path.returncode == 0, by_path.stderr
    by_name = export(tmp_path / "b", "hf-hub:someorg/tiny-vit", cache)
    assert by_name.returncode == 0, by_name.stderr

    a = json.loads((tmp_path / "a" / "manifest.json").read_text())
    b = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert a["files"] == b["files"]  # every file of the bundle, frozen.onnx included, byte for byte
    assert b["weights"] == {"source": f"hf-hub:someorg/tiny-vit@{COMMIT}", "format": "hf"}
    assert a["weights"]["source"] == str(folder)


def test_missing_repository_offline_is_one_line_exit_2(tmp_path):
    cache = tmp_path / "hub"
    cache.mkdir()
    out = export(tmp_path / "b", "hf-hub:someorg/not-cached", cache, *TINY_SIZES)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out.stderr, out.stderr
    assert "someorg/not-cached" in lines[0] and "HF_HUB_OFFLINE" in lines[0]
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())


def test_timm_names_resolve_to_the_timm_repository(tmp_path):
    """`vit_NAME.TAG` means hf-hub:timm/vit_NAME.TAG; a timm repository's weights file is returned with
    its pretrained_cfg mean/std, and an architecture that is a preset gives the preset."""
    cache = tmp_path / "hub"
    weights = b"not read by resolve"
    for name, arch in (
        ("vit_base_patch16_224.augreg_in21k", "vit_base_patch16_224"),
        ("vit_odd_patch8_32.x", "vit_odd"),
    ):
        config = {
            "architecture": arch,
            "num_classes": 0,
            "pretrained_cfg": {"mean": [0.4, 0.4, 0.4], "std": [0.2, 0.2, 0.2]},
        }
        hub_cache(
            cache, f"timm/{name}", {"config.json": json.dumps(config).encode(), "model.safetensors": weights}, COMMIT
        )
    code = (
        "import json, sys\n"
        "from exporters import hub\n"
        "from vqt_edge.errors import UserError\n"
        "out = {}\n"
        "for name in sys.argv[1:]:\n"
        "    try:\n"
        "        r = hub.resolve(name)\n"
        "        out[name] = [str(r.path), r.source, r.model, r.mean, r.std]\n"
        "    except UserError as e:\n"
        "        out[name] = str(e)\n"
        "print(json.dumps(out))\n"
    )
    names = ["vit_base_patch16_224.augreg_in21k", "hf-hub:timm/vit_odd_patch8_32.x", "vit_nothere_patch16_224.y"]
    out = subprocess.run(
        [sys.executable, "-c", code, *names],
        capture_output=True,
        text=True,
        env=offline_env(cache),
        cwd=REPO,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    path, source, model, mean, std = got[names[0]]
    assert Path(path).read_bytes() == weights and Path(path).name == "model.safetensors"
    assert source == f"hf-hub:timm/vit_base_patch16_224.augreg_in21k@{COMMIT}"
    assert model == "vit_b16" and mean == [0.4] * 3 and std == [0.2] * 3
    assert got[names[1]][2] is None and got[names[1]][1] == f"hf-hub:timm/vit_odd_patch8_32.x@{COMMIT}"
    assert "timm/vit_nothere_patch16_224.y" in got[names[2]] and "not in the local Hugging Face cache" in got[names[2]]


def test_file_names_are_not_taken_for_timm_names(tmp_path):
    from exporters import hub

    assert hub.repo_of("vit_b16.npz") is None  # a (mistyped) file: loaders.py says "no such file"
    assert hub.repo_of(str(tmp_path / "vit_x.y")) is None
    assert hub.repo_of("vit_small_patch16_224.augreg_in21k") == ("timm/vit_small_patch16_224.augreg_in21k", None)
    assert hub.repo_of("hf-hub:google/vit-base-patch16-224-in21k@main") == ("google/vit-base-patch16-224-in21k", "main")
