"""Memory as measured, not guessed: the peak of this process, the memory available, and the glibc
settings without which freed phases do not give memory back (docs/design.md section 6)."""

from __future__ import annotations

import os
import re
import resource
import sys
from pathlib import Path

from vqt_edge.errors import UserError

MiB = 2**20
_UNITS = {
    "": 1,
    "B": 1,
    "K": 2**10,
    "KB": 2**10,
    "KIB": 2**10,
    "M": 2**20,
    "MB": 2**20,
    "MIB": 2**20,
    "G": 2**30,
    "GB": 2**30,
    "GIB": 2**30,
}


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def parse_size_mb(text: str) -> float:
    """'600MB', '1.5GB', '800' (MiB) -> MiB. Binary units: a budget is compared with VmHWM."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text or "")
    if not m or m.group(2).upper() not in _UNITS:
        raise UserError(f"cannot read memory size {text!r}; write e.g. 600MB or 1.5GB")
    unit = m.group(2).upper() or "MB"
    return float(m.group(1)) * _UNITS[unit] / 2**20


AVAILABLE_ENV = "VQT_EDGE_MEM_AVAILABLE"
"""Overrides the available memory `train` plans its defaults against, e.g. 1.5GB: for a device
whose /proc/meminfo does not describe the memory the run may use, and for tests."""


def available_mb(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> float | None:
    """Memory a new process can use without swapping, in MiB: $VQT_EDGE_MEM_AVAILABLE if set, else
    MemAvailable (the kernel's estimate, page cache it can drop included), lowered to what the
    cgroup v2 limit leaves (memory.max - memory.current) inside a limited container. None where
    neither can be read (not Linux)."""
    if os.environ.get(AVAILABLE_ENV):
        return parse_size_mb(os.environ[AVAILABLE_ENV])
    found = meminfo_available_mb(meminfo)
    limited = cgroup_memory_mb(cgroup)
    if limited is not None:
        left = limited[0] - limited[1]
        found = left if found is None else min(found, left)
    return found


def meminfo_available_mb(meminfo: Path = Path("/proc/meminfo")) -> float | None:
    """MemAvailable in MiB; None where /proc/meminfo cannot be read."""
    found = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return found


def cgroup_memory_mb(cgroup: Path = Path("/sys/fs/cgroup")) -> tuple[float, float] | None:
    """(memory.max, memory.current) of this cgroup v2 in MiB; None without a limit or a cgroup v2."""
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            return int(limit) / MiB, int((cgroup / "memory.current").read_text()) / MiB
    except (OSError, ValueError):
        pass
    return None


#: glibc's M_MMAP_THRESHOLD (mallopt parameter number) and the value the device commands set.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 * 1024


def lean_malloc() -> bool:
    """Make freed memory go back to the OS (glibc only; a no-op elsewhere). Returns whether it did.

    glibc raises its mmap threshold every time a large block is freed (up to 32 MiB), so after the
    first frozen tensors are freed, later large blocks come from the heap and are never returned:
    measured here on ViT-B/16, an InferenceSession of the 327 MiB frozen graph then took 546 MiB
    instead of 337 MiB, a batch of 8 needed 385 MiB of activations instead of 195 MiB, and closing
    the session gave back nothing (811 MiB stayed resident), which defeats running the frozen pass
    and the training pass in phases. A fixed threshold (blocks >= 64 KiB are mmapped and unmapped
    on free) removes all three effects; every constant below was measured with it set.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def trim_malloc() -> None:
    """Return free heap pages to the OS now (glibc malloc_trim; a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
