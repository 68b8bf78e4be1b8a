"""The device side of fleet adaptation: a Flower ClientApp around the trainer (docs/design.md section 12).

Flower's SuperNode starts a fresh ClientApp process for every message, so everything a device keeps
between rounds lives in its state folder: the client's own run folder (`run/`: the K/V disk cache,
filled once in the first round, and the ORT checkpoint) and the tensors it sent back each round
(`rounds/round_R.safetensors`, for audit and for the tests). A round resumes that run from its
checkpoint, replaces the parameters by the server's tensors, trains `local-steps` more steps (each of
min(batch, its images) images: every client the same steps, however few its images) or, when the server
asks for them, `local-epochs` more epochs, and returns the trainable tensors with its number of images.

Optimizer state is *carried* from round to round (the checkpoint keeps AdamW's moments), and the
learning-rate schedule runs over all rounds x local steps (or epochs), warm-up once, as one centralized
run of that length would: ORT restores optimizer state only through a checkpoint, which the resume path
already does exactly, and a fresh state every round would warm Adam's moments up from zero each time.
The server trains every client every round; a client that missed a round (it failed, or joined
late) trains the epochs it missed in its next round, since its run continues from its checkpoint.

With --calibrate-head the server sends one more message after the last round, a query: the client
returns per-class statistics of its head inputs under the final tensors (`feature_stats`; CCVR,
vqt_edge/calibrate.py), never the features themselves.

Torch-free, like all of device_runner; the Flower import is confined to this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from device_runner import ort
from device_runner.data import drop_unreadable, load_dataset
from device_runner.deploy import save_adapter
from device_runner.features import DiskCache, FrozenBackbone, image_sha256
from device_runner.selection import compute_features, feature_source
from device_runner.trainer import Trainer
from vqt_edge import manifest as mf
from vqt_edge.calibrate import class_stats
from vqt_edge.config import TrainConfig
from vqt_edge.errors import UserError
from vqt_edge.kv_cache import DEFAULT_KV_DTYPE
from vqt_edge.memory import lean_malloc, peak_rss_mb
from vqt_edge.run_folder import RunFolder

#: Keys of the messages, shared with the ServerApp (vqt_edge/fleet/server_app.py).
ARRAYS, CONFIG, METRICS_KEY, NUM_EXAMPLES = "arrays", "config", "metrics", "num-examples"
CLIENT_RUN, ROUNDS = "run", "rounds"
HEAD_BIAS = "head.bias"  # the classifier's bias in every method's trainable set (logit adjustment shifts it)
HEAD_ROWS = ("head.weight", HEAD_BIAS)  # one row per class: what --class-weighted-head averages per class
CLASS_COUNTS = "class-counts"  # a client's training images per class, sent only when the server asks
CALIBRATE = "calibrate-head"  # the server's round config: "", "diagonal" or "full" (vqt_edge/calibrate.py)
FEATURE_BATCH = 64


@dataclass(frozen=True)
class LocalRule:
    """How a client trains its round beyond `train`'s options: the fixes for clients whose data differ
    (docs/design.md section 12). The defaults are plain FedAvg.

    - proximal_mu: FedProx, mu * (w - w_round_start) added to every gradient (portable backend only:
      onnxruntime-training's Optimizer takes the gradients straight from its graph).
    - logit_adjust: tau; the client trains with head.bias + tau * log(its class prior) (counts + 1),
      and sends the bias back without it: the softmax of a balanced-data model under this client's
      label skew, so classes it lacks are not pushed down (logit adjustment; any backend).
    - optimizer: "carry" keeps AdamW's moments across rounds, "reset" starts them from zero each
      round (portable backend only: ORT restores moments only from its own checkpoint). Not a CLI
      option: on validation it changed nothing (examples/results/fleet/validation.md).
    """

    proximal_mu: float = 0.0
    logit_adjust: float = 0.0
    optimizer: str = "carry"

    def backend(self, requested: str) -> str:
        """The backend a client asks for: `auto` means portable when this rule needs it."""
        needs_portable = bool(self.proximal_mu) or self.optimizer != "carry"
        return "portable" if requested == "auto" and needs_portable else requested

    def check(self, backend: str) -> None:
        if self.proximal_mu < 0 or self.logit_adjust < 0 or self.optimizer not in ("carry", "reset"):
            raise UserError("--proximal-mu and --logit-adjust must be non-negative, --optimizer carry or reset")
        if backend != "portable" and (self.proximal_mu or self.optimizer != "carry"):
            raise UserError(
                "--proximal-mu and --optimizer reset need --backend portable "
                "(onnxruntime-training's optimizer cannot take them)"
            )


def prior_shift(labels: np.ndarray, classes: int, tau: float) -> np.ndarray:
    """tau * log of this client's class prior, counts + 1 so that absent classes stay finite; centred."""
    counts = np.bincount(labels, minlength=classes).astype(np.float64) + 1
    shift = tau * np.log(counts / counts.sum())
    return (shift - shift.mean()).astype(np.float32)


def get_tensors(trainer: Trainer) -> dict[str, np.ndarray]:
    """The trainable tensors, by their adapter names (the spec's `trainable_shapes`), as float32 copies."""
    return {name: np.array(value, np.float32) for name, value in trainer.adapter_tensors().items()}


def set_tensors(trainer: Trainer, tensors: dict[str, np.ndarray]) -> None:
    """Replace the trainable tensors (e.g. by the server's average); every name and shape must match
    the bundle, so tensors of another bundle or method are refused, not broadcast into place."""
    shapes = trainer.manifest.spec.trainable_shapes
    if set(tensors) != set(shapes):
        raise UserError(f"the server sent tensors {sorted(tensors)}, the bundle trains {sorted(shapes)}")
    for name in shapes:
        shape = np.shape(tensors[name])
        if shape != tuple(shapes[name]):
            raise UserError(f"tensor {name!r} is {list(shape)}, the bundle expects {list(shapes[name])}")
    trainer.backend.set_parameters(tensors)


def train_round(
    state: Path,
    bundle: Path,
    data: Path,
    tensors: dict[str, np.ndarray],
    cfg: TrainConfig,
    classes: list[str],
    server_round: int,
    local_epochs: int,
    rule: LocalRule = LocalRule(),
) -> tuple[dict[str, np.ndarray], dict]:
    """One round on this device: (returned tensors, metrics). Round r trains epochs
    (r-1)*E+1 .. r*E of the client's run, which `cfg.epochs` (= rounds x E) sizes."""
    run = state / CLIENT_RUN
    folder = RunFolder(run)
    resume = folder.is_run()
    if resume:
        saved = folder.info()["config"]
        if (saved["epochs"], saved["lr"], saved.get("steps_per_epoch")) != (cfg.epochs, cfg.lr, cfg.steps_per_epoch):
            raise UserError(f"{run}: holds a client run of another fleet run; give this client a new state folder")
    shift: np.ndarray | None = None

    def start(trainer: Trainer) -> None:
        nonlocal shift
        rule.check(trainer.cfg.backend)
        start_tensors = dict(tensors)
        if rule.logit_adjust:
            if HEAD_BIAS not in start_tensors:
                raise UserError(f"--logit-adjust needs a trainable {HEAD_BIAS!r}; this bundle trains {sorted(tensors)}")
            shift = prior_shift(trainer.labels[: trainer.n_train], len(classes), rule.logit_adjust)
            start_tensors[HEAD_BIAS] = tensors[HEAD_BIAS] + shift
        set_tensors(trainer, start_tensors)
        backend = trainer.backend
        if rule.proximal_mu:
            backend.proximal = (rule.proximal_mu, get_tensors(trainer))
        if rule.optimizer == "reset":
            backend.adam.reset()

    with folder.lock():
        trainer = Trainer(bundle, run, cfg, data, None, resume, echo=lambda _: None, classes=classes)
        done = trainer.fit(until_epoch=server_round * local_epochs, start_from=start)
        out = get_tensors(trainer)
    if shift is not None:
        out[HEAD_BIAS] = out[HEAD_BIAS] - shift
    (state / ROUNDS).mkdir(exist_ok=True)
    save_adapter(state / ROUNDS / f"round_{server_round}.safetensors", out, trainer.manifest)
    last = folder.metrics()[-1]
    metrics = {
        NUM_EXAMPLES: int(done["train_images"]),
        "train_loss": float(last["train_loss"]),
        "train_acc": float(last["train_acc"]),
        "seconds": float(sum(trainer.step_times)),
        "peak_rss_mb": float(peak_rss_mb()),
        CLASS_COUNTS: np.bincount(trainer.labels[: trainer.n_train], minlength=len(classes)).tolist(),
    }
    return out, metrics


def feature_stats(
    state: Path,
    bundle: Path,
    data: Path,
    tensors: dict[str, np.ndarray],
    classes: list[str],
    diagonal: bool,
    threads: int | None = None,
) -> dict[str, np.ndarray]:
    """Per-class count, mean and covariance (or variance) of this device's head input features under
    the server's final `tensors` (CCVR, vqt_edge/calibrate.py). The frozen outputs come from the
    client run's K/V disk cache, filled in the rounds (any image missing from it is run once now)."""
    manifest = mf.read_manifest(bundle)
    dataset, _ = drop_unreadable(load_dataset(data, classes=classes), manifest.spec.arch.image_size)
    paths = [p for p, _ in dataset.samples]
    labels = np.array([y for _, y in dataset.samples], np.int64)
    cache = DiskCache.for_bundle(state / CLIENT_RUN, manifest)
    hashes = [image_sha256(p) for p in paths]
    cache.fill(
        lambda: FrozenBackbone(bundle, manifest, "cpu", threads), paths, hashes, manifest, FEATURE_BATCH, lambda _: None
    )
    store = cache.store(hashes)
    source = feature_source(bundle, manifest, tensors, lambda rows: store.gather(rows), threads=threads, scratch=state)
    x = compute_features(source, len(paths), FEATURE_BATCH)
    return class_stats(x, labels, len(classes), diagonal)


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Flower's train handler: node config (this device: data, bundle, state folder, threads, K/V mode)
    plus the server's round config (schedule, classes, the bundle's identity)."""
    ort.block_torch()  # this process exists for this message: set it up as `vqt-edge train` sets up its own
    lean_malloc()
    node = context.node_config
    config = msg.content[CONFIG]
    bundle, data, state = Path(str(node["bundle"])), Path(str(node["data"])), Path(str(node["state"]))
    sha = mf.sha256_file(bundle / mf.MANIFEST)
    if sha != config["bundle-sha256"]:
        raise UserError(
            f"{bundle}: not the bundle the server federates (manifest sha256 {sha[:12]} != "
            f"{str(config['bundle-sha256'])[:12]})"
        )
    rounds, local_epochs = int(config["rounds"]), int(config["local-epochs"])
    local_steps = int(config.get("local-steps", 0)) or None  # a round is one epoch of this many steps
    rule = LocalRule(
        proximal_mu=float(config.get("proximal-mu", 0.0)), logit_adjust=float(config.get("logit-adjust", 0.0))
    )
    cfg = TrainConfig(
        epochs=rounds * local_epochs,
        batch_size=int(config["batch-size"]),
        lr=float(config["lr"]),
        weight_decay=float(config["weight-decay"]),
        warmup_epochs=float(config["warmup-epochs"]),
        seed=int(config["seed"]),
        kv=str(node.get("kv", "disk")),
        threads=int(node["threads"]) if "threads" in node else None,
        micro_batch=int(node["micro-batch"]) if "micro-batch" in node else None,
        memory_budget_mb=float(node["memory-budget-mb"]) if "memory-budget-mb" in node else None,
        backend=rule.backend(str(node.get("backend", "auto"))),
        kv_dtype=str(node.get("kv-dtype", DEFAULT_KV_DTYPE)),
        steps_per_epoch=local_steps,
    )
    state.mkdir(parents=True, exist_ok=True)
    tensors = {name: array.numpy() for name, array in msg.content[ARRAYS].items()}
    out, metrics = train_round(
        state,
        bundle,
        data,
        tensors,
        cfg,
        [str(c) for c in config["classes"]],
        int(config["server-round"]),
        local_epochs,
        rule,
    )
    if not config.get("class-weighted-head", False):
        del metrics[CLASS_COUNTS]  # the label histogram leaves the device only when the server's rule needs it
    content = RecordDict(
        {
            ARRAYS: ArrayRecord({name: Array(value) for name, value in out.items()}),
            METRICS_KEY: MetricRecord(metrics),
        }
    )
    return Message(content=content, reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Flower's query handler: after the last round, this device's feature statistics under the
    final global tensors (--calibrate-head); only per-class counts and moments are sent."""
    ort.block_torch()
    lean_malloc()
    node = context.node_config
    config = msg.content[CONFIG]
    bundle, data, state = Path(str(node["bundle"])), Path(str(node["data"])), Path(str(node["state"]))
    tensors = {name: array.numpy() for name, array in msg.content[ARRAYS].items()}
    stats = feature_stats(
        state,
        bundle,
        data,
        tensors,
        [str(c) for c in config["classes"]],
        str(config[CALIBRATE]) == "diagonal",
        int(node["threads"]) if "threads" in node else None,
    )
    content = RecordDict(
        {
            ARRAYS: ArrayRecord({name: Array(value) for name, value in stats.items()}),
            METRICS_KEY: MetricRecord({"peak_rss_mb": float(peak_rss_mb())}),
        }
    )
    return Message(content=content, reply_to=msg)
