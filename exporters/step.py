"""The portable training step: one graph of standard ONNX ops that any onnxruntime runs.

docs/design.md section 9. onnxruntime-training's artifacts need the training build (no aarch64
wheel, no Python >= 3.13, no future). This graph does not: it is the method's forward pass *and*
its backward pass, generated from the torch `MethodHead` (never hand-written) by

1. `torch.func.functional_call(head, {**trainable, **frozen}, inputs)` inside
   `torch.func.grad_and_value(..., has_aux=True)` over the trainable tensors only, so no gradient
   is computed for the frozen weights or for the frozen outputs;
2. `make_fx` with core ATen decompositions, in symbolic mode so the batch stays dynamic;
3. the traced module wrapped in an `nn.Module` and exported with `torch.onnx.export(dynamo=True)`.

Inputs (in this order): every trainable tensor, by its one name (the adapter spec's
`trainable_shapes`), then the frozen outputs the method reads (fp32: the runner converts the fp16
cache rows faster than a Cast node would, device_runner/fp16.py), `query_keep` (methods with query
tokens) and `targets`. Outputs: `loss`,
`logits`, then `grad.<name>` for every trainable tensor. The frozen weights are initializers.
The same graph serves evaluation (all-ones `query_keep`, zero `targets`): a second graph would
hold a second copy of the frozen weights.

The device applies the optimizer in numpy (device_runner/backends.py).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn
from torch._decomp import core_aten_decompositions
from torch.fx.experimental.proxy_tensor import make_fx

from exporters.methods import MethodHead
from vqt_edge.kv_cache import SCALE_SUFFIX, STEP_INT8_FED, layer_input

STEP_OPSET = 18  # the dynamo exporter's lowest
MAX_IR_VERSION = 10  # onnxruntime-training 1.19 (the other backend, same environments) reads IR <= 10


def grad_name(name: str) -> str:
    """Output name of the gradient of trainable tensor `name` (an adapter name)."""
    return f"grad.{name}"


class _Traced(nn.Module):
    """The make_fx graph as a module whose buffers are the frozen weights (exported as initializers).

    The graph takes (trainable..., frozen weights..., inputs...): a symbolic trace cannot close over
    real tensors, so the frozen weights are arguments of the trace and buffers of this module."""

    def __init__(self, graph: torch.fx.GraphModule, n_train: int, frozen: list[torch.Tensor]) -> None:
        super().__init__()
        self.graph_module, self.n_train, self.n_frozen = graph, n_train, len(frozen)
        for i, w in enumerate(frozen):
            self.register_buffer(f"frozen_{i}", w)

    def forward(self, *args: torch.Tensor):
        frozen = [getattr(self, f"frozen_{i}") for i in range(self.n_frozen)]
        return self.graph_module(*args[: self.n_train], *frozen, *args[self.n_train :])


class _LinearAsMatmul(torch.overrides.TorchFunctionMode):
    """F.linear as `x @ w.T + b` while tracing. Under the grad transform, the C++ linear of a 3-D
    input reads concrete sizes (`aten.size`), which pins the traced batch to the example's; matmul
    keeps it symbolic. Same math (the exported graph has MatMul + Add instead of a Gemm)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            out = torch.matmul(x, w.t())
            return out if b is None else out + b
        return func(*args, **kwargs)


def _distinct_batch(tensors: list[torch.Tensor], sizes: set[int]) -> int:
    """A batch size for the trace that equals no other size in it. A symbolic trace turns every
    size comparison it meets into a guard, and a batch equal to some size (a VPT with last_k = 2
    at batch 2; the number of heads at batch 4, met in a reshape) pins the exported graph to that
    batch. A small prime that is none of the sizes avoids both."""
    taken = sizes | {d for t in tensors for d in t.shape}
    return next(b for b in (7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53) if b not in taken)


def _quantize_per_channel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, Lq, H, N, dh] -> int8 codes and float32 scales [B, Lq, H, 1, dh], as the int8 cache
    (device_runner/kv_int8.py); only an example for the trace."""
    scale = x.abs().amax(-2, keepdim=True) / 127
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return torch.clamp(torch.round(x / scale), -127, 127).to(torch.int8), scale


def export_step(head: MethodHead, frozen_example: tuple[torch.Tensor, ...], path: Path, int8_kv: bool = False) -> None:
    """Write the step graph of `head` to `path`. `frozen_example`: the frozen outputs for a batch
    of 2 (fp32, as the graph takes them).

    `int8_kv` (vqt only): the graph of the int8 feed (mf.STEP_INT8_MODEL), whose `keys` and `values`
    are the int8 cache's codes, each followed by its per-channel scales `keys_scale` / `values_scale`
    [B, Lq, H, 1, dh], dequantized in the graph one layer at a time (exporters/vit.py
    `_int8_attention`): it is fed 1 byte per K/V value instead of the fp32 feed's 4."""
    trainable = head.trainable()  # parameter names = adapter names
    params = dict(head.named_parameters())
    frozen = {n: p.detach() for n, p in params.items() if n not in trainable}
    frozen.update(dict(head.named_buffers()))
    names, frozen_names = list(trainable), list(frozen)
    n_train, n_frozen = len(names), len(frozen)
    if int8_kv:
        if head.spec.method != "vqt":
            raise ValueError(f"the int8 K/V step graph is for vqt, not {head.spec.method}")
        example, fed = [], []
        for name, x in zip(head.input_names, frozen_example):
            if name in STEP_INT8_FED:
                codes, scale = _quantize_per_channel(x)
                example += [*codes.unbind(1), scale]
                fed += [*(layer_input(name, i) for i in range(codes.shape[1])), name + SCALE_SUFFIX]
            else:
                example.append(x)
                fed.append(name)
        saved_names = head.input_names
        head.input_names = fed + saved_names[len(frozen_example) :]  # then query_keep, targets
        try:
            export_step(head, tuple(example), path)
        finally:
            head.input_names = saved_names
        return
    input_names = list(head.input_names)

    def loss_fn(weights: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor], *inputs: torch.Tensor):
        loss, logits = torch.func.functional_call(head, {**fixed, **weights}, inputs)
        return loss, logits

    grad_and_value = torch.func.grad_and_value(loss_fn, has_aux=True)  # over argument 0 only

    def step(*flat: torch.Tensor):
        weights = dict(zip(names, flat[:n_train]))
        fixed = dict(zip(frozen_names, flat[n_train : n_train + n_frozen]))
        grads, (loss, logits) = grad_and_value(weights, fixed, *flat[n_train + n_frozen :])
        return (loss, logits, *(grads[n] for n in names))

    weights = [frozen[n] for n in frozen_names]
    example = [params[n].detach().clone() for n in names]
    arch = head.arch
    t = head.spec.query_tokens
    sizes = {head.head.out_features, t, arch.heads, arch.head_dim, arch.num_tokens, arch.num_tokens + t}
    b = _distinct_batch([*example, *weights, *(x[0] for x in frozen_example)], sizes)
    for _name, x in zip(input_names, frozen_example):
        x = x.detach()[torch.arange(b) % x.shape[0]]
        example.append(x)
    if head.spec.has_query_tokens:
        example.append(torch.ones(b, *head.spec.query_keep_shape))
    example.append(torch.full((b, head.head.out_features), 1.0 / b))
    head.train()
    with _LinearAsMatmul():
        traced = make_fx(step, decomposition_table=core_aten_decompositions(), tracing_mode="symbolic")(
            *example[:n_train], *weights, *example[n_train:]
        )
    all_inputs = names + input_names
    batch = torch.export.Dim("batch", min=1)
    dynamic = tuple({0: batch} if name in input_names else None for name in all_inputs)
    exporter_log = logging.getLogger("torch.onnx")  # "torchvision is not installed" and the like
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore")  # the dynamo exporter warns about every lifted constant
            program = torch.onnx.export(
                _Traced(traced, n_train, weights),
                tuple(example),
                None,
                dynamo=True,
                opset_version=STEP_OPSET,
                input_names=all_inputs,
                output_names=["loss", "logits", *map(grad_name, names)],
                dynamic_shapes=(dynamic,),
                optimize=True,
                verbose=False,
            )
    finally:
        exporter_log.setLevel(level)
    program.save(str(path))
    model = onnx.load(str(path), load_external_data=False)
    if model.ir_version > MAX_IR_VERSION:  # a newer onnx/onnxscript would write what ORT 1.19 refuses
        raise RuntimeError(f"{path}: IR version {model.ir_version} > {MAX_IR_VERSION}; keep onnx < 1.18")
    ops = {(n.domain or "ai.onnx") for n in model.graph.node}
    if ops != {"ai.onnx"}:  # a contrib op would tie the graph to one onnxruntime build
        raise RuntimeError(f"{path}: non-standard op domains {sorted(ops - {'ai.onnx'})}")
