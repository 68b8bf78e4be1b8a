"""Default `fleet simulate` against default `train` and local-only, with real processes (issue 24's table).

Each cell is a real command, every training option at its default:

- `train`: `vqt-edge train --bundle B --data TRAIN --test TEST --run R` on the pooled training images;
- fleet, new defaults: `vqt-edge fleet simulate --bundle B --data TRAIN --test TEST --run R --clients N
  --split S` (10 rounds of --local-steps 20, --calibrate-head full);
- fleet, old defaults: the same plus `--local-epochs 1 --calibrate-head off` (the defaults before
  issue 24: one pass over each client's images a round, no calibration; rounds, batch and lr unchanged);
- local-only: each client alone on the shard `fleet simulate` gave it, with `train`'s defaults, the mean of
  their test accuracies. `vqt-edge train` refuses a shard that lacks one of the bundle's classes (most
  Dirichlet shards do), so this runs the trainer with the bundle's classes in a process per task
  (examples/fleet_defaults.py --setting local --fold -1); its shards are checked against the fleet's.

Both fleet runs also pass `--threads 1` (a client's own resource choice, as the README's command does) and,
with --max-concurrent M, `--max-concurrent M` (waves, so a loaded machine does not push Flower's ClientApps
past their 30-s start limit). The tasks and bundles are examples/fleet_defaults.py's. Each run records its
wall time, its CPU time (children), the load average sampled every 5 s while it ran, and the rounds it
completed.

    python bench/fleet_defaults_real.py --out /tmp/fleet_real --task colour4 --max-concurrent 4
    python bench/fleet_defaults_real.py --out /tmp/fleet_real --table > bench/results/fleet_defaults.md

Appends one JSON line per run to OUT/real.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))
from fleet_defaults import TASKS, bundle_for, task_data  # noqa: E402

VQT = [sys.executable, "-m", "vqt_edge.cli"]
KINDS = ("train", "fleet_old", "fleet_new", "local")
OLD = ["--local-epochs", "1", "--calibrate-head", "off"]
SAME_IMAGES = {"fmnist_iid": "fmnist_dir"}  # the same 1000 pooled training images


def _measure(cmd: list[str], log: Path, timeout: float) -> dict:
    """Run `cmd` (output to `log`); its wall and children's CPU seconds and the load while it ran."""
    loads: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(5.0):
            loads.append(os.getloadavg()[0])

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with open(log, "w") as out:
        try:
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            rc = -1
    done.set()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    loads = loads or [os.getloadavg()[0]]
    return {
        "rc": rc,
        "wall_s": round(time.monotonic() - start, 1),
        "cpu_s": round(cpu, 1),
        "load": [round(min(loads), 1), round(sum(loads) / len(loads), 1), round(max(loads), 1)],
        "cmd": " ".join(cmd[3:] if cmd[:3] == VQT else cmd),
    }


def _fleet_result(run: Path) -> dict:
    """Test accuracy after each round and the final (calibrated, if it ran) one, from the run folder."""
    lines = (
        [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        if (run / "metrics.jsonl").exists()
        else []
    )
    rounds = [x for x in lines if x.get("round", 0) > 0 and "clients" in x]
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    return {
        "rounds_done": len(rounds),
        "test_acc_per_round": [x.get("test_acc") for x in rounds],
        "train_loss_per_round": [round(x["train_loss"], 3) for x in rounds if "train_loss" in x],
        "test_acc": summary.get("test_accuracy"),
        "calibration": (summary.get("calibration") or {}).get("test_acc"),
        "shards": [len((c / "train.txt").read_text().splitlines()) for c in _clients(run)],
    }


def _clients(run: Path) -> list[Path]:
    home = run / "fleet" / "clients"
    return sorted(home.iterdir(), key=lambda c: int(c.name.split("_")[1])) if home.exists() else []


def run_task(task: str, kinds: list[str], out: Path, max_concurrent: int, timeout: float) -> None:
    clients, split, _ = TASKS[task]
    train_dir, test_dir = task_data(task, out)
    from device_runner.data import load_dataset

    classes = load_dataset(train_dir).classes
    bundle = bundle_for(out, classes, task.split("_")[0])
    data = ["--bundle", str(bundle), "--data", str(train_dir), "--test", str(test_dir)]
    fleet = ["--clients", str(clients), "--split", split, "--threads", "1"]
    if max_concurrent:
        fleet += ["--max-concurrent", str(max_concurrent)]
    for kind in kinds:
        run = out / "runs" / f"{task}_{kind}"
        shutil.rmtree(run, ignore_errors=True)
        run.parent.mkdir(parents=True, exist_ok=True)
        if kind == "train":
            record = _measure([*VQT, "train", *data, "--run", str(run)], run.with_suffix(".log"), timeout)
            summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
            record["test_acc"] = summary.get("test_accuracy")
        elif kind == "local":
            cmd = [sys.executable, str(ROOT / "examples" / "fleet_defaults.py"), "--out", str(out)]
            cmd += ["--task", task, "--fold", "-1", "--setting", "local"]
            record = _measure(cmd, run.with_suffix(".log"), timeout)
            mine = [json.loads(x) for x in (out / "defaults.jsonl").read_text().splitlines()]
            last = [x for x in mine if x["task"] == task and x["setting"] == "local"][-1]
            record |= {"test_acc": last["final_val_acc"], "per_client": last["per_client"], "shards": last["shards"]}
            fleet_run = out / "runs" / f"{task}_fleet_new"
            if _clients(fleet_run):
                record["shards_match_fleet"] = last["shards"] == _fleet_result(fleet_run)["shards"]
        else:
            extra = OLD if kind == "fleet_old" else []
            cmd = [*VQT, "fleet", "simulate", *data, "--run", str(run), *fleet, *extra]
            record = _measure(cmd, run.with_suffix(".log"), timeout) | _fleet_result(run)
        record |= {"task": task, "kind": kind, "max_concurrent": max_concurrent, "at": time.strftime("%H:%M")}
        with open(out / "real.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)


def table(path: Path) -> str:
    """Markdown: the last run of each (task, kind), then every run with its wall time and load."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    last = {(r["task"], r["kind"]): r for r in records}
    for task, same in SAME_IMAGES.items():  # `train` on the same pooled images: one run serves both
        if (task, "train") not in last and (same, "train") in last:
            last[(task, "train")] = last[(same, "train")]

    def acc(task: str, kind: str) -> str:
        r = last.get((task, kind))
        if r is None:
            return "not run"
        if r.get("test_acc") is None:
            reached = [a for a in r.get("test_acc_per_round", []) if a is not None]
            where = f": {100 * reached[-1]:.1f} there" if reached else ""
            return f"stopped after round {r.get('rounds_done', 0)} (rc {r['rc']}){where}"
        return f"{100 * r['test_acc']:.1f}"

    out = [
        "| task | `train` (pooled) | local-only (mean) | fleet, old defaults | fleet, new defaults "
        "| new - `train` | new - local |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for task in TASKS:
        cells = [acc(task, k) for k in ("train", "local", "fleet_old", "fleet_new")]
        new, ref, loc = (last.get((task, k), {}).get("test_acc") for k in ("fleet_new", "train", "local"))
        gap = f"{100 * (new - ref):+.1f}" if new is not None and ref is not None else "-"
        gap_local = f"{100 * (new - loc):+.1f}" if new is not None and loc is not None else "-"
        out.append(f"| {task} | " + " | ".join(cells) + f" | {gap} | {gap_local} |")
    out += [
        "",
        "| task | run | test acc | rounds | per round (test acc %) | wall s | CPU s | load min/mean/max | ended |",
    ]
    out.append("|---|---|---:|---:|---|---:|---:|---|---|")
    for r in records:  # every run, failed ones too
        task, kind = r["task"], r["kind"]
        per = " ".join(f"{100 * a:.1f}" for a in r.get("test_acc_per_round", []) if a is not None)
        if r.get("calibration") is not None:
            per += f" -> {100 * r['calibration']:.1f} calibrated"
        a = "-" if r.get("test_acc") is None else f"{100 * r['test_acc']:.1f}"
        load = "/".join(str(x) for x in r["load"])
        out.append(
            f"| {task} | {kind} | {a} | {r.get('rounds_done', '-')} | {per} | {r['wall_s']} | {r['cpu_s']} "
            f"| {load} | {r['at']} |"
        )
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/fleet_defaults_real"))
    parser.add_argument("--task", choices=list(TASKS), action="append")
    parser.add_argument("--kind", choices=KINDS, action="append", help="Only these runs [default: all four].")
    parser.add_argument("--max-concurrent", type=int, default=0, help="Passed to `fleet simulate` (0: all at once).")
    parser.add_argument("--timeout", type=float, default=3600, help="Seconds per run before it is stopped.")
    parser.add_argument("--table", action="store_true", help="Only print the table of OUT/real.jsonl.")
    args = parser.parse_args()
    if args.table:
        print(table(args.out / "real.jsonl"), end="")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    for task in args.task or list(TASKS):
        run_task(task, args.kind or list(KINDS), args.out, args.max_concurrent, args.timeout)


if __name__ == "__main__":
    main()
