"""The user's private image set on the device: layouts, a seeded split, bad-file screening, batches.

Two layouts are accepted because both are common and cost little: an image folder (one sub-folder
per class, as torchvision's ImageFolder) and a list file of `path,label` lines (for data that lives
elsewhere or in several places). Numpy and pillow only: the device has no torch.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vqt_edge.errors import UserError
from vqt_edge.preprocess import UnreadableImage, load_batch, load_rgb

log = logging.getLogger(__name__)

#: Files with these suffixes (any case) count as images in an image folder; others are ignored.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})

Sample = tuple[Path, int]


@dataclass
class Dataset:
    """Image paths with class indices into `classes` (the order the model's head uses)."""

    classes: list[str]
    samples: list[Sample]

    def __len__(self) -> int:
        return len(self.samples)


def load_dataset(path: Path, classes: Sequence[str] | None = None) -> Dataset:
    """Load an image folder or a list file.

    `classes=None` means training data: the class list comes from the data (sorted names) and must
    hold at least 2 classes, each with an image. Given `classes` (the trained model's), labels must
    be among them and keep their indices; evaluation data may lack some classes.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"data path {path} does not exist")
    if classes is not None:
        classes = list(classes)
        if len(set(classes)) != len(classes):
            raise ValueError(f"duplicate class names in {classes}")
    dataset = _load_folder(path, classes) if path.is_dir() else _load_list(path, classes)
    if not dataset.samples:
        raise UserError(f"no images found in {path}")
    if classes is None:
        check_trainable(dataset, str(path))
    return dataset


def check_trainable(dataset: Dataset, where: str) -> None:
    """Refuse data a classifier cannot learn from; call again after `drop_unreadable`."""
    if not dataset.samples:
        raise UserError(f"{where}: no usable images")
    if len(dataset.classes) < 2:
        raise UserError(
            f"{where}: training needs at least 2 classes, found {len(dataset.classes)} "
            f"({', '.join(map(repr, dataset.classes))})"
        )
    counts = np.bincount([label for _, label in dataset.samples], minlength=len(dataset.classes))
    empty = [name for name, n in zip(dataset.classes, counts) if n == 0]
    if empty:
        raise UserError(f"{where}: class {empty[0]!r} has no usable images")


def _load_folder(root: Path, classes: list[str] | None) -> Dataset:
    try:
        names = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    except OSError as e:
        raise UserError(f"cannot list {root}: {e}") from None
    if not names:
        raise UserError(f"{root} has no class sub-folders: an image folder needs one sub-folder per class")
    known = names if classes is None else classes
    index = {name: i for i, name in enumerate(known)}
    samples: list[Sample] = []
    for name in names:
        if name not in index:
            raise _unknown_class(name, known, f"class folder {root / name}")
        files = _image_files(root / name)
        if not files and classes is None:
            raise UserError(
                f"class folder {root / name} has no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        samples += [(f, index[name]) for f in files]
    return Dataset(list(known), samples)


def _image_files(folder: Path, recursive: bool = True) -> list[Path]:
    """Image files under `folder` (in its sub-folders too if `recursive`), skipping hidden files and
    folders (.DS_Store, ._* resource forks, .ipynb_checkpoints), in an order that is the same on
    every platform."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")] if recursive else []
        files += [
            Path(dirpath, f)
            for f in filenames
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS
        ]
    return sorted(files, key=lambda f: f.relative_to(folder).as_posix())


def image_paths(paths: Sequence[Path], recursive: bool = False) -> list[Path]:
    """What `predict` reads for its arguments: a file as given, a folder as the image files in it,
    sorted (with `recursive`, those of its sub-folders too, as `find` or `ls -R` would). A folder
    without images is a UserError: predicting nothing for it would look like success."""
    out: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            out.append(path)  # a missing or unreadable file is reported per image by predict
            continue
        files = _image_files(path, recursive)
        if not files:
            try:  # os.walk is silent about a folder it cannot read
                deeper = not recursive and any(p.is_dir() for p in path.iterdir())
            except OSError as e:
                raise UserError(f"cannot list {path}: {e}") from None
            raise UserError(
                f"{path}: folder has no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
                + ("; --recursive also reads its sub-folders" if deeper else "")
            )
        out += files
    return out


def _load_list(list_file: Path, classes: list[str] | None) -> Dataset:
    """Parse `path,label` lines (csv quoting; blank lines, `#` comments and a `path,label` header
    skipped). Relative paths are resolved against the list file's folder, not the working
    directory, so a data set can be moved as a whole."""
    if not list_file.is_file():  # a FIFO would block forever, /dev/zero would fill the memory
        raise UserError(f"{list_file} is neither a folder nor a regular file; give an image folder or a list file")
    try:
        text = list_file.read_text(encoding="utf-8-sig")  # -sig: spreadsheets write a BOM
    except UnicodeDecodeError as e:
        raise UserError(f"list file {list_file} is not UTF-8 text: {e}") from None
    except OSError as e:
        raise UserError(f"cannot read list file {list_file}: {e}") from None
    rows: list[tuple[int, str, str]] = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            row = next(csv.reader([line], skipinitialspace=True, strict=True))
            fields = [f.strip() for f in row]
        except csv.Error as e:
            raise UserError(f"{list_file}, line {lineno}: {e}") from None
        if len(fields) != 2 or not all(fields):
            raise UserError(f"{list_file}, line {lineno}: expected 'path,label', got {line.strip()[:80]!r}")
        if not rows and fields == ["path", "label"]:
            continue
        rows.append((lineno, fields[0], fields[1]))

    known = sorted({label for _, _, label in rows}) if classes is None else classes
    index = {name: i for i, name in enumerate(known)}
    samples: list[Sample] = []
    missing: list[tuple[int, Path]] = []
    for lineno, name, label in rows:
        if label not in index:
            raise _unknown_class(label, known, f"{list_file}, line {lineno}")
        path = Path(name)
        path = path if path.is_absolute() else list_file.parent / path
        if not _is_file(path):
            missing.append((lineno, path))
        samples.append((path, index[label]))
    if missing:
        lineno, path = missing[0]
        more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
        raise UserError(f"{list_file}, line {lineno}: no such image file {path}{more}")
    return Dataset(list(known), samples)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # name too long, embedded NUL, ...
        return False


def _unknown_class(label: str, known: Sequence[str], where: str) -> UserError:
    shown = ", ".join(map(repr, known[:20]))
    if len(known) > 20:
        shown += f", ... ({len(known)} in all)"
    return UserError(f"{where}: unknown class {label!r}; known classes: {shown}")


def split(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Split off `fraction` of each class as a validation set: (train, val).

    Stratified so rare classes appear on both sides, and every class keeps at least one training
    image. Each class draws from its own generator seeded with (seed, class index), so the split is
    the same on every run and platform, one class's size does not perturb another's split, and a
    larger fraction only adds images to the validation set.
    """
    if not 0 <= fraction < 1:
        raise UserError(f"validation fraction must be in [0, 1), got {fraction}")
    if seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed}")
    labels = np.array([label for _, label in dataset.samples], dtype=np.int64)
    val: set[int] = set()
    for c in range(len(dataset.classes)):
        members = np.flatnonzero(labels == c)
        n_val = min(int(np.floor(fraction * len(members) + 0.5)), len(members) - 1)
        if n_val > 0:
            rng = np.random.default_rng([seed, c])
            val.update(rng.permutation(members)[:n_val].tolist())
    samples = dataset.samples
    return (
        Dataset(list(dataset.classes), [s for i, s in enumerate(samples) if i not in val]),
        Dataset(list(dataset.classes), [s for i, s in enumerate(samples) if i in val]),
    )


def drop_unreadable(dataset: Dataset, image_size: int | None = None) -> tuple[Dataset, list[tuple[Path, str]]]:
    """Decode every image once; return the readable ones and (path, reason) for the others.

    Done up front so a bad file costs a warning, not a crash in epoch 37. Given `image_size`,
    JPEGs decode at a reduced scale (still >= image_size): several times faster on big photos and
    still reads the whole file, so truncation is caught. The result may be empty or lack classes:
    call `check_trainable` on training data afterwards.
    """
    good: list[Sample] = []
    bad: list[tuple[Path, str]] = []
    for path, label in dataset.samples:
        try:
            load_rgb(path, draft_size=image_size)
        except UnreadableImage as e:
            log.warning("skipping unreadable image %s: %s", path, e.reason)
            bad.append((path, e.reason))
        else:
            good.append((path, label))
    return Dataset(list(dataset.classes), good), bad


def iter_batches(
    samples: Sequence[Sample],
    batch_size: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (pixels float32 [b,3,S,S], labels int64 [b]) in the given order; the last batch may
    be smaller. Decodes one batch at a time, so memory does not grow with the data set."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        pixels = load_batch([path for path, _ in chunk], image_size, mean, std)
        yield pixels, np.array([label for _, label in chunk], dtype=np.int64)
