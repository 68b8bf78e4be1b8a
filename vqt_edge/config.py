"""What a training run is asked to do: one frozen dataclass, each field with the help text its flag shows.

The CLI generates its options from these fields (vqt_edge/cli/options.py), the API takes the
dataclass as it is, and the trainer never changes it: a plan (K/V mode, micro-batch, backend chosen
against a memory budget) is applied to a copy with `dataclasses.replace`, so a config reused for a
second run means what it meant the first time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vqt_edge.errors import UserError
from vqt_edge.kv_cache import KV_DTYPES
from vqt_edge.spec import BACKENDS, KV_MODES


def _opt(default: Any, help: str, **extra: Any) -> Any:
    """A field with its CLI help (and, in `extra`, `choices`, `flag` or `metavar` for the option; `cli=False`:
    set by a program, not a flag of `train`)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class TrainConfig:
    """`vqt-edge train`'s options; `kv="auto"` and `backend="auto"` leave the choice to the planner."""

    epochs: int = _opt(30, "Passes over the training images.")
    batch_size: int = _opt(32, "Images per optimizer step.")
    micro_batch: int | None = _opt(
        None, "Run each batch in micro-batches of this size (gradient accumulation, less memory)."
    )
    lr: float = _opt(1e-2, "Peak learning rate (AdamW, warm-up then cosine).")
    weight_decay: float = _opt(1e-4, "Decoupled weight decay on query tokens and head weight.")
    warmup_epochs: float | None = _opt(None, "Linear warm-up length [default: 10% of --epochs].")
    seed: int = _opt(0, "Seeds data order, dropout and --val-split.")
    kv: str = _opt(
        "auto",
        "K/V of the frozen backbone: computed once and kept in RAM, cached on disk (fp16, in the run folder), or "
        "recomputed every step [default: RAM if the cache fits in the available memory (or --memory-budget), "
        "else disk].",
        choices=KV_MODES,
    )
    device: str = _opt("cpu", "Where onnxruntime runs.", choices=("cpu", "cuda"))
    threads: int | None = _opt(None, "Threads for the frozen pass and training [default: all cores].")
    val_split: float = _opt(0.0, "Hold out this fraction of --data for validation (seeded, per class).")
    checkpoint_every: int = _opt(0, "Also checkpoint every N steps (0: at the end of every epoch only).")
    memory_budget_mb: float | None = _opt(
        None,
        "Peak memory (RSS) the run must stay within, e.g. 600MB: chooses --kv and --micro-batch (yours are kept "
        "if they fit), exits 2 up front if nothing fits and 3 if the measured peak exceeds it.",
        flag="--memory-budget",
        metavar="SIZE",
    )
    keep_fraction: float = _opt(
        1.0,
        "After training, keep this fraction of the head's input features (group-lasso selection, paper B.2); 1: off.",
    )
    lasso: float = _opt(1e-4, "Group-lasso penalty of --keep-fraction's selection.")
    backend: str = _opt(
        "auto",
        "Training step: portable (any onnxruntime) or ort-training (the onnxruntime-training build); auto: the "
        "default where it can run here, else the other.",
        choices=("auto", *BACKENDS),
    )
    kv_dtype: str = _opt(
        "auto",
        "Rows of the K/V cache (--kv ram/disk): fp16, or int8 with a float32 scale per channel (about half the "
        "bytes; docs/kv-cache.md). auto: fp16 unless only int8 fits the memory and disk budgets.",
        choices=("auto", *KV_DTYPES),
    )
    steps_per_epoch: int | None = _opt(
        None,
        "None: an epoch is one pass over the images. A number: an epoch is that many steps of min(batch_size, "
        "images) images, whatever the images (a fleet round: trainer.data_order).",
        cli=False,
    )
    disk_budget_mb: float | None = _opt(
        None,
        "Disk space the run folder may take, e.g. 20GB: chooses --kv and --kv-dtype with the memory plan, exits 2 "
        "up front if nothing fits [default: the free space of its file system, less 512 MiB or 5% of it].",
        flag="--disk-budget",
        metavar="SIZE",
    )

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError("--epochs and --batch-size must be at least 1")
        if self.micro_batch is not None and not 1 <= self.micro_batch <= self.batch_size:
            raise UserError("--micro-batch must be between 1 and --batch-size")
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise UserError("--lr must be positive and --weight-decay non-negative")
        if self.kv not in (*KV_MODES, "auto"):
            raise UserError(f"--kv must be one of {', '.join(KV_MODES)}")
        if self.memory_budget_mb is not None and not self.memory_budget_mb > 0:
            raise UserError("--memory-budget must be positive")
        if not 0 <= self.val_split < 1:
            raise UserError("--val-split must be in [0, 1)")
        if not (0 < self.keep_fraction <= 1 and self.lasso >= 0):
            raise UserError("--keep-fraction must be in (0, 1] and --lasso non-negative")
        if self.backend not in (*BACKENDS, "auto"):
            raise UserError(f"--backend must be one of {', '.join(BACKENDS)}")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise UserError("--local-steps must be at least 1")
        if self.kv_dtype not in (*KV_DTYPES, "auto"):
            raise UserError(f"--kv-dtype must be one of {', '.join(KV_DTYPES)}")
        if self.disk_budget_mb is not None and not self.disk_budget_mb >= 0:
            raise UserError("--disk-budget must not be negative")
