"""The planner: the fastest configuration whose predicted peak fits a memory budget (`vqt-edge plan`,
`train --memory-budget`), and without a budget the K/V mode that fits the memory available."""

from __future__ import annotations

from vqt_edge.errors import UserError
from vqt_edge.memory.model import DEFAULT_BACKEND, BundleFootprint, Plan, frozen_batch, predict_peak
from vqt_edge.spec import KV_MODES


def micro_batches(batch_size: int) -> list[int]:
    """Candidate micro-batches, largest first: the batch, then halving down to 1."""
    out, m = [], batch_size
    while m > 1:
        out.append(m)
        m = -(-m // 2)
    return out + [1]


class NoPlan(UserError):
    """No configuration fits the budget; `needs_mb` is the smallest budget one would fit."""

    def __init__(self, message: str, needs_mb: float, best: Plan) -> None:
        super().__init__(message)
        self.needs_mb, self.best = needs_mb, best


def choose(
    fp: BundleFootprint,
    budget_mb: float,
    *,
    images: int,
    batch_size: int,
    kv: str | None = None,
    micro_batch: int | None = None,
    test: bool = False,
    backends: tuple[str, ...] = (DEFAULT_BACKEND,),
    smaller_frozen_batches: bool = True,
) -> Plan:
    """The fastest configuration whose predicted peak fits `budget_mb`: the backends in the order
    given (the caller's preference among those that can run here: another one only where none of
    the first one's configurations fits), then K/V in RAM before disk before streaming, then the
    largest micro-batch, then the largest frozen-pass batch (at most the micro-batch;
    docs/design.md section 6). A test set is evaluated at the frozen-pass batch.
    `kv` / `micro_batch` given by the user are kept (and must fit); without
    `smaller_frozen_batches`, the frozen pass keeps frozen_batch(). Raises NoPlan (a UserError,
    exit 2) naming the smallest budget that would fit."""
    kvs = [kv] if kv else list(KV_MODES)
    micros = [micro_batch] if micro_batch else micro_batches(batch_size)
    plans = [
        predict_peak(
            fp,
            images=images,
            batch_size=batch_size,
            micro_batch=m,
            kv=k,
            backend=b,
            frozen_batch_size=f,
            test_batch=f if test else None,
        )
        for b in backends
        for k in kvs
        for m in micros
        for f in (
            micro_batches(frozen_batch(batch_size, m)) if smaller_frozen_batches else [frozen_batch(batch_size, m)]
        )
    ]
    for p in plans:
        if p.fits(budget_mb):
            return p
    best = min(plans, key=lambda p: (p.peak_mb, KV_MODES.index(p.kv), -p.micro_batch))
    fixed = (
        " with "
        + ", ".join(f for f in (f"--kv {kv}" if kv else "", f"--micro-batch {micro_batch}" if micro_batch else "") if f)
        if (kv or micro_batch)
        else ""
    )
    on = f" on the {backends[0]} backend" if len(backends) == 1 else ""
    raise NoPlan(
        f"no configuration fits a memory budget of {budget_mb:.0f} MiB{fixed}{on}; the smallest budget that "
        f"fits is {best.needs_mb:.0f} MiB ({best.describe()})",
        best.needs_mb,
        best,
    )


AVAILABLE_SHARE = 0.8  # without --memory-budget a run plans for this share of the available memory


def default_kv(
    fp: BundleFootprint,
    *,
    images: int,
    batch_size: int,
    micro_batch: int | None,
    available: float | None,
    test: bool = False,
    backend: str = DEFAULT_BACKEND,
) -> Plan:
    """Where K/V live when the user chose neither --kv nor --memory-budget (docs/design.md section
    6): the fastest mode (KV_MODES) whose predicted peak fits AVAILABLE_SHARE of `available`
    MiB, at the user's batch and micro-batch. RAM only if the cache fits; if no mode fits, the one with the smallest predicted
    peak (the run may then not fit, but it does not make things worse by caching in RAM). Unknown
    `available` (None): RAM, as before this default existed."""
    micro = micro_batch or batch_size
    if available is None:
        return predict_peak(
            fp,
            images=images,
            batch_size=batch_size,
            micro_batch=micro,
            kv="ram",
            backend=backend,
            test_batch=frozen_batch(batch_size, micro) if test else None,
        )
    try:
        return choose(
            fp,
            AVAILABLE_SHARE * available,
            images=images,
            batch_size=batch_size,
            micro_batch=micro,
            test=test,
            backends=(backend,),
            smaller_frozen_batches=False,
        )
    except NoPlan as e:
        return e.best
