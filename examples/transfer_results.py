"""Transfer results of the shipped backbone: every method trained by the device runner (VTAB-1k style).

For each task (examples/tasks.py) and method: choose lr and weight decay on train800 -> val200, then
retrain on all 1000 training images with 3 seeds and test on the task's test images. Reports test
accuracy (mean and spread over seeds) and the measured peak training memory (VmHWM of the training
process, from its summary.json). Writes `results.json`, `results.md` (docs/benchmarks.md's table) and one
accuracy-vs-memory plot per task to --out (needs the `examples` extra: scikit-learn, matplotlib).

    python examples/transfer_results.py --out results/transfer --jobs 2

Every run is a real `vqt-edge export` / `vqt-edge train` process; finished runs are reused, so an
interrupted invocation continues where it stopped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tasks import TASKS, make_task  # noqa: E402

VQT_EDGE = [sys.executable, "-m", "vqt_edge.cli"]


@dataclass(frozen=True)
class Method:
    label: str
    method: str
    tokens: int = 1
    last_k: int | None = None
    aggregate: str = "concat"  # vqt-edge export --aggregate
    h2t_target: int | None = None  # vqt-edge export --h2t-target (head2toe; None: export's default)
    quantize: str = "none"  # `export --quantize`
    keep_fraction: float = 1.0  # `train --keep-fraction` (group-lasso feature selection of the head)
    kv_dtype: str = "fp16"  # `train --kv-dtype` (device_runner/kv_int8.py)


# vit_fmnist has 6 layers: "all layers" is k = 6.
METHODS = [
    Method("Linear probe", "linear"),
    Method("VQT (T=1)", "vqt", 1),
    Method("VQT (T=10)", "vqt", 10),
    Method("VPT-Deep (T=5)", "vpt", 5, 6),
    Method("AdaptFormer", "adaptformer", 1, 6),
    Method("Fine-tune last 2", "finetune", 1, 2),
    Method("Fine-tune all 6 blocks", "finetune", 1, 6),  # patch/position embeddings stay frozen
    Method("VQT+AdaptFormer (T=1)", "vqt+adaptformer", 1, 6),
    Method("VQT mean (T=10)", "vqt", 10, aggregate="mean"),
    Method("VQT wsum (T=10)", "vqt", 10, aggregate="wsum"),
    Method("Head2Toe", "head2toe"),
    Method("Head2Toe keep 0.3", "head2toe", keep_fraction=0.3),
    Method("Head2Toe keep 0.1", "head2toe", keep_fraction=0.1),
    Method("VQT (T=1) keep 0.3", "vqt", 1, keep_fraction=0.3),
    Method("VQT (T=1) keep 0.1", "vqt", 1, keep_fraction=0.1),
]
# A small grid: this runs on 2 CPU cores. Every method gets the same grid.
LRS = (3e-3, 1e-2)
WDS = (1e-4,)
SEEDS = (0, 1, 2)


def _run(cmd: list[str], log: Path) -> None:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
            raise RuntimeError(f"failed: {' '.join(cmd)} (see {log})")


def bundle_for(out: Path, task: str, m: Method, classes: list[str]) -> Path:
    variant = (f"-{m.aggregate}" if m.aggregate != "concat" else "") + (f"-h{m.h2t_target}" if m.h2t_target else "")
    variant += "" if m.quantize == "none" else f"-{m.quantize}"
    bundle = out / "bundles" / task / f"{m.method}-T{m.tokens}-k{m.last_k}{variant}"
    if not (bundle / "manifest.json").exists():
        args = [
            "export",
            "--model",
            "vit_fmnist",
            "--method",
            m.method,
            "--query-tokens",
            str(m.tokens),
            "--classes",
            ",".join(classes),
            "--out",
            str(bundle),
        ]
        if m.last_k is not None:
            args += ["--last-k", str(m.last_k)]
        if m.aggregate != "concat":
            args += ["--aggregate", m.aggregate]
        if m.h2t_target is not None:
            args += ["--h2t-target", str(m.h2t_target)]
        if m.quantize != "none":
            args += ["--quantize", m.quantize]
        _run(VQT_EDGE + args, bundle.parent / (bundle.name + ".log"))
    return bundle


def train(
    bundle: Path,
    run: Path,
    data: Path,
    test: Path | None,
    lr: float,
    wd: float,
    seed: int,
    epochs: int,
    keep_fraction: float = 1.0,
    kv_dtype: str = "fp16",
) -> dict:
    if not (run / "summary.json").exists() or (
        test is not None and "test_accuracy" not in json.loads((run / "summary.json").read_text())
    ):
        shutil.rmtree(run, ignore_errors=True)  # an unfinished run from an interrupted invocation
        args = [
            "train",
            "--bundle",
            str(bundle),
            "--data",
            str(data),
            "--run",
            str(run),
            "--epochs",
            str(epochs),
            "--lr",
            str(lr),
            "--weight-decay",
            str(wd),
            "--seed",
            str(seed),
            "--threads",
            "1",
        ]
        args += ["--test", str(test)] if test is not None else []
        args += ["--keep-fraction", str(keep_fraction)] if keep_fraction < 1 else []
        args += ["--kv-dtype", kv_dtype] if kv_dtype != "fp16" else []
        _run(VQT_EDGE + args, run.parent / (run.name + ".log"))
    return json.loads((run / "summary.json").read_text())


def val_accuracy(
    bundle: Path, run: Path, data: Path, lr: float, wd: float, epochs: int, keep_fraction: float, kv_dtype: str = "fp16"
) -> float:
    return train(bundle, run, data / "train800", data / "val200", lr, wd, 0, epochs, keep_fraction, kv_dtype)[
        "test_accuracy"
    ]


def evaluate_method(
    out: Path, task: str, data: Path, m: Method, epochs: int, pool: ThreadPoolExecutor, seeds: tuple[int, ...] = SEEDS
) -> dict:
    classes = sorted(p.name for p in (data / "train1000").iterdir())
    bundle = bundle_for(out, task, m, classes)
    runs = (
        out
        / "runs"
        / task
        / (
            bundle.name
            + (f"-keep{m.keep_fraction}" if m.keep_fraction < 1 else "")
            + (f"-kv{m.kv_dtype}" if m.kv_dtype != "fp16" else "")
        )
    )
    grid = list(itertools.product(LRS, WDS))
    vals = list(
        pool.map(
            lambda g: val_accuracy(
                bundle, runs / f"val-lr{g[0]}-wd{g[1]}", data, *g, epochs, m.keep_fraction, m.kv_dtype
            ),
            grid,
        )
    )
    (lr, wd), best_val = max(zip(grid, vals), key=lambda x: x[1])
    tests = list(
        pool.map(
            lambda s: train(
                bundle,
                runs / f"final-seed{s}",
                data / "train1000",
                data / "test",
                lr,
                wd,
                s,
                epochs,
                m.keep_fraction,
                m.kv_dtype,
            ),
            seeds,
        )
    )
    accs = [t["test_accuracy"] for t in tests]
    return {
        "task": task,
        "method": m.label,
        "lr": lr,
        "weight_decay": wd,
        "val_accuracy": best_val,
        "test_accuracy_mean": statistics.mean(accs),
        "test_accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "test_accuracies": accs,
        "peak_rss_mb": max(t["peak_rss_mb"] for t in tests),
        "seconds_per_epoch": statistics.mean(t["seconds_per_epoch"] for t in tests),
    }


def markdown(rows: list[dict], tasks: list[str]) -> str:
    lines = ["| method | " + " | ".join(tasks) + " | peak memory (MiB) |", "|---" * (len(tasks) + 2) + "|"]
    present = {r["method"] for r in rows if r["task"] in tasks}
    for label in [m.label for m in METHODS if m.label in present] + sorted(present - {m.label for m in METHODS}):
        cells, peak = [], 0.0
        for task in tasks:
            r = next((r for r in rows if r["method"] == label and r["task"] == task), None)
            cells.append(f"{100 * r['test_accuracy_mean']:.1f} ± {100 * r['test_accuracy_std']:.1f}" if r else "-")
            peak = max(peak, r["peak_rss_mb"] if r else 0)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {peak:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("results/transfer"))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--methods", default="all", help="comma-separated method labels, or all")
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument(
        "--quantize",
        default="none",
        help="comma-separated export --quantize modes (none,int8,int4); a mode other than none "
        "adds rows labelled 'METHOD, MODE'",
    )
    parser.add_argument(
        "--kv-dtypes",
        default="fp16",
        help="comma-separated `train --kv-dtype` values; one other than fp16 adds rows labelled 'METHOD, kv DTYPE'",
    )
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="comma-separated seeds of the final runs")
    parser.add_argument("--jobs", type=int, default=2, help="training processes at once")
    parser.add_argument(
        "--table-only", action="store_true", help="only rewrite results.md and the plots from results.json"
    )
    args = parser.parse_args()
    tasks = args.tasks.split(",")
    methods = METHODS if args.methods == "all" else [m for m in METHODS if m.label in args.methods.split(",")]
    methods = [
        m if q == "none" else replace(m, label=f"{m.label}, {q}", quantize=q)
        for m in methods
        for q in args.quantize.split(",")
    ]
    methods = [
        m if d == "fp16" else replace(m, label=f"{m.label}, kv {d}", kv_dtype=d)
        for m in methods
        for d in args.kv_dtypes.split(",")
    ]
    seeds = tuple(int(s) for s in args.seeds.split(","))
    results_path = args.out / "results.json"
    rows = json.loads(results_path.read_text()) if results_path.exists() else []
    with ThreadPoolExecutor(args.jobs) as pool:
        for task in [] if args.table_only else tasks:
            data = make_task(task, args.out / "data" / task)
            for m in methods:
                if any(r["task"] == task and r["method"] == m.label for r in rows):
                    continue
                row = evaluate_method(args.out, task, data, m, args.epochs, pool, seeds)
                rows.append(row)
                print(
                    f"{task:<12} {m.label:<24} test {100 * row['test_accuracy_mean']:.1f} ± {100 * row['test_accuracy_std']:.1f}"
                    f"  (lr {row['lr']}, wd {row['weight_decay']}, val {100 * row['val_accuracy']:.1f})"
                    f"  peak {row['peak_rss_mb']:.0f} MiB",
                    flush=True,
                )
                results_path.write_text(json.dumps(rows, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(rows, tasks))
    print(markdown(rows, tasks))
    for task in tasks:
        if any(r["task"] == task for r in rows):
            print("wrote", plot(rows, task, args.out / f"accuracy_vs_memory_{task}.png"))


def plot(rows: list[dict], task: str, path: Path) -> Path:
    """The paper's Fig. 3b view of one task: test accuracy against peak training memory, a point per method."""
    from vqt_edge.sweep import plot_results

    points = [
        {"method": r["method"], "k": None, "peak_mb": r["peak_rss_mb"], "accuracy": r["test_accuracy_mean"]}
        for r in rows
        if r["task"] == task
    ]
    return plot_results(points, path, title=f"vit_fmnist -> {task}, 1000 training images")


if __name__ == "__main__":
    main()
