"""Seeded splits of one labelled data set over N simulated clients (`fleet simulate --split`).

iid: a random permutation cut in N near-equal parts. dirichlet:ALPHA: for every class, the
proportions of its images per client are drawn from Dirichlet(ALPHA) (Hsu et al. 2019; small ALPHA:
each client sees few classes). classes:K: each client holds K classes, the classes dealt round-robin
after a seeded shuffle, each class's images shared equally among the clients holding it (McMahan et
al. 2017's pathological split). The same (labels, N, split, seed) always gives the same shards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vqt_edge.errors import UserError

MAX_DRAWS = 1000  # dirichlet: redraw until no client is empty


@dataclass(frozen=True)
class Split:
    kind: str  # "iid", "dirichlet" or "classes"
    alpha: float = 0.0
    k: int = 0

    def __str__(self) -> str:
        return {"iid": "iid", "dirichlet": f"dirichlet:{self.alpha:g}", "classes": f"classes:{self.k}"}[self.kind]


def parse_split(text: str) -> Split:
    """'iid', 'dirichlet:ALPHA' (ALPHA > 0) or 'classes:K' (K >= 1); anything else is a UserError."""
    kind, _, arg = text.partition(":")
    try:
        if kind == "iid" and not arg:
            return Split("iid")
        if kind == "dirichlet" and float(arg) > 0 and np.isfinite(float(arg)):
            return Split("dirichlet", alpha=float(arg))
        if kind == "classes" and int(arg) >= 1:
            return Split("classes", k=int(arg))
    except ValueError:
        pass
    raise UserError(f"--split {text!r}: expected iid, dirichlet:ALPHA (ALPHA > 0) or classes:K (K >= 1)")


def assign(labels: np.ndarray, clients: int, split: Split, seed: int) -> list[np.ndarray]:
    """Indices into `labels` for each client (sorted); every image goes to exactly one client and
    every client gets at least one image."""
    labels = np.asarray(labels)
    n, classes = len(labels), int(labels.max()) + 1 if len(labels) else 0
    if not 1 <= clients <= n:
        raise UserError(f"--clients {clients}: must be between 1 and the number of images ({n})")
    rng = np.random.default_rng([seed, 0xF1EE7])
    if split.kind == "iid":
        parts = np.array_split(rng.permutation(n), clients)
    elif split.kind == "classes":
        parts = _by_classes(labels, classes, clients, split.k, rng)
    else:
        parts = _dirichlet(labels, classes, clients, split.alpha, rng)
    return [np.sort(p).astype(np.int64) for p in parts]


def _dirichlet(
    labels: np.ndarray, classes: int, clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    for _ in range(MAX_DRAWS):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in range(classes):
            members = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(clients, alpha)))[:-1] * len(members)).astype(int)
            for i, chunk in enumerate(np.split(members, cuts)):
                parts[i] += chunk.tolist()
        if all(parts):
            return [np.array(p) for p in parts]
    raise UserError(
        f"dirichlet:{alpha:g}: {MAX_DRAWS} draws all left a client without images; "
        "use fewer --clients or a larger ALPHA"
    )


def _by_classes(labels: np.ndarray, classes: int, clients: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    if k > classes:
        raise UserError(f"--split classes:{k}: the data has only {classes} classes")
    if clients * k < classes:
        raise UserError(
            f"--split classes:{k}: {clients} clients x {k} classes cannot cover the data's {classes} classes"
        )
    order = rng.permutation(classes)
    held = [[int(order[(i * k + j) % classes]) for j in range(k)] for i in range(clients)]
    parts: list[list[int]] = [[] for _ in range(clients)]
    for c in range(classes):
        holders = [i for i in range(clients) if c in held[i]]
        for holder, chunk in zip(holders, np.array_split(rng.permutation(np.flatnonzero(labels == c)), len(holders))):
            parts[holder] += chunk.tolist()
    if not all(parts):
        raise UserError(
            f"--split classes:{k}: some client got no images (too few images per class for {clients} clients)"
        )
    return [np.array(p) for p in parts]
