"""Downstream tasks the shipped backbone never saw, written as ordinary image folders (VTAB-1k style).

Each task has `train1000/` (1000 images), `train800/` + `val200/` (the same 1000 split for choosing
lr and weight decay) and `test/`. All from data that installs offline (docs/design.md section 8):

- `fmnist59`: Fashion-MNIST classes 5-9 (sandal, shirt, sneaker, bag, ankle boot); the backbone was
  pre-trained on classes 0-4 only. Test: the official test images of classes 5-9 (5000).
- `digits`: scikit-learn's bundled 8x8 digits (1797 images), upscaled to 28 px; 1000 for training,
  the remaining 797 for test.
- `orientation` (structured, our own): Fashion-MNIST classes 5-9 images rotated by 0, 90, 180 or
  270 degrees; the label is the rotation. Train from the training split, test from 2000 official
  test images.

    python examples/tasks.py --task fmnist59 --out data/fmnist59
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fmnist import CLASSES as FMNIST_CLASSES  # noqa: E402
from fmnist import load_fmnist  # noqa: E402

TASKS = ("fmnist59", "digits", "orientation")


def _folder_name(name: str) -> str:
    return name.lower().replace("/", "-").replace(" ", "-")


def _write(root: Path, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
    for i, (img, y) in enumerate(zip(images, labels)):
        Image.fromarray(img).save(root / classes[int(y)] / f"{i:05d}.png")


def _balanced_pick(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n indices, as equal per class as possible, in random order."""
    classes = np.unique(labels)
    per = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    picked = [rng.choice(np.flatnonzero(labels == c), k, replace=False) for c, k in zip(classes, per)]
    return rng.permutation(np.concatenate(picked))


def _splits(
    out: Path,
    images: np.ndarray,
    labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    classes: list[str],
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    idx = _balanced_pick(labels, 1000, rng) if len(labels) > 1000 else rng.permutation(len(labels))
    _write(out / "train1000", images[idx], labels[idx], classes)
    _write(out / "train800", images[idx[:800]], labels[idx[:800]], classes)
    _write(out / "val200", images[idx[800:]], labels[idx[800:]], classes)
    _write(out / "test", test_images, test_labels, classes)


def make_fmnist59(out: Path, seed: int = 0, test_limit: int | None = None) -> None:
    xs, ys = load_fmnist("train")
    xt, yt = load_fmnist("test")
    keep, keep_t = ys >= 5, yt >= 5
    classes = [_folder_name(FMNIST_CLASSES[c]) for c in range(5, 10)]
    test_idx = np.flatnonzero(keep_t)[:test_limit]
    _splits(out, xs[keep], ys[keep] - 5, xt[test_idx], yt[test_idx] - 5, classes, seed)


def make_digits(out: Path, seed: int = 0) -> None:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("the digits task needs scikit-learn (bundled data): pip install scikit-learn") from None
    d = load_digits()
    img8 = (d.images / 16.0 * 255).round().astype(np.uint8)
    img28 = np.stack([np.asarray(Image.fromarray(im).resize((28, 28), Image.BICUBIC)) for im in img8])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(img28))
    train, test = order[:1000], order[1000:]
    classes = [str(i) for i in range(10)]
    _splits(out, img28[train], d.target[train], img28[test], d.target[test], classes, seed)


def make_orientation(out: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed + 1)
    xs, ys = load_fmnist("train")
    xt, yt = load_fmnist("test")
    xs, xt = xs[ys >= 5], xt[yt >= 5]
    src = rng.choice(len(xs), 1000, replace=False)
    rot = np.arange(1000) % 4
    train = np.stack([np.rot90(xs[i], r) for i, r in zip(src, rot)])
    tsrc = rng.choice(len(xt), 2000, replace=False)
    trot = np.arange(2000) % 4
    test = np.stack([np.rot90(xt[i], r) for i, r in zip(tsrc, trot)])
    classes = ["rot000", "rot090", "rot180", "rot270"]
    _splits(out, train, rot, test, trot, classes, seed)


def make_task(task: str, out: Path, seed: int = 0) -> Path:
    """Write the task to `out` (complete or not at all: written beside it, then renamed)."""
    if out.is_dir():
        return out
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    {"fmnist59": make_fmnist59, "digits": make_digits, "orientation": make_orientation}[task](tmp, seed=seed)
    tmp.rename(out)
    return out


def export_vqt_bundle(bundle: Path, classes: list[str], log: Path | None = None) -> Path:
    """The shipped vit_fmnist as a VQT (T=1) bundle for `classes`, exported once by the real CLI (the fleet
    examples' common start); its output goes to `log` when given."""
    import subprocess

    if not (bundle / "manifest.json").exists():
        cmd = [sys.executable, "-m", "vqt_edge.cli", "export", "--model", "vit_fmnist", "--method", "vqt"]
        cmd += ["--query-tokens", "1", "--classes", ",".join(classes), "--out", str(bundle)]
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
        with open(log or os.devnull, "w") as f:
            if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT if log else None).returncode:
                raise RuntimeError(f"failed: {' '.join(cmd)}" + (f" (see {log})" if log else ""))
    return bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_task(args.task, args.out, args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
