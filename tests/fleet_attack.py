"""TEST ONLY: a Flower ClientApp that misbehaves on purpose, for tests/test_fleet_security.py.

A SuperNode whose node config has `test-attack="MODE1,MODE2"` answers round r's training message with
the bad update of the r-th mode, made from the server's tensors, without training; every other node runs the real device
ClientApp (vqt_edge/fleet/client_app.py). Mode `against:F` is the attacker that passes every check
(bench/fleet_robust_flower.py): it trains like an honest device, then sends its own update reversed and
scaled to F times the server's default update bound, claiming `test-claim` images (node config). Nothing outside tests/ imports this module: the tests submit it
with `Federation.submit(..., clientapp="fleet_attack:app")` and put tests/ on the PYTHONPATH.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

ARRAYS, METRICS, NUM_EXAMPLES = "arrays", "metrics", "num-examples"
HONEST_EXAMPLES = 60

app = ClientApp()


def attack(mode: str, start: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    out, n = {k: v.copy() for k, v in start.items()}, HONEST_EXAMPLES
    first = sorted(out)[0]
    if mode == "nan":
        out[first].flat[0] = np.nan
    elif mode == "inf":
        out[first].flat[0] = np.inf
    elif mode == "shape":
        out[first] = np.concatenate([out[first], out[first][:1]])
    elif mode == "dtype":
        out = {k: v.astype(np.float64) for k, v in out.items()}
    elif mode == "scale1e6":
        out = {k: v * np.float32(1e6) for k, v in out.items()}
    elif mode == "examples":
        n = 10**9
    elif mode.startswith("flip:"):  # scaled but finite: -K times the way the round start points from zero
        k = float(mode.split(":")[1])
        out = {name: (v - k * (v - v.mean())).astype(np.float32) for name, v in out.items()}
    else:
        raise ValueError(mode)
    return out, n


def against(msg: Message, context: Context, fraction: float) -> tuple[dict[str, np.ndarray], int]:
    """The device's own round (real training, its own state), sent back reversed: the round's start
    minus its update, scaled to `fraction` of the bound the server applies (checks.update_bound) to
    the claimed images. Finite, float32, the adapter's shapes, in-bound: every check passes."""
    from vqt_edge.fleet.checks import Limits, update_bound
    from vqt_edge.fleet.client_app import train as honest

    start = {name: a.numpy() for name, a in msg.content[ARRAYS].items()}
    reply = honest(msg, context)
    trained = {name: a.numpy() for name, a in reply.content[ARRAYS].items()}
    config = msg.content["config"]
    steps = int(config.get("local-steps", 0))
    limits = Limits(
        {k: v.shape for k, v in start.items()},
        lr=float(config["lr"]),
        batch_size=int(config["batch-size"]),
        local_epochs=None if steps else int(config["local-epochs"]),
        local_steps=steps,
    )
    n = int(context.node_config.get("test-claim", int(reply.content[METRICS][NUM_EXAMPLES])))
    update = {k: trained[k].astype(np.float64) - start[k] for k in start}
    norm = np.sqrt(sum(float(np.sum(u**2)) for u in update.values()))
    scale = fraction * update_bound(limits, n) / max(norm, 1e-12)
    return {k: (start[k] - scale * update[k]).astype(np.float32) for k in start}, n


@app.train()
def train(msg: Message, context: Context) -> Message:
    modes = str(context.node_config.get("test-attack", ""))  # one mode per round: "nan,inf" = nan in round 1, ...
    if not modes:
        from vqt_edge.fleet.client_app import train as honest

        return honest(msg, context)
    start = {name: a.numpy() for name, a in msg.content[ARRAYS].items()}
    mode = modes.split(",")[int(msg.content["config"]["server-round"]) - 1]
    if mode.startswith("against:"):
        out, n = against(msg, context, float(mode.split(":")[1]))
    else:
        out, n = attack(mode, start)
    content = RecordDict(
        {
            ARRAYS: ArrayRecord({k: Array(v) for k, v in out.items()}),
            METRICS: MetricRecord(
                {NUM_EXAMPLES: n, "train_loss": 0.0, "train_acc": 0.0, "seconds": 0.0, "peak_rss_mb": 0.0}
            ),
        }
    )
    return Message(content=content, reply_to=msg)
