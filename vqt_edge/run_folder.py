"""The run folder: one class owns every file of a training run (docs/design.md section 3).

`vqt-edge train`, a fleet server and `tune` write runs; eval, predict, `load_adapter` and resume
read them. All of them go through `RunFolder`, so the file names, the order in which they are
written, and the integrity check live in one place:

- started: `bundle_manifest.json` (a copy, so eval/predict need only the run), then `run.json`
  (written last: its presence means the folder is a run);
- training: the backend's checkpoint (`CHECKPOINTS`), `metrics.jsonl` (one line per epoch);
- finished: `adapter.safetensors`, `adapter_config.json`, `model.onnx`, then `summary.json`, which
  records the sha256 of those three (`RUN_FILES`). Reading a finished run verifies them, always: a
  summary without a hash is refused, so editing summary.json cannot switch the check off.

Pure files and JSON (no onnxruntime, no torch): the device side hands the bytes of the adapter and
model.onnx over as writer functions, so the core does not import `device_runner`.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from vqt_edge import adapter_config
from vqt_edge import manifest as mf
from vqt_edge.errors import UserError
from vqt_edge.fileio import DISK_FULL, atomic_write_text
from vqt_edge.manifest import Manifest

RUN_FILE = "run.json"
BUNDLE_MANIFEST = "bundle_manifest.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
LOCK = ".lock"
ADAPTER = "adapter.safetensors"
MODEL = "model.onnx"
#: The checkpoint file of each training backend (device_runner/backends.py).
CHECKPOINTS = {"portable": "checkpoint.safetensors", "ort-training": "checkpoint"}
#: Files of a finished run whose sha256 summary.json records; reading a run without them is refused.
RUN_FILES = (ADAPTER, adapter_config.ADAPTER_CONFIG, MODEL)

Writer = Callable[[Path], None]


class RunFolder:
    """A run folder on disk; every read and write of its files goes through here."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # -- started ---------------------------------------------------------------------------
    def is_run(self) -> bool:
        """run.json exists: a run was started here (finished or not)."""
        return (self.path / RUN_FILE).is_file()

    def checkpoint(self, backend: str) -> Path:
        return self.path / CHECKPOINTS[backend]

    @contextmanager
    def lock(self) -> Iterator[None]:
        """One training process per run folder: a second one is refused, not interleaved. A folder
        made here for a run that never started (a refused bundle, bad data, a budget that does not
        fit) is removed again, and so is the lock file in a folder that was there: nothing is left
        behind by a refusal."""
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        lock_created = not (self.path / LOCK).exists()
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"{self.path}: another vqt-edge process is training in this run folder") from None
            yield
        finally:
            if lock_created and not self.is_run():
                (self.path / LOCK).unlink(missing_ok=True)
                if created:
                    try:
                        self.path.rmdir()  # only if nothing else was written
                    except OSError:
                        pass
            os.close(fd)

    def start(self, bundle: Path, classes: list[str], **fields) -> None:
        """Record what the run is: the bundle's manifest copied, then run.json (last) with the bundle's
        path and manifest sha256, the class names and `fields` (data paths, config, ...)."""
        self.path.mkdir(parents=True, exist_ok=True)
        text = (bundle / mf.MANIFEST).read_text()
        atomic_write_text(self.path / BUNDLE_MANIFEST, text)
        atomic_write_text(
            self.path / RUN_FILE,
            json.dumps(
                {
                    "bundle": str(bundle.resolve()),
                    **fields,
                    "classes": list(classes),
                    "bundle_manifest_sha256": mf.sha256_file(bundle / mf.MANIFEST),
                },
                indent=2,
            )
            + "\n",
        )

    def info(self) -> dict:
        """run.json; a missing or damaged one is a UserError."""
        path = self.path / RUN_FILE
        try:
            info = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{self.path}: no {RUN_FILE}; is this a `vqt-edge train` run folder?") from None
        except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON or UTF-8
            raise UserError(f"{path}: damaged ({type(e).__name__}: {e})") from None
        if not isinstance(info, dict):
            raise UserError(f"{path}: damaged (not a JSON object)")
        return info

    def bundle(self) -> Path:
        """The bundle the run was trained on, as run.json names it."""
        bundle = self.info().get("bundle")
        if not isinstance(bundle, str):
            raise UserError(f"{self.path / RUN_FILE}: damaged (no bundle path)")
        return Path(bundle)

    # -- metrics ---------------------------------------------------------------------------
    def append_metrics(self, record: dict) -> None:
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")

    def metrics(self) -> list[dict]:
        path = self.path / METRICS
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def trim_metrics(self, epoch: int) -> None:
        """On resume, forget metrics of epochs after the checkpoint (they will be recomputed), and
        a last line torn by a kill mid-write."""
        path = self.path / METRICS
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["epoch"] <= epoch:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        atomic_write_text(path, "".join(line + "\n" for line in keep))

    def clear_metrics(self) -> None:
        (self.path / METRICS).unlink(missing_ok=True)

    # -- finished --------------------------------------------------------------------------
    def write_outputs(self, write_adapter: Writer, config: dict, write_model: Writer, resume_hint: str) -> None:
        """adapter.safetensors, adapter_config.json, then model.onnx (each written atomically by its
        writer). A full disk while writing model.onnx leaves no partial file and is a UserError that
        ends with `resume_hint` (how to finish the run once there is space)."""
        write_adapter(self.path / ADAPTER)
        adapter_config.write(self.path, config)
        try:
            write_model(self.path / MODEL)
        except BaseException as e:
            (self.path / (MODEL + ".tmp")).unlink(missing_ok=True)  # a partial file would keep a full disk full
            if isinstance(e, OSError) and e.errno in DISK_FULL:
                raise UserError(
                    f"{self.path / MODEL}: disk full while writing it ({os.strerror(e.errno)}); {resume_hint}"
                ) from None
            raise

    def finish(self, summary: dict) -> dict:
        """Write summary.json with the sha256 of every file in RUN_FILES under "files" (last: a run
        with a summary is finished). Returns the summary as written."""
        # eval/predict/load_adapter check these before use: a flipped weight still loads and predicts.
        summary = {**summary, "files": {name: mf.sha256_file(self.path / name) for name in RUN_FILES}}
        atomic_write_text(self.path / SUMMARY, json.dumps(summary, indent=2) + "\n")
        return summary

    def update_summary(self, changes: dict) -> dict:
        """Add or replace fields of a finished run's summary (the test accuracy, the measured peak);
        its recorded hashes are kept as they are."""
        if "files" in changes:
            raise ValueError("the file hashes are recorded by finish() only")
        summary = {**self.summary(), **changes}
        atomic_write_text(self.path / SUMMARY, json.dumps(summary, indent=2) + "\n")
        return summary

    def is_finished(self) -> bool:
        return (self.path / SUMMARY).is_file()

    def summary(self) -> dict:
        path = self.path / SUMMARY
        if not path.is_file():
            raise UserError(f"{path}: missing; is {self.path} a finished `vqt-edge train` run?")
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as e:
            raise UserError(f"{path}: damaged ({type(e).__name__}: {e})") from None
        if not isinstance(summary, dict):
            raise UserError(f"{path}: damaged (not a JSON object)")
        return summary

    def verify(self) -> None:
        """Check the sha256 of the run's deployable files against summary.json "files".

        A bit flipped in model.onnx's weights still loads and silently predicts something else; only a
        hash catches it. A summary that lacks one (or lacks "files") is refused, so deleting a line of
        summary.json cannot turn the check off. There is no switch to skip this."""
        path = self.path / SUMMARY
        files = self.summary().get("files")
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise UserError(f"{path}: damaged: 'files' must map the run's files to their sha256")
        for name in files:
            if name not in RUN_FILES:
                raise UserError(f"{path}: names an unexpected file {name!r}")
        for name in RUN_FILES:
            if name not in files:
                raise UserError(
                    f"{path}: records no sha256 for {name}, so the run cannot be checked; "
                    "copy the run folder again, or train again."
                )
            if not (self.path / name).is_file():
                raise UserError(f"{self.path / name}: missing from the run folder")
            if mf.sha256_file(self.path / name) != files[name]:
                raise UserError(
                    f"{self.path / name}: sha256 does not match {SUMMARY}; the file is damaged or was "
                    "replaced. Copy the run folder again, or train again."
                )

    def open_finished(self) -> tuple[Manifest, list[str]]:
        """A finished run's bundle manifest and class names, after its files were verified."""
        for name in (RUN_FILE, BUNDLE_MANIFEST, MODEL):
            if not (self.path / name).is_file():
                raise UserError(f"{self.path}: no {name}; is this a finished `vqt-edge train` run?")
        info = self.info()
        try:
            manifest = Manifest.from_dict(
                json.loads((self.path / BUNDLE_MANIFEST).read_text()), str(self.path / BUNDLE_MANIFEST)
            )
            classes = info["classes"]
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:  # ValueError: bad JSON or UTF-8
            raise UserError(f"{self.path}: damaged run files ({type(e).__name__}: {e})") from None
        if not (
            isinstance(classes, list)
            and all(isinstance(c, str) for c in classes)
            and len(classes) == manifest.spec.num_classes
        ):
            raise UserError(
                f"{self.path / RUN_FILE}: damaged: its classes do not match the "
                f"{manifest.spec.num_classes} of the bundle"
            )
        self.verify()
        return manifest, list(classes)
