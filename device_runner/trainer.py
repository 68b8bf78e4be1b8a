"""The on-device training loop: explicit, resumable, torch-free.

Every random number of a run is a pure function of (seed, epoch, step): the data order of epoch e
is `default_rng([seed, e]).permutation(n)` and the dropout mask of step i of epoch e is drawn from
`default_rng([seed, e, i])`. A checkpoint therefore only has to hold the parameters, the Adam
state and the position (epoch, step); a run killed at any point and resumed from its last
checkpoint ends with the same parameters as one that was never interrupted.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from device_runner import backends
from device_runner.data import Dataset, check_trainable, drop_unreadable, iter_batches, load_dataset, split
from device_runner.deploy import build_model, save_adapter
from device_runner.features import DiskCache, FeatureStore, FrozenBackbone, build_ram_store, image_sha256
from device_runner.identity import samples_sha256
from device_runner.selection import compress_adapter
from vqt_edge import adapter_config
from vqt_edge import manifest as mf
from vqt_edge.config import TrainConfig
from vqt_edge.errors import UserError
from vqt_edge.manifest import Manifest
from vqt_edge.memory import BundleFootprint, Plan, available_mb, frozen_batch, lean_malloc, peak_rss_mb, trim_malloc
from vqt_edge.memory.disk import default_disk_budget, plan_run
from vqt_edge.optim import lr_at
from vqt_edge.progress import Counter, OnProgress, Progress, log_progress
from vqt_edge.run_folder import ADAPTER, RUN_FILE, RunFolder

log = logging.getLogger("vqt_edge")  # the default for messages; the CLI and the API pass their own
SharedFeatures = Callable[[list[Path]], FeatureStore]  # sample paths -> their frozen outputs, row i = path i


def data_order(seed: int, epoch: int, n: int, steps: int | None, batch: int) -> tuple[np.ndarray, int, int]:
    """(rows in the order of this epoch, steps in it, images per step). One pass: a seeded permutation
    cut in ceil(n / batch) batches. `steps` given: consecutive seeded permutations, so a small shard
    trains the same number of steps as a large one and each step has min(batch, n) images (no image
    twice in a step); a fleet client's round (docs/design.md section 12)."""
    first = np.random.default_rng([seed, epoch]).permutation(n)
    if steps is None:
        return first, math.ceil(n / batch), batch
    b = min(batch, n)
    pool, rows, k = first.tolist(), [], 1
    for _ in range(steps):
        if len(pool) < b:  # the pass's last images, then the next pass without them
            left = set(pool)
            again = np.random.default_rng([seed, epoch, k, 0xDA7A]).permutation(n).tolist()
            pool += [i for i in again if i not in left]
            k += 1
        rows += pool[:b]
        pool = pool[b:]
    return np.array(rows, np.int64), steps, b


class BudgetExceeded(Exception):
    """The measured peak RSS of a run went over its --memory-budget (summary.json says by how much)."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; the current step was finished and checkpointed."""


_STOP = {"stop": False}  # one per process: set by SIGINT/SIGTERM while `stop_on_signal` is active


@contextmanager
def stop_on_signal() -> Iterator[dict]:
    """Turn SIGINT/SIGTERM into a flag checked at safe points: after each training step (which is
    then checkpointed) and between batches of the frozen pass. Nested uses share the flag, so a
    Ctrl-C during start-up is not forgotten when the loop begins."""

    def handler(signum, _frame):
        _STOP["stop"] = True

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield _STOP
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@dataclass
class _Data:
    classes: list[str]
    train: Dataset
    val: Dataset | None
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _load_data(
    manifest: Manifest,
    data: Path,
    val: Path | None,
    cfg: TrainConfig,
    echo: Callable[[str], None],
    classes: list[str] | None = None,
) -> _Data:
    # Given `classes` (a fleet client: docs/design.md section 12), the shard may lack some of them.
    train = load_dataset(data, classes=classes)
    if manifest.class_names is not None and train.classes != manifest.class_names:
        raise UserError(f"{data}: classes {train.classes} differ from the bundle's {manifest.class_names}")
    if len(train.classes) != manifest.spec.num_classes:
        raise UserError(
            f"{data}: {len(train.classes)} classes, but the bundle was exported for {manifest.spec.num_classes} "
            "(export again with --num-classes)"
        )
    skipped: list[tuple[str, str]] = []
    size = manifest.spec.arch.image_size
    train, bad = drop_unreadable(train, size)  # warns once per skipped image
    skipped += [(str(p), why) for p, why in bad]
    if classes is None:
        check_trainable(train, str(data))
    elif not train.samples:
        raise UserError(f"{data}: no usable images")
    valset = None
    if val is not None:
        valset, bad = drop_unreadable(load_dataset(val, classes=train.classes), size)
        skipped += [(str(p), why) for p, why in bad]
    elif cfg.val_split > 0:
        train, valset = split(train, cfg.val_split, cfg.seed)
    return _Data(train.classes, train, valset, skipped)


def _stoppable(progress: Callable[[int], None]) -> Callable[[int], None]:
    """A progress callback that also stops the frozen pass between batches on Ctrl-C."""

    def update(n: int) -> None:
        progress(n)
        _stop_point("during the frozen K/V pass")

    return update


def _one_hot(labels: np.ndarray, classes: int, weight: float) -> np.ndarray:
    out = np.zeros((len(labels), classes), np.float32)
    out[np.arange(len(labels)), labels] = weight
    return out


class Trainer:
    """Holds one run: its data, features and training backend (device_runner/backends.py). `fit()` runs it to the end."""

    # FeatureStore, FrozenBackbone and backends.Backend, each set to None when its phase ends (a memory
    # budget covers the whole run, docs/design.md section 6); typed Any so each phase's use needs no assert.
    store: Any
    backbone: Any
    backend: Any

    def __init__(
        self,
        bundle: Path | None,
        run: Path,
        cfg: TrainConfig,
        data: Path | None,
        val: Path | None,
        resume: bool,
        echo: Callable[[str], None] = log.info,
        with_test: bool = False,
        features: SharedFeatures | None = None,
        classes: list[str] | None = None,
        progress: OnProgress | None = None,
    ) -> None:
        self.run, self.echo, self.shared_features = run, echo, features
        self.progress = progress or log_progress  # vqt_edge/progress.py: the CLI draws bars, a library logs
        self.folder = folder = RunFolder(run)
        if resume and not folder.is_run():
            raise UserError(f"{run}: nothing to resume (no {RUN_FILE}); start it without --resume")
        if not resume and folder.is_run():
            raise UserError(f"{run}: already holds a run; pass --resume to continue it, or choose another --run")
        if resume:
            saved = folder.info()
            try:
                bundle, data = Path(saved["bundle"]), Path(saved["data"])
                val = Path(saved["val"]) if saved.get("val") else None
                # Runs started before the portable backend existed trained on onnxruntime-training.
                # ... and runs started before int8 existed cached fp16.
                cfg = TrainConfig(**{"backend": "ort-training", "kv_dtype": "fp16", **saved["config"]})
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise UserError(f"{run / RUN_FILE}: damaged ({e}); this run cannot be resumed") from None
        cfg.validate()
        if bundle is None:
            raise UserError("--bundle is required")
        self.bundle = bundle
        self.manifest = mf.read_manifest(bundle, verify=True)
        # saved in run.json: a resume keeps it; with "auto", a --memory-budget may pick another that fits
        self.backend_choices = backends.candidates(cfg.backend, self.manifest)
        self.cfg = cfg = replace(cfg, backend=self.backend_choices[0])  # the caller's config is never changed
        self.resume = resume and folder.checkpoint(cfg.backend).exists()
        if resume and saved["bundle_manifest_sha256"] != mf.sha256_file(bundle / mf.MANIFEST):
            raise UserError(f"{bundle}: the bundle changed since this run started; it cannot be resumed")
        if data is None:
            raise UserError("--data is required")
        self.data = _load_data(self.manifest, data, val, cfg, echo, classes)
        self.plan = self._plan_memory(with_test)  # before any work, and before run.json saves the choice
        self.feed_buffers: dict[str, np.ndarray] | None = None  # the last training feed, reused (_features)
        self.image_hashes: dict[Path, str] = {}  # each image's bytes hashed once: identity, then disk-cache key
        samples_sha = samples_sha256([(self.data.train, data), (self.data.val, val or data)], self.image_hashes)
        if resume and saved.get("samples_sha256") != samples_sha:
            raise UserError(
                f"{data}: the images changed since this run started (an image was added, removed, renamed, "
                "relabelled or edited); resuming would not continue the same run. Start a new --run."
            )
        if not resume:
            # data paths absolute but not resolved: a list file reached through a symlink reads its relative
            # entries from the link's folder, on resume too (device_runner/identity.py)
            folder.start(
                bundle,
                self.data.classes,
                data=str(data.absolute()),
                val=str(val.absolute()) if val else None,
                config=asdict(self.cfg),
                samples_sha256=samples_sha,
            )

    def _plan_memory(self, with_test: bool) -> Plan:
        """Predict the run's peak (vqt_edge/memory/) and disk use (vqt_edge/memory/disk.py). Under
        --memory-budget, choose the K/V mode and micro-batch that keep it; a --kv, --kv-dtype or --micro-batch
        the user gave is kept only if it fits. Both budgets: K/V mode and cache dtype within the disk
        budget too. No fit: UserError (exit 2) naming what would fit, before any work is done."""
        cfg = self.cfg
        fp = BundleFootprint.from_bundle(self.bundle)
        images = len(self.data.train) + (len(self.data.val) if self.data.val else 0)
        disk_budget = cfg.disk_budget_mb if cfg.disk_budget_mb is not None else default_disk_budget(self.run)
        available = available_mb() if cfg.memory_budget_mb is None and cfg.kv == "auto" else None
        auto_kv = cfg.kv == "auto"
        self.run_plan = run_plan = plan_run(
            fp,
            images=images,
            batch_size=cfg.batch_size,
            micro_batch=cfg.micro_batch,
            kv=cfg.kv,
            kv_dtype=cfg.kv_dtype,
            memory_budget=cfg.memory_budget_mb,
            available=available,
            disk_budget=disk_budget,
            test=with_test,
            backends=self.backend_choices if cfg.memory_budget_mb is not None else (cfg.backend,),
        )
        plan = run_plan.plan
        cfg = self.cfg = replace(cfg, kv=plan.kv, kv_dtype=run_plan.kv_dtype)
        if cfg.memory_budget_mb is not None:
            self.cfg = replace(
                cfg, backend=plan.backend, micro_batch=plan.micro_batch if plan.micro_batch < cfg.batch_size else None
            )
            self.echo(f"memory budget {cfg.memory_budget_mb:.0f} MiB: {plan.describe()}; {run_plan.describe_disk()}")
        elif auto_kv and available is not None:
            self.echo(
                f"K/V {plan.kv} ({cfg.kv_dtype}): predicted peak {plan.peak_mb:.0f} MiB with {available:.0f} MiB "
                "available"
                + ("" if plan.kv == "ram" else " (a RAM cache of these images would not fit; --kv ram forces it)")
                + f"; {run_plan.describe_disk()}"
            )
        return plan

    # -- features ---------------------------------------------------------------------------
    def _backbone(self) -> FrozenBackbone:
        return FrozenBackbone(self.bundle, self.manifest, self.cfg.device, self.cfg.threads)

    def _prepare_features(self) -> None:
        """ram/disk: run the frozen pass once per image, then free the session (phase 1)."""
        samples = self.data.train.samples + (self.data.val.samples if self.data.val else [])
        self.labels = np.array([label for _, label in samples], dtype=np.int64)
        self.paths = [p for p, _ in samples]
        self.n_train = len(self.data.train.samples)
        bs = self.plan.frozen_batch  # a budget bounds this pass too
        if self.cfg.memory_budget_mb is None and self.cfg.device != "cpu":
            bs = frozen_batch(self.cfg.batch_size, self.plan.micro_batch, self.cfg.device)
        if self.shared_features is not None:  # a caller (tune) already ran the frozen pass
            self.store, self.backbone = self.shared_features(self.paths), None
            return
        if self.cfg.kv == "stream":
            self.backbone, self.store = self._backbone(), None
            return
        if self.cfg.kv == "ram":
            backbone = self._backbone()
            done = Counter(self.progress, "frozen pass (K/V to RAM)", len(self.paths))
            self.store = build_ram_store(backbone, self.paths, self.manifest, bs, _stoppable(done), self.cfg.kv_dtype)
            backbone.close()
            trim_malloc()
        else:
            cache = DiskCache.for_bundle(self.run, self.manifest, self.cfg.kv_dtype)
            hashes = [self.image_hashes.get(p) or image_sha256(p) for p in self.paths]
            done = Counter(self.progress, "frozen pass (K/V to disk cache)", cache.missing(hashes))
            cache.fill(self._backbone, self.paths, hashes, self.manifest, bs, _stoppable(done))
            trim_malloc()
            self.store = cache.store(hashes)  # reads unmap what they touched (FeatureStore.gather)
        self.backbone = None

    def _features(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The frozen outputs of these rows, in the dtypes the backend's graph takes (fp32; a bundle
        exported before 2026-11-30 has a portable step taking fp16 K/V; docs/design.md section 10);
        fp32 once the backend is closed (feature selection reads them after training)."""
        if self.backend is None:  # the caller keeps what it gathers: fresh arrays
            return self.store.gather(rows) if self.store is not None else self._backbone_features(rows, {})
        if self.store is not None:
            # Written into the last feed's arrays: it has been consumed (FeatureStore.gather).
            feed = self.store.gather(rows, self.backend.input_dtypes, self.feed_buffers, self.backend.layer_major)
            kept = [a for n, a in (self.feed_buffers or {}).items() if n not in self.backend.layer_major]
            if not kept or len(rows) > len(kept[0]):
                self.feed_buffers = dict(feed)
            return feed
        return self._backbone_features(rows, self.backend.input_dtypes)

    def _backbone_features(self, rows: np.ndarray, dtypes: dict[str, np.dtype]) -> dict[str, np.ndarray]:
        """--kv none: the frozen pass on these rows' images, every step."""
        m = self.manifest
        pixels = next(
            iter_batches([(self.paths[r], 0) for r in rows], len(rows), m.spec.arch.image_size, m.mean, m.std)
        )[0]
        return {
            name: value.astype(dtypes.get(name, np.float32), copy=False)
            for name, value in self.backbone(pixels).items()
        }

    def _run_module(self, rows: np.ndarray, keep: np.ndarray | None, targets: np.ndarray) -> tuple[float, np.ndarray]:
        """One forward (and, in train mode, backward) call, feeding the graph's inputs by name."""
        feed = self._features(rows)
        feed["targets"] = targets
        if keep is not None:
            feed["query_keep"] = keep
        return self.backend.forward(feed)

    def _keep_mask(self, b: int, rng: np.random.Generator | None) -> np.ndarray | None:
        """Query-token dropout mask, already scaled by 1/(1-p); all ones without an rng (eval)."""
        if "query_keep" not in self.backend.input_names:
            return None
        spec = self.manifest.spec
        assert spec.query_keep_shape is not None  # the graph takes query_keep: the spec has query tokens
        shape = (b, *spec.query_keep_shape)
        if rng is None or spec.dropout == 0:
            return np.ones(shape, np.float32)
        return (rng.random(shape) >= spec.dropout).astype(np.float32) / np.float32(1 - spec.dropout)

    # -- backend -------------------------------------------------------------------------------
    def _open_backend(self) -> None:
        name = self.cfg.backend
        ckpt = self.folder.checkpoint(name) if self.resume else None
        int8_feed = self.cfg.kv in ("ram", "disk") and self.cfg.kv_dtype == "int8"  # codes from the cache
        self.backend = backends.open_backend(
            name, self.bundle, self.manifest, self.cfg.device, self.cfg.threads, ckpt, int8_feed=int8_feed
        )

    def _save_checkpoint(self, position: dict) -> None:
        # onnxruntime-training's save serializes the whole checkpoint (CKPT_SAVE, vqt_edge/memory/model.py): the
        # feed is not held through it. The portable save writes only the trainable tensors: the feed is kept,
        # not freed and page-faulted in again by the next step (a fresh 464 MB at vit_b16 batch 32).
        if self.cfg.backend == "ort-training":
            self.feed_buffers = None
        try:
            self.backend.save(self.folder.checkpoint(self.cfg.backend), position)
        except Exception as e:  # a full disk: OSError here, a RuntimeError from ORT
            raise UserError(
                f"could not write checkpoint in {self.run} ({e}); the previous checkpoint is intact"
            ) from None

    def adapter_tensors(self) -> dict[str, np.ndarray]:
        return self.backend.parameters()

    # -- the loop ------------------------------------------------------------------------------
    def _step(self, rows: np.ndarray, epoch: int, index: int, lr: float) -> tuple[float, int]:
        cfg, m = self.cfg, self.manifest
        b = len(rows)
        keep = self._keep_mask(b, np.random.default_rng([cfg.seed, epoch, index]))
        targets = _one_hot(self.labels[rows], m.spec.num_classes, 1.0 / b)
        micro = cfg.micro_batch or b
        loss, correct = 0.0, 0
        for s in range(0, b, micro):
            part = slice(s, s + micro)
            out_loss, logits = self._run_module(rows[part], None if keep is None else keep[part], targets[part])
            loss += out_loss
            correct += int((logits.argmax(-1) == self.labels[rows[part]]).sum())
        # Decoupled weight decay, then ORT's AdamW (the transformers variant): device_runner/backends.py;
        # tests/test_export.py and tests/test_portable.py check both backends against a reference.
        self.backend.step(lr, cfg.weight_decay)
        return loss * b, correct  # loss summed over the batch (the graph averages)

    def evaluate_rows(self, rows: np.ndarray) -> np.ndarray:
        """Logits of the current parameters for these rows (dropout off)."""
        m, out = self.manifest, []
        self.backend.eval()
        chunk = self.cfg.micro_batch or self.cfg.batch_size  # the memory plan's size, not more
        for s in range(0, len(rows), chunk):
            r = rows[s : s + chunk]
            out.append(
                self._run_module(r, self._keep_mask(len(r), None), np.zeros((len(r), m.spec.num_classes), np.float32))[
                    1
                ]
            )
        self.backend.train()
        return np.concatenate(out) if out else np.zeros((0, m.spec.num_classes), np.float32)

    def fit(
        self,
        handle_signals: bool = False,
        until_epoch: int | None = None,
        start_from: Callable[[Trainer], None] | None = None,
    ) -> dict:
        """Train to the end and finish the run (adapter, model.onnx, summary). `handle_signals`: turn
        SIGINT/SIGTERM into checkpoint-and-stop (the CLI). A fleet round (docs/design.md section 12)
        passes `until_epoch` to stop after that epoch without finishing (the next round resumes from
        the checkpoint, optimizer state and schedule carried over), and `start_from` to replace the
        parameters once the module is open."""
        cfg = self.cfg
        t_start = time.perf_counter()
        self.peaks = {"start": round(peak_rss_mb(), 1)}  # VmHWM after each phase: which one set the peak
        self._prepare_features()
        self.peaks["frozen"] = round(peak_rss_mb(), 1)
        self._open_backend()
        if start_from is not None:
            start_from(self)
        self.peaks["module_load"] = round(peak_rss_mb(), 1)
        n = self.n_train
        steps_per_epoch = data_order(cfg.seed, 0, n, cfg.steps_per_epoch, cfg.batch_size)[1]
        total = steps_per_epoch * cfg.epochs
        warmup_epochs = cfg.warmup_epochs if cfg.warmup_epochs is not None else 0.1 * cfg.epochs
        warmup = int(round(warmup_epochs * steps_per_epoch))
        props = self.backend.position
        start_epoch = int(props["epoch"]) if self.resume and "epoch" in props else 0
        start_step = int(props["step"]) if self.resume and "step" in props else 0
        sums = {k: float(props[k]) if self.resume and k in props else 0.0 for k in ("loss_sum", "correct", "seen")}
        self.folder.trim_metrics(start_epoch)
        val_rows = np.arange(n, len(self.paths))
        epoch_times = []
        self.step_times: list[float] = []  # the optimizer steps alone (no checkpoints, no validation)
        self.step_cpu_times: list[float] = []  # their CPU seconds: what a step costs on a shared machine
        with stop_on_signal() if handle_signals else nullcontext(_STOP) as flag:
            for epoch in range(start_epoch, min(cfg.epochs, until_epoch or cfg.epochs)):
                t0 = time.perf_counter()
                order, _, batch = data_order(cfg.seed, epoch, n, cfg.steps_per_epoch, cfg.batch_size)
                first = start_step if epoch == start_epoch else 0
                if first == 0:
                    sums = dict.fromkeys(sums, 0.0)
                label = f"epoch {epoch + 1}/{cfg.epochs}"
                self.progress(Progress(label, first, steps_per_epoch))
                for index in range(first, steps_per_epoch):
                    rows = order[index * batch : (index + 1) * batch]
                    g = epoch * steps_per_epoch + index
                    t_step, c_step = time.perf_counter(), time.process_time()
                    loss, correct = self._step(rows, epoch, index, lr_at(g, total, warmup, cfg.lr))
                    self.step_times.append(time.perf_counter() - t_step)
                    self.step_cpu_times.append(time.process_time() - c_step)
                    sums["loss_sum"] += loss
                    sums["correct"] += correct
                    sums["seen"] += len(rows)
                    self.progress(Progress(label, index + 1, steps_per_epoch, self._bar_text(sums)))
                    last = index + 1 == steps_per_epoch
                    due = cfg.checkpoint_every and (index + 1) % cfg.checkpoint_every == 0
                    if flag["stop"] or (due and not last):
                        self._save_checkpoint({"epoch": epoch, "step": index + 1, **sums})
                    if flag["stop"]:
                        raise Interrupted(
                            f"stopped after step {index + 1} of epoch {epoch + 1}; continue with --resume"
                        )
                record = {
                    "epoch": epoch + 1,
                    "step": (epoch + 1) * steps_per_epoch,
                    "train_loss": sums["loss_sum"] / max(1, sums["seen"]),
                    "train_acc": sums["correct"] / max(1, sums["seen"]),
                    "lr": lr_at((epoch + 1) * steps_per_epoch - 1, total, warmup, cfg.lr),
                    "seconds": round(time.perf_counter() - t0, 3),
                }
                if len(val_rows):
                    record["val_acc"] = float((self.evaluate_rows(val_rows).argmax(-1) == self.labels[val_rows]).mean())
                # Metrics first: if the process dies before the checkpoint, resume trims this line
                # and recomputes the epoch; the other order could lose the line for good.
                self.folder.append_metrics(record)
                self._save_checkpoint({"epoch": epoch + 1, "step": 0, **dict.fromkeys(sums, 0.0)})
                epoch_times.append(record["seconds"])
                self.echo(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        self.peaks["train"] = round(peak_rss_mb(), 1)
        if until_epoch is not None:  # a round of a longer run: the run is finished by the fleet's server
            return {
                "epochs_done": min(cfg.epochs, until_epoch),
                "train_images": n,
                "peak_rss_mb": round(peak_rss_mb(), 1),
            }
        return self._finish(t_start, epoch_times)

    @staticmethod
    def _bar_text(sums: dict) -> str:
        seen = max(1.0, sums["seen"])
        return f"loss {sums['loss_sum'] / seen:.4f} acc {sums['correct'] / seen:.3f}" if sums["seen"] else ""

    def _finish(self, t_start: float, epoch_times: list[float]) -> dict:
        m = self.manifest
        adapter, selection = self.adapter_tensors(), None
        if self.cfg.keep_fraction < 1:
            self.backend = self.feed_buffers = None  # the selection loads the head graph instead
            trim_malloc()
            adapter, selection = compress_adapter(
                self.bundle, m, adapter, self._features, self.labels, self.n_train, self.cfg, scratch=self.run
            )
            self.echo(f"feature selection: kept {selection['features_kept']} of {selection['features_in']} head inputs")
            self.peaks["selection"] = round(peak_rss_mb(), 1)  # not in the memory plan (vqt_edge/memory.py)

        def write_model(path: Path) -> None:
            self.backend = self.store = self.backbone = self.feed_buffers = None  # free before merging the model
            trim_malloc()
            build_model(
                self.bundle,
                m,
                adapter,
                path,
                classes=self.data.classes,
                adapter_sha256=mf.sha256_file(self.folder.path / ADAPTER),
            )  # written just before

        self.folder.write_outputs(
            lambda path: save_adapter(path, adapter, m),
            adapter_config.from_manifest(m, self.data.classes),
            write_model,
            "training is finished and checkpointed: free space and run again with --resume",
        )
        self.peaks["finish"] = round(peak_rss_mb(), 1)
        metrics = self.folder.metrics()
        summary = {
            "train_images": self.n_train,
            "val_images": len(self.paths) - self.n_train,
            "skipped_images": len(self.data.skipped),
            "skipped": [{"path": p, "reason": why} for p, why in self.data.skipped],
            "epochs": self.cfg.epochs,
            "kv": self.cfg.kv,
            "kv_dtype": self.cfg.kv_dtype,
            "backend": self.cfg.backend,
            "final": metrics[-1] if metrics else None,
            "seconds": round(time.perf_counter() - t_start, 3),
            "seconds_per_epoch": round(float(np.mean(epoch_times)), 3) if epoch_times else None,
            **step_stats(self.step_times, self.step_cpu_times),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "micro_batch": self.cfg.micro_batch,
            "memory_budget_mb": self.cfg.memory_budget_mb,
            "predicted_peak_mb": round(self.plan.peak_mb, 1),
            "memory_plan": self.plan.to_dict(),
            "disk_plan": self.run_plan.to_dict(),
            "peak_rss_mb_after": self.peaks,
            "feature_selection": selection,
        }
        return enforce_budget(self.run, self.folder.finish(summary))


def step_stats(wall: list[float], cpu: list[float]) -> dict:
    """Mean and median seconds per step, wall and CPU; the first step (onnxruntime's first calls plan
    and allocate) also apart, so a short run's mean can be told from its steady state."""
    if not wall:
        return {"seconds_per_step": None}
    out = {
        "seconds_per_step": round(float(np.mean(wall)), 4),
        "seconds_per_step_median": round(float(np.median(wall)), 4),
        "cpu_seconds_per_step": round(float(np.mean(cpu)), 4),
        "cpu_seconds_per_step_median": round(float(np.median(cpu)), 4),
        "first_step_cpu_seconds": round(cpu[0], 4),
    }
    if len(cpu) > 1:
        out["cpu_seconds_per_step_after_first"] = round(float(np.mean(cpu[1:])), 4)
    return out


def enforce_budget(run: Path, summary: dict) -> dict:
    """Record the measured peak (VmHWM) in summary.json; above the run's --memory-budget, flag it
    and raise BudgetExceeded: a budget is a promise, and a broken one is a bug, not a warning."""
    budget = summary.get("memory_budget_mb")
    changes: dict = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    if budget is not None:
        changes["budget_exceeded"] = changes["peak_rss_mb"] > budget
    summary = RunFolder(run).update_summary(changes)
    if summary.get("budget_exceeded"):
        raise BudgetExceeded(
            f"measured peak memory {summary['peak_rss_mb']:.0f} MiB exceeds the budget of {budget:.0f} MiB "
            f"(predicted {summary.get('predicted_peak_mb')} MiB); recorded in {run / 'summary.json'}"
        )
    return summary


def train(
    bundle: Path | None,
    run: Path,
    cfg: TrainConfig,
    data: Path | None,
    val: Path | None = None,
    resume: bool = False,
    echo: Callable[[str], None] = log.info,
    with_test: bool = False,
    process_wide: bool = False,
    features: SharedFeatures | None = None,
    progress: OnProgress | None = None,
) -> dict:
    """Train (or resume) a run to its end; returns the run summary. `with_test`: the caller will
    evaluate a test set in this process afterwards (the memory plan includes it). `process_wide`
    (the CLI): set lean malloc, which the memory model assumes, and turn SIGINT/SIGTERM into a
    checkpoint-and-stop; a library caller's process is left as it was. `features`: the frozen
    outputs of the run's samples from a pass the caller already made (device_runner/tune.py)."""
    if process_wide:
        lean_malloc()  # before the large allocations
    _STOP["stop"] = False
    with stop_on_signal() if process_wide else nullcontext(), RunFolder(run).lock():
        trainer = Trainer(bundle, run, cfg, data, val, resume, echo, with_test, features, progress=progress)
        _stop_point("while reading the data")
        return trainer.fit(handle_signals=process_wide)


def _stop_point(where: str) -> None:
    """Before training starts there is nothing to checkpoint: stop here, cleanly, if asked to."""
    if _STOP["stop"]:
        raise Interrupted(f"stopped {where}, before training started; continue with --resume")
