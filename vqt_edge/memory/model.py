"""The memory model: the peak resident memory of `vqt-edge train` from a bundle's file sizes and tensor
shapes, the data set size, batch / micro-batch, K/V mode and backend, built from components measured
on the reference machine. Each constant has a one-line summary here; how it was measured is in
bench/results/memory_model.md (bench/calibrate_memory.py remeasures them)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from vqt_edge.errors import UserError
from vqt_edge.kv_cache import cache_bytes
from vqt_edge.memory.measure import MiB
from vqt_edge.spec import BACKENDS, CACHED_KV_MODES, DEFAULT_BACKEND, KV_MODES

# --------------------------------------------------------------------------------------------------
# The memory model: peak resident memory of `vqt-edge train`, from measured components
# --------------------------------------------------------------------------------------------------


# Every constant was measured on this project's reference machine (x86-64, 2 cores, glibc, ORT
# 1.19.2 CPU, lean_malloc() on) with bench/calibrate_memory.py: each component in a fresh
# torch-free process, as VmHWM above the process's resident memory just before the component
# (VmHWM reset through /proc/self/clear_refs), on the tiny test ViT and on ViT-B/16 (random init,
# frozen.onnx 327.0 MiB, train/checkpoint 270.8 MiB). Values in brackets are the ViT-B/16 readings.
# Then checked against whole `train` runs (summary.json's peak_rss_mb_after, VmHWM after each phase).
BASE_MB = 64.0  # runtime baseline: Python, numpy, pillow, click, onnx, onnxruntime imported, torch blocked
SESSION_MB = 9.0  # fixed cost of one onnxruntime session, resident even after it is freed
FROZEN_LOAD = 1.03  # peak while frozen.onnx loads, per byte of the file (beyond SESSION_MB)
FROZEN_RESIDENT = 1.0  # resident after that load, per byte of the file
# a quantized graph loads / stays at its file size plus these MiB
QUANTIZED_LOAD_EXTRA_MB, QUANTIZED_RESIDENT_EXTRA_MB = 11.0, 3.0
FROZEN_WORK = 3.8  # frozen-pass transient per image of a batch, in layer-work units (fitted on whole frozen phases)
CKPT_LOAD = 2.04  # peak while CheckpointState loads train/checkpoint, per byte of the file
CKPT_RESIDENT = 1.045  # checkpoint + Module + Optimizer resident, per byte of the checkpoint
CKPT_SAVE = 1.6  # transient of an ort-training checkpoint save, per byte of checkpoint + optimizer state
FEED = 1.0  # ort-training step per sample, in units of the fp32 feed
# last-k methods per sample, layer-work units: (fixed, per adapted layer); over-predicts 16-30% on portable
ADAPTED_WORK = {"vpt": (0.2, 3.8), "adaptformer": (0.45, 3.2), "finetune": (2.0, 3.5)}
H2T_TAPS = 1.0  # Head2Toe's frozen pass per image beyond FROZEN_WORK, in units of its unpooled taps
OPTIMIZER_COPIES = 3  # ort-training, per trainable byte: gradient buffer and two Adam moments

# The portable backend (device_runner/backends.py PortableBackend: train/step.onnx on an
# InferenceSession, AdamW in numpy). Measured with bench/calibrate_memory.py's `portable` child on
# ViT-B/16 (random init, T=1, all 12 layers: step.onnx 270.8 MiB, 1 thread, 2026-11-30): each
# micro-batch size in a fresh process, the first steps at that size (which grow the memory arena).
STEP_LOAD = 1.40  # peak while the portable step graph loads, per byte of train/step.onnx
STEP_RESIDENT = 1.005  # resident after that load, per byte of train/step.onnx
STEP_WORK = 0.15  # portable step per sample beyond its fed rows, in units of the fp32 feed
STEP_INT8_WIDEN = (
    0.5  # the int8-fed step graph's widened codes (one head at a time), in units of one query layer's fp32 K per sample
)
QUANTIZED_STEP_DEQUANT = 4.8  # a quantized step graph's extra per step, in units of its largest dequantized weight
PORTABLE_OPTIMIZER_COPIES = 5  # portable, per trainable byte: parameters, gradients, two moments, one update
MODEL_WORK = 5.0  # eval / train --test on model.onnx per image beyond its pixels, in layer-work units
FINISH_MB = 4.0  # end of the run: model.onnx streamed from frozen.onnx and head.onnx
MARGIN = 0.08  # a plan fits when its predicted peak is at most budget / (1 + MARGIN)


@dataclass(frozen=True)
class BundleFootprint:
    """What the model needs to know about a bundle: file sizes and per-sample tensor sizes (bytes).

    Read from manifest.json, the sizes of the bundle's files and the (small) training graph's
    inputs; nothing large is loaded."""

    name: str
    method: str
    last_k: int
    query_layers: int
    query_tokens: int
    frozen_bytes: int
    head_bytes: int
    ckpt_bytes: int
    trainable_bytes: int
    pixels_per_sample: int  # fp32 input of the frozen pass
    feed_per_sample: int  # fp32 frozen outputs the training step reads
    cache_per_sample: int  # the same, as cached (fp16 K/V and hidden, fp32 cls)
    layer_work: int  # 4 * (H*N*N + N*mlp + N*D)
    query_path_per_sample: int  # VQT query path activations (T tokens per query layer)
    frozen_taps_per_sample: int = 0  # head2toe: its frozen pass's unpooled taps, 4 * N * (3D + mlp) * depth
    largest_weight_bytes: int = 0  # the backbone's largest weight matrix (qkv or MLP)
    quantize: str = "none"  # the manifest's quantize: how frozen.onnx and head.onnx hold their weights
    step_bytes: int = 0  # train/step.onnx, the portable backend's step graph (0: the bundle has none)
    step_dequantized_bytes: int = 0  # a quantized step graph's largest dequantized weight (0: fp32 step)
    model_bytes: int = 0  # model.onnx as the run will write it: frozen.onnx + the head's unshared part
    # The portable step's fed rows per sample: the fp32 feed (None: that); for a step graph taking
    # fp16 K/V (manifest step_feed "float16", older bundles) those rows plus the fp32 copy its Cast makes.
    step_fed_per_sample: int | None = None
    cache_int8_per_sample: int = 0  # cache_per_sample for an int8 cache (vqt_edge/kv_cache.py; memory/disk.py)
    step_int8_bytes: int = 0  # train/step_int8.onnx, the step of the int8 feed (0: the bundle has none)
    int8_feed: bool = False  # a cached run feeds the int8 cache to that graph (memory/disk.py footprint)

    @classmethod
    def from_bundle(cls, bundle: Path) -> BundleFootprint:
        import numpy as np

        from vqt_edge import manifest as mf

        bundle = Path(bundle)
        m = mf.read_manifest(bundle, verify=False)
        spec = m.spec
        a = spec.arch
        specs = spec.frozen_output_specs
        feed = sum(int(np.prod(shape)) * 4 for shape, _ in specs.values())
        cache = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in specs.values())
        n = a.num_tokens
        work = 4 * (a.heads * n * n + n * a.mlp_dim + n * a.dim)
        lq, t = len(spec.query_layers), spec.query_tokens
        query_path = 4 * lq * t * (8 * a.dim + 2 * a.mlp_dim + 2 * a.heads * n)
        taps = 4 * n * (3 * a.dim + a.mlp_dim) * a.depth if spec.method == "head2toe" else 0
        frozen, head = _size(bundle / mf.FROZEN), _size(bundle / mf.HEAD_MODEL)
        # model.onnx reads the query path's frozen weights (Wq, Wo, fc1, fc2 per query layer) from
        # frozen.onnx's initializers (device_runner/onnx_io/share.py): only fp32 weights match by value.
        shared = (
            4 * lq * 2 * a.dim * (a.dim + a.mlp_dim) if m.quantize == "none" and spec.method.startswith("vqt") else 0
        )
        step, step_int8 = bundle / mf.STEP_MODEL, bundle / mf.STEP_INT8_MODEL
        return cls(
            name=str(bundle),
            method=spec.method,
            last_k=spec.last_k,
            query_layers=lq,
            query_tokens=t,
            frozen_bytes=frozen,
            head_bytes=head,
            ckpt_bytes=_size(bundle / mf.CHECKPOINT),
            trainable_bytes=4 * sum(int(np.prod(shape)) for shape in spec.trainable_shapes.values()),
            pixels_per_sample=4 * a.channels * a.image_size**2,
            feed_per_sample=feed,
            cache_per_sample=cache,
            layer_work=work,
            query_path_per_sample=query_path,
            frozen_taps_per_sample=taps,
            largest_weight_bytes=4 * a.dim * max(3 * a.dim, a.mlp_dim),
            quantize=m.quantize,
            step_bytes=step.stat().st_size if step.exists() else 0,
            model_bytes=frozen + max(0, head - shared),
            step_dequantized_bytes=int(
                (m.quantization or {}).get(mf.STEP_MODEL, {}).get("largest_dequantized_bytes", 0)
            ),
            step_fed_per_sample=feed if m.step_feed == "float32" else cache + feed,
            cache_int8_per_sample=cache_bytes(specs, "int8"),
            step_int8_bytes=step_int8.stat().st_size if mf.STEP_INT8_MODEL in m.files and step_int8.exists() else 0,
        )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        raise UserError(f"{path}: missing; is this a complete vqt-edge bundle?") from None


# Images per frozen-pass call without a budget. On a CPU one: on vit_b16 a call of 1 costs 0.38 CPU s
# per image at one thread against 0.43 for calls of 8, the same wall time at two threads, and the
# frozen phase peaks at 445 instead of 716 MiB (bench/results/frozen_pass.md). On a GPU (not timed
# here) the micro-batch, at most FROZEN_BATCH_MAX.
FROZEN_BATCH_CPU = 1
FROZEN_BATCH_MAX = 8


@dataclass
class Plan:
    """A training configuration with its predicted peak (MiB) and the phase that sets it."""

    kv: str
    micro_batch: int
    batch_size: int
    images: int
    peak_mb: float
    phases: dict[str, float]
    backend: str = DEFAULT_BACKEND
    frozen_batch: int = FROZEN_BATCH_CPU  # images per frozen-pass call (and per test batch)

    @property
    def needs_mb(self) -> float:
        """The smallest budget this configuration fits, margin included (whole MiB)."""
        return float(math.ceil(self.peak_mb * (1 + MARGIN)))

    def fits(self, budget_mb: float) -> bool:
        return self.needs_mb <= budget_mb

    def describe(self) -> str:
        top = max(self.phases, key=self.phases.__getitem__)
        return (
            f"kv {self.kv}, micro-batch {self.micro_batch} (batch {self.batch_size}, frozen pass {self.frozen_batch} "
            f"images at a time), backend {self.backend}: predicted peak {self.peak_mb:.0f} MiB, set by the {top} phase"
        )

    def to_dict(self) -> dict:
        return {
            "backend": self.backend,
            "kv": self.kv,
            "micro_batch": self.micro_batch,
            "batch_size": self.batch_size,
            "frozen_batch": self.frozen_batch,
            "images": self.images,
            "predicted_peak_mb": round(self.peak_mb, 1),
            "needs_mb": self.needs_mb,
            "phases_mb": {k: round(v, 1) for k, v in self.phases.items()},
        }


def frozen_batch(batch_size: int, micro_batch: int | None, device: str = "cpu") -> int:
    """Images per frozen-pass call without a budget: FROZEN_BATCH_CPU on a CPU; elsewhere the
    micro-batch, at most FROZEN_BATCH_MAX."""
    if device == "cpu":
        return FROZEN_BATCH_CPU
    return max(1, min(micro_batch or batch_size, FROZEN_BATCH_MAX))


def predict_peak(
    fp: BundleFootprint,
    *,
    images: int,
    batch_size: int,
    micro_batch: int | None,
    kv: str,
    test_batch: int | None = None,
    backend: str = DEFAULT_BACKEND,
    frozen_batch_size: int | None = None,
) -> Plan:
    """Predicted VmHWM (MiB) of `vqt-edge train` on `images` images (train + validation).

    peak = BASE_MB + max over the phases the run goes through, each in MiB above the baseline:

    - frozen (kv ram/disk: frozen.onnx runs once per image, then its session is freed):
      SESSION_MB + max(FROZEN_LOAD * frozen file, FROZEN_RESIDENT * frozen file + act_frozen(fb)
      + store), with fb = `frozen_batch_size` (default frozen_batch()), act_frozen(b) = b * (fp32
      input + fp32 outputs + FROZEN_WORK * layer work + H2T_TAPS * head2toe's taps), and store =
      images * cache row (fp16 K/V) in ram mode; in disk mode one batch of rows, as the fill
      unmaps the pages it wrote after every batch. A quantized frozen.onnx (and model.onnx) loads
      at file + QUANTIZED_LOAD_EXTRA_MB and stays resident at file + QUANTIZED_RESIDENT_EXTRA_MB.
    - train, backend ort-training: 2 * SESSION_MB + store + max(CKPT_LOAD * checkpoint, module +
      max(step, save)), with module = CKPT_RESIDENT * checkpoint + OPTIMIZER_COPIES * trainable
      bytes, step = micro * (FEED * fp32 feed + query path activations + adapted layers'
      activations, ADAPTED_WORK), save = CKPT_SAVE * (checkpoint + Adam moments). The store is the
      RAM cache (ram) or nothing (disk: the trainer unmaps the cache pages after every read). In
      stream mode the frozen session stays resident for the whole run (FROZEN_RESIDENT * frozen
      file) and each step adds act_frozen(micro).
    - train, backend portable: the same with the step session in place of the ORT checkpoint and
      module: load = STEP_LOAD * step file, module = STEP_RESIDENT * step file +
      PORTABLE_OPTIMIZER_COPIES * trainable bytes, step = micro * (fed rows + STEP_WORK * fp32
      feed + adapted layers' activations) (+ QUANTIZED_STEP_DEQUANT * largest dequantized weight for a quantized step graph),
      save = 3 * trainable bytes. A cached run on an int8 cache whose bundle has the int8-fed step
      graph (`int8_feed`) loads that file instead, and its fed rows are the int8 cache rows plus
      STEP_INT8_WIDEN query layers' fp32 K (the codes it widens, one head of one layer at a time).
    - finish: 2 * SESSION_MB + 2 * trainable bytes (the adapter) + FINISH_MB + the largest weight
      (streamed model.onnx); the module and checkpoint state are freed before it.
    - test (only with `test_batch`, i.e. `train --test`): model.onnx (`model_bytes`) loaded as the
      frozen graph is, plus test_batch * (fp32 pixels + MODEL_WORK * layer work).

    Phases run one after the other and free what they used (lean_malloc), so the peak is their
    max; in stream mode the frozen session and the training module are resident together, so
    their costs add.
    """
    if kv not in KV_MODES:
        raise ValueError(kv)
    if backend not in BACKENDS:
        raise ValueError(backend)
    micro = micro_batch or batch_size
    fb = frozen_batch_size or frozen_batch(batch_size, micro)
    mb = 1 / MiB

    def act_frozen(b: int) -> float:
        return (
            b
            * (
                fp.pixels_per_sample
                + fp.feed_per_sample
                + FROZEN_WORK * fp.layer_work
                + H2T_TAPS * fp.frozen_taps_per_sample
            )
            * mb
        )

    def loaded(file_mb: float) -> tuple[float, float]:
        """(load peak, resident) of an inference session on a graph file of this size."""
        if fp.quantize != "none":
            return file_mb + QUANTIZED_LOAD_EXTRA_MB, file_mb + QUANTIZED_RESIDENT_EXTRA_MB
        return FROZEN_LOAD * file_mb, FROZEN_RESIDENT * file_mb

    frozen_load, frozen_res = loaded(fp.frozen_bytes * mb)
    cache = images * fp.cache_per_sample * mb
    trainable = fp.trainable_bytes * mb
    fixed, per_layer = ADAPTED_WORK.get(fp.method.split("+")[-1], (2.0, 3.8))
    adapted = (fixed + per_layer * fp.last_k) * fp.layer_work if fp.last_k else 0.0
    if backend == "ort-training":
        ckpt = fp.ckpt_bytes * mb
        load = CKPT_LOAD * ckpt
        module = CKPT_RESIDENT * ckpt + OPTIMIZER_COPIES * trainable
        save = CKPT_SAVE * (ckpt + 2 * trainable)
        step = micro * (FEED * fp.feed_per_sample + fp.query_path_per_sample + adapted) * mb
    else:
        int8_graph = fp.int8_feed and fp.step_int8_bytes > 0 and kv in CACHED_KV_MODES
        step_bytes = fp.step_int8_bytes if int8_graph else fp.step_bytes
        load = STEP_LOAD * step_bytes * mb
        module = STEP_RESIDENT * step_bytes * mb + PORTABLE_OPTIMIZER_COPIES * trainable
        save = 3 * trainable
        fed: float = fp.feed_per_sample if fp.step_fed_per_sample is None else fp.step_fed_per_sample
        if int8_graph:  # the int8 cache's rows as they are, plus the head slices it widens
            fed = fp.cache_per_sample + STEP_INT8_WIDEN * fp.feed_per_sample / (2 * max(fp.query_layers, 1))
        step = micro * (fed + STEP_WORK * fp.feed_per_sample + adapted) * mb
        step += QUANTIZED_STEP_DEQUANT * fp.step_dequantized_bytes * mb
        step += save  # the trainer keeps the portable feed through its (small) checkpoint save
    phases: dict[str, float] = {}
    if kv in CACHED_KV_MODES:
        store = cache if kv == "ram" else fb * fp.cache_per_sample * mb  # disk: one batch's pages at a time
        phases["frozen"] = SESSION_MB + max(frozen_load, frozen_res + act_frozen(fb) + store)
        store = cache if kv == "ram" else 0.0
        phases["train"] = 2 * SESSION_MB + store + max(load, module + max(step, save))
    else:
        phases["train"] = 2 * SESSION_MB + max(
            frozen_load, frozen_res + max(load, module + max(step + act_frozen(micro), save))
        )
    phases["finish"] = 2 * SESSION_MB + 2 * trainable + FINISH_MB + fp.largest_weight_bytes * mb
    if test_batch:
        model_load, model_res = loaded((fp.model_bytes or fp.frozen_bytes + fp.head_bytes) * mb)
        work = test_batch * (fp.pixels_per_sample + MODEL_WORK * fp.layer_work) * mb
        # 2, not 3, sessions' fixed costs: a tiny-model `train --test` peaked 11 MiB under the 3 (80.4 MiB
        # measured), within 2.3 MiB of 2; the third session reuses what the first two left.
        phases["test"] = 2 * SESSION_MB + max(model_load, model_res + work)
    return Plan(kv, micro, batch_size, images, BASE_MB + max(phases.values()), phases, backend, fb)
