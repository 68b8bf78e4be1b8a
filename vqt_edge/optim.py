"""The one optimizer and the one learning-rate schedule of every trainer in vqt-edge.

`AdamW` is onnxruntime-training's AdamW (adam_mode=1) in its CPU kernel's float32 order, so the
portable backend follows the ort-training backend's trajectory (tests/test_portable.py). The feature
selection head (device_runner/selection.py) uses it as is; the fleet server's head refit
(vqt_edge/calibrate.py) runs it in float64. Decoupled weight decay is applied by the caller first
(`decay_factor`), as both training backends do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

BETA1, BETA2, EPS = 0.9, 0.999, 1e-6  # the ORT AdamW of the training artifacts (tests/test_export.py)


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total`."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1 + math.cos(math.pi * min(1.0, progress)))


def decay_factor(lr: float, weight_decay: float) -> np.float32:
    """The decoupled weight decay's factor on a weight, computed as both backends apply it."""
    return np.float32(1 - lr * weight_decay)


@dataclass
class AdamW:
    """Adam moments and step count of a set of named tensors; `step` updates the tensors in a dict.

    `dtype`: the arithmetic's precision (float32: bit for bit ORT's kernel; float64 for small exact fits).
    """

    exp_avg: dict[str, np.ndarray]
    exp_avg_sq: dict[str, np.ndarray]
    t: int = 0
    eps: float = EPS
    dtype: type[np.floating] = field(default=np.float32)

    @classmethod
    def zeros_like(
        cls, params: dict[str, np.ndarray], dtype: type[np.floating] = np.float32, eps: float = EPS
    ) -> AdamW:
        zeros = {n: np.zeros_like(p, dtype=dtype) for n, p in params.items()}
        return cls({n: z.copy() for n, z in zeros.items()}, zeros, 0, eps, dtype)

    def reset(self) -> None:
        """Zero moments, step 0 (a fleet client that does not carry its optimizer across rounds)."""
        self.exp_avg = {n: np.zeros_like(m) for n, m in self.exp_avg.items()}
        self.exp_avg_sq = {n: np.zeros_like(v) for n, v in self.exp_avg_sq.items()}
        self.t = 0

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray], lr: float) -> None:
        """One update of every tensor in `grads`; `params[name]` is replaced by the new array."""
        dt = self.dtype
        t = self.t + 1  # ORT passes step + 1: the bias correction's power starts at 1
        b1, b2, one = dt(BETA1), dt(BETA2), dt(1)
        alpha_correction = one - dt(float(b1) ** t)  # std::pow(float, int64) is a double
        beta_correction = one - dt(float(b2) ** t)
        lr_corrected = dt(lr) * (np.sqrt(beta_correction) / alpha_correction)
        eps = dt(self.eps)
        for n, g in grads.items():
            m = b1 * self.exp_avg[n] + (one - b1) * g
            v = b2 * self.exp_avg_sq[n] + (one - b2) * g * g
            params[n] = params[n] - lr_corrected * m / (np.sqrt(v) + eps)
            self.exp_avg[n], self.exp_avg_sq[n] = m, v
        self.t = t
