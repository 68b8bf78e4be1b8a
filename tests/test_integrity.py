"""Issue 6, integrity: a damaged, swapped or hand-edited bundle or run, and untrusted checkpoints.

Every attack goes through the real CLI in a fresh process (torch unimportable for the device
commands) and must end with exit code 2, a one-line `error:` naming the culprit, no traceback, and,
for `train`, before any training step: the run folder holds no checkpoint and no run.json.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from exporters.loaders import detect_format, save_hf_folder
from tests.conftest import TINY, TINY_SIZES, run_cli
from vqt_edge import manifest as mf
from vqt_edge.errors import UserError
from vqt_edge.spec import AdapterSpec

# -- helpers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_bundle(tmp_path_factory, tiny_backbone) -> Path:
    """A second, genuine bundle of the same backbone, exported for 4 classes instead of 3."""
    from exporters.export import export_bundle

    out = tmp_path_factory.mktemp("bundle4")
    export_bundle(
        tiny_backbone,
        out,
        AdapterSpec.create(tiny_backbone.arch, "vqt", 4, query_tokens=2),
        model_name="tiny",
        int8_step=False,  # the int8-fed step graph: 15 s of export, tiny_bundle has it
        log=lambda _: None,
    )
    return out


def _copy(bundle: Path, dst: Path) -> Path:
    shutil.copytree(bundle, dst)
    return dst


def _edit_manifest(bundle: Path, edit) -> None:
    data = json.loads((bundle / mf.MANIFEST).read_text())
    edit(data)
    (bundle / mf.MANIFEST).write_text(json.dumps(data))  # allow_nan: Python writes NaN as the JSON extension


def _flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * where)
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def assert_refused(out, *needles: str) -> None:
    """Exit 2 with one clean `error:` message containing every needle; no traceback."""
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out.stderr
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def assert_nothing_trained(run: Path) -> None:
    """Refused before any work: no checkpoint, no run record, nothing but the lock file."""
    left = sorted(p.name for p in run.iterdir()) if run.exists() else []
    assert set(left) <= {".lock"}, left


# -- bundle damage through `vqt-edge train` -------------------------------------------------------


def _truncate(b: Path, other: Path) -> str:
    path = b / mf.FROZEN
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return mf.FROZEN


def _swap_training_model(b: Path, other: Path) -> str:
    """The file of a genuine bundle for 4 classes, in a bundle whose manifest says 3."""
    shutil.copyfile(other / mf.TRAINING_MODEL, b / mf.TRAINING_MODEL)
    return mf.TRAINING_MODEL


def _edit_checkpoint(b: Path, other: Path) -> str:
    _flip_byte(b / mf.CHECKPOINT)
    return mf.CHECKPOINT


def _edit_head(b: Path, other: Path) -> str:
    _flip_byte(b / mf.HEAD_MODEL, 0.9)  # a weight of the inference head: still a valid ONNX file
    return mf.HEAD_MODEL


def _delete_eval_model(b: Path, other: Path) -> str:
    (b / mf.EVAL_MODEL).unlink()
    return mf.EVAL_MODEL


def _unlist_and_swap_frozen(b: Path, other: Path) -> str:
    """Deleting a file's line from the manifest must not switch its check off."""
    _edit_manifest(b, lambda d: d["files"].pop(mf.FROZEN))
    shutil.copyfile(other / mf.FROZEN, b / mf.FROZEN)
    return f"does not list {mf.FROZEN}"


def _escape_dotdot(b: Path, other: Path) -> str:
    (b.parent / "x").write_bytes(b"outside")
    _edit_manifest(b, lambda d: d["files"].update({"../x": mf.sha256_file(b.parent / "x")}))
    return "'../x' points outside the bundle"


def _escape_absolute(b: Path, other: Path) -> str:
    target = b.parent / "abs.onnx"
    shutil.copyfile(b / mf.FROZEN, target)
    _edit_manifest(b, lambda d: d["files"].update({str(target): mf.sha256_file(target)}))
    return "points outside the bundle"


def _escape_symlink(b: Path, other: Path) -> str:
    """An identical file, but outside the bundle, reached through a link: refused all the same."""
    target = b.parent / "outside_frozen.onnx"
    shutil.copyfile(b / mf.FROZEN, target)
    (b / mf.FROZEN).unlink()
    (b / mf.FROZEN).symlink_to(target)
    return f"'{mf.FROZEN}' points outside the bundle"


def _unknown_format(b: Path, other: Path) -> str:
    _edit_manifest(b, lambda d: d.update(format="vqt-edge/99"))
    return "unknown bundle format 'vqt-edge/99'"


def _garbage_manifest(b: Path, other: Path) -> str:
    (b / mf.MANIFEST).write_bytes(np.random.default_rng(0).bytes(3000))
    return mf.MANIFEST


def _deeply_nested_manifest(b: Path, other: Path) -> str:
    (b / mf.MANIFEST).write_text("[" * 200_000)  # json.loads would raise RecursionError
    return "not valid JSON"


def _class_names_not_a_list(b: Path, other: Path) -> str:
    _edit_manifest(b, lambda d: d.update(class_names=3))
    return "class_names"


def _nan_std(b: Path, other: Path) -> str:
    _edit_manifest(b, lambda d: d.update(std=[float("nan")] * 3))
    return "std"


def _nul_in_file_name(b: Path, other: Path) -> str:
    _edit_manifest(b, lambda d: d["files"].update({"a\x00b": "0" * 64}))
    return "points outside the bundle"


def _no_trainable_shapes(b: Path, other: Path) -> str:
    _edit_manifest(b, lambda d: d.pop("trainable_shapes"))  # no fallback to guessed VQT shapes
    return "trainable_shapes"


DAMAGE = [
    _truncate,
    _swap_training_model,
    _edit_checkpoint,
    _edit_head,
    _delete_eval_model,
    _unlist_and_swap_frozen,
    _escape_dotdot,
    _escape_absolute,
    _escape_symlink,
    _unknown_format,
    _garbage_manifest,
    _deeply_nested_manifest,
    _class_names_not_a_list,
    _nan_std,
    _nul_in_file_name,
    _no_trainable_shapes,
]
# Through the real CLI: one of each kind (the others differ only inside read_manifest, tested below).
CLI_DAMAGE = [
    _truncate,
    _swap_training_model,
    _edit_checkpoint,
    _delete_eval_model,
    _unlist_and_swap_frozen,
    _escape_dotdot,
    _escape_symlink,
    _unknown_format,
    _garbage_manifest,
]


@pytest.mark.parametrize("damage", DAMAGE, ids=[d.__name__.lstrip("_") for d in DAMAGE])
def test_damaged_bundle_is_refused_by_read_manifest(damage, tmp_path, tiny_bundle, other_bundle):
    bundle = _copy(tiny_bundle, tmp_path / "bundle")
    needle = damage(bundle, other_bundle)
    with pytest.raises(UserError) as err:
        mf.read_manifest(bundle, verify=True)
    assert needle in str(err.value)


@pytest.mark.parametrize("damage", CLI_DAMAGE, ids=[d.__name__.lstrip("_") for d in CLI_DAMAGE])
def test_damaged_bundle_is_refused_before_any_training_step(damage, tmp_path, tiny_bundle, other_bundle, task):
    bundle = _copy(tiny_bundle, tmp_path / "bundle")
    needle = damage(bundle, other_bundle)
    run = tmp_path / "run"
    out = run_cli("train", "--bundle", bundle, "--data", task["train"], "--run", run, "--epochs", 1, timeout=120)
    assert_refused(out, needle)
    if needle in mf.REQUIRED_FILES:
        assert str(bundle / needle) in out.stderr  # the full path of the culprit file
    assert_nothing_trained(run)


def test_refusal_leaves_nothing_behind_and_resume_rechecks_the_bundle(tmp_path, tiny_bundle, task):
    """A refused start can be repeated once the bundle is repaired (no run.json to --resume), and a
    bundle damaged after the run started is refused by --resume without touching the run."""
    bundle = _copy(tiny_bundle, tmp_path / "bundle")
    _truncate(bundle, tiny_bundle)
    run = tmp_path / "run"
    args = ["train", "--bundle", bundle, "--data", task["train"], "--run", run, "--epochs", 1]
    assert_refused(run_cli(*args), mf.FROZEN)
    shutil.copyfile(tiny_bundle / mf.FROZEN, bundle / mf.FROZEN)
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr
    assert (run / "model.onnx").is_file()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    _flip_byte(bundle / mf.OPTIMIZER_MODEL)
    assert_refused(run_cli("train", "--run", run, "--resume"), mf.OPTIMIZER_MODEL, "sha256")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before  # nothing touched


def test_verify_files_in_process(tmp_path, tiny_bundle):
    bundle = _copy(tiny_bundle, tmp_path / "bundle")
    assert mf.read_manifest(bundle).files.keys() >= set(mf.REQUIRED_FILES)
    with pytest.raises(UserError, match="does not list nope.onnx"):
        mf.read_manifest(bundle, only=["nope.onnx"])
    _flip_byte(bundle / mf.FROZEN)
    mf.read_manifest(bundle, verify=False)  # parsing alone does not read the files
    mf.read_manifest(bundle, only=[mf.CHECKPOINT])  # only the files asked for
    with pytest.raises(UserError, match=r"frozen\.onnx: sha256 does not match"):
        mf.read_manifest(bundle)


# -- eval and predict on a damaged run folder -----------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tiny_run) -> Path:
    return tiny_run  # the tests that damage it work on a copy (_copy)


def _foreign_model(run: Path, other_bundle: Path) -> str:
    """model.onnx of a run of another bundle (4 classes), built as the trainer builds it."""
    from device_runner.deploy import build_model

    m = mf.read_manifest(other_bundle)
    d, c = m.spec.arch.dim, m.spec.num_classes
    adapter = {
        "query_tokens": np.zeros((len(m.spec.query_layers), m.spec.query_tokens, d), np.float32),
        "head.weight": np.zeros((c, m.spec.head_width), np.float32),
        "head.bias": np.zeros(c, np.float32),
    }
    build_model(other_bundle, m, adapter, run / "model.onnx")
    return "model.onnx: sha256 does not match"  # the hash summary.json recorded catches it first


def _foreign_model_with_its_hash(run: Path, other_bundle: Path) -> str:
    """The same, with summary.json's hash edited to match: the graph's signature catches it."""
    _foreign_model(run, other_bundle)
    _edit_summary(run, lambda files: files.update({"model.onnx": mf.sha256_file(run / "model.onnx")}))
    return "logits [B,3]"


def _edit_summary(run: Path, edit) -> None:
    summary = json.loads((run / "summary.json").read_text())
    edit(summary["files"])
    (run / "summary.json").write_text(json.dumps(summary))


def _summary_without_hashes(run: Path, other_bundle: Path) -> str:
    summary = json.loads((run / "summary.json").read_text())
    del summary["files"]
    (run / "summary.json").write_text(json.dumps(summary))
    return "'files' must map"


def _summary_without_model_hash(run: Path, other_bundle: Path) -> str:
    _edit_summary(run, lambda files: files.pop("model.onnx"))
    return "records no sha256 for model.onnx"


def _summary_hash_edited(run: Path, other_bundle: Path) -> str:
    _edit_summary(run, lambda files: files.update({"adapter.safetensors": "0" * 64}))
    return "adapter.safetensors: sha256 does not match summary.json"


def _summary_deleted(run: Path, other_bundle: Path) -> str:
    (run / "summary.json").unlink()
    return "summary.json: missing"


def _truncate_model(run: Path, other_bundle: Path) -> str:
    path = run / "model.onnx"
    path.write_bytes(path.read_bytes()[:5000])
    return "model.onnx"


def _classes_edited(run: Path, other_bundle: Path) -> str:
    info = json.loads((run / "run.json").read_text())
    info["classes"] = info["classes"][:2]
    (run / "run.json").write_text(json.dumps(info))
    return "classes"


def _run_json_without_classes(run: Path, other_bundle: Path) -> str:
    (run / "run.json").write_text("{}")
    return "damaged run files"


def _bundle_manifest_garbage(run: Path, other_bundle: Path) -> str:
    (run / "bundle_manifest.json").write_bytes(b"\xff\xfe garbage")
    return "damaged run files"


#: Damage to the hashes summary.json records: integrity cannot be switched off by editing it.
SUMMARY_DAMAGE = [_summary_without_hashes, _summary_without_model_hash, _summary_hash_edited, _summary_deleted]
RUN_DAMAGE = [
    _foreign_model,
    _foreign_model_with_its_hash,
    _truncate_model,
    _classes_edited,
    _run_json_without_classes,
    _bundle_manifest_garbage,
    *SUMMARY_DAMAGE,
]
EVAL_DAMAGE = [_foreign_model, _foreign_model_with_its_hash, _truncate_model, *SUMMARY_DAMAGE]


@pytest.mark.parametrize("damage", RUN_DAMAGE, ids=[d.__name__.lstrip("_") for d in RUN_DAMAGE])
def test_damaged_run_folder_is_refused_by_predict(damage, tmp_path, finished_run, other_bundle, task):
    run = _copy(finished_run, tmp_path / "run")
    needle = damage(run, other_bundle)
    out = run_cli("predict", "--run", run, task["test"] / "red" / "000.png", "--json")
    assert_refused(out, needle)
    assert out.stdout == ""


@pytest.mark.parametrize("damage", EVAL_DAMAGE, ids=[d.__name__.lstrip("_") for d in EVAL_DAMAGE])
def test_damaged_run_folder_is_refused_by_eval(damage, tmp_path, finished_run, other_bundle, task):
    run = _copy(finished_run, tmp_path / "run")
    out = run_cli("eval", "--run", run, "--data", task["test"], "--json")  # the intact copy works
    assert out.returncode == 0 and json.loads(out.stdout)["images"] == 60, out.stderr
    needle = damage(run, other_bundle)
    out = run_cli("eval", "--run", run, "--data", task["test"], "--json")
    assert_refused(out, needle)
    assert out.stdout == ""


def test_recorded_hashes_catch_a_flipped_weight_in_model_onnx(tmp_path, finished_run, task):
    """RunFolder.verify checks the sha256 that a run records in summary.json "files"."""
    from device_runner.evaluate import FinishedRun
    from vqt_edge.run_folder import RUN_FILES, RunFolder

    run = _copy(finished_run, tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["files"] == {name: mf.sha256_file(run / name) for name in RUN_FILES}
    (run / "summary.json").write_text(json.dumps(summary))
    RunFolder(run).verify()
    FinishedRun.open(run)
    _flip_byte(run / "model.onnx", 0.6)
    with pytest.raises(UserError, match=r"model\.onnx: sha256 does not match summary\.json"):
        FinishedRun.open(run)
    summary["files"] = {"../../etc/passwd": "0" * 64}
    (run / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(UserError, match="unexpected file"):
        RunFolder(run).verify()


@pytest.mark.parametrize("damage", SUMMARY_DAMAGE, ids=[d.__name__.lstrip("_") for d in SUMMARY_DAMAGE])
def test_damaged_summary_is_refused_by_load_adapter(damage, tmp_path, finished_run, other_bundle):
    """A run folder (it has run.json) is verified by load_adapter too: deleting or editing summary.json
    does not turn it into an unchecked adapter folder."""
    from vqt_edge import api

    run = _copy(finished_run, tmp_path / "run")
    api.load_adapter(run)  # the intact copy loads
    needle = damage(run, other_bundle)
    with pytest.raises(UserError, match=re.escape(needle)):
        api.load_adapter(run)


def test_flipped_weight_in_model_onnx_is_refused_by_predict(tmp_path, finished_run, task):
    run = _copy(finished_run, tmp_path / "run")
    _flip_byte(run / "model.onnx", 0.6)  # inside the weights: still a loadable model
    out = run_cli("predict", "--run", run, task["test"] / "red" / "000.png")
    assert_refused(out, "model.onnx", "sha256")


# -- untrusted checkpoints through `vqt-edge export` ----------------------------------------------


class _Payload:
    """Unpickling this runs code that creates a marker file: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _evil_pth(path: Path, model, marker: Path) -> list[str]:
    torch.save({"model": _state(model) | {"extra": _Payload(marker)}}, path)
    return ["executable pickle content", "exec"]


def _object_npz(path: Path, model, marker: Path) -> list[str]:
    with open(path, "wb") as f:  # np.savez pickles object arrays: loading them would run the payload
        np.savez(f, cls=np.array([_Payload(marker)], dtype=object))
    return ["'cls' is an object array"]


def _wrong_dtype_safetensors(path: Path, model, marker: Path) -> list[str]:
    sd = _state(model)
    sd["blocks.1.norm2.bias"] = torch.zeros(TINY.dim, dtype=torch.int32)
    safetensors.torch.save_file(sd, path)
    return ["blocks.1.norm2.bias has dtype int32"]


def _wrong_shape_safetensors(path: Path, model, marker: Path) -> list[str]:
    sd = _state(model)
    sd["blocks.0.mlp.fc1.weight"] = torch.zeros(48, TINY.dim)
    safetensors.torch.save_file(sd, path)
    return ["blocks.0.mlp.fc1.weight has shape [48, 32]", "[64, 32]"]


CHECKPOINTS = [_evil_pth, _object_npz, _wrong_dtype_safetensors, _wrong_shape_safetensors]


def test_evil_pickle_never_runs_through_the_real_cli(tmp_path, tiny_backbone):
    marker = tmp_path / "payload_ran"
    pickle.loads(pickle.dumps(_Payload(tmp_path / "control")))  # the payload is live when unpickled
    assert (tmp_path / "control").exists()
    weights = tmp_path / "EVIL.pth"
    needles = _evil_pth(weights, tiny_backbone, marker)
    out = run_cli(
        "export",
        "--weights",
        weights,
        "--num-classes",
        3,
        "--out",
        tmp_path / "bundle",
        *TINY_SIZES,
        torch_free=False,
        timeout=180,
    )
    assert_refused(out, str(weights), *needles)
    assert not marker.exists(), "the checkpoint's code ran"
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("make", CHECKPOINTS, ids=[c.__name__.lstrip("_") for c in CHECKPOINTS])
def test_untrusted_checkpoint_is_refused_by_export(make, tmp_path, tiny_backbone):
    """The export command in this process (torch is imported once; a fresh process per case costs
    5 s of torch import): the same click command, error handler and exit code as the real CLI."""
    from click.testing import CliRunner

    from vqt_edge.cli import cli

    marker = tmp_path / "payload_ran"
    weights = tmp_path / "weights.bin"  # a neutral name: formats are detected by content
    needles = make(weights, tiny_backbone, marker)
    args = ["export", "--weights", weights, "--num-classes", 3, "--out", tmp_path / "bundle", *TINY_SIZES]
    result = CliRunner().invoke(cli, list(map(str, args)))
    assert result.exit_code == 2, (result.output, result.exception)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for needle in [str(weights), *needles]:
        assert needle in result.stderr
    assert not marker.exists(), "the checkpoint's code ran"
    assert not (tmp_path / "bundle").exists()


def test_hf_folder_with_only_a_pickle_is_refused_without_unpickling(tmp_path, tiny_backbone):
    """transformers' pytorch_model.bin is a pickle: an HF folder without model.safetensors is refused."""
    folder = tmp_path / "hf"
    save_hf_folder(tiny_backbone, folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "payload_ran"
    torch.save({"x": _Payload(marker)}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="config.json and model.safetensors"):
        detect_format(folder)
    assert not marker.exists()


def test_bundle_of_the_retired_format_is_refused_with_a_re_export_hint(tmp_path, tiny_bundle, task):
    """A vqt-edge/1 bundle (before the adapter spec) names its trained tensors otherwise in its
    graphs: training it used to crash mid-run (KeyError from onnxruntime-training, or a failed
    model.onnx merge on the portable backend). Now every command refuses it up front, exit 2."""
    bundle = tmp_path / "old"
    shutil.copytree(tiny_bundle, bundle)
    manifest = json.loads((bundle / mf.MANIFEST).read_text())
    manifest["format"] = "vqt-edge/1"
    (bundle / mf.MANIFEST).write_text(json.dumps(manifest))
    for args in (
        ["train", "--bundle", bundle, "--data", task["train"], "--run", tmp_path / "run", "--epochs", 1],
        ["plan", "--bundle", bundle, "--images", 10, "--memory-budget", "1GB"],
    ):
        out = run_cli(*args)
        assert out.returncode == 2 and "re-export the bundle" in out.stderr and "Traceback" not in out.stderr, (
            out.stderr
        )
    assert not (tmp_path / "run" / "run.json").exists()  # refused before the run started
