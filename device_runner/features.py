"""The frozen pass: images -> frozen.onnx -> (cls, keys, values), streamed or cached.

Three ways to feed training (docs/design.md section 2, paper D.3):
- `stream`: run the frozen graph on every training step (no cache; the backbone session and the
  training module are both resident).
- `ram`: run it once per image before training, keep fp16 K/V in memory, then free the session.
- `disk`: like `ram`, but into an fp16 memory-mapped cache in the run folder, keyed by the frozen
  graph's sha256 and each image's sha256, so a changed image or bundle is never served stale and a
  resumed run reuses what an earlier process computed.

Either cache holds fp16 rows or, with `--kv-dtype int8`, int8 rows and their scales
(device_runner/kv_int8.py), dequantized into the step's fp32 feed by `FeatureStore.gather`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from device_runner import ort
from device_runner.data import iter_batches
from device_runner.fp16 import fp16_to_fp32
from device_runner.kv_int8 import dequantize_into, encode
from vqt_edge import manifest as mf
from vqt_edge.errors import UserError
from vqt_edge.fileio import DISK_FULL, atomic_write_text
from vqt_edge.kv_cache import SCALE_SUFFIX, cache_specs, is_scale
from vqt_edge.manifest import Manifest

log = logging.getLogger(__name__)
Features = dict[str, np.ndarray]  # frozen output name -> [B, ...] (cls, keys, values, hidden)


class FrozenBackbone:
    """An InferenceSession on frozen.onnx; `close()` frees its weights before the training phase.
    `prepack=False` turns onnxruntime's weight prepacking off; it changes nothing measurable for
    frozen.onnx, whose weights each have one reader (346 / 337 MiB load peak / resident on ViT-B/16
    either way, bench/calibrate_memory.py), so the trainer keeps the default."""

    # Process-wide counts of sessions opened and images run: `tune` records them to show that its
    # whole grid shares one frozen pass (device_runner/tune.py).
    sessions_opened = 0
    images_run = 0

    def __init__(
        self, bundle: Path, manifest: Manifest, device: str = "cpu", threads: int | None = None, prepack: bool = True
    ) -> None:
        FrozenBackbone.sessions_opened += 1
        rt = ort.onnxruntime()
        self.names = manifest.spec.frozen_outputs
        self.session = rt.InferenceSession(
            str(bundle / mf.FROZEN), sess_options=ort.session_options(threads, prepack), providers=ort.providers(device)
        )

    def __call__(self, pixels: np.ndarray) -> Features:
        FrozenBackbone.images_run += len(pixels)
        return dict(zip(self.names, self.session.run(self.names, {"pixel_values": pixels})))

    def close(self) -> None:
        self.session = None


def image_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class FeatureStore:
    """Cached features for a list of samples: row i of every array belongs to sample i."""

    def __init__(self, arrays: Features) -> None:
        self.arrays = arrays

    def gather(
        self,
        rows: np.ndarray,
        dtypes: dict[str, np.dtype] | None = None,
        out: Features | None = None,
        layer_major: frozenset[str] = frozenset(),
    ) -> Features:
        """Copies of the asked rows, in the asked order, as `dtypes[name]` (fp32 by default).

        int8 asked of an int8 cache: the codes as they are, and their scales as `<name>_scale`
        (the int8-fed step graph dequantizes them itself); laid out [L, B, ...] for the names in
        `layer_major`, so that each layer's codes are one contiguous array (device_runner/backends.py).

        `out`: arrays of an earlier gather to write into (their first len(rows) rows) where dtype and
        row shape match and they are long enough; anything the caller still reads from them is
        overwritten. The training loop passes its last feed: a fresh 464 MB array per vit_b16 step is
        page-faulted in again every time (0.034 CPU s of a 0.28 s step; docs/design.md section 10).

        Both step graphs take fp32; fp16 rows are converted by `fp16_to_fp32` (3x numpy's cast,
        1.8x onnxruntime 1.19.2's Cast inside a graph; docs/design.md section 10). A bundle whose
        step graph takes fp16 (exported before 2026-11-30) gets plain copies.
        Row by row into one preallocated array: the peak is the feed plus one row.
        (`a[rows].astype(np.float32)` also holds the fp16 gather and, reordered, a second fp32
        copy: 1.5x the feed at the peak.) Rows are read in sorted order, which is kinder to a
        memmap. From a memory-mapped cache, each row's pages are dropped once copied and the whole
        mapping after each output (see `drop_mapped_pages`), so the read leaves nothing resident
        and adds little beyond the fp32 copy at its peak; for in-memory arrays that is a no-op."""
        gathered: Features = {}
        order = np.argsort(rows, kind="stable")
        for name, a in self.arrays.items():
            if is_scale(name):  # read with its int8 rows
                continue
            scale = self.arrays.get(name + SCALE_SUFFIX)
            dtype = np.dtype((dtypes or {}).get(name, np.float32))
            if dtype == np.int8:
                if scale is None:
                    raise ValueError(f"{name}: int8 asked of a {a.dtype} cache")
                gathered.update(_gather_codes(name, a, scale, rows, order, out or {}, name in layer_major))
                continue
            reuse = (out or {}).get(name)
            if (
                reuse is not None
                and reuse.dtype == dtype
                and reuse.shape[1:] == a.shape[1:]
                and len(reuse) >= len(rows)
            ):
                dst = reuse[: len(rows)]
            else:
                dst = np.empty((len(rows), *a.shape[1:]), dtype)
            convert = a.dtype == np.float16 and dst.dtype == np.float32
            for i in order:
                if scale is not None:
                    _dequantize(a[rows[i]], scale[rows[i]], dst[i])
                elif convert:
                    fp16_to_fp32(a[rows[i]], dst[i])
                else:
                    dst[i] = a[rows[i]]
                _drop_row_pages(a, int(rows[i]))
            # A fault also maps neighbouring cached pages ("fault-around"): drop what is left.
            drop_mapped_pages({name: a} if scale is None else {name: a, "scale": scale})
            gathered[name] = dst
        return gathered


def _reusable(reuse: np.ndarray | None, shape: tuple[int, ...], dtype: np.dtype, axis: int) -> np.ndarray:
    """The first shape[axis] rows along the batch `axis` of `reuse` (an earlier gather's array) where
    it has this dtype and is as large, else a new array."""
    if reuse is not None and reuse.dtype == dtype and reuse.ndim == len(shape):
        other = [d for i, d in enumerate(reuse.shape) if i != axis] == [d for i, d in enumerate(shape) if i != axis]
        if other and reuse.shape[axis] >= shape[axis]:
            return reuse[(slice(None),) * axis + (slice(0, shape[axis]),)]
    return np.empty(shape, dtype)


def _gather_codes(
    name: str, a: np.ndarray, scale: np.ndarray, rows: np.ndarray, order: np.ndarray, out: Features, layers_first: bool
) -> Features:
    """The int8 rows and scales of `name` as they are cached, codes [B, L, ...] or [L, B, ...]."""
    b = len(rows)
    shape = (a.shape[1], b, *a.shape[2:]) if layers_first else (b, *a.shape[1:])
    codes = _reusable(out.get(name), shape, np.dtype(np.int8), int(layers_first))
    scales = _reusable(out.get(name + SCALE_SUFFIX), (b, *scale.shape[1:]), np.dtype(np.float32), 0)
    for i in order:
        if layers_first:
            codes[:, i] = a[rows[i]]
        else:
            codes[i] = a[rows[i]]
        scales[i] = scale[rows[i]]
        _drop_row_pages(a, int(rows[i]))
    drop_mapped_pages({name: a, "scale": scale})
    return {name: codes, name + SCALE_SUFFIX: scales}


def _dequantize(q: np.ndarray, scale: np.ndarray, dst: np.ndarray) -> None:
    if dst.dtype == np.float32:
        dequantize_into(q, scale, dst)
    else:  # a step graph taking fp16 (bundles exported before 2026-11-30)
        dst[...] = q.astype(np.float32) * scale


def _run_backbone(
    backbone: FrozenBackbone, paths: Sequence[Path], batch_size: int, manifest: Manifest
) -> Iterator[tuple[int, Features]]:
    a = manifest.spec.arch
    start = 0
    for pixels, _ in iter_batches([(p, 0) for p in paths], batch_size, a.image_size, manifest.mean, manifest.std):
        yield start, backbone(pixels)
        start += len(pixels)


def build_ram_store(
    backbone: FrozenBackbone,
    paths: Sequence[Path],
    manifest: Manifest,
    batch_size: int,
    progress: Callable[[int], None],
    kv_dtype: str = "fp16",
) -> FeatureStore:
    n = len(paths)
    specs = cache_specs(manifest.spec.frozen_output_specs, kv_dtype)
    arrays = {name: np.empty((n, *shape), dtype) for name, (shape, dtype) in specs.items()}
    for start, feats in _run_backbone(backbone, paths, batch_size, manifest):
        for name, value in encode(feats, kv_dtype).items():
            arrays[name][start : start + len(value)] = value
        progress(len(next(iter(feats.values()))))
    return FeatureStore(arrays)


class DiskCache:
    """fp16 (or int8 + scales) K/V rows in growable raw files under `folder`, indexed by image sha256.

    `index.json` is rewritten (temp + rename) only after the rows it names are flushed, so a process
    killed mid-way leaves a cache that is consistent: rows it had not indexed are recomputed.
    """

    def __init__(self, folder: Path, manifest: Manifest, kv_dtype: str = "fp16") -> None:
        self.folder, self.kv_dtype = folder, kv_dtype
        self.specs = cache_specs(manifest.spec.frozen_output_specs, kv_dtype)  # per-image shape, cache dtype
        folder.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, int] = self._read_index()

    def _read_index(self) -> dict[str, int]:
        """The cached rows, or none when index.json is absent, damaged, or names rows that the
        array files do not hold (a cache is never trusted blindly; its rows are recomputed)."""
        path = self.folder / "index.json"
        if not path.exists():
            return {}
        try:
            rows = json.loads(path.read_text())["rows"]
            if not isinstance(rows, dict) or not all(type(r) is int for r in rows.values()):
                raise ValueError("rows must map image hashes to row numbers")
            n = len(rows)
            if sorted(rows.values()) != list(range(n)):
                raise ValueError("row numbers are not 0..n-1")
            for name, (shape, dtype) in self.specs.items():
                if self._path(name, dtype).stat().st_size < n * int(np.prod(shape)) * np.dtype(dtype).itemsize:
                    raise ValueError(f"{self._path(name, dtype).name} is shorter than its {n} rows")
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            log.warning("ignoring the damaged K/V cache in %s (%s); it will be recomputed", self.folder, e)
            return {}
        return rows

    def _path(self, name: str, dtype: np.typing.DTypeLike) -> Path:
        return self.folder / f"{name}.{np.dtype(dtype).name}"

    @classmethod
    def for_bundle(cls, run: Path, manifest: Manifest, kv_dtype: str = "fp16") -> DiskCache:
        key = manifest.files[mf.FROZEN] + "-" + ",".join(manifest.spec.frozen_outputs)
        key += "" if kv_dtype == "fp16" else f"-{kv_dtype}"  # fp16 keeps the key caches had before int8 existed
        return cls(run / "kv_cache" / hashlib.sha256(key.encode()).hexdigest()[:16], manifest, kv_dtype)

    def _arrays(self, rows: int, mode: str) -> Features:
        out = {}
        for name, (shape, dtype) in self.specs.items():
            path = self._path(name, dtype)
            need = rows * int(np.prod(shape)) * np.dtype(dtype).itemsize
            if mode == "r+":
                with open(path, "ab") as f:
                    if f.tell() < need:
                        _reserve(f, need)
            if rows:  # numpy's stubs take the mode as a Literal, not the str this function passes on
                out[name] = np.memmap(path, dtype=dtype, mode=mode, shape=(rows, *shape))  # type: ignore[call-overload]
            else:
                out[name] = np.empty((0, *shape), dtype)
        return out

    def missing(self, hashes: Sequence[str]) -> int:
        """How many distinct images `fill` would have to run through the backbone."""
        return len(set(hashes) - set(self.index))

    def fill(
        self,
        backbone_factory: Callable[[], FrozenBackbone],
        paths: Sequence[Path],
        hashes: Sequence[str],
        manifest: Manifest,
        batch_size: int,
        progress: Callable[[int], None],
    ) -> None:
        """Compute the rows of images not cached yet (`hashes[i]` is the sha256 of `paths[i]`).

        `progress(n)` is told about every image computed (cached ones are not counted)."""
        first_path: dict[str, Path] = {}
        for h, p in zip(hashes, paths):
            first_path.setdefault(h, p)
        todo_unique = [h for h in first_path if h not in self.index]
        if todo_unique:
            todo_paths = [first_path[h] for h in todo_unique]
            rows0 = len(self.index)
            sizes = {name: self._size(self._path(name, dtype)) for name, (_, dtype) in self.specs.items()}
            try:
                arrays = self._arrays(rows0 + len(todo_paths), "r+")
                backbone = backbone_factory()
                for start, feats in _run_backbone(backbone, todo_paths, batch_size, manifest):
                    for name, value in encode(feats, self.kv_dtype).items():
                        arrays[name][rows0 + start : rows0 + start + len(value)] = value
                    drop_mapped_pages(arrays)
                    progress(len(value))
                backbone.close()
                for arr in arrays.values():
                    if isinstance(arr, np.memmap):
                        arr.flush()
                del arrays
                self.index.update({h: rows0 + j for j, h in enumerate(todo_unique)})
                atomic_write_text(self.folder / "index.json", json.dumps({"rows": self.index}))
            except OSError as e:
                if e.errno in DISK_FULL:
                    arrays = None  # unmap before shrinking the files back
                    self._shrink(sizes)
                    raise UserError(
                        f"disk full while writing the K/V cache in {self.folder} ({os.strerror(e.errno)}); "
                        "the cache was rolled back and nothing else was changed. Free space and run again "
                        "with --resume, or use --kv ram or --kv stream."
                    ) from None
                raise

    @staticmethod
    def _size(path: Path) -> int:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return 0

    def _shrink(self, sizes: dict[str, int]) -> None:
        """Give back the space a failed fill reserved (the index never named those rows)."""
        for name, (_, dtype) in self.specs.items():
            try:
                os.truncate(self._path(name, dtype), sizes[name])
            except OSError:
                pass

    def store(self, hashes: Sequence[str]) -> FeatureStore:
        """A store over the cached rows of these images (memory-mapped, read-only)."""
        rows = np.array([self.index[h] for h in hashes], dtype=np.int64)
        return _RowMapped(self._arrays(len(self.index), "r"), rows)


def _reserve(f, size: int) -> None:
    """Grow the open file `f` to `size` bytes with its blocks allocated now.

    A memory-mapped write into a sparse region (what `truncate` makes) that finds the disk full
    does not raise: the kernel kills the process with SIGBUS, losing the run without a word.
    Allocating up front turns a full disk into an OSError (ENOSPC) here, where it can be reported.
    """
    start = f.tell()
    try:
        os.posix_fallocate(f.fileno(), start, size - start)
        return
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
    except AttributeError:  # no posix_fallocate on this platform
        pass
    chunk = b"\0" * (1 << 20)  # the file system cannot allocate: write the zeros ourselves
    f.seek(start)
    while f.tell() < size:
        f.write(chunk[: size - f.tell()])
    f.flush()


def drop_mapped_pages(arrays: Features) -> None:
    """Unmap the pages of memory-mapped cache files that this process touched. Touched pages of a
    mapping count in the process's resident memory (VmHWM) until unmapped, so filling or reading
    the disk cache would otherwise cost as much memory as the RAM cache; once dropped they are the
    kernel's page cache (written pages of a shared mapping are kept there and written back)."""
    for array in arrays.values():
        mapped = getattr(array, "_mmap", None)
        if mapped is not None:
            mapped.madvise(mmap.MADV_DONTNEED)


def _drop_row_pages(array: np.ndarray, row: int) -> None:
    """`drop_mapped_pages` for one row of a memory-mapped array (a no-op for an in-memory one).
    The range is widened to whole pages; a neighbouring row that loses a page reads it back from
    the page cache."""
    mapped = getattr(array, "_mmap", None)
    if mapped is None:
        return
    start = row * array.strides[0]
    aligned = start - start % mmap.PAGESIZE
    mapped.madvise(mmap.MADV_DONTNEED, aligned, start + array.strides[0] - aligned)


class _RowMapped(FeatureStore):
    """A store whose sample i lives at cache row `rows[i]`."""

    def __init__(self, arrays: Features, rows: np.ndarray) -> None:
        super().__init__(arrays)
        self.rows = rows

    def gather(
        self,
        rows: np.ndarray,
        dtypes: dict[str, np.dtype] | None = None,
        out: Features | None = None,
        layer_major: frozenset[str] = frozenset(),
    ) -> Features:
        return super().gather(self.rows[rows], dtypes, out, layer_major)
