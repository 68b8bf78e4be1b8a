"""Issue 15: however a path is typed, a run resumes; a real change of the images is refused;
`predict` reads folders; two identical runs write the same adapter bytes.

Real processes throughout: training is started with relative paths from one working directory,
SIGKILLed mid-epoch, and resumed from another one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from device_runner.data import load_dataset, split
from device_runner.identity import samples_sha256
from tests.conftest import TINY_RUN, cli_command, cli_env, run_cli
from tests.test_faults import (
    assert_clean_error,
    assert_same_adapter,
    kill_mid_epoch,
)
from vqt_edge.errors import UserError

# 120 images, batch 8: 15 steps per epoch, a checkpoint every 4 steps, so that a kill can land
# mid-epoch; validation on --val each epoch.
TRAIN = ["--epochs", 6, "--batch-size", 8, "--seed", 5, "--checkpoint-every", 4]
CHANGED = "the images changed since this run started"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bundle, task) -> Path:
    """The uninterrupted run, started with absolute paths from the repository."""
    run = tmp_path_factory.mktemp("reference") / "run"
    out = run_cli(
        "train", "--bundle", tiny_bundle, "--data", task["train"], "--val", task["test"], "--run", run, *TRAIN
    )
    assert out.returncode == 0, out.stderr
    return run


def write_list(data: Path, list_file: Path) -> None:
    """A list file with relative entries ("../my_images/red/000.png"), in the image folder's order."""
    dataset = load_dataset(data)
    rows = [f"{os.path.relpath(p, list_file.parent)},{dataset.classes[label]}" for p, label in dataset.samples]
    list_file.parent.mkdir(parents=True, exist_ok=True)
    list_file.write_text("path,label\n" + "\n".join(rows) + "\n")


@pytest.mark.parametrize("layout", ["folder", "list"])
def test_relative_paths_killed_mid_epoch_resume_from_another_cwd(tmp_path, tiny_bundle, task, reference, layout):
    start_dir, other_dir = tmp_path / "start", tmp_path / "elsewhere" / "deeper"
    other_dir.mkdir(parents=True)
    shutil.copytree(task["train"], start_dir / "my_images")
    data = "my_images/"
    if layout == "list":
        write_list(start_dir / "my_images", start_dir / "lists" / "train.csv")
        data = "./lists/train.csv"
    args = [
        "--bundle",
        os.path.relpath(tiny_bundle, start_dir),
        "--data",
        data,
        "--val",
        os.path.relpath(task["test"], start_dir),
        "--run",
        "run1/",
        *TRAIN,
    ]
    proc = subprocess.Popen(
        cli_command("train", *args),
        cwd=start_dir,
        env=cli_env(),
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        position = kill_mid_epoch(proc, start_dir / "run1")
    finally:
        proc.kill()
        proc.communicate()
    run = start_dir / "run1"
    assert 0 < position["step"] < 15 and not (run / "adapter.safetensors").exists()

    out = run_cli("train", "--run", os.path.relpath(run, other_dir), "--resume", cwd=other_dir)
    assert out.returncode == 0, out.stderr
    assert_same_adapter(run, reference)
    # Not only the same tensors: the same file (the header's metadata is written in a fixed order).
    assert (run / "adapter.safetensors").read_bytes() == (reference / "adapter.safetensors").read_bytes()


def test_two_identical_runs_write_identical_adapter_bytes(tmp_path, tiny_bundle, tiny_run, task):
    # The second run repeats tiny_run's command (tests/conftest.py) in another process and folder.
    out = run_cli("train", "--bundle", tiny_bundle, "--data", task["train"], "--run", tmp_path / "two", *TINY_RUN)
    assert out.returncode == 0, out.stderr
    files = [tiny_run / "adapter.safetensors", tmp_path / "two" / "adapter.safetensors"]
    assert files[0].read_bytes() == files[1].read_bytes()
    with safe_open(str(files[0]), framework="numpy") as f:  # still a valid safetensors file
        assert f.metadata()["format"] == "vqt-edge/2" and set(f.keys()) == {"query_tokens", "head.weight", "head.bias"}
    size = int.from_bytes(files[0].read_bytes()[:8], "little")
    header = json.loads(files[0].read_bytes()[8 : 8 + size])
    assert list(header) == sorted(header) and list(header["__metadata__"]) == sorted(header["__metadata__"])


# -- the identity of a run's samples ---------------------------------------------------------------


def identity(data: str | Path, val: str | Path | None = None, val_split: float = 0.0) -> str:
    """The identity train computes for `--data data [--val val | --val-split f]`, from the cwd."""
    train = load_dataset(Path(data))
    if val is not None:
        return samples_sha256([(train, Path(data)), (load_dataset(Path(val), classes=train.classes), Path(val))])
    train, held_out = split(train, val_split, seed=0)
    return samples_sha256([(train, Path(data)), (held_out, Path(data))])


@pytest.fixture
def tree(tmp_path, task, monkeypatch) -> Path:
    """tmp/a/x (images), tmp/a/x.csv (relative entries), tmp/a/abs.csv (absolute entries),
    tmp/link -> a (a symlinked folder); the working directory is tmp/a."""
    a = tmp_path / "a"
    shutil.copytree(task["test"], a / "x")
    write_list(a / "x", a / "lists" / "x.csv")
    dataset = load_dataset(a / "x")
    (a / "abs.csv").write_text("".join(f"{p},{dataset.classes[label]}\n" for p, label in dataset.samples))
    (tmp_path / "link").symlink_to(a, target_is_directory=True)
    monkeypatch.chdir(a)
    return tmp_path


def test_identity_ignores_how_the_path_was_typed(tree, monkeypatch):
    a = tree / "a"
    spellings = ["x", "./x", "x/", str(a / "x"), str(tree / "link" / "x"), "../link/x", "../a/./x"]
    want = identity("x", val_split=0.25)
    assert all(identity(s, val_split=0.25) == want for s in spellings)
    lists = ["lists/x.csv", "./lists/x.csv", str(a / "lists" / "x.csv"), "../link/lists/x.csv"]
    want_list = identity("lists/x.csv", val="x")
    assert all(identity(s, val=v) == want_list for s in lists for v in ("x", "./x", str(tree / "link" / "x")))
    assert identity("abs.csv") == identity(str(a / "abs.csv")) == identity("../link/abs.csv")
    monkeypatch.chdir(tree.parent)  # another working directory
    assert identity(os.path.relpath(a / "x", tree.parent), val_split=0.25) == want
    assert identity(tree / "link" / "lists" / "x.csv", val=a / "x") == want_list


def _rename(x: Path) -> None:
    (x / "red" / "001.png").rename(x / "red" / "001b.png")


def _relabel(x: Path) -> None:
    (x / "red" / "001.png").rename(x / "blue" / "001.png")


def _add(x: Path) -> None:
    shutil.copy(x / "red" / "001.png", x / "red" / "999.png")


def _remove(x: Path) -> None:
    (x / "green" / "002.png").unlink()


def _edit(x: Path) -> None:
    """One pixel of one image: same name, label and (PNG) size class; other bytes."""
    path = x / "blue" / "003.png"
    pixels = np.array(Image.open(path))
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(path)


CHANGES = [_rename, _relabel, _add, _remove, _edit]


@pytest.mark.parametrize("change", CHANGES, ids=lambda f: f.__name__.strip("_"))
def test_identity_sees_every_real_change(tree, change):
    before = identity("x", val_split=0.25)
    change(tree / "a" / "x")
    assert identity("x", val_split=0.25) != before


def test_identity_sees_a_relabelled_list_entry(tree):
    before = identity("lists/x.csv")
    text = (tree / "a" / "lists" / "x.csv").read_text()
    first = text.splitlines()[1]
    path, label = first.rsplit(",", 1)
    other = "green" if label != "green" else "red"
    (tree / "a" / "lists" / "x.csv").write_text(text.replace(first, f"{path},{other}", 1))
    assert identity("lists/x.csv") != before


def test_an_image_gone_since_it_was_decoded_is_a_user_error(tree):
    dataset = load_dataset(Path("x"))
    (tree / "a" / "x" / "red" / "000.png").unlink()
    with pytest.raises(UserError, match="000.png: cannot read it any more"):
        samples_sha256([(dataset, Path("x"))])


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_bundle, task) -> tuple[Path, Path]:
    """A finished one-epoch run on its own copy of the images, started with relative paths."""
    root = tmp_path_factory.mktemp("finished")
    shutil.copytree(task["test"], root / "x")
    out = run_cli(
        "train", "--bundle", tiny_bundle, "--data", "x", "--run", "run", "--epochs", 1, "--val-split", 0.25, cwd=root
    )
    assert out.returncode == 0, out.stderr
    return root / "x", root / "run"


@pytest.mark.parametrize("change", [None, *CHANGES], ids=lambda f: f.__name__.strip("_") if f else "unchanged")
def test_resume_refuses_changed_images_and_accepts_unchanged(tmp_path, finished, change):
    """A finished run resumed with --resume only rebuilds its outputs: the data check comes first."""
    data, run = finished
    pristine = tmp_path / "pristine"
    shutil.copytree(data, pristine)
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    try:
        if change:
            change(data)
        out = run_cli("train", "--run", copy, "--resume", cwd=tmp_path)
    finally:
        shutil.rmtree(data)
        shutil.copytree(pristine, data)
    if change is None:
        assert out.returncode == 0, out.stderr
    else:
        assert_clean_error(out, CHANGED, "added, removed, renamed, relabelled or edited", "Start a new --run")


# -- predict on folders ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def photos(tmp_path_factory, task) -> Path:
    """photos/{b.png, a.png, notes.txt, .hidden.png, sub/c.png, sub/deeper/d.png}, empty/, only_sub/sub/e.png"""
    root = tmp_path_factory.mktemp("photos")
    src = sorted((task["test"] / "red").iterdir())
    for i, rel in enumerate(
        [
            "photos/b.png",
            "photos/a.png",
            "photos/.hidden.png",
            "photos/sub/c.png",
            "photos/sub/deeper/d.png",
            "only_sub/sub/e.png",
        ]
    ):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src[i], root / rel)
    (root / "photos" / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    return root


def predicted(out: subprocess.CompletedProcess) -> list[str]:
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)
    assert all(set(r) == {"path", "label", "logits"} for r in results)
    return [r["path"] for r in results]


def test_predict_a_folder_one_level_sorted_then_recursive(tiny_run, photos):
    out = run_cli("predict", "--run", tiny_run, "photos/", "--json", cwd=photos)
    assert predicted(out) == ["photos/a.png", "photos/b.png"]
    out = run_cli("predict", "--run", tiny_run, "photos", "--recursive", "--json", cwd=photos)
    assert predicted(out) == ["photos/a.png", "photos/b.png", "photos/sub/c.png", "photos/sub/deeper/d.png"]


def test_predict_mixed_files_and_folders_in_the_given_order(tiny_run, photos):
    out = run_cli("predict", "--run", tiny_run, "photos/sub/c.png", "photos", "photos/a.png", "--json", cwd=photos)
    assert predicted(out) == ["photos/sub/c.png", "photos/a.png", "photos/b.png", "photos/a.png"]
    text = run_cli("predict", "--run", tiny_run, "photos", cwd=photos)
    assert text.returncode == 0 and [line.split("\t")[0] for line in text.stdout.splitlines()] == [
        "photos/a.png",
        "photos/b.png",
    ]


@pytest.mark.parametrize(
    "folder, extra, needles",
    [
        ("empty", [], ["empty: folder has no images"]),
        ("only_sub", [], ["only_sub: folder has no images", "--recursive also reads its sub-folders"]),
        ("empty", ["--recursive"], ["empty: folder has no images"]),
    ],
)
def test_predict_a_folder_without_images_is_a_clear_error(tiny_run, photos, folder, extra, needles):
    out = run_cli("predict", "--run", tiny_run, "photos/a.png", folder, *extra, "--json", cwd=photos)
    assert_clean_error(out, *needles)
    assert out.stdout == ""  # refused before anything is predicted


def test_disk_cache_reuses_the_identity_hashes(tmp_path, tiny_bundle, task, monkeypatch):
    """With --kv disk, each image's bytes are hashed once at start (its sample identity), and the
    K/V disk cache is keyed by those same sha256s, not by a second pass over the files."""
    import hashlib

    from device_runner import identity, trainer

    calls: list[Path] = []

    def counted(path):
        calls.append(Path(path))
        return real(path)

    real = identity.image_sha256
    monkeypatch.setattr(identity, "image_sha256", counted)
    monkeypatch.setattr(trainer, "image_sha256", counted)
    run = tmp_path / "run"
    t = trainer.Trainer(
        tiny_bundle,
        run,
        trainer.TrainConfig(epochs=1, kv="disk"),
        task["train"],
        task["test"],
        False,
        echo=lambda _: None,
    )
    t._prepare_features()
    images = [p for p, _ in t.data.train.samples + t.data.val.samples]
    assert len(images) == 180 and sorted(calls) == sorted(images)  # each image once
    index = json.loads(next((run / "kv_cache").glob("*/index.json")).read_text())["rows"]
    assert set(index) == {hashlib.sha256(p.read_bytes()).hexdigest() for p in images}
