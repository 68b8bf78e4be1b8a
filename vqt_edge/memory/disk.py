"""Disk, planned like memory: what a run writes into its folder, and the choice of K/V mode and cache
dtype that fits both a memory budget and a disk budget (docs/kv-cache.md).

A run folder holds, at its largest: the K/V disk cache (`--kv disk`: one row per distinct image,
fp16 or int8 + scales, device_runner/kv_int8.py), two copies of the checkpoint (the new one is
written next to the old before the rename), and the outputs (model.onnx: the frozen graph plus the
head's unshared part, the adapter). `--disk-budget` defaults to the free space of the run folder's
file system minus a margin (DISK_MARGIN_MB, at most DISK_MARGIN_SHARE of it), so a run that would
fill the disk is refused before the frozen pass instead of failing after it.

The candidates, in order: every cached mode of the preferred dtype (RAM before disk), then of the
other dtype, then streaming. Without --kv-dtype the preferred dtype is DEFAULT_KV_DTYPE (int8,
vqt_edge/kv_cache.py); an explicit --kv / --kv-dtype is kept (and must fit).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

from vqt_edge.errors import UserError
from vqt_edge.kv_cache import DEFAULT_KV_DTYPE, KV_DTYPES
from vqt_edge.memory.measure import MiB
from vqt_edge.memory.model import BundleFootprint, Plan, frozen_batch, predict_peak
from vqt_edge.memory.planner import AVAILABLE_SHARE, NoPlan, choose
from vqt_edge.spec import CACHED_KV_MODES, KV_MODES

DISK_MARGIN_MB, DISK_MARGIN_SHARE = 512.0, 0.05
"""Left free on the run folder's file system by the default --disk-budget (logs, other processes):
512 MiB, or 5% of a smaller file system."""
RUN_FILES_MB = 1.0
"""run.json, metrics, summary, the cache index and the lock, each at least one file-system block."""


def footprint(fp: BundleFootprint, kv_dtype: str) -> BundleFootprint:
    """The footprint with the cache rows of this dtype; an int8 cache is fed as it is to a bundle's
    int8-fed step graph where it has one (`int8_feed`), else as the same fp32 feed."""
    if kv_dtype == "fp16":
        return fp
    return dataclasses.replace(fp, cache_per_sample=fp.cache_int8_per_sample, int8_feed=fp.step_int8_bytes > 0)


def disk_mb(fp: BundleFootprint, *, images: int, kv: str, backend: str) -> dict[str, float]:
    """Predicted bytes (MiB) a run writes into its folder, by part. `fp` carries the cache dtype's rows."""
    ckpt = fp.ckpt_bytes + 2 * fp.trainable_bytes if backend == "ort-training" else 3 * fp.trainable_bytes
    return {
        "kv_cache": images * fp.cache_per_sample / MiB if kv == "disk" else 0.0,
        "checkpoints": 2 * ckpt / MiB,
        "outputs": ((fp.model_bytes or fp.frozen_bytes + fp.head_bytes) + 2 * fp.trainable_bytes) / MiB,
        "run_files": RUN_FILES_MB,
    }


def disk_usage_mb(run: Path) -> tuple[float, float] | None:
    """(size, free space) in MiB of the file system that holds (or will hold) `run`; None if unknown."""
    path = Path(run).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return None
    return usage.total / MiB, usage.free / MiB


def used_mb(folder: Path) -> float:
    """Disk blocks (MiB) the files under `folder` take, as `du` counts them."""
    total = 0
    for path in Path(folder).rglob("*") if Path(folder).is_dir() else []:
        try:
            total += path.lstat().st_blocks * 512
        except OSError:
            pass
    return total / MiB


def default_disk_budget(run: Path) -> float | None:
    """The space this run may use: free space plus what the run folder already holds (a resumed run's
    cache and checkpoints), minus the margin."""
    usage = disk_usage_mb(run)
    if usage is None:
        return None
    total, free = usage
    return max(0.0, free + used_mb(run) - min(DISK_MARGIN_MB, DISK_MARGIN_SHARE * total))


@dataclass
class RunPlan:
    """A memory plan with its cache dtype and predicted disk use."""

    plan: Plan
    kv_dtype: str
    disk: dict[str, float]
    disk_budget_mb: float | None

    @property
    def disk_total_mb(self) -> float:
        return math.ceil(100 * sum(self.disk.values())) / 100

    def to_dict(self) -> dict:
        return {
            "kv_dtype": self.kv_dtype,
            "disk_mb": {k: round(v, 1) for k, v in self.disk.items()},
            "disk_total_mb": self.disk_total_mb,
            "disk_budget_mb": None if self.disk_budget_mb is None else round(self.disk_budget_mb),
        }

    def describe_disk(self) -> str:
        parts = ", ".join(f"{k} {v:.0f}" for k, v in self.disk.items())
        budget = "" if self.disk_budget_mb is None else f" of a {self.disk_budget_mb:.0f} MiB disk budget"
        return f"disk {self.disk_total_mb:.0f} MiB ({parts}){budget}"


def plan_run(
    fp: BundleFootprint,
    *,
    images: int,
    cache_images: int | None = None,
    batch_size: int,
    micro_batch: int | None,
    kv: str,
    kv_dtype: str,
    memory_budget: float | None,
    available: float | None,
    disk_budget: float | None,
    test: bool,
    backends: tuple[str, ...],
) -> RunPlan:
    """The first candidate (module docstring) that fits both budgets. Memory as vqt_edge/memory.py plans
    it: under `memory_budget` (choose, NoPlan when nothing fits), else against AVAILABLE_SHARE of
    `available` for kv "auto" (no refusal: the leanest plan), else the given kv's prediction.
    `cache_images`: distinct images the disk cache holds (default `images`). Raises UserError (exit 2)
    naming what would fit when no candidate fits the disk budget (and the memory budget)."""
    dtypes = [kv_dtype] if kv_dtype != "auto" else [DEFAULT_KV_DTYPE] + [d for d in KV_DTYPES if d != DEFAULT_KV_DTYPE]
    kvs = [kv] if kv != "auto" else list(KV_MODES)
    candidates = [(k, d) for d in dtypes for k in kvs if k in CACHED_KV_MODES]
    candidates += [(k, dtypes[0]) for k in kvs if k not in CACHED_KV_MODES]
    micro = micro_batch or batch_size
    seen: list[RunPlan] = []
    memory_failures: list[tuple[NoPlan, str]] = []
    for k, d in candidates:
        fpd = footprint(fp, d)
        try:
            if memory_budget is not None:
                plan = choose(
                    fpd,
                    memory_budget,
                    images=images,
                    batch_size=batch_size,
                    kv=k,
                    micro_batch=micro_batch,
                    test=test,
                    backends=backends,
                )
            elif kv == "auto" and available is not None:
                plan = choose(
                    fpd,
                    AVAILABLE_SHARE * available,
                    images=images,
                    batch_size=batch_size,
                    kv=k,
                    micro_batch=micro,
                    test=test,
                    backends=backends[:1],
                    smaller_frozen_batches=False,
                )
            else:
                plan = predict_peak(
                    fpd,
                    images=images,
                    batch_size=batch_size,
                    micro_batch=micro,
                    kv=k,
                    backend=backends[0],
                    test_batch=frozen_batch(batch_size, micro) if test else None,
                )
        except NoPlan as e:
            memory_failures.append((e, d))
            continue
        run = RunPlan(plan, d, disk_mb(fpd, images=cache_images or images, kv=k, backend=plan.backend), disk_budget)
        if disk_budget is None or run.disk_total_mb <= disk_budget:
            return run
        seen.append(run)
    if memory_budget is None and kv == "auto" and available is not None and not seen:
        # nothing fits the available memory (and the disk did not refuse): the leanest, as default_kv does
        leanest, d = min(memory_failures, key=lambda f: f[0].best.peak_mb)
        best = leanest.best
        return RunPlan(
            best,
            d,
            disk_mb(footprint(fp, d), images=cache_images or images, kv=best.kv, backend=best.backend),
            disk_budget,
        )
    if not seen and memory_failures:  # the memory budget alone refuses: as memory.choose does, the smallest that fits
        smallest, d = min(memory_failures, key=lambda f: f[0].needs_mb)
        fixed = (
            " with " + ", ".join(f"--{n} {v}" for n, v in (("kv", kv), ("kv-dtype", kv_dtype)) if v != "auto")
            if (kv, kv_dtype) != ("auto", "auto")
            else ""
        )
        raise NoPlan(
            f"no configuration fits a memory budget of {memory_budget:.0f} MiB{fixed}; the smallest budget that "
            f"fits is {smallest.needs_mb:.0f} MiB ({smallest.best.describe()}, --kv-dtype {d})",
            smallest.needs_mb,
            smallest.best,
        )
    raise UserError(_refusal(seen, memory_failures, memory_budget, disk_budget))


def _refusal(
    seen: list[RunPlan],
    memory_failures: list[tuple[NoPlan, str]],
    memory_budget: float | None,
    disk_budget: float | None,
) -> str:
    budgets = " and ".join(
        b
        for b in (
            f"a memory budget of {memory_budget:.0f} MiB" if memory_budget is not None else "",
            f"a disk budget of {disk_budget:.0f} MiB" if disk_budget is not None else "",
        )
        if b
    )
    lines = [f"no configuration fits {budgets}."]
    if seen:
        leanest = min(seen, key=lambda r: r.disk_total_mb)
        lines.append(
            f"Within the memory budget, the least disk is --kv {leanest.plan.kv} --kv-dtype {leanest.kv_dtype}: "
            f"{leanest.describe_disk()}; free space or pass --disk-budget {leanest.disk_total_mb:.0f}MB or more."
        )
    if memory_failures:
        best, d = min(memory_failures, key=lambda f: f[0].needs_mb)
        lines.append(f"The least memory is {best.needs_mb:.0f} MiB ({best.best.describe()}, --kv-dtype {d}).")
    return " ".join(lines)
