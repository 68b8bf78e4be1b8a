"""Choosing the defaults of `fleet simulate` / `fleet server` on validation folds only (docs/fleet-defaults.md).

Tasks, all on the shipped vit_fmnist (VQT, T=1), each scored on held-out folds of its *training* images:
- colour4: 4 colour classes drawn with numpy/pillow, 160 training images, 4 folds of 40; the other
  120 over 4 clients by Dirichlet(0.5) (shards of a few to ~60 images).
- fmnist_dir: Fashion-MNIST 5-9 train1000 (examples/tasks.py), 5 folds of 200; the other 800 over
  10 clients by Dirichlet(0.3) (shards of ~5 to ~300 images).
- fmnist_iid: the same 800 over 10 clients, iid (80 each).

A fleet setting runs the fleet client's own code (device_runner/fleet.py train_round) for every
client in this process and averages as Flower's FedAvg does (sample-weighted; tests/test_fleet.py
checks that Flower's equals it); --calibrate-head as the server does it (feature_stats,
calibrate_head). `central` is `vqt-edge train`'s defaults on the pooled fold-training images;
`local` is each client alone with `train`'s defaults, the mean of their validation accuracies.

    python examples/fleet_defaults.py --out results/fleet_defaults --task colour4 --fold 0 --setting steps20
    python examples/fleet_defaults.py --out results/fleet_defaults --summary

Appends one JSON line per (task, fold, setting) to OUT/defaults.jsonl.
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

COLOURS = {"blue": (50, 60, 200), "green": (40, 180, 60), "red": (200, 40, 40), "yellow": (210, 200, 40)}
TASKS = {"colour4": (4, "dirichlet:0.5", 4), "fmnist_dir": (10, "dirichlet:0.3", 5), "fmnist_iid": (10, "iid", 5)}
# name -> the fleet's options (None: `train`'s references); "old" is the defaults before issue 24
SETTINGS: dict[str, dict] = {
    "old": {"local_epochs": 1, "batch": 32, "rounds": 10, "lr": 1e-2},
    "old_E5_b16": {"local_epochs": 5, "batch": 16, "rounds": 10, "lr": 1e-2},
    "steps10": {"local_steps": 10, "batch": 32, "rounds": 10, "lr": 1e-2},
    "steps20": {"local_steps": 20, "batch": 32, "rounds": 10, "lr": 1e-2},
    "steps50": {"local_steps": 50, "batch": 32, "rounds": 10, "lr": 1e-2},
    "steps20_b16": {"local_steps": 20, "batch": 16, "rounds": 10, "lr": 1e-2},
    "steps20_r20": {"local_steps": 20, "batch": 32, "rounds": 20, "lr": 1e-2},
    "steps20_lr3e-2": {"local_steps": 20, "batch": 32, "rounds": 10, "lr": 3e-2},
    "steps20_ccvr": {"local_steps": 20, "batch": 32, "rounds": 10, "lr": 1e-2, "calibrate": "full"},
    "steps50_ccvr": {"local_steps": 50, "batch": 32, "rounds": 10, "lr": 1e-2, "calibrate": "full"},
    "old_ccvr": {"local_epochs": 1, "batch": 32, "rounds": 10, "lr": 1e-2, "calibrate": "full"},
    "central": {},
    "local": {},
}


def make_colours(root: Path, per_class: int, seed: int, size: int = 28, tint: float = 0.2) -> Path:
    """Four colour classes, faint (`tint` of the colour over grey), with pixel noise, random brightness
    and a random bright square: `vqt-edge train` on 160 of them needs its 30 epochs (66% after 3)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            colour = (1 - tint) * 128 + tint * np.array(rgb)
            img = rng.integers(0, 90, (size, size, 3)) + colour * rng.uniform(0.4, 1.0) - 20
            x, y = rng.integers(0, size - 8, 2)
            img[y : y + 8, x : x + 8] = rng.integers(100, 256, 3)
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def _write_list(path: Path, samples, classes: list[str]) -> Path:
    path.write_text("".join(f"{json.dumps(str(Path(p).resolve()))},{json.dumps(classes[y])}\n" for p, y in samples))
    return path


def task_data(task: str, out: Path) -> tuple[Path, Path | None]:
    """(all training images, the test images: only for the final table, never for choosing)."""
    if task == "colour4":
        root = out / "data" / "colour4"
        if not (root / "test").exists():
            make_colours(root / "train", 40, seed=1)
            make_colours(root / "test", 20, seed=2)
        return root / "train", root / "test"
    from tasks import make_task

    data = make_task("fmnist59", out / "data" / "fmnist59")
    return data / "train1000", data / "test"


def bundle_for(out: Path, classes: list[str], name: str) -> Path:
    from tasks import export_vqt_bundle

    return export_vqt_bundle(out / "bundles" / name, classes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/fleet_defaults"))
    parser.add_argument("--task", choices=list(TASKS))
    parser.add_argument(
        "--fold",
        type=int,
        default=0,
        help="Validate on this fold of the training images; -1: train "
        "on all of them and score on the test images (the final table only, after choosing).",
    )
    parser.add_argument("--setting", choices=list(SETTINGS))
    parser.add_argument("--summary", action="store_true", help="Only write OUT/defaults.md from OUT/defaults.jsonl.")
    parser.add_argument("--mechanism", type=Path, help="Only print the per-round table of this `fleet simulate` run.")
    args = parser.parse_args()
    if args.mechanism:
        print(mechanism(args.mechanism))
        return
    if args.summary:
        (args.out / "defaults.md").write_text(summary(args.out / "defaults.jsonl"))
        print((args.out / "defaults.md").read_text())
        return
    if not (args.task and args.setting):
        parser.error("--task and --setting are required")

    from device_runner import ort
    from device_runner.data import load_dataset
    from device_runner.deploy import build_model
    from vqt_edge import manifest as mf
    from vqt_edge.calibrate import calibrate_head
    from vqt_edge.config import TrainConfig
    from vqt_edge.fleet.client_app import feature_stats, train_round
    from vqt_edge.fleet.server_app import TestSet, initial_tensors
    from vqt_edge.split import assign, parse_split

    ort.block_torch()
    clients, split_text, folds = TASKS[args.task]
    train_dir, test_dir = task_data(args.task, args.out)
    every = load_dataset(train_dir)
    classes = every.classes
    bundle = bundle_for(args.out, classes, args.task.split("_")[0])
    manifest = mf.read_manifest(bundle)
    work = args.out / "work" / f"{args.task}_{args.fold}_{args.setting}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    order = np.random.default_rng(0).permutation(len(every.samples))
    size = len(order) // folds
    held = set(order[size * args.fold : size * (args.fold + 1)].tolist()) if args.fold >= 0 else set()
    train = [s for i, s in enumerate(every.samples) if i not in held]
    train_path = _write_list(work / "train.txt", train, classes)
    val_path = _write_list(work / "val.txt", [s for i, s in enumerate(every.samples) if i in held], classes)
    val = TestSet(val_path if held else test_dir, manifest, classes, 256)
    labels = np.array([y for _, y in train])
    parts = assign(labels, clients, parse_split(split_text), max(0, args.fold))
    shards = [_write_list(work / f"client_{k}.txt", [train[i] for i in rows], classes) for k, rows in enumerate(parts)]
    initial = initial_tensors(bundle, manifest)

    def score(tensors: dict[str, np.ndarray]) -> float:
        build_model(bundle, manifest, tensors, work / "model.onnx")
        return val.accuracy(work / "model.onnx")

    t0 = time.process_time()
    s = SETTINGS[args.setting]
    central = TrainConfig(kv="disk", threads=1)  # `vqt-edge train`'s defaults
    extra: dict = {}
    if args.setting == "central":
        tensors, _ = train_round(work / "central", bundle, train_path, initial, central, classes, 1, central.epochs)
        accs = [score(tensors)]
    elif args.setting == "local":
        per_client = []
        for k, shard in enumerate(shards):
            tensors, _ = train_round(
                work / f"local_{k}",
                bundle,
                shard,
                initial,
                TrainConfig(kv="disk", threads=1),
                classes,
                1,
                central.epochs,
            )
            per_client.append(score(tensors))
        accs, extra = [float(np.mean(per_client))], {"per_client": per_client}
    else:
        steps, epochs = s.get("local_steps"), s.get("local_epochs", 1)
        cfg = TrainConfig(
            epochs=s["rounds"] * epochs,
            batch_size=s["batch"],
            lr=s["lr"],
            kv="disk",
            threads=1,
            seed=max(0, args.fold),
            steps_per_epoch=steps,
        )
        current, accs = initial, []
        for r in range(1, s["rounds"] + 1):
            sent, weights, losses = [], [], []
            for k, shard in enumerate(shards):
                tensors, metrics = train_round(work / f"state_{k}", bundle, shard, current, cfg, classes, r, epochs)
                sent.append(tensors)
                weights.append(metrics["num-examples"])
                losses.append(metrics["train_loss"])
            w = np.array(weights, np.float64) / sum(weights)
            current = {n: sum(wk * t[n] for wk, t in zip(w, sent)).astype(np.float32) for n in current}
            if args.fold >= 0 or r == s["rounds"]:  # the test images: scored once, at the end
                accs.append(score(current))
            extra.setdefault("train_loss", []).append(float(np.dot(w, losses)))
            print(
                f"{args.task} fold {args.fold} {args.setting} round {r}: acc {100 * accs[-1] if accs else 0:.1f} "
                f"loss {extra['train_loss'][-1]:.3f}",
                flush=True,
            )
        if s.get("calibrate"):
            stats = [
                feature_stats(
                    work / f"state_{k}", bundle, shard, current, classes, s["calibrate"] == "diagonal", threads=1
                )
                for k, shard in enumerate(shards)
            ]
            current = calibrate_head(current, stats, max(0, args.fold))
            accs.append(score(current))
    record = {
        "task": args.task,
        "fold": args.fold,
        "setting": args.setting,
        **s,
        "shards": [len(p) for p in parts],
        "val_acc": accs,
        "final_val_acc": accs[-1],
        **extra,
        "cpu_seconds": round(time.process_time() - t0, 1),
    }
    with open(args.out / "defaults.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps({k: record[k] for k in ("task", "fold", "setting", "final_val_acc", "cpu_seconds")}), flush=True)
    shutil.rmtree(work, ignore_errors=True)


def mechanism(run: Path) -> str:
    """What a finished `fleet simulate` run did per client and round: AdamW steps, the lr at the end of
    the round (the client's own schedule), its loss, and how much FedAvg cancelled of the clients'
    moves: |weighted mean of the deltas| / weighted mean of |delta| over all trainable tensors
    (1: all moved the same way; small: the skewed clients' moves cancel)."""
    from safetensors.numpy import load_file

    clients = sorted((run / "fleet" / "clients").iterdir(), key=lambda c: int(c.name.split("_")[1]))
    sizes = np.array([len((c / "train.txt").read_text().splitlines()) for c in clients], np.float64)
    w = sizes / sizes.sum()
    logs = [
        [json.loads(line) for line in (c / "state" / "run" / "metrics.jsonl").read_text().splitlines()] for c in clients
    ]
    rounds = len(list((run / "rounds").glob("round_*.safetensors"))) - 1  # round_0: the initial tensors
    per_round = max(1, len(logs[0]) // max(1, rounds))  # the client's metrics lines (epochs) per round
    out = [
        f"shards {sizes.astype(int).tolist()}",
        "| round | steps per client (cumulative) | lr at round end per client | loss per client | FedAvg kept |",
        "|---:|---|---|---|---:|",
    ]
    for r in range(1, rounds + 1):
        start = load_file(str(run / "rounds" / f"round_{r - 1}.safetensors"))
        sent = [load_file(str(c / "state" / "rounds" / f"round_{r}.safetensors")) for c in clients]
        deltas = [np.concatenate([(t[n] - start[n]).ravel() for n in sorted(start)]) for t in sent]
        moved = sum(wk * np.linalg.norm(d) for wk, d in zip(w, deltas))
        kept = np.linalg.norm(sum(wk * d for wk, d in zip(w, deltas))) / max(1e-12, moved)
        last = [log[min(len(log), r * per_round) - 1] for log in logs]
        steps = " ".join(str(x["step"]) for x in last)
        lrs = " ".join(f"{x['lr']:.2g}" for x in last)
        losses = " ".join(f"{x['train_loss']:.2f}" for x in last)
        out.append(f"| {r} | {steps} | {lrs} | {losses} | {kept:.2f} |")
    return "\n".join(out) + "\n"


def summary(path: Path) -> str:
    """Markdown: per task, each setting's validation accuracy, mean over the folds it ran on."""
    rows: dict[tuple[str, str], list[dict]] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        where = "test" if r["fold"] < 0 else "val"
        rows.setdefault((r["task"], f"{where}: {r['setting']}"), []).append(r)
        if r.get("calibrate"):  # the same run before its head was calibrated: the last round's FedAvg
            rows.setdefault((r["task"], f"{where}: {r['setting']} (before calibration)"), []).append(
                {**r, "final_val_acc": r["val_acc"][-2]}
            )
    out = [
        "| task | images scored: setting | folds | final accuracy (%) | per fold | CPU s (mean) |",
        "|---|---|---:|---:|---|---:|",
    ]
    for (task, setting), records in sorted(rows.items()):
        accs = 100 * np.array([r["final_val_acc"] for r in records])
        spread = f" ± {accs.std():.1f}" if len(accs) > 1 else ""
        per_fold = " ".join(f"{a:.1f}" for a in accs)
        cpu = np.mean([r["cpu_seconds"] for r in records])
        out.append(f"| {task} | {setting} | {len(records)} | {accs.mean():.1f}{spread} | {per_fold} | {cpu:.0f} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
