"""Classifier calibration with virtual representations (CCVR, Luo et al. 2021) after the last round
(docs/design.md section 12).

Under label skew FedAvg's adapter features are fine (an iid split matches centralized training),
but the head is biased toward the classes the larger clients hold. After the last round each client
runs its images through the final global adapter once and sends, per class, its image count, the
mean of the head's input features and their second moment (full covariance or only the variances).
Images and features never leave the device; only these statistics do. The server pools them into
one Gaussian per class, draws the same number of virtual features from every class (seeded numpy)
and refits the linear head on them by softmax regression, starting from the aggregated head.

Torch-free numpy; the client's half (`feature_stats`) lives in vqt_edge/fleet/client_app.py.
"""

from __future__ import annotations

import numpy as np

from vqt_edge.optim import AdamW

COUNT, MEAN, COV, VAR = "calib.count", "calib.mean", "calib.cov", "calib.var"  # the statistics' names in a message
VIRTUAL_PER_CLASS = 2000  # virtual features drawn per class
STEPS, LR = 300, 1e-2  # full-batch Adam on the virtual features
EPS = 1e-8


def class_stats(x: np.ndarray, y: np.ndarray, classes: int, diagonal: bool) -> dict[str, np.ndarray]:
    """One client's statistics: count [C], mean [C, F], and cov [C, F(F+1)/2] (population covariance's
    upper triangle, row by row: it is symmetric, so half travels) or var [C, F]. A class the client
    lacks has count 0 and zero moments."""
    f = x.shape[1]
    count = np.bincount(y, minlength=classes).astype(np.float32)
    mean = np.zeros((classes, f), np.float32)
    second = np.zeros((classes, f) if diagonal else (classes, f, f), np.float32)
    for c in range(classes):
        xc = x[y == c].astype(np.float64)
        if not len(xc):
            continue
        mean[c] = xc.mean(0)
        d = xc - xc.mean(0)
        second[c] = (d * d).mean(0) if diagonal else d.T @ d / len(xc)
    if not diagonal:
        second = second[(slice(None), *np.triu_indices(f))]  # Python 3.10 has no star in an index
    return {COUNT: count, MEAN: mean, (VAR if diagonal else COV): second}


def unpack(packed: np.ndarray, f: int) -> np.ndarray:
    """[C, F(F+1)/2] upper triangles -> [C, F, F] symmetric matrices."""
    full = np.zeros((len(packed), f, f), np.float64)
    rows, cols = np.triu_indices(f)
    full[:, rows, cols] = packed
    full[:, cols, rows] = packed
    return full


def pool(stats: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fleet's per-class (count, mean, covariance or variance), exactly as from all images at once:
    E[x x^T] pooled over clients, minus the pooled mean's outer product."""
    diagonal = VAR in stats[0]
    count = np.sum([s[COUNT].astype(np.float64) for s in stats], axis=0)
    safe = np.maximum(count, 1)
    mean = sum(s[COUNT][:, None] * s[MEAN].astype(np.float64) for s in stats) / safe[:, None]
    if diagonal:
        raw = sum(s[COUNT][:, None] * (s[VAR] + s[MEAN] ** 2).astype(np.float64) for s in stats) / safe[:, None]
        cov = raw - mean**2
    else:
        f = stats[0][MEAN].shape[1]
        raw = (
            sum(
                s[COUNT][:, None, None] * (unpack(s[COV], f) + s[MEAN][:, :, None] * s[MEAN][:, None, :]) for s in stats
            )
            / safe[:, None, None]
        )
        cov = raw - mean[:, :, None] * mean[:, None, :]
    return count, mean, cov


def virtual_features(
    count: np.ndarray, mean: np.ndarray, cov: np.ndarray, per_class: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """`per_class` draws from N(mean_c, cov_c) for every class some client holds (seeded)."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in np.flatnonzero(count > 0):
        z = rng.standard_normal((per_class, mean.shape[1]))
        if cov.ndim == 2:  # diagonal
            xs.append(mean[c] + z * np.sqrt(np.maximum(cov[c], 0)))
        else:  # a symmetric square root: works for the rank-deficient covariance of a few images
            vals, vecs = np.linalg.eigh(cov[c])
            xs.append(mean[c] + (z * np.sqrt(np.maximum(vals, 0))) @ vecs.T)
        ys.append(np.full(per_class, c))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def refit_head(
    x: np.ndarray, y: np.ndarray, weight: np.ndarray, bias: np.ndarray, steps: int = STEPS, lr: float = LR
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax regression on (x, y) by full-batch Adam, starting from the aggregated head (W [C, F], b [C])."""
    params = {"w": weight.astype(np.float64), "b": bias.astype(np.float64)}
    adam = AdamW.zeros_like(params, dtype=np.float64, eps=EPS)
    x64 = x.astype(np.float64)
    for _ in range(steps):
        logits = x64 @ params["w"].T + params["b"]
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        p[np.arange(len(y)), y] -= 1
        p /= len(y)
        adam.step(params, {"w": p.T @ x64, "b": p.sum(0)}, lr)
    w, b = params["w"], params["b"]
    return w.astype(np.float32), b.astype(np.float32)


def calibrate_head(
    tensors: dict[str, np.ndarray], stats: list[dict[str, np.ndarray]], seed: int, per_class: int = VIRTUAL_PER_CLASS
) -> dict[str, np.ndarray]:
    """The aggregated tensors with head.weight/head.bias refitted on virtual features from the
    clients' pooled per-class Gaussians; every other tensor as it was."""
    count, mean, cov = pool(stats)
    x, y = virtual_features(count, mean, cov, per_class, seed)
    w, b = refit_head(x, y, tensors["head.weight"], tensors["head.bias"])
    return {**tensors, "head.weight": w, "head.bias": b}


def stats_bytes(stats: dict[str, np.ndarray]) -> int:
    """Bytes of one client's statistics as they travel (float32 arrays, without framing)."""
    return sum(int(np.asarray(v).nbytes) for v in stats.values())
