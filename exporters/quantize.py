"""Quantized bundles: onnxruntime's own quantizers applied to a bundle's ONNX graphs (docs/design.md
sections 6, 7 and 10).

Every function takes an ONNX file and writes a quantized one; none of the quantization arithmetic is
written here. What is quantized is every MatMul whose weight (input B) is a constant initializer,
except those named in `keep` (the tensors the device trains or replaces by name). That covers
frozen.onnx, train/head.onnx, model.onnx and any step graph whose forward and backward MatMuls read
constant weights.

- int8 (`quantize_int8`): `onnxruntime.quantization.quantize_dynamic`, MatMul only, QInt8 weights
  (per tensor), activations quantized to uint8 per call. The patch embedding's Conv stays fp32:
  ConvInteger has no CPU kernel (docs/design.md section 7).
- int4 (`quantize_int4`): `MatMul4BitsQuantizer` with its HQQ algorithm (weight-only, asymmetric,
  one scale and zero point per block of `block_size` along K; the round-to-nearest algorithm needs C++
  helpers the training build lacks, see `_matmul_4bits_quantizer`) writing
  `com.microsoft.MatMulNBits`; with `accuracy_level` unset the
  kernel multiplies in fp32 by the dequantized weight, so a graph computes exactly what its fp32
  twin computes with the dequantized weights. onnxruntime 1.19.2's MatMulNBits CPU kernel accepts
  4 bits only ("Only 4b quantization is supported for MatMulNBits op", checked here), so there is
  no weight-only 8-bit mode: int8 is the dynamic quantizer above.

Both quantizers handle only 2-D weights. The query path stacks each frozen weight over the query
layers (`[L, K, N]`, docs/design.md section 10), so `split_stacked_matmuls` first rewrites every
`MatMul(A, W[L,K,N])` as Split(A, axis -3) -> L MatMuls with the 2-D slices W[l] -> Concat(axis -3):
the same values, a graph the quantizers understand.

`dequantized_weights` reads back, for each quantized weight, the values the quantized graph
actually multiplies by: it cuts the quantized MatMul (whatever nodes the quantizer made of it) out
of the graph with onnx's Extractor and runs it with onnxruntime on the identity matrix, so the
dequantization is onnxruntime's own. The exporter loads those values into the training graph, so
training and model.onnx use the same weights.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

INT4_BLOCK = 32
"""Block size of int4 weights along K: 32 keeps each block's range small (better accuracy than the
quantizer's default 128) and divides every ViT width (D, mlp)."""
_SLICE = "/slice{}"


@dataclass
class QuantReport:
    """What one quantizer call did: recorded in the manifest (docs/design.md section 3)."""

    mode: str
    tool: str
    weights: list[str] = field(default_factory=list)  # original initializer names now quantized
    matmuls: int = 0  # 2-D MatMuls after splitting stacked weights
    fp32_bytes: int = 0  # bytes of those weights before
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "tool": self.tool,
            "weights": len(self.weights),
            "matmuls": self.matmuls,
            "fp32_weight_bytes": self.fp32_bytes,
            **self.settings,
        }


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _constant_matmuls(model: onnx.ModelProto, keep: set[str]) -> list[onnx.NodeProto]:
    inits = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits and n.input[1] not in keep]


def split_stacked_matmuls(model: onnx.ModelProto, keep: Iterable[str] = ()) -> dict[str, list[tuple[str, str]]]:
    """Rewrite, in place, each MatMul with a stacked constant weight W[L,K,N] (and an input of rank
    >= 3 whose axis -3 is the stack) into Split -> L MatMuls on W[l] -> Concat, W[l] being new
    initializers `W/slice{l}`. Returns, for every constant-weight MatMul left (2-D weights), the
    original weight name -> [(activation input, output)] of its MatMuls, in slice order.

    A stacked weight read as the first operand, `MatMul(W, X)` (the portable step's backward,
    exporters/vit.py `_FrozenMatmul`), is split the same way onto the same slices. Only step graphs
    have such MatMuls (exporters/quantize_step.py rewires every reader of a slice by name); the
    graphs the quantizers quantize read weights as B only."""
    keep = set(keep)
    inits = {t.name: t for t in model.graph.initializer}
    ranks = _ranks(model)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    plan: dict[str, list[tuple[str, str]]] = {}
    nodes, dropped = [], set()
    for node in model.graph.node:
        first = node.op_type == "MatMul" and _stacked(inits.get(node.input[0])) and node.input[0] not in keep
        w = node.input[int(not first)] if node.op_type == "MatMul" else None
        if w not in inits or w in keep or inits[w].data_type != onnx.TensorProto.FLOAT:
            nodes.append(node)
            continue
        dims = list(inits[w].dims)
        if len(dims) == 2:
            plan.setdefault(w, []).append((node.input[0], node.output[0]))
            nodes.append(node)
            continue
        x = node.input[int(first)]  # the activation
        if len(dims) != 3 or ranks.get(x, 0) < 3:
            nodes.append(node)  # not a layout we can slice; the quantizers skip it too
            continue
        stack = numpy_helper.to_array(inits[w])
        base = node.output[0]
        label = node.name or base  # node names must stay unique, and unnamed nodes are allowed
        pieces = [f"{base}{_SLICE.format(i)}/a" for i in range(len(stack))]
        outs = [f"{base}{_SLICE.format(i)}" for i in range(len(stack))]
        split_sizes = f"{base}/split_sizes"
        model.graph.initializer.append(numpy_helper.from_array(np.ones(len(stack), np.int64), split_sizes))
        nodes.append(
            helper.make_node("Split", [x, split_sizes], pieces, name=f"{label}/split", axis=-3)
            if opset >= 13
            else helper.make_node("Split", [x], pieces, name=f"{label}/split", axis=-3, split=[1] * len(stack))
        )
        for i, w_l in enumerate(stack):
            name = f"{w}{_SLICE.format(i)}"
            if w not in dropped:  # a weight read by several MatMuls is sliced once
                model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w_l), name))
            operands = [name, pieces[i]] if first else [pieces[i], name]
            nodes.append(helper.make_node("MatMul", operands, [outs[i]], name=f"{label}{_SLICE.format(i)}"))
            plan.setdefault(w, []).append((pieces[i], outs[i]))
        nodes.append(helper.make_node("Concat", outs, [base], name=f"{label}/concat", axis=-3))
        dropped.add(w)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    kept = [t for t in model.graph.initializer if t.name not in dropped or t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return plan


def _stacked(t: onnx.TensorProto | None) -> bool:
    """A stacked fp32 weight [L, K, N] (a 2-D first operand is left alone: nothing exports one)."""
    return t is not None and len(t.dims) == 3 and t.data_type == onnx.TensorProto.FLOAT


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Rank of every value onnx's shape inference can tell (graph inputs included)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    return {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in [*g.input, *g.value_info, *g.output]
        if v.type.tensor_type.HasField("shape")
    }


def _prepare(src: Path, keep: Iterable[str]) -> tuple[onnx.ModelProto, dict, int]:
    """Load `src`, split its stacked weights; also the fp32 bytes of the weights to be quantized."""
    model = onnx.load(str(src))
    sizes = {t.name: int(np.prod(t.dims)) * 4 for t in model.graph.initializer}
    plan = split_stacked_matmuls(model, keep)
    return model, plan, sum(sizes[w] for w in plan)


def quantize_int8(src: Path, dst: Path, keep: Iterable[str] = ()) -> QuantReport:
    """Dynamic int8 (onnxruntime's quantize_dynamic, MatMul with constant weight only, QInt8)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model, plan, nbytes = _prepare(Path(src), keep)
    names = [n.name for n in _constant_matmuls(model, set(keep))]
    if not names:  # quantize_dynamic reads an empty nodes_to_quantize as "all" (it quantized the trained head.weight)
        shutil.copyfile(src, dst)
    else:
        with tempfile.TemporaryDirectory() as tmp, _quiet():
            split = Path(tmp) / "split.onnx"
            onnx.save(model, str(split))
            del model
            quantize_dynamic(
                split,
                Path(dst),
                op_types_to_quantize=["MatMul"],
                nodes_to_quantize=names,
                weight_type=QuantType.QInt8,
                per_channel=False,
                extra_options={"MatMulConstBOnly": True},
            )
        _restore_kept(Path(src), Path(dst), keep)
    return QuantReport(
        "int8",
        f"onnxruntime {_ort_version()} quantization.quantize_dynamic",
        list(plan),
        len(names),
        nbytes,
        {
            "weight_type": "QInt8",
            "activations": "uint8, dynamic per tensor",
            "per_channel": False,
            "op_types": ["MatMul"],
        },
    )


def _restore_kept(src: Path, dst: Path, keep: Iterable[str]) -> None:
    """Give the kept tensors of `dst` back their names' original shapes.

    quantize_dynamic rewrites every Gemm as MatMul + Add before quantizing (even one it then leaves
    in fp32), storing a transposed B under the same name: the head's `head.weight [C,F]` would
    become [F,C], and the device, which replaces it by name, would refuse it. The original tensor is
    put back and read through a Transpose node."""
    keep = set(keep)
    original = {t.name: t for t in onnx.load(str(src)).graph.initializer if t.name in keep}
    model = onnx.load(str(dst))
    flipped = [t for t in model.graph.initializer if t.name in original and list(t.dims) != list(original[t.name].dims)]
    if not flipped:
        return
    for t in flipped:
        t.CopyFrom(original[t.name])
        for node in model.graph.node:
            node.input[:] = [f"{t.name}/T" if i == t.name else i for i in node.input]
        model.graph.node.insert(
            0, helper.make_node("Transpose", [t.name], [f"{t.name}/T"], name=f"{t.name}/T", perm=[1, 0])
        )
    onnx.save(model, str(dst))


def quantize_int4(src: Path, dst: Path, keep: Iterable[str] = (), block_size: int = INT4_BLOCK) -> QuantReport:
    """Weight-only int4 (onnxruntime's MatMul4BitsQuantizer with its HQQ algorithm -> MatMulNBits)."""
    q = _matmul_4bits_quantizer()
    model, plan, nbytes = _prepare(Path(src), keep)
    keep_set = set(keep)
    excluded = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in keep_set]
    count = sum(len(v) for v in plan.values())
    with _quiet(), warnings.catch_warnings():
        # HQQ wraps onnx's read-only weight arrays in torch tensors that it never writes to.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        config = q.HQQWeightOnlyQuantConfig(block_size=block_size, bits=4)
        quantizer = q.MatMul4BitsQuantizer(model, nodes_to_exclude=excluded, algo_config=config)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
    return QuantReport(
        "int4",
        f"onnxruntime {_ort_version()} quantization.matmul_4bits_quantizer (HQQ)",
        list(plan),
        count,
        nbytes,
        {
            "bits": 4,
            "block_size": block_size,
            "algorithm": "HQQ",
            "op": "com.microsoft.MatMulNBits",
            "compute": "fp32 on the dequantized weight (accuracy_level unset)",
        },
    )


def _matmul_4bits_quantizer():
    """onnxruntime.quantization.matmul_4bits_quantizer, importable in the training build.

    The module imports two C++ helpers (`quantize_matmul_4bits`, `quantize_qdq_matmul_4bits`) that
    onnxruntime-training 1.19.2's pybind module does not have, so its import fails there. Only its
    round-to-nearest algorithm calls them; its HQQ algorithm is written in torch, which the
    exporter has. So placeholders that raise are present for the import only, then removed."""
    from onnxruntime.capi import _pybind_state as capi

    missing = [n for n in ("quantize_matmul_4bits", "quantize_qdq_matmul_4bits") if not hasattr(capi, n)]

    def unavailable(*_args, **_kw):
        raise RuntimeError("this onnxruntime build has no round-to-nearest 4-bit quantizer; use the HQQ algorithm")

    for name in missing:
        setattr(capi, name, unavailable)
    try:
        from onnxruntime.quantization import matmul_4bits_quantizer
    finally:
        for name in missing:
            delattr(capi, name)
    return matmul_4bits_quantizer


QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4}


def quantize(mode: str, src: Path, dst: Path, keep: Iterable[str] = ()) -> QuantReport:
    """Quantize `src` into `dst` with `mode` ("int8" or "int4"); `keep` names weights left fp32."""
    return QUANTIZERS[mode](src, dst, keep)


def dequantized_weights(fp32: Path, quantized: Path, keep: Iterable[str] = ()) -> dict[str, np.ndarray]:
    """The weight each quantized MatMul of `quantized` really multiplies by, keyed by the original
    initializer name in `fp32` (stacked weights restacked to [L,K,N]). Each MatMul is cut out of
    the quantized graph (onnx.utils.Extractor) and run by onnxruntime on the identity I_K: the
    result is onnxruntime's own dequantization (for int8 the identity's uint8 quantization is exact:
    scale 1/255, zero point 0)."""
    import onnxruntime as ort

    model = onnx.load(str(fp32))
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    plan = split_stacked_matmuls(model, keep)
    del model
    qmodel = onnx.load(str(quantized))
    known = set(_ranks(qmodel))
    qmodel.graph.value_info.extend(  # shape inference does not know contrib ops' outputs
        helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        for mm in plan.values()
        for pair in mm
        for name in pair
        if name not in known
    )
    extractor = onnx.utils.Extractor(qmodel)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    out: dict[str, np.ndarray] = {}
    for w, matmuls in plan.items():
        k, n = shapes[w][-2:]
        slices = []
        for a, y in matmuls[: shapes[w][0] if len(shapes[w]) == 3 else 1]:  # one use of a shared weight
            sub = extractor.extract_model([a], [y])
            _free_shapes(sub)  # inferred for the export's sample batch; the identity is another shape
            sess = ort.InferenceSession(sub.SerializeToString(), opts, providers=["CPUExecutionProvider"])
            rank = len(sub.graph.input[0].type.tensor_type.shape.dim)
            eye = np.eye(k, dtype=np.float32).reshape([1] * (max(rank, 2) - 2) + [k, k])
            slices.append(sess.run(None, {a: eye})[0].reshape(k, n))
        out[w] = np.stack(slices) if len(shapes[w]) == 3 else slices[0]
    return out


def _free_shapes(model: onnx.ModelProto) -> None:
    """Replace every dimension of the graph's inputs and outputs by a symbol, drop value_info."""
    del model.graph.value_info[:]
    for v in [*model.graph.input, *model.graph.output]:
        shape = v.type.tensor_type.shape
        for i, d in enumerate(shape.dim):
            d.Clear()
            d.dim_param = f"d{i}"


class _quiet:
    """onnxruntime's quantizers log every node at INFO, and advise pre-processing at WARNING, through
    the root logger: noise for an export that quantizes on purpose."""

    def __enter__(self):
        self._level = logging.getLogger().level
        logging.getLogger().setLevel(logging.ERROR)

    def __exit__(self, *exc):
        logging.getLogger().setLevel(self._level)
        return False


def quantize_bundle_graphs(out: Path, mode: str, keep: Iterable[str]) -> tuple[dict, dict[str, np.ndarray]]:
    """Quantize a bundle's frozen.onnx and train/head.onnx in place with `mode`. Returns the
    manifest's `quantization` record and the dequantized values of head.onnx's quantized weights
    (by tensor name), which the training graph is built with (`holding`), so it trains on exactly
    the weights head.onnx, and so the run's model.onnx, multiplies by.

    Quantize every graph from the fp32 weights, never from dequantized ones: int8 re-quantizes to
    the same values, but int4's HQQ does not (re-quantizing dequantized int4 weights moved them by up
    to 0.04 on the tiny test model, about one quantization step)."""
    from vqt_edge import manifest as mf

    record: dict = {}
    values: dict[str, np.ndarray] = {}
    for name in (mf.FROZEN, mf.HEAD_MODEL):
        path = out / name
        tmp = path.with_name(path.name + ".quantized")
        record[name] = quantize(mode, path, tmp, keep).to_dict()
        if name == mf.HEAD_MODEL:
            values = dequantized_weights(path, tmp, keep)
        tmp.replace(path)
    record[mf.CHECKPOINT] = {
        "weights": f"fp32, the dequantized values of {mf.HEAD_MODEL}'s quantized weights "
        "(read back through onnxruntime)"
    }
    record["kept_fp32"] = [
        "the patch embedding Conv (MatMul only: ConvInteger has no CPU kernel)",
        "MatMuls without a constant weight (attention)",
        "the trained tensors: " + ", ".join(sorted(keep)),
    ]
    return record, values


@contextlib.contextmanager
def holding(module, values: dict[str, np.ndarray]):
    """`module` (torch) with `values` in place of its tensors of those names, restored on exit."""
    import torch

    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    unknown = sorted(set(values) - set(tensors))
    if unknown:  # the training graph would keep fp32 weights that model.onnx does not use
        raise RuntimeError(f"quantized weights that are not tensors of the module: {unknown}")
    saved = {name: tensors[name].detach().clone() for name in values}
    with torch.no_grad():
        try:
            for name, v in values.items():
                tensors[name].copy_(torch.from_numpy(np.asarray(v)))
            yield module
        finally:
            for name, v in saved.items():
                tensors[name].copy_(v)
