"""Robust aggregation under a scaled-but-finite attacker (docs/fleet-security.md).

N honest clients train the tiny test bundle on iid shards of the generated colour task with the
device's own round function (vqt_edge.fleet.client_app.train_round: real ONNX graphs, onnxruntime); one
more client (claiming --claim images, default 30) sends the round's start moved against the honest clients' mean update,
with a norm of 0.95 x lr x steps x sqrt(P) (the default bound without its slack): finite, well-formed
and accepted by the checks. Each round the server's own code path decides:
vqt_edge.fleet.checks.screen (the checks) then Flower's FedAvg / FedMedian / FedTrimmedAvg
(checks.aggregator). Test accuracy after the last round, per rule, with and without the attacker.
Not Flower processes: the rounds of the rules run side by side in this one process.

    python bench/fleet_robust.py [--rounds 3] [--clients 4] [--scale 0.95] [--claim 30] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import export_tiny_bundle, make_task  # noqa: E402
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict  # noqa: E402

from device_runner.deploy import build_model  # noqa: E402
from device_runner.trainer import TrainConfig  # noqa: E402
from vqt_edge import manifest as mf  # noqa: E402
from vqt_edge.fleet.checks import BOUND_SLACK, Limits, aggregator, screen, update_bound  # noqa: E402
from vqt_edge.fleet.client_app import train_round  # noqa: E402
from vqt_edge.fleet.server_app import TestSet, initial_tensors  # noqa: E402

CLASSES = ["blue", "green", "red"]
KEYS = {"arrayrecord_key": "arrays", "configrecord_key": "config", "weighted_by_key": "num-examples"}


class Reply:
    def __init__(self, tensors: dict[str, np.ndarray], n: int, node: int) -> None:
        self.content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(v) for k, v in tensors.items()}),
                "metrics": MetricRecord({"num-examples": n}),
            }
        )
        self.metadata = type("Metadata", (), {"src_node_id": node})()

    def has_error(self) -> bool:
        return False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4, help="honest clients")
    ap.add_argument(
        "--scale", type=float, default=0.95, help="the attacker's update norm, as a fraction of lr x steps x sqrt(P)"
    )
    ap.add_argument("--claim", type=int, default=30, help="num_examples the attacker claims (<= --max-examples)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/fleet_robust_claim30.json"))
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fleet_robust_"))
    bundle = export_tiny_bundle(root / "bundle")
    train, test = make_task(root / "train", 40, seed=1), make_task(root / "test", 20, seed=2)
    manifest = mf.read_manifest(bundle)
    files = sorted((c, p) for c in CLASSES for p in (train / c).iterdir())
    rng = np.random.default_rng(0)
    order = rng.permutation(len(files))
    shards = []
    for k in range(args.clients):
        path = root / f"shard_{k}.txt"
        path.write_text("".join(f"{files[i][1]},{files[i][0]}\n" for i in order[k :: args.clients]))
        shards.append(path)
    testset = TestSet(test, manifest, CLASSES, 32)
    limits = Limits({n: tuple(s) for n, s in manifest.spec.trainable_shapes.items()}, lr=1e-2, batch_size=16)
    cfg = TrainConfig(
        epochs=args.rounds,
        batch_size=16,
        lr=1e-2,
        weight_decay=1e-4,
        warmup_epochs=0.1 * args.rounds,
        seed=0,
        kv="disk",
        threads=1,
        backend="portable",
    )
    results = {}
    t0 = time.process_time()
    for attacked in (False, True):
        for rule in ("fedavg", "median", "trimmed:0.2"):
            tensors = initial_tensors(bundle, manifest)
            state = root / f"{rule}_{attacked}"
            rejected, norms = [], []
            for r in range(1, args.rounds + 1):
                replies = []
                for k in range(args.clients):
                    out, metrics = train_round(state / f"c{k}", bundle, shards[k], tensors, cfg, CLASSES, r, 1)
                    replies.append(Reply(out, metrics["num-examples"], k + 1))
                if attacked:  # against the honest mean update, at `scale` x the default bound for its claim
                    honest = {
                        n: np.mean([r.content["arrays"][n].numpy() for r in replies], 0) - v for n, v in tensors.items()
                    }
                    size = np.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in honest.values()))
                    step = args.scale * update_bound(limits, args.claim) / BOUND_SLACK / size
                    bad = {n: (v - step * honest[n]).astype(np.float32) for n, v in tensors.items()}
                    replies.append(Reply(bad, args.claim, 99))
                kept, rej, accepted = screen(replies, tensors, limits, "arrays", "metrics", "num-examples")
                rejected += rej
                norms.append({str(n): a["update_norm"] / a["norm_bound"] for n, a in accepted.items()})
                arrays, _ = aggregator(rule, **KEYS).aggregate_train(r, kept)
                tensors = {n: np.asarray(a.numpy(), np.float32) for n, a in arrays.items()}
            build_model(bundle, manifest, tensors, state / "model.onnx")
            acc = testset.accuracy(state / "model.onnx")
            results[f"{rule}{' + attacker' if attacked else ''}"] = {
                "test_acc": acc,
                "rejected": len(rejected),
                "norm_over_bound_last_round": norms[-1],
            }
            print(
                f"{rule:12s} attacker={attacked!s:5s} test_acc={acc:.4f} rejected={len(rejected)} "
                f"norm/bound(last round)={json.dumps({k: round(v, 4) for k, v in norms[-1].items()})}",
                flush=True,
            )
    args.out.write_text(
        json.dumps(
            {
                "args": {k: str(v) for k, v in vars(args).items()},
                "results": results,
                "cpu_seconds": round(time.process_time() - t0, 1),
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
