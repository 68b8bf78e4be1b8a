"""What a run is asked to do: frozen dataclasses (a training run, a fleet), each field with the help text its flag shows.

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
        "Rows of the K/V cache (--kv ram/disk): int8 with a float32 scale per channel, or fp16 (about twice the "
        "bytes; docs/kv-cache.md). auto: int8 (the same accuracy on the measured tasks, a faster vqt step), "
        "fp16 only where int8 would not fit the budgets.",
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


CALIBRATIONS = ("full", "diagonal", "off")  # --calibrate-head: CCVR with a full or diagonal covariance
DEFAULT_MAX_EXAMPLES = 100_000  # images one client may claim per round: far above an edge device's own set


def parse_aggregation(text: str) -> tuple[str, float]:
    """`fedavg`, `median` or `trimmed:BETA` (0 <= BETA < 0.5, the fraction cut from each end)."""
    kind, _, arg = text.partition(":")
    if kind in ("fedavg", "median") and not arg:
        return kind, 0.0
    if kind == "trimmed":
        try:
            beta = float(arg or "0.2")
        except ValueError:
            beta = -1.0
        if 0.0 <= beta < 0.5:
            return kind, beta
    raise UserError(f"--aggregation {text!r}: use fedavg, median or trimmed:BETA with 0 <= BETA < 0.5")


@dataclass(frozen=True)
class FleetConfig:
    """What a fleet's server decides for every client (`fleet simulate` / `fleet server` options; sent to
    the clients with each round, docs/fleet.md).

    Why these defaults (docs/fleet-defaults.md; chosen on validation folds of the training images only):
    a round used to be one local epoch at batch 32, so a client of 18-69 images made one or two AdamW
    steps a round with its own warm-up and cosine sized to them; the label-skewed heads barely moved and
    FedAvg cancelled them (chance accuracy). A round is now a fixed number of steps, each of
    min(batch, shard) images, the same for every client, so one lr schedule runs across the fleet; and
    the head is recalibrated on the clients' per-class feature statistics after the last round (CCVR).
    """

    rounds: int = _opt(10, "Federated rounds.")
    local_steps: int = _opt(
        20,
        "AdamW steps each client trains per round, each on min(--batch-size, its images) images: every client "
        "the same steps however few its images.",
    )
    local_epochs: int | None = _opt(
        None,
        "Instead of --local-steps: passes over its own images per round (a client with few images then makes "
        "few steps).",
    )
    batch_size: int = _opt(32, "Images per step (a client with fewer uses all of its images in each step).")
    lr: float = _opt(
        1e-2,
        "Peak learning rate (AdamW; warm-up once, then cosine over rounds x local steps, one schedule for every "
        "client).",
    )
    weight_decay: float = _opt(1e-4, "Decoupled weight decay on query tokens and head weight.")
    warmup_epochs: float | None = _opt(
        None, "Warm-up, in rounds (or, with --local-epochs, epochs of rounds x local epochs) [default: 10%]."
    )
    seed: int = _opt(0, "Seeds the split, data order and dropout.")
    round_timeout: float = _opt(3600.0, "Seconds to wait for the clients of a round.")
    logit_adjust: float = _opt(
        0.0,
        "Each client trains with tau * log(its class prior) added to the head's bias, removed before sending: "
        "the fix for clients that see different classes (tau; 0: plain FedAvg).",
    )
    proximal_mu: float = _opt(
        0.0, "FedProx: mu * (w - the round's start) added to every gradient (portable backend only)."
    )
    class_weighted_head: bool = _opt(
        False,
        "Average each class's head row over the clients weighted by their images of that class (clients then "
        "send their per-class image counts).",
    )
    calibrate_head: str = _opt(
        "full",
        "After the last round, refit the head on virtual features drawn from the clients' per-class feature "
        "means and covariances (full) or variances (diagonal): CCVR. On by default: each client then SENDS, "
        "once, per class its image count and the mean and covariance of its features (full: about C x F^2 / 2 "
        "floats; never images or per-image features). off: nothing but the trainable tensors leaves a device.",
        choices=CALIBRATIONS,
    )
    aggregation: str = _opt(
        "fedavg",
        "fedavg (weighted mean), median (element-wise; resists a minority of arbitrary updates) or trimmed:BETA "
        "(mean without the BETA largest and smallest fraction per element).",
    )
    max_examples: int = _opt(
        DEFAULT_MAX_EXAMPLES, "Largest num_examples a client may claim in a round (FedAvg weights by it)."
    )
    max_update_norm: float | None = _opt(
        None,
        "Largest L2 distance of a client's tensors from the round's start [default: what AdamW can move them in "
        "the client's steps: lr x steps x sqrt(parameters)].",
    )
    min_clients: int = _opt(1, "Stop with an error when fewer client updates than this pass the checks in a round.")
    max_concurrent: int = _opt(
        0,
        "Start at most this many clients at once in a round (waves); on a small machine this avoids Flower's "
        "ClientApp restart loop [default: all at once].",
    )

    def validate(self) -> None:
        local = self.local_steps if self.local_epochs is None else self.local_epochs
        if self.rounds < 1 or local < 1 or self.batch_size < 1:
            raise UserError("--rounds, --local-steps, --local-epochs and --batch-size must be at least 1")
        if not (self.lr > 0 and self.weight_decay >= 0 and self.round_timeout > 0):
            raise UserError("--lr and --round-timeout must be positive and --weight-decay non-negative")
        if not (self.logit_adjust >= 0 and self.proximal_mu >= 0):
            raise UserError("--logit-adjust and --proximal-mu must be non-negative")
        if self.calibrate_head not in CALIBRATIONS:
            raise UserError(f"--calibrate-head must be one of {', '.join(CALIBRATIONS)}")
        parse_aggregation(self.aggregation)
        if self.max_examples < 1 or self.min_clients < 1:
            raise UserError("--max-examples and --min-clients must be at least 1")
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            raise UserError("--max-update-norm must be positive")
        if self.max_concurrent < 0:
            raise UserError("--max-concurrent must be 0 (all at once) or more")

    @property
    def steps_per_round(self) -> int | None:
        """Each client's AdamW steps in a round; None when a round is --local-epochs passes over its images."""
        return None if self.local_epochs is not None else self.local_steps
