"""Split a ViT into the bundle the device trains on (docs/design.md sections 2-3), for any method.

- `frozen.onnx`: the frozen front of the backbone, pixel_values -> the method's frozen outputs
  (the adapter spec's `frozen_outputs`: cls, keys, values for VQT; hidden, the input of layer L-k,
  for the methods that adapt the last k layers; see exporters/methods/). Opset 17 with fused
  LayerNormalization: it is only ever run forward.
- `train/`: onnxruntime-training artifacts for the trainable part + head (`methods.build_head`). Exported
  at opset 16 (no LayerNormalization gradient in ORT 1.19), in TRAINING mode, without constant
  folding (folding renames parameters and silently freezes them). The loss is part of the graph:
  loss = -sum(log_softmax(logits) * targets), with `targets` the one-hot labels already weighted
  by 1/batch, so gradient accumulation over micro-batches and a short last batch are exact.
  Dropout on the query tokens is the input `query_keep` (a scaled mask the runner draws), so
  training is reproducible and resumable bit for bit. Inputs: the frozen outputs, `query_keep`
  (methods with query tokens), `targets`; outputs: `loss`, `logits`.
- `train/head.onnx`: the same trainable part + head for inference (frozen outputs -> logits); the
  device fills in the learned tensors and merges it behind frozen.onnx into model.onnx.
- `train/step.onnx` + `train/step_init.safetensors`: the portable training step (standard ops,
  any onnxruntime; exporters/step.py) and the trainable tensors' initial values (adapter names).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import onnx
import torch
from safetensors.numpy import save_file
from torch import nn

from exporters.methods import build_frozen, build_head
from exporters.quantize import holding, quantize_bundle_graphs
from exporters.quantize_step import quantize_step_graph
from exporters.step import export_step
from exporters.vit import VisionTransformer
from vqt_edge import manifest as mf
from vqt_edge.errors import UserError
from vqt_edge.manifest import Manifest
from vqt_edge.spec import AdapterSpec

TRAIN_OPSET = 16
INFER_OPSET = 17


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], graph: str) -> None:
    """torch.onnx.export with the settings each graph needs (docs/design.md section 7). `graph`:

    - "frozen": opset 17, eval mode, constant folding (it is only ever run forward).
    - "head" (head.onnx): opset 17, no folding: folding would turn the query tokens into a constant
      Q, and the learned tensors must stay initializers that the device replaces by name. Traced
      in training mode, which changes nothing in these modules (no Dropout/BatchNorm; query dropout
      is an input) but stops the exporter from merging initializers of equal value (eval mode does:
      zero-initialized adapter weights, LayerNorm ones of several layers) into one.
    - "train" (the training graph): opset 16, training mode, no folding (ORT training).
    """
    training = graph != "frozen"
    module.train(training)
    with torch.no_grad() if graph != "train" else torch.enable_grad(), warnings.catch_warnings():
        # The TorchScript exporter and its `training=` argument are deprecated in torch >= 2.9, and
        # used on purpose: the dynamo exporter's graphs do not survive ORT's training artifacts
        # (docs/design.md section 7). torch is pinned to 2.13.0, where both still work.
        warnings.filterwarnings("ignore", category=DeprecationWarning)  # scoped to this call
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes={n: {0: "batch"} for n in inputs + outputs if n != "loss"},
            opset_version=TRAIN_OPSET if graph == "train" else INFER_OPSET,
            dynamo=False,  # the TorchScript exporter: the dynamo one does not give ORT-trainable graphs
            export_params=True,
            do_constant_folding=graph == "frozen",
            training=torch.onnx.TrainingMode.TRAINING if training else torch.onnx.TrainingMode.EVAL,
        )


def export_frozen(backbone: VisionTransformer, path: Path, spec: AdapterSpec) -> None:
    """frozen.onnx of `spec` alone: pixel_values [B,3,S,S] -> the spec's frozen outputs
    (docs/design.md section 3)."""
    arch = backbone.arch
    pixels = torch.randn(2, arch.channels, arch.image_size, arch.image_size)
    _export(build_frozen(backbone, spec), (pixels,), path, ["pixel_values"], spec.frozen_outputs, "frozen")


@contextlib.contextmanager
def _quiet_native_stderr():
    """Capture what native code writes to fd 2 and show it only if the block fails.

    ORT's gradient-graph builder logs every graph transformer at INFO from C++, whatever
    `set_default_logger_severity` says; a user should see that only when something went wrong.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            capture.seek(0)
            sys.stderr.write(capture.read().decode(errors="replace")[-20000:])
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _generate_training_artifacts(train_onnx: Path, out_dir: Path, trainable: list[str]) -> None:
    from onnxruntime.training import artifacts

    model = onnx.load(str(train_onnx))
    params = [init.name for init in model.graph.initializer]
    missing = set(trainable) - set(params)
    if missing:  # would mean the export renamed or folded a trainable tensor
        raise RuntimeError(f"trainable parameters missing from the exported graph: {sorted(missing)}")
    logging.getLogger().setLevel(logging.WARNING)  # generate_artifacts logs every node at INFO
    with _quiet_native_stderr():
        artifacts.generate_artifacts(
            model,
            requires_grad=list(trainable),
            frozen_params=[p for p in params if p not in trainable],
            loss=None,  # the graph computes its own weighted cross-entropy (see module docstring)
            loss_input_names=["loss"],
            additional_output_names=["logits"],
            # Weight decay is applied by the runner (decoupled, per tensor, configurable on the
            # device); OptimType.AdamW is Adam with weight decay 0 (docs/design.md section 7).
            optimizer=artifacts.OptimType.AdamW,
            artifact_directory=str(out_dir),
        )


def export_bundle(
    backbone: VisionTransformer,
    out: Path,
    spec: AdapterSpec,
    *,
    model_name: str,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    class_names: Sequence[str] | None = None,
    weights: dict | None = None,
    seed: int = 0,
    quantize: str = "none",
    int8_step: bool = True,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Write a complete bundle for the adapter `spec` (vqt_edge/spec.py) to `out` and return its
    manifest. `out` must be empty or absent. `quantize` ("int8", "int4"): frozen.onnx and head.onnx
    quantized, the training graph holding the dequantized weights (exporters/quantize.py).
    """
    arch = backbone.arch
    if spec.arch != arch:
        raise ValueError(f"the spec's architecture {spec.arch} is not the backbone's {arch}")
    if quantize not in mf.QUANTIZE_MODES:
        raise UserError(f"unknown quantization {quantize!r}; one of {', '.join(mf.QUANTIZE_MODES)}")
    manifest = Manifest(
        model=model_name,
        spec=spec,
        mean=[float(x) for x in mean],
        std=[float(x) for x in std],
        class_names=list(class_names) if class_names else None,
        weights=weights or {},
        quantize=quantize,
    )
    manifest.validate("export settings")
    out.mkdir(parents=True, exist_ok=True)
    (out / "train").mkdir(exist_ok=True)
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)

    torch.manual_seed(seed)
    head = build_head(backbone, spec)  # checks that it trains exactly the spec's tensors
    params = dict(head.named_parameters())
    trainable = head.trainable()
    # The int8-fed step (mf.STEP_INT8_MODEL): plain vqt on fp32 weights (a quantized bundle's step is
    # rewritten to read head.onnx's quantized weights, exporters/quantize_step.py, for one feed only).
    int8_step = int8_step and spec.method == "vqt" and quantize == "none"
    b = 2
    pixels = torch.randn(b, arch.channels, arch.image_size, arch.image_size)

    t0 = time.perf_counter()
    frozen_outputs = spec.frozen_outputs
    log(f"exporting {mf.FROZEN} (backbone -> {', '.join(frozen_outputs)}) ...")
    frozen = build_frozen(backbone, spec)
    _export(frozen, (pixels,), out / mf.FROZEN, ["pixel_values"], frozen_outputs, "frozen")
    with torch.no_grad():
        feats = frozen(pixels)
        feats = feats if isinstance(feats, tuple) else (feats,)
    extra = (torch.ones(b, *spec.query_keep_shape),) if spec.has_query_tokens else ()
    targets = torch.full((b, spec.num_classes), 1.0 / (b * spec.num_classes))

    log(f"exporting {mf.HEAD_MODEL} ({spec.method} trainable part + head, inference) ...")
    _export(head, feats, out / mf.HEAD_MODEL, frozen_outputs, ["logits"], "head")
    dequantized: dict = {}
    if quantize != "none":
        log(
            f"quantizing {mf.FROZEN} and {mf.HEAD_MODEL} ({quantize}; the training graph gets the dequantized weights) ..."
        )
        manifest.quantization, dequantized = quantize_bundle_graphs(out, quantize, trainable)
    log("generating onnxruntime-training artifacts ...")
    with tempfile.TemporaryDirectory() as tmp, holding(head, dequantized):
        train_onnx = Path(tmp) / "train_step.onnx"
        _export(head, (*feats, *extra, targets), train_onnx, head.input_names, ["loss", "logits"], "train")
        _generate_training_artifacts(train_onnx, out / "train", trainable)
        # Inside holding(): both backends train on the same (dequantized) weights.
        log(f"exporting {mf.STEP_MODEL} (portable training step: forward + gradients, standard ops) ...")
        export_step(head, feats, out / mf.STEP_MODEL)
        if int8_step:
            log(f"exporting {mf.STEP_INT8_MODEL} (the same step, fed the int8 K/V cache) ...")
            export_step(head, feats, out / mf.STEP_INT8_MODEL, int8_kv=True)
    if quantize != "none":  # the step reads head.onnx's quantized tensors (exporters/quantize_step.py)
        manifest.quantization[mf.STEP_MODEL] = quantize_step_graph(
            out / mf.STEP_MODEL, out / mf.HEAD_MODEL, dequantized, quantize
        )
    save_file({k: params[k].detach().contiguous().numpy() for k in trainable}, str(out / mf.STEP_INIT))

    n_train = sum(params[k].numel() for k in trainable)
    n_frozen = sum(p.numel() for n, p in params.items() if n not in trainable)
    log(
        f"parameters: trainable {n_train:,} ({', '.join(_groups(trainable))}); "
        f"frozen weights held by the training graph {n_frozen:,}"
    )
    manifest.files = dict.fromkeys(
        [
            mf.FROZEN,
            mf.HEAD_MODEL,
            mf.TRAINING_MODEL,
            mf.EVAL_MODEL,
            mf.OPTIMIZER_MODEL,
            mf.CHECKPOINT,
            mf.STEP_MODEL,
            mf.STEP_INIT,
            *([mf.STEP_INT8_MODEL] if int8_step else []),
        ],
        "",
    )
    mf.write_manifest(out, manifest)
    log(f"wrote bundle {out} in {time.perf_counter() - t0:.1f} s")
    return manifest


def _groups(trainable: list[str]) -> list[str]:
    """'query_tokens', 'head', 'blocks (12 layers)', ...: the trainable tensors grouped for a log line."""
    groups: dict[str, set[str]] = {}
    for name in trainable:
        parts = name.split(".")
        groups.setdefault(parts[0], set()).add(parts[1] if parts[0] in ("blocks", "adapters") else "")
    return [g + (f" ({len(ls)} layers)" if g in ("blocks", "adapters") else "") for g, ls in groups.items()]
