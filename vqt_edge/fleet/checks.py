"""Every client update checked before it counts, and the aggregation rule (docs/fleet-security.md).

A fleet client with a valid key can still send anything. Before aggregation the server drops every
reply that is not exactly an adapter of the bundle it federates (names, shapes, dtype float32), that
holds a non-finite value, that claims a `num_examples` that is not a positive integer <= the
server's cap (FedAvg weights by it: one client claiming 1e9 images would own the average), or whose
distance from the round's start is larger than AdamW could have moved it (`update_bound`). What is
left is aggregated by Flower's own FedAvg, FedMedian or FedTrimmedAvg (`aggregator`), in an order
fixed by the replies' contents, not by their arrival, so that equal replies give bit-equal results.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from vqt_edge.config import DEFAULT_MAX_EXAMPLES, parse_aggregation

if TYPE_CHECKING:  # flwr is imported where a round runs, not by every command that parses options
    from flwr.app import Message
    from flwr.serverapp.strategy import FedAvg

DTYPE = "float32"
#: update_bound's margin over one lr per element per step: an honest client with a single step per round
#: measured 0.99 of the bare bound (Adam's first step moves every element by lr), and a client that
#: missed a round trains two rounds' epochs in its next one.
BOUND_SLACK = 3.0


@dataclass(frozen=True)
class Limits:
    """What the server accepts from one client in one round."""

    shapes: dict[str, tuple[int, ...]]  # the adapter's trainable tensors
    max_examples: int = DEFAULT_MAX_EXAMPLES
    max_update_norm: float | None = None  # None: update_bound(...) for each reply
    lr: float = 1e-2  # peak learning rate and the round's steps: what update_bound needs
    batch_size: int = 32
    local_epochs: int | None = 1  # None: a round is local_steps steps (the fleet's default)
    local_steps: int = 0


def aggregator(text: str, **keys) -> FedAvg:
    """Flower's strategy whose `aggregate_train` combines the accepted replies."""
    from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg  # here: the CLI imports this module

    kind, beta = parse_aggregation(text)
    if kind == "median":
        return FedMedian(**keys)
    if kind == "trimmed":
        return FedTrimmedAvg(beta=beta, **keys)
    return FedAvg(**keys)


def update_bound(limits: Limits, num_examples: int) -> float:
    """The furthest honest AdamW moves the adapter in one round: about one peak lr per element per
    step (Adam's normalized step), for the round's steps, as an L2 norm over all P elements, times
    BOUND_SLACK."""
    params = sum(math.prod(s) for s in limits.shapes.values())
    if limits.local_epochs is None:
        steps = limits.local_steps  # every client the same steps, however many images it has
    else:
        steps = math.ceil(num_examples / limits.batch_size) * limits.local_epochs
    return BOUND_SLACK * limits.lr * steps * math.sqrt(params)


def check_reply(
    msg: Message, start: dict[str, np.ndarray], limits: Limits, arrays_key: str, metrics_key: str, examples_key: str
) -> tuple[str | None, float | None]:
    """(why the reply is refused, or None; its update norm when it got that far)."""
    try:
        arrays = msg.content[arrays_key]
        claimed = msg.content[metrics_key][examples_key]
    except (KeyError, TypeError) as e:
        return f"malformed reply (no {e})", None
    names = sorted(arrays.keys())
    if names != sorted(limits.shapes):
        return f"tensors {names} are not the adapter's {sorted(limits.shapes)}", None
    for name, shape in limits.shapes.items():
        array = arrays[name]
        if tuple(array.shape) != tuple(shape):
            return f"{name} has shape {list(array.shape)}, the adapter's is {list(shape)}", None
        if array.dtype != DTYPE:
            return f"{name} has dtype {array.dtype}, the adapter's is {DTYPE}", None
    if isinstance(claimed, bool) or not isinstance(claimed, int) or not 0 < claimed <= limits.max_examples:
        return f"num_examples {claimed!r} is not an integer in 1..{limits.max_examples} (--max-examples)", None
    squared = 0.0
    for name in limits.shapes:
        value = arrays[name].numpy()
        if not np.isfinite(value).all():
            return f"{name} holds {int((~np.isfinite(value)).sum())} non-finite values", None
        squared += float(np.sum((value.astype(np.float64) - start[name]) ** 2))
    norm = math.sqrt(squared)
    bound = limits.max_update_norm if limits.max_update_norm is not None else update_bound(limits, claimed)
    if not norm <= bound:
        return f"update norm {norm:.4g} exceeds {bound:.4g} (--max-update-norm)", norm
    return None, norm


def content_order(arrays) -> str:
    """A sort key from a reply's tensors (its ArrayRecord): aggregation in this order is independent of
    arrival order."""
    h = hashlib.sha256()
    for name in sorted(arrays.keys()):
        h.update(name.encode())
        h.update(bytes(arrays[name].data))
    return h.hexdigest()


def screen(
    replies: list[Message],
    start: dict[str, np.ndarray],
    limits: Limits | None,
    arrays_key: str,
    metrics_key: str,
    examples_key: str,
) -> tuple[list[Message], list[dict], dict[int, dict]]:
    """(the replies that count, in content order, error replies kept for the record; one entry per
    rejected reply: node, reason and update norm; per accepted node its update norm and the bound it
    met). Without limits nothing is refused."""
    kept, errors, rejected, accepted = [], [], [], {}
    for msg in replies:
        if msg.has_error():
            errors.append(msg)
            continue
        reason, norm = (
            check_reply(msg, start, limits, arrays_key, metrics_key, examples_key) if limits else (None, None)
        )
        if reason is None:
            kept.append(msg)
            if limits and norm is not None:
                n = msg.content[metrics_key][examples_key]
                bound = limits.max_update_norm if limits.max_update_norm is not None else update_bound(limits, int(n))
                accepted[int(msg.metadata.src_node_id)] = {"update_norm": round(norm, 6), "norm_bound": round(bound, 6)}
        else:
            rejected.append(
                {
                    "node": int(msg.metadata.src_node_id),
                    "reason": reason,
                    **({"update_norm": round(norm, 6)} if norm is not None else {}),
                }
            )
    kept.sort(key=lambda m: content_order(m.content[arrays_key]))
    return kept + errors, sorted(rejected, key=lambda r: r["node"]), accepted
