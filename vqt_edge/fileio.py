"""Writing files so that a crash at any instant leaves either the old file or the new one."""

from __future__ import annotations

import errno
import os
from pathlib import Path

#: errno values that mean "no room for this write": a full disk, a full quota, or a file-size limit
#: (RLIMIT_FSIZE, with SIGXFSZ ignored). All are reported as a full disk, not as a crash.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file beside `path`, fsync it, then rename over `path` (atomic on POSIX)."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """`atomic_write_text` for bytes (a checkpoint serialized in memory)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a partial file would keep a full disk full
        raise


def fsync_file(path: Path) -> None:
    """Flush a file written by someone else (ORT) to disk before it is renamed into place."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
