"""The method sweep behind `vqt-edge sweep`: the paper's memory/accuracy trade-off (Fig. 3b) on this device.

Every configuration (method, k) is exported by `vqt-edge export` and trained by `vqt-edge train`,
each in a process of its own, so that the peak memory of one run (the training process's own
VmHWM, recorded in its summary.json) never includes another's. This module imports neither torch
nor onnxruntime.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from vqt_edge.errors import UserError
from vqt_edge.spec import LAST_K_METHODS, METHODS

FIELDS = [
    "method",
    "k",
    "T",
    "batch",
    "micro_batch",
    "kv",
    "peak_mb",
    "predicted_peak_mb",
    "seconds_per_step",
    "accuracy",
    "accuracy_on",
    "status",
    "error",
]


@dataclass
class SweepConfig:
    model_name: str | None
    weights: Path | None
    random_init: bool
    methods: list[str]
    last_k: list[int]
    batch_size: int
    query_tokens: int
    data: Path | None
    test: Path | None
    val_split: float
    steps: int | None
    epochs: int
    lr: float | None
    kv: str | None  # None: each train run chooses (vqt_edge/memory.py default_kv)
    micro_batch: int | None
    num_classes: int | None
    out: Path
    keep_bundles: bool = False
    sizes: dict = field(default_factory=dict)
    kv_dtype: str | None = None  # None: each train run chooses (vqt_edge/memory/disk.py)


def configurations(cfg: SweepConfig, depth: int) -> list[tuple[str, int | None]]:
    """(method, k) pairs: k over --last-k for methods with adapted layers, query layers last:k for
    vqt, none for a method that has neither (linear). k larger than the depth is dropped."""
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise UserError(
            f"--methods: {', '.join(unknown)} not supported by this export (supported: {', '.join(METHODS)})"
        )
    ks = sorted({k for k in cfg.last_k if 1 <= k <= depth})
    bad = [k for k in cfg.last_k if not 1 <= k <= depth]
    if not ks:
        raise UserError(f"--last-k: no k in [1, {depth}] (got {cfg.last_k})")
    if bad:
        print(f"warning: --last-k {bad} outside [1, {depth}] skipped", file=sys.stderr)
    out: list[tuple[str, int | None]] = []
    for method in cfg.methods:
        if method in LAST_K_METHODS or method == "vqt":
            out += [(method, k) for k in ks]
        else:
            out.append((method, None))
    return out


def _cli(*args: object) -> list[str]:
    return [sys.executable, "-m", "vqt_edge.cli", *map(str, args)]


def _run(cmd: list[str], log: Path, timeout: float | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as f:
        return subprocess.run(
            [str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout, text=True
        )


def _tail(log: Path, lines: int = 3) -> str:
    try:
        text = [line for line in log.read_text(errors="replace").replace("\r", "\n").splitlines() if line.strip()]
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def random_images(folder: Path, count: int, size: int, classes: int, seed: int = 0) -> Path:
    """`count` random RGB images in `classes` class folders (memory-only sweeps)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(count):
        d = folder / f"class{i % classes}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i:05d}.png")
    return folder


def _arch(cfg: SweepConfig):
    from vqt_edge.arch import resolve_arch

    if cfg.model_name is None and not cfg.sizes:
        raise UserError("give --model, or all of --depth --dim --heads --mlp-dim --patch --image-size")
    return resolve_arch(cfg.model_name, **cfg.sizes)


def run_sweep(cfg: SweepConfig, echo: Callable[[str], None] = print) -> list[dict]:
    arch = _arch(cfg)
    todo = configurations(cfg, arch.depth)
    cfg.out.mkdir(parents=True, exist_ok=True)
    data, classes = cfg.data, cfg.num_classes
    if cfg.steps is not None:
        if cfg.steps < 1:
            raise UserError("--steps must be at least 1")
        classes = classes or 2
        data = cfg.out / "random_images"
        if not data.exists():
            random_images(data, cfg.steps * cfg.batch_size, arch.image_size, classes)
        epochs = 1
    else:
        from device_runner.data import load_dataset

        assert data is not None  # SweepConfig: --data or --steps
        classes = classes or len(load_dataset(data).classes)
        epochs = cfg.epochs
    echo(
        f"sweep: {len(todo)} configurations on {cfg.model_name or 'custom'} (depth {arch.depth}, dim {arch.dim}), "
        f"batch {cfg.batch_size}, {'memory only, ' + str(cfg.steps) + ' steps' if cfg.steps else str(epochs) + ' epochs'}"
    )
    results: list[dict] = []
    for i, (method, k) in enumerate(todo, 1):
        name = method.replace("+", "_") + (f"_k{k}" if k else "")
        bundle, run = cfg.out / "bundles" / name, cfg.out / "runs" / name
        for path in (bundle, run):
            if path.exists():
                shutil.rmtree(path)
        bundle.parent.mkdir(parents=True, exist_ok=True)
        run.parent.mkdir(parents=True, exist_ok=True)
        row = {
            "method": method,
            "k": k,
            "T": cfg.query_tokens,
            "batch": cfg.batch_size,
            "micro_batch": cfg.micro_batch,
            "kv": cfg.kv,
            "peak_mb": None,
            "predicted_peak_mb": None,
            "seconds_per_step": None,
            "accuracy": None,
            "accuracy_on": None,
            "status": "ok",
            "error": None,
        }
        label = f"[{i}/{len(todo)}] {method}" + (f" k={k}" if k else "")
        export = _cli(
            "export",
            *(["--model", cfg.model_name] if cfg.model_name else []),
            *(["--weights", cfg.weights] if cfg.weights else []),
            *(["--random-init"] if cfg.random_init else []),
            "--num-classes",
            classes,
            "--query-tokens",
            cfg.query_tokens,
            "--out",
            bundle,
            *[a for key, v in cfg.sizes.items() for a in (f"--{key.replace('_', '-')}", v)],
        )
        if method != "vqt":  # export's default, also where export has no --method yet
            export += ["--method", method]
        if k is not None:
            export += ["--last-k", str(k)] if method in LAST_K_METHODS else ["--query-layers", f"last:{k}"]
        t0 = time.perf_counter()
        echo(f"{label}: export ...")
        done = _run(export, run.parent / f"{name}.export.log")
        if done.returncode != 0:
            row.update(status="export failed", error=_tail(run.parent / f"{name}.export.log"))
            echo(f"{label}: export FAILED ({row['error']})")
            results.append(row)
            _write(cfg.out, results)
            continue
        echo(f"{label}: exported in {time.perf_counter() - t0:.0f} s; training ...")
        train = _cli(
            "train",
            "--bundle",
            bundle,
            "--data",
            data,
            "--run",
            run,
            "--epochs",
            epochs,
            "--batch-size",
            cfg.batch_size,
            *(["--kv", cfg.kv] if cfg.kv else []),
            *(["--kv-dtype", cfg.kv_dtype] if cfg.kv_dtype else []),
        )
        if cfg.micro_batch:
            train += ["--micro-batch", str(cfg.micro_batch)]
        if cfg.lr:
            train += ["--lr", str(cfg.lr)]
        if cfg.test and cfg.steps is None:
            train += ["--test", str(cfg.test)]
        elif cfg.val_split and cfg.steps is None:
            train += ["--val-split", str(cfg.val_split)]
        t0 = time.perf_counter()
        done = _run(train, run.parent / f"{name}.train.log")
        summary_path = run / "summary.json"
        if done.returncode != 0 or not summary_path.exists():
            row.update(status=f"train failed (exit {done.returncode})", error=_tail(run.parent / f"{name}.train.log"))
            echo(f"{label}: train FAILED ({row['error']})")
        else:
            s = json.loads(summary_path.read_text())
            row.update(
                peak_mb=s["peak_rss_mb"],
                predicted_peak_mb=s["predicted_peak_mb"],
                kv=s["kv"],
                micro_batch=s["micro_batch"] or cfg.micro_batch,
                seconds_per_step=s["seconds_per_step"],
            )
            final = s.get("final") or {}
            if cfg.steps is None:
                if "test_accuracy" in s:
                    row.update(accuracy=s["test_accuracy"], accuracy_on="test")
                elif "val_acc" in final:
                    row.update(accuracy=final["val_acc"], accuracy_on="val")
                else:
                    row.update(accuracy=final.get("train_acc"), accuracy_on="train")
            acc = f", accuracy {row['accuracy']:.4f} ({row['accuracy_on']})" if row["accuracy"] is not None else ""
            echo(
                f"{label}: peak {row['peak_mb']:.0f} MiB (predicted {row['predicted_peak_mb']}), "
                f"{row['seconds_per_step']} s/step{acc}; {time.perf_counter() - t0:.0f} s"
            )
        if not cfg.keep_bundles:
            shutil.rmtree(bundle, ignore_errors=True)
        results.append(row)
        _write(cfg.out, results)
    plot = plot_results(
        results,
        cfg.out / "accuracy_vs_memory.png",
        memory_only=cfg.steps is not None,
        title=f"{cfg.model_name or 'custom'}, batch {cfg.batch_size}",
    )
    echo(f"wrote {cfg.out / 'results.csv'}, {cfg.out / 'results.json'}, {plot}")
    if all(r["status"] != "ok" for r in results):
        raise UserError(f"every configuration failed; see the logs in {cfg.out / 'runs'}")
    return results


def _write(out: Path, results: list[dict]) -> None:
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for r in results:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in FIELDS})
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def plot_results(results: list[dict], path: Path, memory_only: bool = False, title: str = "") -> Path:
    """Fig. 3b style: x peak memory (MB), y accuracy, one line per method over k (each point
    labelled with its k). Memory-only sweeps (no accuracy) put k on the y axis instead."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib (results.csv/json are written)") from None
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    methods = list(dict.fromkeys(r["method"] for r in results))
    for method in methods:
        rows = sorted(
            (r for r in results if r["method"] == method and r["peak_mb"] is not None), key=lambda r: r["k"] or 0
        )
        if not rows:
            continue
        xs = [r["peak_mb"] for r in rows]
        ys = [
            (r["k"] or 0) if memory_only else (r["accuracy"] if r["accuracy"] is not None else float("nan"))
            for r in rows
        ]
        ax.plot(xs, ys, marker="o", label=method)
        for r, x, y in zip(rows, xs, ys):
            if r["k"] is not None:
                ax.annotate(f"k={r['k']}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("peak memory of the training process (MiB, VmHWM)")
    ax.set_ylabel("k (adapted / query layers)" if memory_only else "accuracy")
    ax.set_title(title + (" (memory only)" if memory_only else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
