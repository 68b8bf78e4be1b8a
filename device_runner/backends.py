"""Two ways to run a training step, one result (docs/design.md sections 7 and 9).

- `portable`: a plain onnxruntime InferenceSession on the bundle's step graph (train/step.onnx:
  forward + gradients in standard ops), the optimizer in numpy. Runs on any onnxruntime build
  (stock, onnxruntime-gpu for Jetson, the training build). Its checkpoint is what is trained: the
  trainable tensors, their Adam moments and the position, in one small safetensors file.
- `ort-training`: onnxruntime-training's Module/Optimizer on the bundle's training artifacts (needs
  the training build, whose last release is 1.19.2). Its checkpoint also carries the frozen
  weights of the training graph.

Both apply the same update: ORT's AdamW in its Hugging Face mode (adam_mode=1: the bias
correction goes into the learning rate, eps is not bias-corrected), after the runner's decoupled
weight decay p <- p * (1 - lr * wd) on every tensor with ndim >= 2 (query tokens, prompts,
matrices; not biases or norms). The numpy optimizer below reproduces ORT's CPU kernel
(`AdamWOptimizer`, orttraining/training_ops/cpu/optimizer/adamw/adamw.cc) in float32.

The portable path never imports onnxruntime.training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save

from device_runner import ort
from vqt_edge import manifest as mf
from vqt_edge.errors import UserError
from vqt_edge.fileio import atomic_path, atomic_write_bytes
from vqt_edge.kv_cache import STEP_INT8_FED, layer_input
from vqt_edge.manifest import Manifest
from vqt_edge.optim import AdamW, decay_factor
from vqt_edge.spec import BACKENDS, DEFAULT_BACKEND

# Where both run: as fast (vit_b16 step 0.245 vs 0.250 CPU s) and as lean at a full batch (1079 vs
# 1065 MiB), a 1.25 MiB checkpoint saved in ms instead of 272 MiB in 0.5 s, a far lower memory
# floor under --memory-budget, and the same backend on every onnxruntime (bench/step_bench.py; docs/benchmarks.md).
DEFAULT = DEFAULT_BACKEND
Position = dict[str, float | int]  # epoch, step, loss_sum, correct, seen


class Backend(Protocol):
    """What the trainer needs from a backend. `forward` in train mode accumulates gradients until
    `step` applies them (micro-batches add up); in eval mode it only returns loss and logits."""

    input_names: list[str]  # graph inputs the trainer feeds: frozen outputs, query_keep, targets
    input_dtypes: dict[str, np.dtype]  # dtype each fed input must have
    layer_major: frozenset[str]  # fed outputs gathered [Lq, B, ...] (the int8-fed step graph; FeatureStore.gather)
    position: dict  # where the checkpoint it resumed from stopped (empty when starting)

    def forward(self, feed: dict[str, np.ndarray]) -> tuple[float, np.ndarray]: ...
    def train(self) -> None: ...
    def eval(self) -> None: ...
    def step(self, lr: float, weight_decay: float) -> None: ...
    def parameters(self) -> dict[str, np.ndarray]: ...
    def set_parameters(self, tensors: dict[str, np.ndarray]) -> None: ...
    def save(self, path: Path, position: Position) -> None: ...  # the run folder's CHECKPOINTS[name]


def has_step_graph(manifest: Manifest) -> bool:
    return mf.STEP_MODEL in manifest.files and mf.STEP_INIT in manifest.files


def resolve(requested: str, manifest: Manifest) -> str:
    """The backend a run uses: `requested`, or for "auto" the default where it can run here, else
    the other one (portable needs the bundle's step graph, ort-training the training build of
    onnxruntime). An explicit request that cannot run is a UserError."""
    return candidates(requested, manifest)[0]


def candidates(requested: str, manifest: Manifest) -> tuple[str, ...]:
    """The backends a run may use, preferred first: for "auto" every one that can run here, the
    default first (a --memory-budget takes the first whose plan fits, vqt_edge/memory.py); else
    just `requested`, which must be able to run (UserError otherwise)."""
    runnable = {"portable": has_step_graph(manifest), "ort-training": ort.has_training_api()}
    why = {
        "portable": "this bundle has no train/step.onnx (exported by an older vqt-edge); re-export it",
        "ort-training": "the installed onnxruntime has no training API (install onnxruntime-training-cpu, see docs/install.md)",
    }
    if requested == "auto":
        found = tuple(name for name in (DEFAULT, *(b for b in BACKENDS if b != DEFAULT)) if runnable[name])
        if found:
            return found
        raise UserError(f"no training backend can run here: {why['portable']}, and {why['ort-training']}")
    if requested not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}")
    if not runnable[requested]:
        other = next(b for b in BACKENDS if b != requested)
        raise UserError(f"--backend {requested}: {why[requested]}; or use --backend {other}")
    return (requested,)


def open_backend(
    name: str,
    bundle: Path,
    manifest: Manifest,
    device: str,
    threads: int | None,
    resume_from: Path | None,
    arena: bool = True,
    int8_feed: bool = False,
) -> Backend:
    """`arena`: the portable step session's memory arena. Training keeps it on (a step twice as fast,
    for 3.5% of the step's peak at micro-batch 32 on ViT-B/16: vqt_edge/memory.py STEP_WORK); off
    only to measure that (bench/calibrate_memory.py). `int8_feed`: the features come from an int8
    cache; the portable backend then runs the bundle's int8-fed step graph (mf.STEP_INT8_MODEL: K/V
    dequantized in the graph one layer at a time, a quarter of the fp32 feed's bytes; docs/kv-cache.md)
    where the bundle has one, and the fp32 feed's train/step.onnx otherwise (bundles exported before it)."""
    if name == "portable":
        return PortableBackend(bundle, manifest, device, threads, resume_from, arena, int8_feed)
    return OrtTrainingBackend(bundle, manifest, device, threads, resume_from)


# Constant folding would store a transposed copy of every frozen weight the backward pass
# multiplies by (dX = dY W^T); unfolded, ORT fuses the Transpose into the MatMul instead.
# vit_b16, batch 32, one thread: peak 1508 instead of 1808 MiB, 0.38 CPU s per step.
STEP_DISABLED_OPTIMIZERS = ["ConstantFolding"]


def step_session_options(threads: int | None, arena: bool = True) -> object:
    """SessionOptions of the step graph (bench/step_bench.py profiles with the same)."""
    options = ort.session_options(threads)
    # Unlike the frozen pass (whose batches vary), every step allocates the same buffers: with the
    # arena they are reused instead of page-faulted in again on each call. vit_b16, batch 32, one
    # thread: 0.40 CPU s per step instead of 0.75, peak +33 MiB (bench/step_bench.py's feed).
    options.enable_cpu_mem_arena = arena
    # The memory pattern (one block planned from the first call, allocated from the second on) sat
    # next to the arena's buffers: stock onnxruntime 1.32, vit_b16 as above, peak 1528 -> 1086 MiB
    # without it, 0.227 -> 0.245 CPU s per step; onnxruntime-training 1.19.2: 1303 MiB either way.
    options.enable_mem_pattern = False
    return options


class PortableBackend:
    """Step graph on an InferenceSession + AdamW in numpy; checkpoint = safetensors of what is trained.

    With `int8_feed` (and a bundle that has it) the session runs mf.STEP_INT8_MODEL, the same step
    whose K/V are int8 codes, one input per query layer (vqt_edge/kv_cache.py `layer_input`), and
    their per-channel scales: the trainer gathers the codes layer-major (`layer_major`), so each
    layer's input is a contiguous view, fed without a copy."""

    def __init__(
        self,
        bundle: Path,
        manifest: Manifest,
        device: str,
        threads: int | None,
        resume_from: Path | None,
        arena: bool = True,
        int8_feed: bool = False,
    ) -> None:
        rt = ort.onnxruntime()
        self.shapes = manifest.spec.trainable_shapes
        int8_feed = int8_feed and mf.STEP_INT8_MODEL in manifest.files
        self.session = rt.InferenceSession(
            str(bundle / (mf.STEP_INT8_MODEL if int8_feed else mf.STEP_MODEL)),
            sess_options=step_session_options(threads, arena),
            providers=ort.providers(device),
            disabled_optimizers=STEP_DISABLED_OPTIMIZERS,
        )
        inputs = self.session.get_inputs()
        graph_inputs = [i.name for i in inputs]
        self.names = graph_inputs[: len(self.shapes)]  # adapter names, in the graph's order
        if set(self.names) != set(self.shapes):
            raise UserError(
                f"{bundle / mf.STEP_MODEL}: inputs {graph_inputs} do not start with the trainable tensors "
                f"{sorted(self.shapes)} of the manifest; re-export the bundle"
            )
        self.input_names = graph_inputs[len(self.names) :]
        self.input_dtypes = {
            i.name: np.dtype(np.float16 if i.type == "tensor(float16)" else np.float32)
            for i in inputs[len(self.names) :]
        }
        # The int8 graph's per-layer inputs, as the trainer feeds them: one int8 array per output, layer-major.
        self.layers = {
            name: [n for n in self.input_names if n.startswith(name + ".")] for name in STEP_INT8_FED if int8_feed
        }
        self.layer_major = frozenset(self.layers)
        for name, layer_names in self.layers.items():
            if layer_names != [layer_input(name, i) for i in range(len(layer_names))] or not layer_names:
                raise UserError(
                    f"{bundle / mf.STEP_INT8_MODEL}: unexpected inputs {graph_inputs}; re-export the bundle"
                )
            self.input_names = [n for n in self.input_names if n not in layer_names]
            self.input_names.insert(0, name)
            self.input_dtypes = {k: v for k, v in self.input_dtypes.items() if k not in layer_names}
            self.input_dtypes[name] = np.dtype(np.int8)
        self.outputs = [o.name for o in self.session.get_outputs()]
        # Evaluation fetches loss and logits only; this runs just the nodes they need (no backward).
        self.eval_options = rt.RunOptions()
        self.eval_options.only_execute_path_to_fetches = True
        self.training = True
        self.grads: dict[str, np.ndarray] | None = None
        # FedProx (docs/design.md section 12): (mu, the round's start tensors); step() adds
        # mu * (w - start) to each gradient. Set by a fleet round, never saved in the checkpoint.
        self.proximal: tuple[float, dict[str, np.ndarray]] | None = None
        self.position: dict = {}
        if resume_from is None:
            self.params = self._read(
                bundle / mf.STEP_INIT, {n: n for n in self.names}, "re-copy or re-export the bundle"
            )
            self.adam = AdamW.zeros_like(self.params)
        else:
            self._load(resume_from)

    # -- running ------------------------------------------------------------------------------
    def train(self) -> None:
        self.training = True

    def eval(self) -> None:
        self.training = False

    def forward(self, feed: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
        if self.layers:  # [Lq, B, ...] codes -> one contiguous view per layer
            feed = dict(feed)
            for name, layer_names in self.layers.items():
                codes = feed.pop(name)
                feed.update(zip(layer_names, codes))
        if not self.training:
            loss, logits = self.session.run(["loss", "logits"], {**self.params, **feed}, self.eval_options)
            return float(loss), logits
        out = self.session.run(self.outputs, {**self.params, **feed})
        grads = dict(zip(self.names, out[2:]))
        if self.grads is None:
            self.grads = grads
        else:
            for n in self.names:
                self.grads[n] += grads[n]
        return float(out[0]), out[1]

    def step(self, lr: float, weight_decay: float) -> None:
        """Decoupled weight decay, then ORT's AdamW (adam_mode=1), in float32 as its CPU kernel."""
        if self.grads is None:
            raise RuntimeError("step() without a forward pass in train mode")
        if weight_decay:
            keep = decay_factor(lr, weight_decay)
            for n, p in self.params.items():
                if p.ndim >= 2:
                    self.params[n] = p * keep
        grads = self.grads
        if self.proximal is not None:
            mu, anchor = self.proximal
            grads = {n: g + np.float32(mu) * (self.params[n] - anchor[n]) for n, g in grads.items()}
        self.adam.step(self.params, grads, lr)
        self.grads = None

    def parameters(self) -> dict[str, np.ndarray]:
        return {n: self.params[n].copy() for n in self.names}

    def set_parameters(self, tensors: dict[str, np.ndarray]) -> None:
        """Replace the trained tensors (adapter names; the optimizer state is kept): a fleet round."""
        for n in self.names:
            self.params[n] = np.ascontiguousarray(tensors[n], np.float32)

    # -- checkpoint ---------------------------------------------------------------------------
    def save(self, path: Path, position: Position) -> None:
        """One safetensors file: `param/NAME`, `exp_avg/NAME`, `exp_avg_sq/NAME`; the optimizer step
        and the position in its metadata, floats as exact reprs. Written atomically and fsynced."""
        tensors = {}
        for n in self.names:
            tensors[f"param/{n}"] = self.params[n]
            tensors[f"exp_avg/{n}"] = self.adam.exp_avg[n]
            tensors[f"exp_avg_sq/{n}"] = self.adam.exp_avg_sq[n]
        meta = {"format": mf.FORMAT, "optimizer_step": str(self.adam.t), **{k: repr(v) for k, v in position.items()}}
        atomic_write_bytes(path, save(tensors, metadata=meta))

    def _load(self, path: Path) -> None:
        hint = "this run cannot be resumed from it; start a new --run"
        tensors = self._read(
            path, {f"{kind}/{n}": n for kind in ("param", "exp_avg", "exp_avg_sq") for n in self.names}, hint
        )
        self.params = {n: tensors[f"param/{n}"] for n in self.names}
        exp_avg = {n: tensors[f"exp_avg/{n}"] for n in self.names}
        exp_avg_sq = {n: tensors[f"exp_avg_sq/{n}"] for n in self.names}
        try:
            with safe_open(str(path), framework="np") as f:
                meta = dict(f.metadata() or {})
            self.adam = AdamW(exp_avg, exp_avg_sq, int(meta.pop("optimizer_step")))
            meta.pop("format", None)
            self.position = {k: int(v) if k in ("epoch", "step") else float(v) for k, v in meta.items()}
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"{path}: damaged checkpoint metadata ({e}); {hint}") from None

    def _read(self, path: Path, expect: dict[str, str], hint: str) -> dict[str, np.ndarray]:
        """Tensors `expect` (file key -> adapter name, for the shape) from a safetensors file, each
        float32 of the manifest's shape; anything else is a damaged file."""
        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError, ValueError) as e:
            raise UserError(f"{path}: damaged checkpoint ({e}); {hint}") from None
        for key, name in expect.items():
            t = tensors.get(key)
            if t is None or t.dtype != np.float32 or t.shape != tuple(self.shapes[name]):
                got = "missing" if t is None else f"{t.dtype}{list(t.shape)}"
                raise UserError(f"{path}: tensor {key!r} is {got}, expected float32{list(self.shapes[name])}; {hint}")
        if set(tensors) != set(expect):
            raise UserError(f"{path}: unexpected tensors {sorted(set(tensors) - set(expect))}; {hint}")
        return {key: np.ascontiguousarray(tensors[key]) for key in expect}


class OrtTrainingBackend:
    """onnxruntime-training's Module and Optimizer on the bundle's artifacts (its CheckpointState
    holds parameters, moments and the position as properties)."""

    def __init__(
        self, bundle: Path, manifest: Manifest, device: str, threads: int | None, resume_from: Path | None
    ) -> None:
        api = ort.training_api()
        self.manifest = manifest
        ckpt = resume_from if resume_from is not None else bundle / mf.CHECKPOINT
        try:
            self.state = api.CheckpointState.load_checkpoint(str(ckpt))
        except RuntimeError as e:  # ORT: "Checkpoint verification failed" and the like
            raise UserError(
                f"{ckpt}: damaged checkpoint ({str(e).splitlines()[0][:200]}); "
                + (
                    "re-copy or re-export the bundle"
                    if resume_from is None
                    else "this run cannot be resumed from it; start a new --run"
                )
            ) from None
        ort.providers(device)  # a clear error if this build has no CUDA
        options = ort.onnxruntime().SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # Arena off: with it the Module grew at its second train step and stayed there (vit_b16 VPT
        # k=4, batch 32: 2376 MiB after one step, 3309 after two or three; 2042 flat without), past
        # the memory model, whose terms come from first steps. The VQT step is as fast either way
        # (0.245 vs 0.248 CPU s, bench/step_bench.py) and peaks 16 MiB higher (1081 MiB).
        options.enable_cpu_mem_arena = False
        self.module = api.Module(
            str(bundle / mf.TRAINING_MODEL),
            self.state,
            str(bundle / mf.EVAL_MODEL),
            device=device,
            session_options=options,
        )
        self.optimizer = api.Optimizer(str(bundle / mf.OPTIMIZER_MODEL), self.module)
        self.input_names = list(self.module.input_names())
        # The training graph takes fp32: fp16 cache rows are converted by the feed (FeatureStore.gather).
        self.input_dtypes = {name: np.dtype(np.float32) for name in self.input_names}
        self.layer_major: frozenset[str] = frozenset()
        props = self.state.properties
        self.position = {
            k: props[k]
            for k in ("epoch", "step", "loss_sum", "correct", "seen")
            if resume_from is not None and k in props
        }

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def forward(self, feed: dict[str, np.ndarray]) -> tuple[float, np.ndarray]:
        loss, logits = self.module(*[feed[name] for name in self.input_names])
        return float(loss), logits

    def step(self, lr: float, weight_decay: float) -> None:
        if weight_decay:
            keep = decay_factor(lr, weight_decay)
            for name in self.manifest.spec.trainable_shapes:
                param = self.state.parameters[name]
                value = param.data
                if value.ndim >= 2:
                    param.data = value * keep
        self.optimizer.set_learning_rate(lr)
        self.optimizer.step()
        self.module.lazy_reset_grad()

    def parameters(self) -> dict[str, np.ndarray]:
        return {name: np.array(self.state.parameters[name].data) for name in self.manifest.spec.trainable_shapes}

    def set_parameters(self, tensors: dict[str, np.ndarray]) -> None:
        """Replace the trained tensors (adapter names; the optimizer state is kept): a fleet round."""
        for name in self.manifest.spec.trainable_shapes:
            self.state.parameters[name].data = np.ascontiguousarray(tensors[name], np.float32)

    def save(self, path: Path, position: Position) -> None:
        api = ort.training_api()
        for k, v in position.items():
            # ORT stores float properties as float32; running sums go in as exact strings.
            self.state.properties[k] = repr(v) if isinstance(v, float) else v
        with atomic_path(path) as tmp:
            api.CheckpointState.save_checkpoint(self.state, str(tmp), include_optimizer_state=True)
