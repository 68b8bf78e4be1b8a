"""Memory: measured (measure.py), predicted (model.py) and planned (planner.py).

A memory budget is a promise about the peak resident memory of the whole process (docs/design.md
section 6), so the number that counts is the kernel's high-water mark, VmHWM. The model predicts the
peak of `vqt-edge train` from components measured on the reference machine; the planner chooses the
fastest configuration that fits a budget, or without one the K/V mode that fits the memory available.
"""

from vqt_edge.memory.measure import (
    AVAILABLE_ENV,
    MiB,
    available_mb,
    lean_malloc,
    parse_size_mb,
    peak_rss_mb,
    trim_malloc,
)
from vqt_edge.memory.model import FROZEN_BATCH_MAX, MARGIN, BundleFootprint, Plan, frozen_batch, predict_peak
from vqt_edge.memory.planner import AVAILABLE_SHARE, NoPlan, choose, default_kv, micro_batches

__all__ = [
    "AVAILABLE_ENV",
    "AVAILABLE_SHARE",
    "FROZEN_BATCH_MAX",
    "MARGIN",
    "BundleFootprint",
    "MiB",
    "NoPlan",
    "Plan",
    "available_mb",
    "choose",
    "default_kv",
    "frozen_batch",
    "lean_malloc",
    "micro_batches",
    "parse_size_mb",
    "peak_rss_mb",
    "predict_peak",
    "trim_malloc",
]
