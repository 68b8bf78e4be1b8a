"""optimum's ORTQuantizer against exporters/quantize.py `quantize_int8` on one frozen.onnx (docs/deploy.md).

    .venv-hf/bin/python bench/compare_optimum_quantizer.py BUNDLE/frozen.onnx

Both run onnxruntime's ONNXQuantizer. ORTQuantizer gets the graph after vqt-edge's split of stacked
weights (it cannot split them itself), once with its avx512_vnni dynamic preset (MatMul) and once
restricted to the constant-weight MatMuls vqt-edge quantizes; prints the output differences against
vqt-edge's graph and against fp32, and whether the restricted output is byte-identical.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from optimum.onnxruntime import ORTQuantizer
from optimum.onnxruntime.configuration import AutoQuantizationConfig

from exporters.quantize import quantize_int8, split_stacked_matmuls


def main(src: Path) -> None:
    tmp = Path(tempfile.mkdtemp())
    quantize_int8(src, tmp / "ours.onnx")
    model = onnx.load(src)
    split_stacked_matmuls(model)
    (tmp / "split").mkdir()
    onnx.save(model, tmp / "split" / "model.onnx")
    inits = {t.name for t in model.graph.initializer}
    const_b = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    quantizer = ORTQuantizer.from_pretrained(tmp / "split", file_name="model.onnx")
    for name, nodes in (("preset", None), ("restricted", const_b)):
        config = AutoQuantizationConfig.avx512_vnni(
            is_static=False, per_channel=False, operators_to_quantize=["MatMul"], nodes_to_quantize=nodes
        )
        quantizer.quantize(save_dir=tmp / name, quantization_config=config)
    inputs = ort.InferenceSession(str(src)).get_inputs()[0]
    size = inputs.shape[-1]
    x = np.random.default_rng(0).standard_normal((4, 3, size, size)).astype(np.float32)

    def run(path: Path) -> list[np.ndarray]:
        return ort.InferenceSession(str(path)).run(None, {inputs.name: x})

    fp32, ours = run(src), run(tmp / "ours.onnx")

    def diff(a: list[np.ndarray], b: list[np.ndarray]) -> list[float]:
        return [round(float(np.abs(u - v).max()), 4) for u, v in zip(a, b)]

    print(f"vqt-edge int8: max |out - fp32| per output {diff(ours, fp32)}, {(tmp / 'ours.onnx').stat().st_size} bytes")
    for name in ("preset", "restricted"):
        path = tmp / name / "model_quantized.onnx"
        theirs = run(path)
        print(
            f"optimum {name}: max |out - fp32| {diff(theirs, fp32)}, max |out - vqt-edge| {diff(theirs, ours)}, "
            f"{path.stat().st_size} bytes, byte-identical to vqt-edge: {path.read_bytes() == (tmp / 'ours.onnx').read_bytes()}"
        )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
