"""The device side of fleet adaptation: a Flower ClientApp around the trainer (docs/design.md section 12).

Flower's SuperNode starts a fresh ClientApp process for every message, so everything a device keeps
between rounds lives in its state folder: the client's own run folder (`run/`: the K/V disk cache,
filled once in the first round, and the ORT checkpoint) and the tensors it sent back each round
(`rounds/round_R.safetensors`, for audit and for the tests). A round resumes that run from its
checkpoint, replaces the parameters by the server's tensors, trains `local-epochs` more epochs and
returns the trainable tensors with the number of training images.

Optimizer state is *carried* from round to round (the checkpoint keeps AdamW's moments), and the
learning-rate schedule runs over all rounds x local epochs, warm-up once, as one centralized run of
that length would: ORT restores optimizer state only through a checkpoint, which the resume path
already does exactly, and a fresh state every round would warm Adam's moments up from zero each time.
The server trains every client every round; a client that missed a round (it failed, or joined
late) trains the epochs it missed in its next round, since its run continues from its checkpoint.

Torch-free, like all of device_runner; the Flower import is confined to this module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from device_runner import ort
from device_runner.deploy import save_adapter
from device_runner.trainer import Trainer, TrainConfig
from vqt_edge import manifest as mf
from vqt_edge.errors import UserError
from vqt_edge.memory import lean_malloc, peak_rss_mb
from vqt_edge.run_folder import RunFolder

#: Keys of the messages, shared with the ServerApp (vqt_edge/fleet/server.py).
ARRAYS, CONFIG, METRICS_KEY, NUM_EXAMPLES = "arrays", "config", "metrics", "num-examples"
CLIENT_RUN, ROUNDS = "run", "rounds"


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


def train_round(state: Path, bundle: Path, data: Path, tensors: dict[str, np.ndarray], cfg: TrainConfig,
                classes: list[str], server_round: int, local_epochs: int) -> tuple[dict[str, np.ndarray], dict]:
    """One round on this device: (returned tensors, metrics). Round r trains epochs
    (r-1)*E+1 .. r*E of the client's run, which `cfg.epochs` (= rounds x E) sizes."""
    run = state / CLIENT_RUN
    folder = RunFolder(run)
    resume = folder.is_run()
    if resume:
        saved = folder.info()["config"]
        if saved["epochs"] != cfg.epochs or saved["lr"] != cfg.lr:
            raise UserError(f"{run}: holds a client run of another fleet run; give this client a new state folder")
    with folder.lock():
        trainer = Trainer(bundle, run, cfg, data, None, resume, echo=lambda _: None, classes=classes)
        done = trainer.fit(until_epoch=server_round * local_epochs, start_from=lambda t: set_tensors(t, tensors))
        out = get_tensors(trainer)
    (state / ROUNDS).mkdir(exist_ok=True)
    save_adapter(state / ROUNDS / f"round_{server_round}.safetensors", out, trainer.manifest)
    last = folder.metrics()[-1]
    metrics = {
        NUM_EXAMPLES: int(done["train_images"]), "train_loss": float(last["train_loss"]),
        "train_acc": float(last["train_acc"]), "seconds": float(sum(trainer.step_times)),
        "peak_rss_mb": float(peak_rss_mb()),
    }
    return out, metrics


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
        raise UserError(f"{bundle}: not the bundle the server federates (manifest sha256 {sha[:12]} != "
                        f"{str(config['bundle-sha256'])[:12]})")
    rounds, local_epochs = int(config["rounds"]), int(config["local-epochs"])
    cfg = TrainConfig(
        epochs=rounds * local_epochs, batch_size=int(config["batch-size"]), lr=float(config["lr"]),
        weight_decay=float(config["weight-decay"]), warmup_epochs=float(config["warmup-epochs"]),
        seed=int(config["seed"]), kv=str(node.get("kv", "disk")), threads=int(node["threads"]) if "threads" in node else None,
        micro_batch=int(node["micro-batch"]) if "micro-batch" in node else None,
        memory_budget_mb=float(node["memory-budget-mb"]) if "memory-budget-mb" in node else None,
    )
    state.mkdir(parents=True, exist_ok=True)
    tensors = {name: array.numpy() for name, array in msg.content[ARRAYS].items()}
    out, metrics = train_round(state, bundle, data, tensors, cfg, [str(c) for c in config["classes"]],
                               int(config["server-round"]), local_epochs)
    content = RecordDict({
        ARRAYS: ArrayRecord({name: Array(value) for name, value in out.items()}),
        METRICS_KEY: MetricRecord(metrics),
    })
    return Message(content=content, reply_to=msg)

