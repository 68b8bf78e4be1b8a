"""The portable training step of a quantized bundle: train/step.onnx reading the quantized weights of
train/head.onnx (docs/design.md sections 6, 9 and 10).

The step graph (exporters/step.py) multiplies by every frozen weight twice: forward, `x @ W` (the
query path's W stacked over the query layers `[L, K, N]`), and in the backward pass either
`(W dY^T)^T`, reading W as stored as the first operand (the query path, exporters/vit.py
`_FrozenMatmul`), or `dY @ W^T`, for which the exporter stores the transpose as a second
initializer (small models) or keeps a Transpose node (large ones). Quantizing the two
separately would give a backward pass that is not the gradient of the forward one (a blockwise
quantization of W^T is not the transpose of that of W). So nothing is quantized here: both
initializers are replaced by the tensors onnxruntime's quantizer already wrote into head.onnx
(exporters/quantize.py), read through standard ops, one chain per use:

- int4 (MatMulNBits in head.onnx; its B bytes are the 4-bit values of W^T `[N, K]`, blocks of
  `block_size` along K, low nibble first, which is exactly ONNX's UINT4 layout):
  `DequantizeLinear(q as UINT4 [N, K/bs, bs], 1) -> Sub(zero points) -> Mul(scales) -> Reshape [N, K]`,
  MatMulNBits's own definition `(q - zero_point) * scale` (HQQ's zero points are floats, which
  DequantizeLinear's integer zero point cannot hold). Forward uses add a Transpose. UINT4 needs
  opset 21, so the graph's opset is raised from 18 to 21 with onnx's version converter.
- int8 (quantize_dynamic in head.onnx: QInt8 weight, per-tensor scale and zero point):
  `DequantizeLinear(q [K, N], scale, zero_point)`, transposed for the backward uses. The step is
  weight-only: its activations stay fp32 (model.onnx's MatMulInteger also quantizes them).

Each use dequantizes one layer's weight right before its MatMul (the stacked MatMuls are split per
layer, exporters/quantize.py `split_stacked_matmuls`), so at most one layer's fp32 weight exists at
a time, never the whole stack. The forward and backward chains of a weight are distinct nodes; the
session's optimizers leave them distinct (checked in onnxruntime 1.19.2's optimized graph of the
tiny int4 and int8 bundles, common-subexpression elimination on), so no fp32 weight lives from the
forward to the backward pass.

The fp32 initializers are recognized by value: the step graph is exported from the dequantized
weights (exporters/export.py `holding`), so each equals a head weight or its transpose bit for bit.
Training, model.onnx and the ORT-training artifacts (built from the same dequantized values) thus
all use the values onnxruntime's quantizer produced once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporters.quantize import _SLICE, split_stacked_matmuls

STEP_QUANT_OPSET = 21  # DequantizeLinear of UINT4
# onnxruntime's quantizers name a weight's quantized tensors after it (quantize_dynamic: base_quantizer.py,
# TENSOR_NAME_QUANT_SUFFIX; MatMul4BitsQuantizer: HQQWeightOnlyQuantizer.quantize).
INT8_SUFFIXES = ("_quantized", "_scale", "_zero_point")
INT4_SUFFIXES = ("_Q4", "_scales", "_zero_points")


def _digest(a: np.ndarray) -> tuple:
    return a.shape, hashlib.sha256(np.ascontiguousarray(a, np.float32).tobytes()).digest()


def _match(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> dict[str, tuple[str, bool]]:
    """Step initializer name -> (head weight name, transposed?) for every initializer equal, bit for
    bit, to a dequantized head weight or to its transpose over the last two axes."""
    wanted: dict[tuple, tuple[str, bool]] = {}
    for name, v in values.items():
        wanted[_digest(v)] = (name, False)
        wanted.setdefault(_digest(np.swapaxes(v, -1, -2)), (name, True))
    found = {}
    for t in model.graph.initializer:
        if t.data_type == TensorProto.FLOAT and len(t.dims) >= 2:
            hit = wanted.get(_digest(numpy_helper.to_array(t)))
            if hit:
                found[t.name] = hit
    return found


def _store_transposes(model: onnx.ModelProto, matched: dict[str, tuple[str, bool]]) -> None:
    """Replace each `Transpose(W)` over the last two axes of a matched weight by an initializer
    holding W^T, matched as transposed. The step exporter stores small transposes as initializers
    but leaves large ones (ViT-B/16's) as Transpose nodes; either way each becomes a transposed use."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        w = node.input[0] if node.op_type == "Transpose" else None
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        rank = len(inits[w].dims) if w in inits else 0
        if w in matched and not matched[w][1] and perm == [*range(rank - 2), rank - 1, rank - 2]:
            t = np.ascontiguousarray(np.swapaxes(numpy_helper.to_array(inits[w]), -1, -2))
            model.graph.initializer.append(numpy_helper.from_array(t, node.output[0]))
            matched[node.output[0]] = (matched[w][0], True)
        else:
            nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    for name in [n for n in matched if n not in used]:  # read only through the Transposes just replaced
        del matched[name]
        model.graph.initializer.remove(next(t for t in model.graph.initializer if t.name == name))


class _Chains:
    """The quantized tensors of head.onnx and the nodes that dequantize one layer's weight."""

    def __init__(self, mode: str, head: onnx.ModelProto) -> None:
        self.mode = mode
        self.inits = {t.name: t for t in head.graph.initializer}
        self.nbits = {
            n.input[1]: {a.name: helper.get_attribute_value(a) for a in n.attribute}
            for n in head.graph.node
            if n.op_type == "MatMulNBits"
        }
        self.added: dict[str, TensorProto] = {}  # initializers for the step graph, each added once
        self.count = 0

    def _tensor(self, name: str) -> TensorProto:
        if name not in self.inits:
            raise RuntimeError(f"head.onnx has no quantized tensor {name!r}: the quantizer's naming changed")
        return self.inits[name]

    def _add(self, t: TensorProto) -> str:
        self.added.setdefault(t.name, t)
        return t.name

    def nodes(self, weight: str, transposed: bool, out: str) -> list[onnx.NodeProto]:
        """Nodes computing `out`: the dequantized 2-D slice `weight` (`W/slice{l}` or `W`) of head.onnx,
        or with `transposed` its transpose."""
        self.count += 1
        tag = f"{out}/dq"
        if self.mode == "int8":
            q, scale, zero = (self._tensor(weight + s) for s in INT8_SUFFIXES)
            for t in (q, scale, zero):
                self._add(t)
            deq = helper.make_node(
                "DequantizeLinear", [q.name, scale.name, zero.name], [f"{tag}/w" if transposed else out], name=tag
            )
            return (
                [deq, helper.make_node("Transpose", [deq.output[0]], [out], name=f"{tag}/t", perm=[1, 0])]
                if transposed
                else [deq]
            )
        q, scale, zero = (self._tensor(weight + s) for s in INT4_SUFFIXES)
        attr = self.nbits[q.name]
        n, k, bs = attr["N"], attr["K"], attr["block_size"]
        blocks = k // bs
        if attr["bits"] != 4 or k % bs or list(q.dims) != [n, blocks, bs // 2]:
            raise RuntimeError(f"{q.name}: unexpected MatMulNBits layout {attr}, dims {list(q.dims)}")
        # The same bytes as an ONNX UINT4 tensor: MatMulNBits packs W^T row by row, low nibble first.
        q4 = self._add(helper.make_tensor(f"{weight}/uint4", TensorProto.UINT4, [n, blocks, bs], q.raw_data, raw=True))
        s = self._add(numpy_helper.from_array(numpy_helper.to_array(scale).reshape(n, blocks, 1), f"{weight}/scales"))
        z = self._add(
            numpy_helper.from_array(numpy_helper.to_array(zero).reshape(n, blocks, 1), f"{weight}/zero_points")
        )
        one = self._add(numpy_helper.from_array(np.array(1.0, np.float32), "dequantize/one"))
        shape = self._add(numpy_helper.from_array(np.array([n, k], np.int64), f"{weight}/shape"))
        wt = out if transposed else f"{tag}/wt"
        nodes = [
            helper.make_node("DequantizeLinear", [q4, one], [f"{tag}/q"], name=f"{tag}/q"),
            helper.make_node("Sub", [f"{tag}/q", z], [f"{tag}/d"], name=f"{tag}/sub"),
            helper.make_node("Mul", [f"{tag}/d", s], [f"{tag}/w3"], name=f"{tag}/mul"),
            helper.make_node("Reshape", [f"{tag}/w3", shape], [wt], name=f"{tag}/reshape"),
        ]
        if not transposed:
            nodes.append(helper.make_node("Transpose", [wt], [out], name=f"{tag}/t", perm=[1, 0]))
        return nodes


def quantize_step_graph(step: Path, head: Path, values: dict[str, np.ndarray], mode: str) -> dict:
    """Rewrite `step` (train/step.onnx, exported from the dequantized weights `values`, keyed by
    head.onnx's weight names) in place so that its frozen weights are read from the quantized
    tensors of `head` (train/head.onnx, already quantized with `mode`). Returns the manifest's
    record for the step graph."""
    if not values:  # the head quantized nothing (a linear probe's only weight is trained)
        return {"weights": 0, "matmuls": 0}
    model = onnx.load(str(step))
    matched = _match(model, values)
    fp32_bytes = sum(int(np.prod(t.dims)) * 4 for t in model.graph.initializer if t.name in matched)
    _store_transposes(model, matched)
    if not matched:
        raise RuntimeError(f"{step}: none of its initializers is a quantized weight of {head}")
    others = [t.name for t in model.graph.initializer if t.name not in matched]
    plan = split_stacked_matmuls(model, keep=others)
    if set(plan) != set(matched):
        raise RuntimeError(
            f"{step}: quantized weights not read by a splittable MatMul: {sorted(set(matched) - set(plan))}"
        )
    chains = _Chains(mode, onnx.load(str(head)))
    rewired: dict[str, tuple[str, bool]] = {}  # fp32 slice initializer -> (head slice, transposed)
    for name, (weight, transposed) in matched.items():
        stacked = len(values[weight].shape) == 3
        for i in range(values[weight].shape[0] if stacked else 1):
            suffix = _SLICE.format(i) if stacked else ""
            rewired[name + suffix] = (weight + suffix, transposed)
    nodes = []
    for node in model.graph.node:
        for j, x in enumerate(node.input):
            if x in rewired:
                out = f"{x}/use{chains.count}"
                nodes.extend(chains.nodes(*rewired[x], out=out))
                node.input[j] = out
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    kept = [t for t in model.graph.initializer if t.name not in rewired]
    del model.graph.initializer[:]
    model.graph.initializer.extend([*kept, *chains.added.values()])
    if mode == "int4":
        model = onnx.version_converter.convert_version(model, STEP_QUANT_OPSET)
    onnx.checker.check_model(model)
    onnx.save(model, str(step))
    quantized = sum(len(t.raw_data) or numpy_helper.to_array(t).nbytes for t in chains.added.values())
    largest = max(int(np.prod(values[w].shape[-2:])) * 4 for w, _ in matched.values())
    return {
        "weights": len(matched),
        "transposed": sum(t for _, t in matched.values()),
        "matmuls": chains.count,
        "fp32_weight_bytes": fp32_bytes,
        "quantized_bytes": quantized,
        "largest_dequantized_bytes": largest,
        "values": "train/head.onnx's quantized tensors, read by DequantizeLinear",
        "opset": STEP_QUANT_OPSET if mode == "int4" else None,
    }
