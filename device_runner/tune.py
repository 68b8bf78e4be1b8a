"""`vqt-edge tune`: choose lr and weight decay on a held-out split, all on one frozen pass.

The paper chooses its hyper-parameters on an 800/200 split and retrains the best on all 1000
images (paper B.4; the official `head2toe_train.py` / `tune_vtab.py`, docs/design.md section 11).
VQT's features never change, so every configuration of the grid, and the final retraining, read
the K/V of one frozen pass over the data: the pass runs once for the whole grid, where separate
`train` runs would each run it again (`FrozenBackbone`'s process-wide counters are recorded in
tune.json to show it).

Layout: `RUN.tune/` next to the run folder holds `settings.json`, one ordinary run folder per
configuration (`lr{lr}_wd{wd}/`, trained on the seeded per-class 80% and validated on the 20%),
the K/V cache with `--kv disk`, and `tune.json` (the grid, the choice, the counts, the seconds).
RUN itself is an ordinary run (eval and predict accept it), trained on all the data with the
chosen lr and weight decay. A killed tune continues with `--resume`: finished configurations are
kept, an interrupted one resumes from its checkpoint (device_runner/trainer.py), and the rest run.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from device_runner.data import check_trainable, drop_unreadable, load_dataset
from device_runner.features import DiskCache, FeatureStore, FrozenBackbone, _RowMapped, build_ram_store, image_sha256
from device_runner.trainer import train
from vqt_edge import manifest as mf
from vqt_edge.config import TrainConfig
from vqt_edge.errors import UserError
from vqt_edge.fileio import atomic_write_text
from vqt_edge.kv_cache import DEFAULT_KV_DTYPE
from vqt_edge.memory import frozen_batch, trim_malloc
from vqt_edge.progress import Counter, OnProgress, log_progress
from vqt_edge.run_folder import RunFolder
from vqt_edge.spec import CACHED_KV_MODES

log = logging.getLogger("vqt_edge")

SETTINGS = "settings.json"
TUNE_JSON = "tune.json"
# Official grid for VQT with Adam (head2toe_train.py, train type h2t-prompt): base lrs scaled by
# batch size / 256, as the official code does; weight decays as they are.
OFFICIAL_BASE_LRS = (1.0, 0.5, 0.25, 0.1, 0.05)
OFFICIAL_WEIGHT_DECAYS = (0.01, 0.001, 0.0001, 0.0)
VAL_FRACTION = 0.2  # the paper's 800/200


def default_lrs(batch_size: int) -> list[float]:
    return [lr * batch_size / 256 for lr in OFFICIAL_BASE_LRS]


def workspace(run: Path) -> Path:
    """`RUN.tune/`: the grid's run folders and tune.json, next to the run."""
    return run.with_name(run.name + ".tune")


def config_name(lr: float, wd: float) -> str:
    return f"lr{lr:g}_wd{wd:g}"


def val_score(summary: dict) -> float | None:
    """What a configuration is judged by: the validation accuracy of the model the run deploys
    (after feature selection when it selects), at the last epoch as the official code does."""
    selection = summary.get("feature_selection")
    if selection and selection.get("val_acc") is not None:
        return selection["val_acc"]
    return (summary.get("final") or {}).get("val_acc")


def choose(rows: list[dict]) -> dict:
    """Best validation accuracy; ties go to the smaller lr (the official rule: "for stability"),
    then to the smaller weight decay."""
    return min(rows, key=lambda r: (-r["val_acc"], r["lr"], r["weight_decay"]))


class SharedPass:
    """The frozen outputs of every image of the data set, computed on first use, and views of them
    for any list of those images (what `trainer.train(features=...)` takes)."""

    def __init__(
        self,
        bundle: Path,
        manifest: mf.Manifest,
        paths: list[Path],
        cfg: TrainConfig,
        folder: Path,
        progress: OnProgress = log_progress,
    ) -> None:
        self.bundle, self.manifest, self.paths, self.cfg, self.folder = bundle, manifest, paths, cfg, folder
        self.progress = progress
        self.row = {p: i for i, p in enumerate(paths)}
        self.store: FeatureStore | None = None
        self.seconds = 0.0

    def _build(self) -> FeatureStore:
        t0 = time.perf_counter()
        cfg, m = self.cfg, self.manifest
        batch = frozen_batch(cfg.batch_size, cfg.micro_batch, cfg.device)

        def backbone() -> FrozenBackbone:
            return FrozenBackbone(self.bundle, m, cfg.device, cfg.threads)

        if cfg.kv == "disk":
            cache = DiskCache.for_bundle(self.folder, m, cfg.kv_dtype)
            hashes = [image_sha256(p) for p in self.paths]
            done = Counter(self.progress, "frozen pass (K/V to disk cache)", cache.missing(hashes))
            cache.fill(backbone, self.paths, hashes, m, batch, done)
            store = cache.store(hashes)
        else:
            session = backbone()
            store = build_ram_store(
                session,
                self.paths,
                m,
                batch,
                Counter(self.progress, "frozen pass (K/V to RAM)", len(self.paths)),
                cfg.kv_dtype,
            )
            session.close()
        trim_malloc()
        self.seconds = time.perf_counter() - t0
        return store

    def __call__(self, paths: list[Path]) -> FeatureStore:
        if self.store is None:
            self.store = self._build()
        try:
            rows = np.array([self.row[p] for p in paths], np.int64)
        except KeyError as e:
            raise UserError(f"{e.args[0]}: not among the images of the frozen pass; did the data change?") from None
        base = getattr(self.store, "rows", None)  # a disk cache maps samples to its own rows
        return _RowMapped(self.store.arrays, rows if base is None else base[rows])


def _data_paths(data: Path, manifest: mf.Manifest) -> list[Path]:
    dataset = load_dataset(data)
    if len(dataset.classes) != manifest.spec.num_classes:
        raise UserError(
            f"{data}: {len(dataset.classes)} classes, but the bundle was exported for {manifest.spec.num_classes}"
        )
    dataset, _ = drop_unreadable(dataset, manifest.spec.arch.image_size)
    check_trainable(dataset, str(data))
    return [p for p, _ in dataset.samples]


def _run_one(
    folder: Path,
    bundle: Path,
    cfg: TrainConfig,
    data: Path,
    shared: SharedPass,
    process_wide: bool,
    progress: OnProgress,
) -> dict:
    """Train one run folder to its end (or resume it, or read it when finished); its summary."""
    run = RunFolder(folder)
    if run.is_finished():
        return run.summary()
    resume = run.is_run()
    return train(
        bundle,
        folder,
        cfg,
        data,
        resume=resume,
        echo=lambda _: None,
        features=shared,
        process_wide=process_wide,
        progress=progress,
    )


def tune(
    bundle: Path | None,
    data: Path | None,
    run: Path,
    cfg: TrainConfig,
    lrs: Sequence[float] | None = None,
    weight_decays: Sequence[float] | None = None,
    resume: bool = False,
    echo: Callable[[str], None] = log.info,
    process_wide: bool = False,
    progress: OnProgress = log_progress,
) -> dict:
    """Run the grid, retrain the best on all the data into `run`; returns what tune.json holds.
    `process_wide` as in `trainer.train` (the CLI passes it: Ctrl-C checkpoints and stops)."""
    t_start = time.perf_counter()
    space = workspace(run)
    if resume:
        try:
            saved = json.loads((space / SETTINGS).read_text())
            bundle, data = Path(saved["bundle"]), Path(saved["data"])
            cfg, lrs, weight_decays = TrainConfig(**saved["config"]), saved["lrs"], saved["weight_decays"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{space / SETTINGS}: nothing to resume or damaged ({e})") from None
    else:
        if bundle is None or data is None:
            raise UserError("give --bundle and --data (or --resume to continue a tune)")
        if space.exists() or RunFolder(run).is_run():
            raise UserError(
                f"{space} or {run} already exists; pass --resume to continue that tune, or choose another --run"
            )
        if cfg.kv not in CACHED_KV_MODES:
            raise UserError(
                f"tune keeps the K/V of its one frozen pass: --kv must be one of {', '.join(CACHED_KV_MODES)}"
            )
        if cfg.kv_dtype == "auto":  # one shared pass: its dtype is fixed before any run plans
            cfg = replace(cfg, kv_dtype=DEFAULT_KV_DTYPE)
        lrs = list(lrs or default_lrs(cfg.batch_size))
        weight_decays = list(OFFICIAL_WEIGHT_DECAYS if weight_decays is None else weight_decays)
        if not lrs or not weight_decays or min(lrs) <= 0 or min(weight_decays) < 0:
            raise UserError("--lrs must be positive and --weight-decays non-negative numbers")
        cfg.validate()
        bundle, data = bundle.resolve(), data.resolve()  # what resumed runs read back from their run.json
        space.mkdir(parents=True)
        atomic_write_text(
            space / SETTINGS,
            json.dumps(
                {
                    "bundle": str(bundle),
                    "data": str(data),
                    "config": asdict(cfg),
                    "lrs": lrs,
                    "weight_decays": weight_decays,
                    "val_fraction": VAL_FRACTION,
                },
                indent=2,
            )
            + "\n",
        )
    manifest = mf.read_manifest(bundle, verify=True)
    shared = SharedPass(bundle, manifest, _data_paths(data, manifest), cfg, space, progress)
    passes0, images0 = FrozenBackbone.sessions_opened, FrozenBackbone.images_run

    rows = []
    for lr in lrs:
        for wd in weight_decays:
            folder = space / config_name(lr, wd)
            t0 = time.perf_counter()
            summary = _run_one(
                folder,
                bundle,
                replace(cfg, lr=lr, weight_decay=wd, val_split=VAL_FRACTION),
                data,
                shared,
                process_wide,
                progress,
            )
            row = {
                "lr": lr,
                "weight_decay": wd,
                "val_acc": val_score(summary),
                "train_acc": (summary.get("final") or {}).get("train_acc"),
                "run": folder.name,
                "train_images": summary["train_images"],
                "val_images": summary["val_images"],
                "seconds": summary["seconds"],
                "seconds_this_process": round(time.perf_counter() - t0, 3),
            }
            if row["val_acc"] is None:
                raise UserError(
                    f"{folder}: no validation accuracy (is the data too small for a {VAL_FRACTION:.0%} split?)"
                )
            rows.append(row)
            echo(f"lr {lr:g}  weight decay {wd:g}  val accuracy {row['val_acc']:.4f}")
    best = choose(rows)
    t_final = time.perf_counter()
    final = _run_one(
        run,
        bundle,
        replace(cfg, lr=best["lr"], weight_decay=best["weight_decay"], val_split=0.0),
        data,
        shared,
        process_wide,
        progress,
    )
    result = {
        "run": str(run),
        "bundle": str(bundle),
        "data": str(data),
        "val_fraction": VAL_FRACTION,
        "lrs": lrs,
        "weight_decays": weight_decays,
        "grid": rows,
        "best": {"lr": best["lr"], "weight_decay": best["weight_decay"], "val_acc": best["val_acc"]},
        "images": len(shared.paths),
        # This process's frozen pass: sessions of frozen.onnx opened and images run through it.
        "frozen_passes": FrozenBackbone.sessions_opened - passes0,
        "frozen_images": FrozenBackbone.images_run - images0,
        "seconds": {
            "frozen_pass": round(shared.seconds, 3),
            "final": round(time.perf_counter() - t_final, 3),
            "total_this_process": round(time.perf_counter() - t_start, 3),
        },
        "final_summary": {
            k: final.get(k) for k in ("train_images", "seconds", "peak_rss_mb", "final", "feature_selection")
        },
    }
    atomic_write_text(space / TUNE_JSON, json.dumps(result, indent=2) + "\n")
    return result


def table(result: dict) -> str:
    """The grid as text: one row per lr, one column per weight decay, validation accuracy in %;
    the chosen cell is starred."""
    wds, best = result["weight_decays"], result["best"]
    acc = {(r["lr"], r["weight_decay"]): r["val_acc"] for r in result["grid"]}
    lines = ["val acc (%)  " + "".join(f"{'wd ' + format(wd, 'g'):>12}" for wd in wds)]
    for lr in result["lrs"]:
        cells = []
        for wd in wds:
            star = "*" if (lr, wd) == (best["lr"], best["weight_decay"]) else " "
            cells.append(f"{100 * acc[(lr, wd)]:11.2f}{star}")
        lines.append(f"{'lr ' + format(lr, 'g'):<13}" + "".join(cells))
    return "\n".join(lines)
