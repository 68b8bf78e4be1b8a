"""model.onnx describes itself (vqt_edge/model_metadata.py), `predict --model` reads a bare file, and
`package` writes the HF folder and the self-describing file (docs/deploy.md). Real runs, real CLI.
The Hugging Face libraries themselves load the folder in tests/test_hf_package.py (.venv-hf)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

from device_runner.onnx_io.stream import copy_with_metadata, read_metadata
from tests.conftest import CLASSES, run_cli
from vqt_edge import manifest as mf
from vqt_edge import model_metadata
from vqt_edge.errors import UserError
from vqt_edge.run_folder import RunFolder


@pytest.fixture(scope="module")
def images(task) -> list[Path]:
    return [task["test"] / c / "000.png" for c in CLASSES] + [task["test"] / "red" / "001.png"]


def test_every_run_model_carries_its_metadata(tiny_run, tiny_bundle):
    props = read_metadata(tiny_run / "model.onnx")
    assert list(props) == list(model_metadata.KEYS)
    summary, info = RunFolder(tiny_run).summary(), RunFolder(tiny_run).info()
    assert json.loads(props["class_names"]) == CLASSES == info["classes"]
    assert props["adapter_sha256"] == summary["files"]["adapter.safetensors"]
    assert props["bundle_sha256"] == info["bundle_manifest_sha256"] == mf.sha256_file(tiny_bundle / mf.MANIFEST)
    assert props["image_size"] == "32" and json.loads(props["mean"]) == [0.5, 0.5, 0.5]
    assert json.loads(props["adapter_spec"])["query_tokens"] == 2
    model = onnx.load(tiny_run / "model.onnx")
    onnx.checker.check_model(model)  # metadata keys unique, graph valid
    assert {p.key: p.value for p in model.metadata_props} == props
    RunFolder(tiny_run).verify()  # the run's hash check holds: the metadata is written before the hash


def test_onnxruntime_sees_the_metadata(tiny_run):
    import onnxruntime

    meta = onnxruntime.InferenceSession(str(tiny_run / "model.onnx")).get_modelmeta().custom_metadata_map
    assert meta == read_metadata(tiny_run / "model.onnx")


def test_predict_model_alone_equals_predict_run(tiny_run, images, tmp_path):
    lone = tmp_path / "elsewhere" / "model.onnx"
    lone.parent.mkdir()
    shutil.copy(tiny_run / "model.onnx", lone)
    by_run = run_cli("predict", "--run", tiny_run, "--json", *images)
    by_file = run_cli("predict", "--model", lone, "--json", *images)
    assert by_run.returncode == by_file.returncode == 0, by_file.stderr
    assert json.loads(by_file.stdout) == json.loads(by_run.stdout)
    text = run_cli("predict", "--model", lone, *images)
    assert [line.split("\t")[1] for line in text.stdout.splitlines()] == [r["label"] for r in json.loads(by_run.stdout)]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: {}, "no vqt-edge metadata"),
        (lambda p: {**p, "class_names": json.dumps(CLASSES[:2])}, "class_names"),
        (lambda p: {**p, "resize": "center crop"}, "preprocessing this vqt-edge does not implement"),
        (lambda p: {**p, "image_size": "64"}, "image_size"),
        (lambda p: {**p, "adapter_spec": "{"}, "not JSON"),
        (lambda p: {**p, "std": "[0.5, 0, 0.5]"}, "std"),
    ],
)
def test_predict_model_refuses_bad_metadata(tiny_run, tmp_path, edit, message):
    from device_runner.model_file import open_model

    bad = tmp_path / "model.onnx"
    copy_with_metadata(tiny_run / "model.onnx", bad, edit(read_metadata(tiny_run / "model.onnx")))
    with pytest.raises(UserError, match=message):
        open_model(bad)


def test_predict_model_without_metadata_exits_2(tiny_bundle, images):
    out = run_cli("predict", "--model", tiny_bundle / mf.FROZEN, *images)
    assert out.returncode == 2 and "no vqt-edge metadata" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_predict_needs_run_or_model(tiny_run, images):
    for args in ((), ("--run", tiny_run, "--model", tiny_run / "model.onnx")):
        out = run_cli("predict", *args, *images)
        assert out.returncode == 2 and "one of --run RUN or --model" in out.stderr


def test_copy_with_metadata_keeps_the_graph(tiny_run, tmp_path):
    stripped, restored = tmp_path / "a.onnx", tmp_path / "b.onnx"
    props = read_metadata(tiny_run / "model.onnx")
    copy_with_metadata(tiny_run / "model.onnx", stripped, {})
    assert read_metadata(stripped) == {}
    assert onnx.load(stripped).graph == onnx.load(tiny_run / "model.onnx").graph
    copy_with_metadata(stripped, restored, props)
    assert restored.read_bytes() == (tiny_run / "model.onnx").read_bytes()  # metadata last, as the merge writes it


def test_package_onnx_and_hf(tiny_run, tmp_path):
    out = run_cli("package", "--run", tiny_run, "--format", "onnx", "--out", tmp_path / "onnx")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "onnx" / "model.onnx").read_bytes() == (tiny_run / "model.onnx").read_bytes()
    out = run_cli("package", "--run", tiny_run, "--format", "hf", "--out", tmp_path / "hf")
    assert out.returncode == 0, out.stderr
    hf = tmp_path / "hf"
    assert sorted(p.name for p in hf.iterdir()) == [
        "README.md",
        "config.json",
        "model.onnx",
        "preprocessor_config.json",
    ]
    config = json.loads((hf / "config.json").read_text())
    assert config["model_type"] == "vit" and config["id2label"] == {"0": "blue", "1": "green", "2": "red"}
    assert config["label2id"] == {"blue": 0, "green": 1, "red": 2} and config["image_size"] == 32
    pre = json.loads((hf / "preprocessor_config.json").read_text())
    assert pre["size"] == {"height": 32, "width": 32} and pre["resample"] == 3 and pre["image_mean"] == [0.5] * 3
    assert "do_center_crop" not in pre and pre["rescale_factor"] == 1 / 255
    card = (hf / "README.md").read_text()
    summary = RunFolder(tiny_run).summary()
    assert summary["files"]["adapter.safetensors"] in card and "`blue`, `green`, `red`" in card
    assert f"{summary['train_images']} training images" in card


def test_package_refuses_damaged_run_and_nonempty_out(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    out = run_cli("package", "--run", run, "--format", "hf", "--out", tmp_path / "full")
    assert out.returncode == 2 and "not an empty folder" in out.stderr
    data = bytearray((run / "model.onnx").read_bytes())
    data[-10] ^= 1  # inside the metadata: the run's hash still catches it
    (run / "model.onnx").write_bytes(bytes(data))
    out = run_cli("package", "--run", run, "--format", "onnx", "--out", tmp_path / "o")
    assert out.returncode == 2 and "sha256 does not match" in out.stderr


def test_build_model_hashes_the_adapter_it_would_write(tiny_run, tmp_path):
    """Without the written file's hash (examples, bench), build_model hashes the bytes save_adapter
    writes for the same tensors: the same sha256 as the run's adapter.safetensors."""
    from device_runner.deploy import build_model, load_adapter

    folder = RunFolder(tiny_run)
    manifest, classes = folder.open_finished()
    tensors = load_adapter(tiny_run / "adapter.safetensors", manifest)
    build_model(folder.bundle(), manifest, tensors, tmp_path / "model.onnx", classes=classes)
    assert (tmp_path / "model.onnx").read_bytes() == (tiny_run / "model.onnx").read_bytes()
