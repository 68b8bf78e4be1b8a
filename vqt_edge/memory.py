"""Memory: what this process has used at its peak, measured, not guessed; and what a run will use.

A memory budget is a promise about the peak resident memory of the whole process (docs/design.md
section 6), so the number that counts is the kernel's high-water mark, VmHWM. This module holds:

- `peak_rss_mb`, `parse_size_mb`: the measurement and the budget's units (MiB);
- `lean_malloc`, `trim_malloc`: glibc settings without which freed phases do not give memory back;
- the memory model (`BundleFootprint`, `predict_peak`): the peak of `vqt-edge train` from a
  bundle's file sizes and tensor shapes, the data set size, batch / micro-batch and K/V mode,
  built from components measured on this machine (bench/calibrate_memory.py; every constant's
  docstring says how it was measured);
- the planner (`choose`): the fastest configuration that fits a budget, used by `vqt-edge plan`
  and `train --memory-budget`; without a budget, `default_kv` uses it against the memory the
  system has available (`available_mb`), so a default run never keeps a RAM cache that does not fit.
"""

from __future__ import annotations

import math
import os
import re
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

from vqt_edge.errors import UserError
from vqt_edge.spec import BACKENDS, CACHED_KV_MODES, KV_MODES

_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20, "G": 2**30, "GB": 2**30, "GIB": 2**30}


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def parse_size_mb(text: str) -> float:
    """'600MB', '1.5GB', '800' (MiB) -> MiB. Binary units: a budget is compared with VmHWM."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text or "")
    if not m or m.group(2).upper() not in _UNITS:
        raise UserError(f"cannot read memory size {text!r}; write e.g. 600MB or 1.5GB")
    unit = m.group(2).upper() or "MB"
    return float(m.group(1)) * _UNITS[unit] / 2**20


AVAILABLE_ENV = "VQT_EDGE_MEM_AVAILABLE"
"""Overrides the available memory `train` plans its defaults against, e.g. 1.5GB: for a device
whose /proc/meminfo does not describe the memory the run may use, and for tests."""


def available_mb(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> float | None:
    """Memory a new process can use without swapping, in MiB: $VQT_EDGE_MEM_AVAILABLE if set, else
    MemAvailable (the kernel's estimate, page cache it can drop included), lowered to what the
    cgroup v2 limit leaves (memory.max - memory.current) inside a limited container. None where
    neither can be read (not Linux)."""
    if os.environ.get(AVAILABLE_ENV):
        return parse_size_mb(os.environ[AVAILABLE_ENV])
    found = None
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found = int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            left = (int(limit) - int((cgroup / "memory.current").read_text())) / MiB
            found = left if found is None else min(found, left)
    except (OSError, ValueError):
        pass
    return found


# --------------------------------------------------------------------------------------------------
# Keeping the peak where the model says it is
# --------------------------------------------------------------------------------------------------

#: glibc's M_MMAP_THRESHOLD (mallopt parameter number) and the value the device commands set.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 * 1024


def lean_malloc() -> bool:
    """Make freed memory go back to the OS (glibc only; a no-op elsewhere). Returns whether it did.

    glibc raises its mmap threshold every time a large block is freed (up to 32 MiB), so after the
    first frozen tensors are freed, later large blocks come from the heap and are never returned:
    measured here on ViT-B/16, an InferenceSession of the 327 MiB frozen graph then took 546 MiB
    instead of 337 MiB, a batch of 8 needed 385 MiB of activations instead of 195 MiB, and closing
    the session gave back nothing (811 MiB stayed resident), which defeats running the frozen pass
    and the training pass in phases. A fixed threshold (blocks >= 64 KiB are mmapped and unmapped
    on free) removes all three effects; every constant below was measured with it set.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


def trim_malloc() -> None:
    """Return free heap pages to the OS now (glibc malloc_trim; a no-op elsewhere)."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


# --------------------------------------------------------------------------------------------------
# The memory model: peak resident memory of `vqt-edge train`, from measured components
# --------------------------------------------------------------------------------------------------

MiB = 2**20

# Every constant was measured on this project's reference machine (x86-64, 2 cores, glibc, ORT
# 1.19.2 CPU, lean_malloc() on) with bench/calibrate_memory.py: each component in a fresh
# torch-free process, as VmHWM above the process's resident memory just before the component
# (VmHWM reset through /proc/self/clear_refs), on the tiny test ViT and on ViT-B/16 (random init,
# frozen.onnx 327.0 MiB, train/checkpoint 270.8 MiB). Values in brackets are the ViT-B/16 readings.
# Then checked against whole `train` runs (summary.json's peak_rss_mb_after, VmHWM after each phase).
BASE_MB = 64.0
"""Runtime baseline: Python + numpy + pillow + click + onnx + safetensors + onnxruntime and its
training API imported, torch blocked: everything `train` imports [63.7 MiB VmHWM, same for every
bundle; docs/design.md section 7 measured 60 MB for `import onnxruntime` alone]."""
SESSION_MB = 9.0
"""Fixed cost of an onnxruntime session (kernel registry, thread pool, graph), which stays resident
after the session is freed: the tiny model's frozen session is 8.2 MiB for a 0.2 MiB file, and
9.3-10.7 MiB remain after closing a frozen session of either model; the training Module is 8.6 MiB
over its tiny checkpoint. Counted once for the frozen session and once for the training module."""
FROZEN_LOAD = 1.03
"""Peak while an InferenceSession (arena off) loads frozen.onnx, per byte of the file, beyond
SESSION_MB [346 MiB for 327]."""
FROZEN_RESIDENT = 1.0
"""Resident after that load, per byte of the file, beyond SESSION_MB [337 MiB for 327]."""
QUANTIZED_LOAD_EXTRA_MB, QUANTIZED_RESIDENT_EXTRA_MB = 11.0, 3.0
"""A quantized frozen.onnx (`export --quantize`, exporters/quantize.py) loads at its file size plus
11 MiB and stays resident at its file size plus 3 MiB, beyond SESSION_MB (none of its weights is
unpacked to fp32). Measured on ViT-B/16 with bench/quantized_frozen.py (fresh torch-free process,
1 thread): int8 file 84.1 MiB, load peak 104.2, resident 96.1; int4 file 63.7 MiB, 83.0 and 74.5
(the same run's fp32 file, 327.0 MiB: 345.9 and 337.1, as FROZEN_LOAD and FROZEN_RESIDENT say).
One frozen call at batch 8 peaked at 185.6 (int8) and 181.2 (int4) vs 194.8 MiB (fp32), so
FROZEN_WORK is kept for all. Also applied to model.onnx (the `test` phase), which holds the same
quantized weights."""
FROZEN_WORK = 3.8
"""Frozen pass as the trainer runs it (decode, preprocess, run, convert into the cache), per image
of a frozen-pass batch: besides the fp32 pixels and the fp32 outputs (both counted exactly), the
transient memory in units of one layer's work, 4 bytes * (H*N*N + N*mlp + N*D). A bare
session.run needs 2.1 units [24.2 MiB per image: slope from batch 1 to 32; 25 MiB per image for
real PNG batches of 8]; inside the trainer the previous batch's outputs are still referenced
while the next batch runs, which raises it: fitted on whole frozen phases of `train`, ram and
disk, batch 8, 64 images [1037 and 649 MiB above baseline, predicted 1036 and 648: 32 MiB per
image = 0.6 pixels + 13.9 outputs + 3.8 * 4.66]; it over-predicts batch 16 (+73 MiB) and is
within 5 MiB at batch 1. Source images about the model's resolution are assumed (a large photo
costs its decoded size, one image at a time)."""
CKPT_LOAD = 2.04
"""Peak while CheckpointState loads train/checkpoint, per byte of the file: the file is read
whole, then copied into tensors [552.5 MiB for 270.8]."""
CKPT_RESIDENT = 1.045
"""Checkpoint + training Module + Optimizer resident after loading, per byte of the checkpoint
(the frozen weights the training graph holds), beyond SESSION_MB [292.8 MiB for 270.8]."""
CKPT_SAVE = 1.6
"""Saving a checkpoint (end of every epoch, and every --checkpoint-every steps) serializes every
tensor the checkpoint holds, frozen ones included, into a growing buffer: a transient of this
much per byte of checkpoint + optimizer state, on top of the resident module [433.4 MiB for
270.8]. For ViT-B/16 this, not the training step, sets the peak of the training phase."""
FEED = 1.0
"""Training step, per sample: peak in units of the fp32 feed (the frozen outputs the step reads).
The cached fp16 rows are converted row by row into one fp32 array per output, which onnxruntime
reads in place; the VQT query path's own activations fit under the feed [111.0 and 446.1 MiB at
micro-batch 8 and 32 for feeds of 110.8 and 443.3 MiB; 1.5x before the row-by-row gather]."""
ADAPTED_WORK = {"vpt": (0.2, 3.8), "adaptformer": (0.45, 3.2), "finetune": (2.0, 3.5)}
"""Training step of a method adapting the last k layers (vpt, adaptformer, finetune, vqt+*), per
sample: activations kept for the backward pass, in layer-work units, as (fixed, per adapted layer):
fixed + k * per_layer. Fitted (upper envelope, not validated on independent runs) on whole `train`
runs: ViT-B/16 adapting 12 layers at batch 32 (bench/memory_vs_baselines.py: VPT-Deep 7149 MiB,
AdaptFormer 6137 MiB peak: 3.75 and 3.17 units per layer) and ViT-Ti/16 with k = 1 and 12 at batch
16 (`vqt-edge sweep --steps 2`: per sample VPT 3.8 / 40.8 units, AdaptFormer 3.4 / 35.8, partial
fine-tuning 5.2 / 40.1; fine-tuning's extra fixed part is the weight-gradient work of the final
norm and head path). Checked on the ViT-B/16 sweep over k = 1, 2, 4, 8, 12 at batch 32
(bench/results/sweep_vit_b16): VPT and AdaptFormer over-predicted by 1-26%; fine-tuning's per-layer
3.2 under-predicted k = 8 and 12 by 7% (5445 and 7968 MiB measured), hence 3.5 (+0.3 unit per layer,
the gap at both k). On the portable backend (2026-11-30, vit_b16, batch 32, 64 images, --kv disk, one epoch,
time -v) the same terms over-predict: VPT k=4 1925 MiB measured / 2510 predicted, AdaptFormer k=4
1552 / 2197, fine-tuning k=2 1450 / 1717; on ort-training, after its arena was turned off, 2042 /
2511, 1621 / 2196, 1301 / 1662 (with the arena VPT k=4 grew to 3309 MiB from its second step)."""
H2T_TAPS = 1.0
"""Head2Toe's frozen pass (exporters/methods/head2toe.py), per image, beyond FROZEN_WORK: in units of its
unpooled taps, 4 bytes * N * (3D + mlp) per layer [1.07 MiB for vit_fmnist]. Measured with
onnxruntime directly (1 thread, fresh torch-free process, lean_malloc, VmHWM growth of one
session.run, slope from batch 8 to 32): vit_fmnist's head2toe frozen.onnx 1.29 MiB per image, its
VQT frozen.onnx 0.66; less their fp32 outputs (0.10 and 0.29), 0.82 MiB more work (0.77 units).
On a whole `train` run (1000 Fashion-MNIST images, batch 32, --kv ram, frozen batch 8) the frozen
phase measured 142.4 MiB against 136.2 predicted without this term: 1.2 MiB per image (1.1
units). 1.0 sits between the two; with it the same run predicts 140.7 and measured 141.6 MiB."""
OPTIMIZER_COPIES = 3
"""Per byte of trainable parameters: the gradient buffer and AdamW's two moments."""

# The portable backend (device_runner/backends.py PortableBackend: train/step.onnx on an
# InferenceSession, AdamW in numpy). Measured with bench/calibrate_memory.py's `portable` child on
# ViT-B/16 (random init, T=1, all 12 layers: step.onnx 270.8 MiB, 1 thread, 2026-11-30): each
# micro-batch size in a fresh process, the first steps at that size (which grow the memory arena).
STEP_LOAD = 1.40
"""Peak while the step session loads train/step.onnx, per byte of the file, beyond SESSION_MB
[388 MiB for 270.8]: the file is parsed, then its initializers are copied into the session."""
STEP_RESIDENT = 1.005
"""Resident after that load, per byte of step.onnx, beyond SESSION_MB [281 MiB]. The frozen
query-path weights are graph initializers, read once; constant folding is off, so no transposed
copies are stored (backends.py). Derived from the file's real size, so a smaller (quantized) step
graph is counted by its size; not yet measured on one."""
STEP_WORK = 0.15
"""Portable training step, per sample, beyond its fed rows (`step_fed_per_sample`: the fp32 feed,
converted from the fp16 cache by the runner into the last step's arrays), in units of the fp32 feed
(`feed_per_sample`): the query path's activations and the attention's scores and gradients [peak of
the first step 16.9 / 62.6 / 123.6 / 496.6 MiB at micro-batch 1 / 4 / 8 / 32 for feeds of 13.9 /
55.4 / 110.8 / 443.3 MiB: 0.117 units; 0.09 with the arena off, kept on for speed;
bench/calibrate_memory.py, 2026-11-30; 0.15 keeps a margin]. A step graph taking fp16 K/V (older
bundles) also holds those rows and its Cast's fp32 copy: `step_fed_per_sample` counts both (measured
29.2 / 113 / 241 / 926 MiB at 1 / 4 / 8 / 32 for such a graph before the K transpose went away,
docs/design.md section 10). The optimizer's tensors (parameters, gradients, both moments and one
update's temporaries) add PORTABLE_OPTIMIZER_COPIES * trainable bytes; its checkpoint (trainable
tensors and moments, 1.25 MiB for ViT-B/16, saved in milliseconds) adds 3 * trainable bytes while
it is written, while the feed arrays are kept (device_runner/trainer.py: they are let go only before
onnxruntime-training's much larger save)."""
QUANTIZED_STEP_DEQUANT = 4.8
"""A quantized step graph (train/step.onnx reading head.onnx's quantized tensors through
DequantizeLinear chains, exporters/quantize_step.py) needs this many times its largest dequantized
weight (the manifest's `largest_dequantized_bytes`) more per step, whatever the micro-batch: each
chain's temporaries (dequantized, zero-shifted, scaled) are alive while one product runs. Measured on
a ViT-B/16 int4 bundle (step.onnx 51.1 MiB, largest dequantized weight 9.0 MiB, bench/calibrate_memory.py,
2026-11-30): first step 72.5 / 158.4 / 273.9 MiB at micro-batch 1 / 4 / 8, the fp32 graph's
29.2 / 113.1 / 240.7 plus 43 (= 4.8 x 9.0; the same 28.8 MiB per sample); load 65.8 MiB, under
STEP_LOAD's count. Without it the int4 bundle's 256 MB run was predicted at 218 MiB and measured at
234 (time -v). Scaled by the bundle's own largest weight, so a small quantized model is not charged
ViT-B/16's 43 MiB."""
PORTABLE_OPTIMIZER_COPIES = 5
"""Per byte of trainable parameters on the portable backend: the parameters (numpy, not in an ORT
checkpoint), their gradients, two moments, and the new arrays one AdamW update allocates."""
MODEL_WORK = 5.0
"""`eval` / `train --test` on model.onnx (prepacking off, device_runner/evaluate.py), per image of a
batch beyond its fp32 pixels, in layer-work units [23.7 MiB per image on ViT-B/16: 24.8 / 190.5 /
758.3 MiB at batch 1 / 8 / 32, bench/calibrate_memory.py's `model` child; = 0.57 pixels + 5.0 *
4.66]. Its session loads as frozen.onnx does, per byte of model.onnx [348 MiB load peak, 339
resident for 327.7 MiB]. These hold with lean_malloc (which `eval` and `predict` now set too):
without it the same `eval` at batch 32 peaked at 1982 MiB (`/usr/bin/time -v`), the 2050 MiB
reported against the old prediction of 1717."""
FINISH_MB = 4.0
"""End of the run: model.onnx streamed from frozen.onnx and head.onnx (device_runner/onnx_stream.py)
with its 1 MiB copy buffer and the learned tensors [+2 MiB for ViT-B/16; the onnx.compose merge it
replaced peaked at 3.2 GiB]. The adapter itself is counted as 2 * trainable bytes. Finding the head
weights frozen.onnx already holds (device_runner/onnx_share.py) reads one frozen weight at a time,
counted as the largest one, `largest_weight_bytes` [+10.1 MiB for ViT-B/16, whose largest is 9 MiB]."""
MARGIN = 0.08
"""A configuration fits a budget when its predicted peak is at most budget / (1 + MARGIN). The
largest under-prediction seen on whole runs was 4% (ViT-B/16 frozen phase, 64 images)."""


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
    cache_int8_per_sample: int = 0  # cache_per_sample for an int8 cache (device_runner/kv_int8.py; vqt_edge/disk_plan.py)

    @classmethod
    def from_bundle(cls, bundle: Path) -> "BundleFootprint":
        import numpy as np

        from device_runner.kv_int8 import cache_bytes
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
        # frozen.onnx's initializers (device_runner/onnx_share.py): only fp32 weights match by value.
        shared = 4 * lq * 2 * a.dim * (a.dim + a.mlp_dim) if m.quantize == "none" and spec.method.startswith("vqt") else 0
        step = bundle / mf.STEP_MODEL
        return cls(
            name=str(bundle), method=spec.method, last_k=spec.last_k, query_layers=lq,
            query_tokens=t, frozen_bytes=frozen, head_bytes=head,
            ckpt_bytes=_size(bundle / mf.CHECKPOINT), trainable_bytes=_trainable_bytes(bundle / mf.TRAINING_MODEL),
            pixels_per_sample=4 * a.channels * a.image_size**2, feed_per_sample=feed, cache_per_sample=cache,
            layer_work=work, query_path_per_sample=query_path, frozen_taps_per_sample=taps,
            largest_weight_bytes=4 * a.dim * max(3 * a.dim, a.mlp_dim), quantize=m.quantize,
            step_bytes=step.stat().st_size if step.exists() else 0, model_bytes=frozen + max(0, head - shared),
            step_dequantized_bytes=int((m.quantization or {}).get(mf.STEP_MODEL, {}).get("largest_dequantized_bytes", 0)),
            step_fed_per_sample=feed if m.step_feed == "float32" else cache + feed,
            cache_int8_per_sample=cache_bytes(specs, "int8"),
        )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        raise UserError(f"{path}: missing; is this a complete vqt-edge bundle?") from None


def _trainable_bytes(training_model: Path) -> int:
    """Bytes of the trainable tensors: the training graph has one `<name>_grad.accumulation.buffer`
    input per trainable tensor, with the tensor's shape."""
    import onnx

    try:
        graph = onnx.load(str(training_model), load_external_data=False).graph
    except Exception as e:  # a damaged file; the trainer's own sha256 check names it precisely
        raise UserError(f"{training_model}: cannot read ({e})") from None
    total = 0
    for inp in graph.input:
        if inp.name.endswith("_grad.accumulation.buffer"):
            n = 1
            for d in inp.type.tensor_type.shape.dim:
                n *= d.dim_value
            total += 4 * n
    return total


FROZEN_BATCH_MAX = 8
"""Most images per frozen-pass call. Larger calls are no faster on a CPU and cost 32 MiB per image
on ViT-B/16 (FROZEN_WORK): 1 thread, frozen.onnx of ViT-B/16, 32 random images, two rounds
(measured with onnxruntime directly, 2026-11-24): 0.55 / 0.51 s per image at batch 8, 0.92 / 0.64
at batch 32, 0.47 / 0.50 at batch 4. At batch 32 the frozen pass (1.4 GiB) used to set the peak of a whole
VQT run whose training step needs half that."""


@dataclass
class Plan:
    """A training configuration with its predicted peak (MiB) and the phase that sets it."""

    kv: str
    micro_batch: int
    batch_size: int
    images: int
    peak_mb: float
    phases: dict[str, float]
    backend: str = "ort-training"
    frozen_batch: int = FROZEN_BATCH_MAX  # images per frozen-pass call (and per test batch)

    @property
    def needs_mb(self) -> float:
        """The smallest budget this configuration fits, margin included (whole MiB)."""
        return float(math.ceil(self.peak_mb * (1 + MARGIN)))

    def fits(self, budget_mb: float) -> bool:
        return self.needs_mb <= budget_mb

    def describe(self) -> str:
        top = max(self.phases, key=self.phases.get)
        return (f"kv {self.kv}, micro-batch {self.micro_batch} (batch {self.batch_size}, frozen pass {self.frozen_batch} "
                f"images at a time), backend {self.backend}: predicted peak {self.peak_mb:.0f} MiB, set by the {top} phase")

    def to_dict(self) -> dict:
        return {"backend": self.backend, "kv": self.kv, "micro_batch": self.micro_batch, "batch_size": self.batch_size,
                "frozen_batch": self.frozen_batch, "images": self.images, "predicted_peak_mb": round(self.peak_mb, 1),
                "needs_mb": self.needs_mb, "phases_mb": {k: round(v, 1) for k, v in self.phases.items()}}


def frozen_batch(batch_size: int, micro_batch: int | None) -> int:
    """Images per frozen-pass call without a budget: the micro-batch, at most FROZEN_BATCH_MAX."""
    return max(1, min(micro_batch or batch_size, FROZEN_BATCH_MAX))


def predict_peak(fp: BundleFootprint, *, images: int, batch_size: int, micro_batch: int | None, kv: str,
                 test_batch: int | None = None, backend: str = "ort-training", frozen_batch_size: int | None = None) -> Plan:
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
      save = 3 * trainable bytes.
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
        return b * (fp.pixels_per_sample + fp.feed_per_sample + FROZEN_WORK * fp.layer_work
                + H2T_TAPS * fp.frozen_taps_per_sample) * mb

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
        load = STEP_LOAD * fp.step_bytes * mb
        module = STEP_RESIDENT * fp.step_bytes * mb + PORTABLE_OPTIMIZER_COPIES * trainable
        save = 3 * trainable
        fed = fp.feed_per_sample if fp.step_fed_per_sample is None else fp.step_fed_per_sample
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
        phases["train"] = 2 * SESSION_MB + max(frozen_load, frozen_res + max(load, module + max(step + act_frozen(micro), save)))
    phases["finish"] = 2 * SESSION_MB + 2 * trainable + FINISH_MB + fp.largest_weight_bytes * mb
    if test_batch:
        model_load, model_res = loaded((fp.model_bytes or fp.frozen_bytes + fp.head_bytes) * mb)
        work = test_batch * (fp.pixels_per_sample + MODEL_WORK * fp.layer_work) * mb
        # 2, not 3, sessions' fixed costs: a tiny-model `train --test` peaked 11 MiB under the 3 (80.4 MiB
        # measured), within 2.3 MiB of 2; the third session reuses what the first two left.
        phases["test"] = 2 * SESSION_MB + max(model_load, model_res + work)
    return Plan(kv, micro, batch_size, images, BASE_MB + max(phases.values()), phases, backend, fb)


def micro_batches(batch_size: int) -> list[int]:
    """Candidate micro-batches, largest first: the batch, then halving down to 1."""
    out, m = [], batch_size
    while m > 1:
        out.append(m)
        m = -(-m // 2)
    return out + [1]


class NoPlan(UserError):
    """No configuration fits the budget; `needs_mb` is the smallest budget one would fit."""

    def __init__(self, message: str, needs_mb: float, best: Plan) -> None:
        super().__init__(message)
        self.needs_mb, self.best = needs_mb, best


def choose(fp: BundleFootprint, budget_mb: float, *, images: int, batch_size: int, kv: str | None = None,
           micro_batch: int | None = None, test: bool = False, backends: tuple[str, ...] = ("ort-training",),
           smaller_frozen_batches: bool = True) -> Plan:
    """The fastest configuration whose predicted peak fits `budget_mb`: the backends in the order
    given (the caller's preference among those that can run here: another one only where none of
    the first one's configurations fits), then K/V in RAM before disk before streaming, then the
    largest micro-batch, then the largest frozen-pass batch (at most the micro-batch;
    docs/design.md section 6). A test set is evaluated at the frozen-pass batch.
    `kv` / `micro_batch` given by the user are kept (and must fit); without
    `smaller_frozen_batches`, the frozen pass keeps frozen_batch(). Raises NoPlan (a UserError,
    exit 2) naming the smallest budget that would fit."""
    kvs = [kv] if kv else list(KV_MODES)
    micros = [micro_batch] if micro_batch else micro_batches(batch_size)
    plans = [predict_peak(fp, images=images, batch_size=batch_size, micro_batch=m, kv=k, backend=b,
                          frozen_batch_size=f, test_batch=f if test else None)
             for b in backends for k in kvs for m in micros
             for f in (micro_batches(frozen_batch(batch_size, m)) if smaller_frozen_batches else [frozen_batch(batch_size, m)])]
    for p in plans:
        if p.fits(budget_mb):
            return p
    best = min(plans, key=lambda p: (p.peak_mb, KV_MODES.index(p.kv), -p.micro_batch))
    fixed = " with " + ", ".join(f for f in (f"--kv {kv}" if kv else "", f"--micro-batch {micro_batch}" if micro_batch else "") if f) \
        if (kv or micro_batch) else ""
    on = f" on the {backends[0]} backend" if len(backends) == 1 else ""
    raise NoPlan(
        f"no configuration fits a memory budget of {budget_mb:.0f} MiB{fixed}{on}; the smallest budget that "
        f"fits is {best.needs_mb:.0f} MiB ({best.describe()})", best.needs_mb, best,
    )


AVAILABLE_SHARE = 0.8
"""Without --memory-budget, a run plans for this share of the available memory (and the planner's
MARGIN on top): MemAvailable is an estimate, other processes grow, and the disk cache's pages compete
for the same RAM."""


def default_kv(fp: BundleFootprint, *, images: int, batch_size: int, micro_batch: int | None, available: float | None,
               test: bool = False, backend: str = "ort-training") -> Plan:
    """Where K/V live when the user chose neither --kv nor --memory-budget (docs/design.md section
    6): the fastest mode (KV_MODES) whose predicted peak fits AVAILABLE_SHARE of `available`
    MiB, at the user's batch and micro-batch. RAM only if the cache fits; if no mode fits, the one with the smallest predicted
    peak (the run may then not fit, but it does not make things worse by caching in RAM). Unknown
    `available` (None): RAM, as before this default existed."""
    micro = micro_batch or batch_size
    if available is None:
        return predict_peak(fp, images=images, batch_size=batch_size, micro_batch=micro, kv="ram", backend=backend,
                            test_batch=frozen_batch(batch_size, micro) if test else None)
    try:
        return choose(fp, AVAILABLE_SHARE * available, images=images, batch_size=batch_size, micro_batch=micro, test=test,
                      backends=(backend,), smaller_frozen_batches=False)
    except NoPlan as e:
        return e.best
