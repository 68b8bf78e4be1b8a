"""Choosing the fleet's settings on validation data, never on the test images (docs/design.md section 12).

The 1000 Fashion-MNIST 5-9 training images of examples/fleet_results.py are split 800 / 200
(examples/tasks.py: train800, val200). The 800 go to 10 clients by Dirichlet(0.3), as the 1000 do in
the real experiment; each candidate setting trains the same rounds with the fleet client's own code
(vqt_edge/fleet/client_app.py train_round, every client in this one process, one after the other), and
is scored on the 200 held-out images. The server step is Flower's: FedAvg's sample-weighted mean
(tests/test_fleet.py shows Flower's equals it) and, for --server-momentum, FedAvgM's update as
flwr.serverapp.strategy.FedAvgM computes it. The per-process start-up of real Flower rounds is left
out: it changes the seconds, not the tensors.

    python examples/fleet_tune.py --out results/fleet_tune --name base
    python examples/fleet_tune.py --out results/fleet_tune --name prox01 --proximal-mu 0.1

Appends one line per setting to OUT/tune.jsonl (the validation accuracy after every round).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fleet_results import add_fleet_arguments  # noqa: E402
from tasks import export_vqt_bundle, make_task  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/fleet_tune"))
    parser.add_argument("--name", help="This setting's name (required unless --summary).")
    parser.add_argument("--summary", action="store_true", help="Only write OUT/validation.md from OUT/tune.jsonl.")
    add_fleet_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--optimizer", default="carry")
    parser.add_argument("--server-momentum", type=float, default=0.0)
    parser.add_argument("--server-lr", type=float, default=1.0)
    parser.add_argument(
        "--fold",
        type=int,
        help="Validate on fold K (0-4) of train1000 and train on the other 800 [default: train800 / val200].",
    )
    parser.add_argument(
        "--centralized", action="store_true", help="Instead: the training images in one run of R x E epochs."
    )
    args = parser.parse_args()
    if args.summary:
        (args.out / "validation.md").write_text(summary(args.out / "tune.jsonl"))
        print((args.out / "validation.md").read_text())
        return
    if not args.name:
        parser.error("--name is required")

    from device_runner import ort
    from device_runner.data import load_dataset
    from device_runner.deploy import build_model
    from vqt_edge import manifest as mf
    from vqt_edge.calibrate import calibrate_head, stats_bytes
    from vqt_edge.config import TrainConfig
    from vqt_edge.fleet.client_app import LocalRule, feature_stats, train_round
    from vqt_edge.fleet.server_app import TestSet, class_weighted_rows, initial_tensors
    from vqt_edge.split import assign, parse_split

    ort.block_torch()
    out = args.out
    data = make_task("fmnist59", out / "data" / "fmnist59")
    bundle = out / "bundle"
    export_vqt_bundle(bundle, sorted(p.name for p in (data / "train800").iterdir()))
    manifest = mf.read_manifest(bundle)
    work = out / "work" / args.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if args.fold is None:
        train_path, val_path = data / "train800", data / "val200"
    else:  # 5 folds of the 1000: every training image validates once
        every = load_dataset(data / "train1000")
        order = np.random.default_rng(0).permutation(len(every.samples))
        held = set(order[200 * args.fold : 200 * (args.fold + 1)].tolist())
        train_path, val_path = work / "train.txt", work / "val.txt"
        for path, keep in ((train_path, False), (val_path, True)):
            path.write_text(
                "".join(
                    f"{json.dumps(str(Path(p).resolve()))},{json.dumps(every.classes[y])}\n"
                    for i, (p, y) in enumerate(every.samples)
                    if (i in held) == keep
                )
            )
    train = load_dataset(train_path, classes=manifest.class_names)
    classes = train.classes
    val = TestSet(val_path, manifest, classes, 256)
    cfg = TrainConfig(
        epochs=args.rounds * args.local_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=1e-4,
        seed=args.seed,
        kv="disk",
        threads=1,
        backend="portable",
    )
    rule = LocalRule(args.proximal_mu, args.logit_adjust, args.optimizer)

    def score(tensors: dict[str, np.ndarray]) -> float:
        build_model(bundle, manifest, tensors, work / "model.onnx")
        return val.accuracy(work / "model.onnx")

    t0 = time.process_time()
    if args.centralized:
        tensors, _ = train_round(
            work / "central",
            bundle,
            train_path,
            initial_tensors(bundle, manifest),
            cfg,
            classes,
            1,
            args.rounds * args.local_epochs,
        )
        accs = [score(tensors)]
    else:
        labels = np.array([label for _, label in train.samples])
        parts = assign(labels, args.clients, parse_split(args.split), args.seed)
        shards = []
        for k, rows in enumerate(parts):
            shard = work / f"client_{k}.txt"
            shard.write_text(
                "".join(
                    f"{json.dumps(str(Path(train.samples[i][0]).resolve()))},"
                    f"{json.dumps(classes[train.samples[i][1]])}\n"
                    for i in rows
                )
            )
            shards.append(shard)
        current = initial_tensors(bundle, manifest)
        momentum: dict[str, np.ndarray] | None = None
        accs = []
        for r in range(1, args.rounds + 1):
            sent, weights, counts = [], [], []
            for k, shard in enumerate(shards):
                if not len(parts[k]):
                    continue
                tensors, metrics = train_round(
                    work / f"state_{k}", bundle, shard, current, cfg, classes, r, args.local_epochs, rule
                )
                sent.append(tensors)
                weights.append(metrics["num-examples"])
                counts.append(metrics["class-counts"])
            w = np.array(weights, np.float64) / sum(weights)
            mean = {n: sum(wk * t[n] for wk, t in zip(w, sent)).astype(np.float32) for n in current}
            if args.class_weighted_head:  # as the fleet server's --class-weighted-head
                mean = class_weighted_rows(mean, sent, counts)
            if args.server_momentum or args.server_lr != 1.0:  # FedAvgM, as Flower's aggregate_train
                grad = {n: current[n] - mean[n] for n in current}
                if args.server_momentum:
                    momentum = (
                        grad if momentum is None else {n: args.server_momentum * momentum[n] + grad[n] for n in grad}
                    )
                    grad = momentum
                mean = {n: current[n] - args.server_lr * grad[n] for n in current}
            current = mean
            accs.append(score(current))
            print(f"{args.name} round {r}: val {100 * accs[-1]:.1f}", flush=True)
        if args.calibrate_head:  # as the fleet server's --calibrate-head, after the last round
            stats = [
                feature_stats(
                    work / f"state_{k}", bundle, shard, current, classes, args.calibrate_head == "diagonal", threads=1
                )
                for k, shard in enumerate(shards)
                if len(parts[k])
            ]
            calib_bytes = max(stats_bytes(s) for s in stats)
            uncalibrated = accs[-1]
            current = calibrate_head(current, stats, args.seed)
            accs.append(score(current))
            print(
                f"{args.name} calibrated: val {100 * accs[-1]:.1f} (before {100 * uncalibrated:.1f}; "
                f"{calib_bytes} bytes from each client)",
                flush=True,
            )
    record = {
        "name": args.name,
        **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "val_acc": accs,
        "final_val_acc": accs[-1],
        **({"calibration_bytes_per_client": calib_bytes} if args.calibrate_head and not args.centralized else {}),
        "cpu_seconds": round(time.process_time() - t0, 1),
    }
    with open(out / "tune.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps({k: record[k] for k in ("name", "final_val_acc", "cpu_seconds")}))
    shutil.rmtree(work, ignore_errors=True)


def summary(path: Path) -> str:
    """Markdown: each setting's final validation accuracy, folds (`NAME_fK`) averaged."""
    groups: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        name = record["name"]
        key = name.rsplit("_f", 1)[0] + " (folds)" if record.get("fold") is not None else name
        groups.setdefault(key, []).append(record)
    lines = ["| setting | validation | final val. accuracy (%) | per round (mean) |", "|---|---|---:|---|"]
    for name, records in groups.items():
        accs = 100 * np.array([r["final_val_acc"] for r in records])
        folds = records[0].get("fold") is not None
        where = f"{len(records)} folds of train1000" if folds else f"val200, seed {records[0]['seed']}"
        rounds = (
            np.mean([r["val_acc"] for r in records], axis=0) if len({len(r["val_acc"]) for r in records}) == 1 else []
        )
        lines.append(
            f"| {name.removesuffix(' (folds)')} | {where} | {accs.mean():.1f}"
            + (f" ± {accs.std():.1f}" if len(accs) > 1 else "")
            + f" | {' '.join(f'{100 * a:.0f}' for a in rounds)}"
            + (" (last: after --calibrate-head)" if records[0].get("calibrate_head") else "")
            + " |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
