"""RunFolder (vqt_edge/run_folder.py) on its own: the order of a finished run's files, hashes kept
across summary updates, and a full disk while writing model.onnx. Real files in tmp_path; the
trained runs that go through it are in test_integrity.py, test_device.py and test_fleet.py."""

from __future__ import annotations

import errno
import json

import pytest

from vqt_edge import manifest as mf
from vqt_edge.errors import UserError
from vqt_edge.run_folder import ADAPTER, MODEL, RUN_FILES, SUMMARY, RunFolder

CONFIG = {"format": "x"}


def finished(tmp_path) -> RunFolder:
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.write_outputs(lambda p: p.write_bytes(b"adapter"), CONFIG, lambda p: p.write_bytes(b"model"), "hint")
    run.finish({"epochs": 2})
    return run


def test_finish_records_every_run_file_and_updates_keep_them(tmp_path):
    run = finished(tmp_path)
    summary = json.loads((run.path / SUMMARY).read_text())
    assert summary["files"] == {name: mf.sha256_file(run.path / name) for name in RUN_FILES}
    run.verify()
    updated = run.update_summary({"test_accuracy": 0.75})
    assert updated["files"] == summary["files"] and updated["epochs"] == 2 and updated["test_accuracy"] == 0.75
    run.verify()
    with pytest.raises(ValueError):
        run.update_summary({"files": {}})  # only finish() records hashes


def test_edited_file_after_finish_is_refused(tmp_path):
    run = finished(tmp_path)
    (run.path / ADAPTER).write_bytes(b"adapteR")
    with pytest.raises(UserError, match="adapter.safetensors: sha256 does not match"):
        run.verify()


def test_disk_full_while_writing_model_leaves_no_partial_file(tmp_path):
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()

    def full_disk(path):
        path.with_name(path.name + ".tmp").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match="disk full while writing it.*free space and resume"):
        run.write_outputs(lambda p: p.write_bytes(b"adapter"), CONFIG, full_disk, "free space and resume")
    assert not (run.path / (MODEL + ".tmp")).exists() and not (run.path / MODEL).exists()
    assert not run.is_finished()


def test_a_refused_run_leaves_no_folder_and_no_lock_file(tmp_path):
    """The lock is taken before the bundle and data are checked; a refusal removes what it made."""
    fresh = RunFolder(tmp_path / "new" / "run")
    with pytest.raises(UserError), fresh.lock():
        raise UserError("refused")
    assert not fresh.path.exists()
    kept = RunFolder(tmp_path / "mine")
    kept.path.mkdir()
    (kept.path / "notes.txt").write_text("the user's")
    with pytest.raises(UserError), kept.lock():
        raise UserError("refused")
    assert sorted(p.name for p in kept.path.iterdir()) == ["notes.txt"]
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / mf.MANIFEST).write_text("{}")
    started = RunFolder(tmp_path / "started")
    with started.lock():
        started.start(bundle, ["a", "b"], config={})
    assert started.is_run() and (started.path / ".lock").exists()  # a run that began keeps its folder
