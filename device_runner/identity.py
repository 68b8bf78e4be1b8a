"""What a run's samples are, so that `--resume` continues the same run and refuses a different one.

The data order of a run depends on its sample list (docs/design.md section 2), so `train --resume`
compares the samples it finds with those the run started on. A resumed run reads its data paths
from run.json, absolute, while the run may have been started with relative paths, from another
working directory, or through a symlinked folder; an identity made of the paths as typed told these
apart and refused runs whose images had not changed. Each image is therefore named by its real path
(symlinks and `..` resolved) relative to the real data root (the image folder, or the list file's
folder), with its label and the sha256 of its bytes: an image added, removed, renamed, relabelled or
edited changes the identity, a path spelled differently does not.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from device_runner.data import Dataset
from device_runner.features import image_sha256
from vqt_edge.errors import UserError


def data_root(source: Path) -> Path:
    """The real folder the samples of `source` hang from: the image folder itself, or the folder of
    a list file (against which its relative entries are resolved, device_runner/data.py)."""
    source = Path(source).absolute()  # a list file's symlink: its entries are read from the link's folder
    return (source if source.is_dir() else source.parent).resolve()


def sample_name(path: Path, root: Path) -> str:
    """The real `path` relative to `root` when it lies under it (an image folder's files, a list
    file's entries below it), else the real absolute path (list entries elsewhere); the same whatever
    the working directory and whichever symlink or spelling reached the file."""
    path = Path(path).resolve()
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def samples_sha256(parts: Iterable[tuple[Dataset | None, Path]], content: dict[Path, str] | None = None) -> str:
    """Identity of (dataset, source) parts in order (train, then validation): for each sample its
    name under the source's root, its label and its bytes' sha256, in the dataset's order. `content`,
    if given, receives each image's sha256 by path: the K/V disk cache keys its rows by the same hash,
    so a run reads and hashes every image once at start, not twice."""
    digest = hashlib.sha256()
    for dataset, source in parts:
        root = data_root(source)
        for path, label in dataset.samples if dataset else []:
            try:
                sha = image_sha256(path)
            except OSError as e:  # deleted or locked since it was decoded a moment ago
                raise UserError(f"{path}: cannot read it any more ({e.strerror or e})") from None
            digest.update(f"{sample_name(path, root)}\0{label}\0{sha}\n".encode())
            if content is not None:
                content[path] = sha
        digest.update(b"--\n")
    return digest.hexdigest()
