"""Writing files so that a crash at any instant leaves either the old file or the new one."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: errno values that mean "no room for this write": a full disk, a full quota, or a file-size limit
#: (RLIMIT_FSIZE, with SIGXFSZ ignored). All are reported as a full disk, not as a crash.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` of `text` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through `atomic_path`."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temp path beside `path` to write (also for writers that open the file themselves: ORT, the
    streamed model.onnx); when the block ends it is fsynced and renamed over `path` (atomic on POSIX),
    and on any error removed: a partial file would keep a full disk full."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        fsync_file(tmp)  # else a power cut after the rename can leave a truncated file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_file(path: Path) -> None:
    """Flush a file written by someone else (ORT) to disk before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
