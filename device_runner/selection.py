"""Group-lasso feature selection for the head (paper B.2; docs/design.md sections 4 and 11).

After the query tokens are learned they are frozen, so the head's input features
[n(cls), n(z_1), ...] of every training image can be computed once. Then, as the official code
(andytu28/VQT, `head2toe_sparsity_train.py`: "compress", then "featselect"):

1. a fresh head is trained with the penalty `lasso * sum_j ||W[:, j]||_2`, added to the loss and
   followed by its plain subgradient (the official code adds it to the loss and lets autograd and
   Adam take it; no proximal step);
2. the features are scored by the column norms of that head and the top `keep_fraction` kept;
3. a fresh head is trained on the kept features alone, without the penalty.

Both heads use the trainer's optimizer family: AdamW (the transformers form ORT uses), linear
warm-up then cosine, the run's epochs and batch size, decoupled weight decay on the weight only,
at half the run's learning rate (the official sparsity runs use 0.5 x the tuned lr). Differences
from the official code: the features are computed once, so query-token dropout (active there in
train mode even with the tokens frozen) is not applied.

Everything here is numpy plus onnxruntime, torch-free and deterministic from the seed. The run
stores the kept indices as `head.feature_index` (int64) next to a `head.weight` of shape [C, k]; its
model.onnx reads only those features (a Gather before the head's Gemm; `selected_head`).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from device_runner import ort
from device_runner.onnx_io.stream import read_graph_skeleton, rewrite_streaming
from vqt_edge import manifest as mf
from vqt_edge.config import TrainConfig
from vqt_edge.errors import UserError
from vqt_edge.manifest import Manifest
from vqt_edge.optim import AdamW, decay_factor, lr_at

FEATURE_INDEX = "head.feature_index"  # adapter (and model.onnx initializer) name of the kept indices
HEAD_LR_SCALE = 0.5  # official sparsity runs: BASE_LR = 0.5 x the tuned lr


# -- the head's input features, from the bundle's head graph ------------------------------------------
HEAD_WEIGHT = "head.weight"  # the Gemm weight feature selection reads and replaces


def head_gemm(nodes: Iterable[onnx.NodeProto], manifest: Manifest) -> onnx.NodeProto:
    """The Gemm that computes `logits` from the head's input features and `head.weight`."""
    for node in nodes:
        if node.op_type == "Gemm" and "logits" in node.output and len(node.input) >= 2 and node.input[1] == HEAD_WEIGHT:
            return node
    raise UserError(
        f"{mf.HEAD_MODEL}: no Gemm computes logits from {HEAD_WEIGHT}; feature selection needs a linear head"
    )


def _learned(manifest: Manifest, adapter: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The adapter's learned tensors that head.onnx holds as initializers (all but the head's)."""
    return {
        name: np.asarray(adapter[name], np.float32)
        for name in manifest.spec.trainable_shapes
        if not name.startswith("head.")
    }


FeatureSource = Callable[[np.ndarray], np.ndarray]  # store rows -> head input features [B, F]


def feature_source(
    bundle: Path,
    manifest: Manifest,
    adapter: dict[str, np.ndarray],
    gather: Callable[[np.ndarray], dict],
    device: str = "cpu",
    threads: int | None = None,
    scratch: Path | None = None,
) -> FeatureSource:
    """The one place that turns frozen outputs into the head's input features, for any method whose
    head is one Gemm on them (vqt: [n(cls), n(z_1), ...]; linear: [n(cls)]; a method whose frozen
    graph emits the features directly: the identity). `gather(rows)` returns the frozen outputs of
    those rows (a FeatureStore's gather). The features graph is head.onnx with the adapter's tensors
    and the Gemm's input as its output, written by a streaming rewrite into a temporary file in
    `scratch` (the run folder; a disk-sized file, not memory) and opened without prepacking: on
    ViT-B/16 the in-memory edit of head.onnx made this phase peak at 1499 MiB in a run planned for
    512 (now no higher than the training step's session)."""
    head = bundle / mf.HEAD_MODEL
    nodes, inputs = read_graph_skeleton(head)
    source = head_gemm(nodes, manifest).input[0]
    if source in inputs:  # head2toe: the Gemm reads a frozen output as it is
        return lambda rows: np.asarray(gather(rows)[source], np.float32)
    out = "selection.head_input"  # a name of its own: the graph may already use "features"
    rt = ort.onnxruntime()
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        path = Path(tmp) / "features.onnx"
        rewrite_streaming(
            head,
            path,
            replace=_learned(manifest, adapter),
            edit_nodes=lambda ns: [*ns, helper.make_node("Identity", [source], [out], name=out)],
            outputs=[helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, None)],
        )
        session = rt.InferenceSession(
            str(path), sess_options=ort.session_options(threads, prepack=False), providers=ort.providers(device)
        )
    names = [i.name for i in session.get_inputs()]

    def features(rows: np.ndarray) -> np.ndarray:
        feed = gather(rows)
        return session.run([out], {name: feed[name] for name in names})[0]

    return features


def compute_features(source: FeatureSource, n: int, batch: int) -> np.ndarray:
    """Features of rows 0..n-1, computed once in batches of `batch`."""
    parts = [source(np.arange(s, min(n, s + batch))) for s in range(0, n, batch)]
    return np.concatenate(parts).astype(np.float32, copy=False)


# -- the head, in numpy ---------------------------------------------------------------------------------
@dataclass
class HeadConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_epochs: float
    seed: int


def group_lasso_grad(weight: np.ndarray, lasso: float) -> np.ndarray:
    """Subgradient of lasso * sum_j ||W[:, j]||_2: lasso * W[:, j] / ||W[:, j]|| (0 for a zero column)."""
    norms = np.sqrt((weight * weight).sum(0, keepdims=True))
    return lasso * np.divide(weight, norms, out=np.zeros_like(weight), where=norms > 0)


def train_head(
    x: np.ndarray, y: np.ndarray, classes: int, cfg: HeadConfig, lasso: float = 0.0, phase: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A linear head (W [C, F], b [C]) on fixed features: softmax cross-entropy (+ group lasso),
    AdamW with warm-up and cosine. Init as torch's nn.Linear weight, U(+-1/sqrt(F)), bias 0; data
    order and init drawn from (seed, phase[, epoch]), so each call is a pure function of its inputs."""
    n, f = x.shape
    rng = np.random.default_rng([cfg.seed, phase])
    bound = 1.0 / math.sqrt(f)
    w = rng.uniform(-bound, bound, (classes, f)).astype(np.float32)
    b = np.zeros(classes, np.float32)
    params = {"w": w, "b": b}
    adam = AdamW.zeros_like(params)
    steps = math.ceil(n / cfg.batch_size)
    total, warmup = steps * cfg.epochs, int(round(cfg.warmup_epochs * steps))
    t = 0
    for epoch in range(cfg.epochs):
        order = np.random.default_rng([cfg.seed, phase, epoch]).permutation(n)
        for i in range(steps):
            rows = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            xb = x[rows]
            logits = xb @ w.T + b
            p = np.exp(logits - logits.max(1, keepdims=True))
            p /= p.sum(1, keepdims=True)
            p[np.arange(len(rows)), y[rows]] -= 1
            p /= len(rows)
            grads = [p.T @ xb, p.sum(0)]
            if lasso:
                grads[0] += group_lasso_grad(w, lasso)
            lr = lr_at(t, total, warmup, cfg.lr)
            t += 1
            params["w"] = params["w"] * decay_factor(lr, cfg.weight_decay)  # decoupled, weight only (as the trainer)
            adam.step(params, {"w": grads[0], "b": grads[1]}, lr)
            w, b = params["w"], params["b"]
    return w, b


def select_features(weight: np.ndarray, keep_fraction: float) -> np.ndarray:
    """Indices (ascending) of the round(keep_fraction * F) columns with the largest L2 norms (at
    least one); ties go to the lower index, so the choice is deterministic."""
    f = weight.shape[1]
    k = max(1, int(round(keep_fraction * f)))
    norms = np.sqrt((weight.astype(np.float64) ** 2).sum(0))
    return np.sort(np.argsort(-norms, kind="stable")[:k]).astype(np.int64)


def compress(
    x: np.ndarray, y: np.ndarray, classes: int, cfg: HeadConfig, keep_fraction: float, lasso: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lasso head -> kept indices -> head retrained on them: (index, W [C, k], b)."""
    w, _ = train_head(x, y, classes, cfg, lasso=lasso, phase=1)
    index = select_features(w, keep_fraction)
    w_sel, b_sel = train_head(np.ascontiguousarray(x[:, index]), y, classes, cfg, phase=2)
    return index, w_sel, b_sel


# -- model.onnx that reads only the kept features ------------------------------------------------------
@contextmanager
def selected_head(bundle: Path, manifest: Manifest, adapter: dict[str, np.ndarray], folder: Path) -> Iterator[Path]:
    """head.onnx as it must be merged for this adapter: the bundle's own when nothing was selected;
    else a temporary copy (in `folder`) whose Gemm reads Gather(features, head.feature_index, axis=1)
    and whose head.weight is [C, k], written by a streaming rewrite (weights copied through)."""
    if FEATURE_INDEX not in adapter:
        yield bundle / mf.HEAD_MODEL
        return
    index = np.asarray(adapter[FEATURE_INDEX], np.int64)

    def insert_gather(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
        gemm = head_gemm(nodes, manifest)
        gather = helper.make_node(
            "Gather", [gemm.input[0], FEATURE_INDEX], ["selected_features"], name="select_features", axis=1
        )
        gemm.input[0] = "selected_features"
        i = nodes.index(gemm)
        return [*nodes[:i], gather, *nodes[i:]]  # just before the Gemm: nodes are in topological order

    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = Path(tmp) / "head.onnx"
        rewrite_streaming(
            bundle / mf.HEAD_MODEL,
            path,
            replace={**_learned(manifest, adapter), HEAD_WEIGHT: adapter[HEAD_WEIGHT]},
            add=[numpy_helper.from_array(index, FEATURE_INDEX)],
            edit_nodes=insert_gather,
        )
        yield path


# -- the step a run takes after its training loop ------------------------------------------------------
def compress_adapter(
    bundle: Path,
    manifest: Manifest,
    adapter: dict[str, np.ndarray],
    gather: Callable[[np.ndarray], dict],
    labels: np.ndarray,
    n_train: int,
    cfg: TrainConfig,
    scratch: Path | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
    """Freeze the learned tensors, compute the head's input features of every sample once (rows
    0..n_train-1 train, the rest validate), select `cfg.keep_fraction` of them with group lasso
    `cfg.lasso` and retrain the head on those. Returns the new adapter (head.weight [C, k],
    head.bias, head.feature_index) and what summary.json records. `scratch`: where the features
    graph's temporary file goes (the run folder)."""
    t0 = time.perf_counter()
    source = feature_source(bundle, manifest, adapter, gather, cfg.device, cfg.threads, scratch)
    x = compute_features(source, len(labels), cfg.micro_batch or cfg.batch_size)
    warmup = cfg.warmup_epochs if cfg.warmup_epochs is not None else 0.1 * cfg.epochs
    head_cfg = HeadConfig(
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=HEAD_LR_SCALE * cfg.lr,
        weight_decay=cfg.weight_decay,
        warmup_epochs=warmup,
        seed=cfg.seed,
    )
    index, w, b = compress(
        x[:n_train], labels[:n_train], manifest.spec.num_classes, head_cfg, cfg.keep_fraction, cfg.lasso
    )

    def accuracy(rows: slice) -> float | None:
        xs = x[rows][:, index]
        return float(((xs @ w.T + b).argmax(-1) == labels[rows]).mean()) if len(xs) else None

    info = {
        "keep_fraction": cfg.keep_fraction,
        "lasso": cfg.lasso,
        "features_in": int(x.shape[1]),
        "features_kept": int(len(index)),
        "head_lr": head_cfg.lr,
        "train_acc": accuracy(slice(0, n_train)),
        "val_acc": accuracy(slice(n_train, None)),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    return {**adapter, "head.weight": w, "head.bias": b, FEATURE_INDEX: index}, info
