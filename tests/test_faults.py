"""Issue 6, faults: a full disk, two trainers on one run, Ctrl-C, and 10,000 images to predict.

Interrupted work must never lose data: after each fault the last good checkpoint still loads, and
`--resume` ends with exactly the parameters of a run that was never interrupted.

A full disk is simulated two ways: a small tmpfs (needs root and `mount`; skipped elsewhere) and
RLIMIT_FSIZE in the training process, with SIGXFSZ ignored so that a write past the limit fails
with EFBIG the way a write to a full disk fails with ENOSPC (works for any user).
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

from device_runner import ort
from tests.conftest import REPO, run_cli
from vqt_edge.run_folder import CHECKPOINTS

CLI = "import sys; sys.modules['torch'] = None; from vqt_edge.cli import main; sys.argv = ['vqt-edge'] + sys.argv[1:]; main()"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
# 120 images, batch 8: 15 steps per epoch, so that an interrupted run stops mid-epoch; 10 epochs
# (~0.1 s each), so that it is still running when the test gets to stop it.
TRAIN = ["--epochs", 10, "--batch-size", 8, "--seed", 3, "--kv", "ram"]


def start_cli(*args, **kw) -> subprocess.Popen:
    """The real CLI in a background process (as tests.conftest.run_cli, but not waited for); its output
    piped unless `stdout=` says otherwise."""
    kw = {"stdout": subprocess.PIPE, **kw}
    return subprocess.Popen(
        [sys.executable, "-c", CLI, *map(str, args)], cwd=REPO, env=ENV, text=True, stderr=subprocess.PIPE, **kw
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.005)


def stop(proc: subprocess.Popen) -> None:
    """SIGSTOP, and wait until the kernel shows the process stopped (delivery is asynchronous)."""
    proc.send_signal(signal.SIGSTOP)
    stat = Path(f"/proc/{proc.pid}/stat")
    end = time.monotonic() + 30
    while stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
        assert time.monotonic() < end, "the process did not stop"
        time.sleep(0.001)


def kill_mid_epoch(proc: subprocess.Popen, run: Path, timeout: float = 120) -> dict:
    """SIGKILL the training process once its checkpoint lies inside an epoch (step > 0).

    The checkpoint's own position is polled (file times can be too coarse to order two writes), then
    read again with the process stopped (SIGSTOP), so the one read is the one that resume will find."""
    wait_for(lambda: (run / "run.json").exists(), proc, timeout)
    ckpt = checkpoint_of(run)

    def mid_epoch() -> dict | None:
        try:  # each checkpoint is a complete file renamed into place
            position = load_checkpoint(ckpt)
        except Exception:  # not written yet
            return None
        return position if position["step"] > 0 else None

    while True:
        wait_for(lambda: mid_epoch() is not None, proc, timeout)
        stop(proc)
        position = mid_epoch()
        if position is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return position
        proc.send_signal(signal.SIGCONT)


def metrics_lines(run: Path) -> int:
    path = run / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def file_size_limit(limit: int):
    """preexec_fn: writes past `limit` bytes fail with EFBIG instead of killing the process."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # ignored dispositions survive exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def interrupt_mid_run(run: Path, *args) -> subprocess.CompletedProcess:
    """Start training, freeze it (SIGSTOP) once it has finished an epoch, send SIGINT, let it go.

    Deterministic: the signal is pending while the process is stopped and is handled as soon as it
    continues, in the middle of a later epoch."""
    proc = start_cli("train", "--run", run, *args)
    wait_for(lambda: metrics_lines(run) >= 1, proc)
    stop(proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def checkpoint_of(run: Path) -> Path:
    """The run's checkpoint file: that of the backend its run.json names."""
    return run / CHECKPOINTS[json.loads((run / "run.json").read_text())["config"]["backend"]]


def load_checkpoint(path: Path) -> dict:
    """The position a checkpoint holds, read back as its backend reads it (so it is a valid one):
    safetensors metadata (portable) or onnxruntime-training's CheckpointState."""
    if path.name == CHECKPOINTS["portable"]:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata()
        return {k: int(meta[k]) for k in ("epoch", "step")}
    state = ort.training_api().CheckpointState.load_checkpoint(str(path))
    return {k: state.properties[k] for k in ("epoch", "step")}


def assert_clean_error(out, *needles) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = out.stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(starts) == 1, out.stderr[-3000:]
    error = "\n".join(lines[starts[0] :])  # onnxruntime's own text may span lines
    for needle in needles:
        assert needle in error, (needle, error)


def assert_same_adapter(run: Path, reference: Path) -> None:
    want, got = load_file(str(reference / "adapter.safetensors")), load_file(str(run / "adapter.safetensors"))
    assert want.keys() == got.keys()
    for name in want:
        assert np.array_equal(want[name], got[name]), name
    losses = [
        [json.loads(x)["train_loss"] for x in (r / "metrics.jsonl").read_text().splitlines()] for r in (reference, run)
    ]
    assert losses[0] == losses[1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bundle, task) -> Path:
    """The uninterrupted run every interrupted one must end up equal to (the default backend)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    out = run_cli("train", "--bundle", tiny_bundle, "--data", task["train"], "--run", run, *TRAIN)
    assert out.returncode == 0, out.stderr
    return run


@pytest.fixture(scope="module")
def reference_ort(tmp_path_factory, tiny_bundle, task) -> Path:
    """The same on the onnxruntime-training backend (its checkpoint is ORT's own format)."""
    if not ort.has_training_api():
        pytest.skip("no onnxruntime-training here")
    run = tmp_path_factory.mktemp("reference_ort") / "run"
    out = run_cli(
        "train", "--bundle", tiny_bundle, "--data", task["train"], "--run", run, *TRAIN, "--backend", "ort-training"
    )
    assert out.returncode == 0, out.stderr
    return run


# -- a small file system ---------------------------------------------------------------------------


class SmallDisk:
    """A tmpfs of a given size: `fill()` takes all the space left, `free()` gives it back."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def resize(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True, capture_output=True)

    def fill(self, leave: int = 0) -> None:
        """Take all the space, then give back `leave` bytes."""
        with open(self.path / "filler", "wb", buffering=0) as f:
            for block in (1 << 20, 4096, 1):
                try:
                    while True:
                        f.write(b"\0" * block)
                except OSError as e:
                    assert e.errno == errno.ENOSPC
            assert os.statvfs(self.path).f_bavail == 0
            f.truncate(f.tell() - leave)

    def free(self) -> None:
        (self.path / "filler").unlink()


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a tmpfs needs root (the RLIMIT_FSIZE variant runs everywhere)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield SmallDisk(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# -- disk full -------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["tmpfs", "rlimit"])
def test_disk_full_while_writing_the_kv_cache(how, request, tmp_path, tiny_bundle, task):
    # An explicit --disk-budget: the disk fills up during the run (the default budget refuses this one
    # up front; tests/test_disk_plan.py).
    args = ["--bundle", tiny_bundle, "--data", task["train"], "--epochs", 2, "--kv", "disk", "--disk-budget", "1GB"]
    if how == "tmpfs":
        disk = request.getfixturevalue("small_disk")  # 256 KiB: the cache needs 800 KiB
        run, kw = disk.path / "run", {}
    else:
        run, kw = tmp_path / "run", {"preexec_fn": file_size_limit(64 << 10)}
    out = run_cli("train", "--run", run, *args, **kw)
    assert_clean_error(out, "disk full while writing the K/V cache", "--resume")
    assert not any((run / name).exists() for name in CHECKPOINTS.values())
    cache = next((run / "kv_cache").iterdir())
    assert not (cache / "index.json").exists()
    assert all(f.stat().st_size == 0 for f in cache.iterdir()), "the failed fill was not rolled back"

    if how == "tmpfs":
        disk.resize("8m")
    out = run_cli("train", "--run", run, "--resume")
    assert out.returncode == 0, out.stderr
    assert metrics_lines(run) == 2 and (run / "model.onnx").is_file()


@pytest.mark.parametrize("how,backend", [("tmpfs", "ort-training"), ("rlimit", "ort-training"), ("rlimit", "portable")])
def test_disk_full_while_writing_a_checkpoint(how, backend, request, tmp_path, tiny_bundle, task):
    """A run with a checkpoint meets a full disk at its next one: exit 2, the old checkpoint intact
    and loadable, and --resume (with space back) ends exactly where an uninterrupted run does."""
    reference = request.getfixturevalue("reference_ort" if backend == "ort-training" else "reference")
    size = checkpoint_of(reference).stat().st_size  # ort-training ~80 KB, portable ~11 KB
    if how == "tmpfs":
        disk = request.getfixturevalue("small_disk")
        disk.resize("8m")
        run, kw = disk.path / "run", {}
    else:  # room for every other file of the run (each a few KB), not for the checkpoint
        run, kw = tmp_path / "run", {"preexec_fn": file_size_limit(min(32 << 10, size // 2))}
    first = interrupt_mid_run(
        run, "--bundle", tiny_bundle, "--data", task["train"], *TRAIN, "--backend", backend, "--disk-budget", "1GB"
    )  # the disk fills up later (by `disk.fill` below)
    assert first.returncode == 130, first.stderr
    ckpt = checkpoint_of(run)
    good = ckpt.read_bytes()
    position = load_checkpoint(ckpt)
    metrics = (run / "metrics.jsonl").read_text()

    if how == "tmpfs":
        disk.fill(leave=32 << 10)  # room for the small files, not for the checkpoint
    out = run_cli("train", "--run", run, "--resume", **kw)
    assert_clean_error(out, "could not write checkpoint", "the previous checkpoint is intact")
    assert ("No space left on device" if how == "tmpfs" else "File too large") in out.stderr
    assert ckpt.read_bytes() == good
    assert load_checkpoint(ckpt) == position
    assert not ckpt.with_name(ckpt.name + ".tmp").exists()
    # The failed epoch's metrics line may have been written (metrics go first); --resume trims it.
    assert (run / "metrics.jsonl").read_text().startswith(metrics)

    if how == "tmpfs":
        disk.free()
    out = run_cli("train", "--run", run, "--resume")
    assert out.returncode == 0, out.stderr
    assert_same_adapter(run, reference)


def test_disk_full_while_writing_model_onnx(tmp_path, tiny_bundle, task):
    run = tmp_path / "run"
    # 150 KB: every checkpoint (~90 KB) fits, model.onnx (~260 KB) does not.
    out = run_cli(
        "train",
        "--run",
        run,
        "--bundle",
        tiny_bundle,
        "--data",
        task["train"],
        "--epochs",
        1,
        preexec_fn=file_size_limit(150 << 10),
    )
    assert checkpoint_of(run).is_file()
    assert_clean_error(out, "model.onnx")
    assert not (run / "model.onnx.tmp").exists()  # the partial file would keep the disk full
    out = run_cli("train", "--run", run, "--resume")
    assert out.returncode == 0 and (run / "model.onnx").is_file(), out.stderr


def test_damaged_run_checkpoint_is_reported_on_resume(tmp_path, reference):
    """What a power cut can leave (the checkpoint is renamed into place without fsync)."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    checkpoint_of(run).write_bytes(checkpoint_of(reference).read_bytes()[:1000])
    assert_clean_error(run_cli("train", "--run", run, "--resume"), str(checkpoint_of(run)))


# -- two trainers, Ctrl-C --------------------------------------------------------------------------


def test_second_trainer_is_refused_and_sigint_checkpoints_then_resume_completes(tmp_path, tiny_bundle, task, reference):
    run = tmp_path / "run"
    args = ["--bundle", tiny_bundle, "--data", task["train"], *TRAIN]
    first = start_cli("train", "--run", run, *args)
    wait_for(lambda: metrics_lines(run) >= 1, first)
    stop(first)  # hold it mid-run, lock taken, while the others try
    try:
        snapshot = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        for extra in ([], ["--resume"]):
            second = run_cli("train", "--run", run, *([] if extra else args), *extra)
            assert_clean_error(second, "another vqt-edge process is training in this run folder")
            assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == snapshot  # not interleaved
    finally:
        first.send_signal(signal.SIGINT)
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "--resume" in err.splitlines()[-1], err[-3000:]
    position = load_checkpoint(checkpoint_of(run))
    assert position["step"] > 0, (position, err[-3000:])  # the step in progress was finished and saved mid-epoch
    assert not (run / "model.onnx").exists()

    out = run_cli("train", "--run", run, "--resume")
    assert out.returncode == 0, out.stderr
    assert_same_adapter(run, reference)


def test_sigint_during_the_frozen_pass_exits_130_and_resume_works(tmp_path, tiny_bundle, task):
    data = tmp_path / "data"  # 5 copies of every image (RAM mode does not deduplicate): a longer frozen pass
    for src in task["train"].rglob("*.png"):
        for k in range(5):
            (data / src.parent.name).mkdir(parents=True, exist_ok=True)
            os.link(src, data / src.parent.name / f"{k}_{src.name}")
    run = tmp_path / "run"
    proc = start_cli("train", "--run", run, "--bundle", tiny_bundle, "--data", data, "--epochs", 1)
    wait_for(lambda: (run / "run.json").exists(), proc)  # written just before the frozen pass
    stop(proc)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    try:
        assert proc.returncode == 130 and "Traceback" not in err and "--resume" in err, err[-2000:]
    finally:
        out = run_cli("train", "--run", run, "--resume")
        assert out.returncode == 0, out.stderr


# -- load: predict streams -------------------------------------------------------------------------

PEAK = """import sys, atexit
sys.modules['torch'] = None
def report(path=sys.argv[1]):
    with open('/proc/self/status') as f:
        peak = next(line.split()[1] for line in f if line.startswith('VmHWM:'))
    with open(path, 'w') as f:
        f.write(peak)
atexit.register(report)
from vqt_edge.cli import main
sys.argv = ['vqt-edge'] + sys.argv[2:]
main()
"""


@pytest.fixture(scope="module")
def predict_run(tiny_run) -> Path:
    return tiny_run  # predict only reads it


def _predict_peak_kib(run: Path, folder: Path, n: int) -> int:
    """Peak RSS (VmHWM, KiB) of one `vqt-edge predict` process over the first n images."""
    names = [f"i/{i:05d}.png" for i in range(n)]
    report = folder / f"peak_{n}"
    with open(folder / f"out_{n}.txt", "w") as stdout:
        done = subprocess.run(
            [sys.executable, "-c", PEAK, str(report), "predict", "--run", str(run), *names],
            cwd=folder,
            env=ENV,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = (folder / f"out_{n}.txt").read_text().splitlines()
    assert len(lines) == n and lines[-1].startswith(names[-1] + "\t")
    return int(report.read_text())


def test_predict_10000_images_in_bounded_memory(tmp_path, predict_run, task):
    (tmp_path / "i").mkdir()
    sources = sorted(task["test"].rglob("*.png"))[:8]
    for i in range(10_000):
        os.link(sources[i % len(sources)], tmp_path / "i" / f"{i:05d}.png")
    small = _predict_peak_kib(predict_run, tmp_path, 1_000)
    large = _predict_peak_kib(predict_run, tmp_path, 10_000)
    growth = (large - small) / 1024
    print(
        f"\npredict peak RSS: 1,000 images {small / 1024:.1f} MiB, 10,000 images {large / 1024:.1f} MiB "
        f"(+{growth:.1f} MiB)"
    )
    (tmp_path.parent / "predict_peak_rss.json").write_text(json.dumps({"1000": small, "10000": large, "unit": "KiB"}))
    # Not streaming would hold 10,000 x 12 KiB of pixels (120 MiB); the paths themselves cost ~0.6 KiB each.
    assert growth < 20, (small, large)
