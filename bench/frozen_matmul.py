"""The input gradient of a frozen stacked weight, `dY W^T`, in the two orientations onnxruntime can run.

docs/design.md section 10, exporters/vit.py `_FrozenMatmul`. The portable step's query path
multiplies `x @ W` with W [L, K, N] an initializer; the backward needs dX = dY W^T. Written that
way onnxruntime runs it as FusedMatMul(dY, W, transB), and MLAS packs its B operand, the whole
weight, on every call. Written as (W dY^T)^T, W is the A operand, read in place, and only the small
dY^T is packed. This bench runs plain ONNX graphs of the forward and of both backward forms on one
onnxruntime session each (graph optimizations on but constant folding, as the step session) and
prints the CPU seconds per call (median) and the largest difference between the two backward forms.

    .venv/bin/python bench/frozen_matmul.py [--layers 12] [--rows 32] [--k 768] [--n 3072] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime
from onnx import TensorProto, helper, numpy_helper


def _session(nodes: list, inputs: list[str], output: str, weight: np.ndarray, threads: int):
    vi = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, None)  # noqa: E731
    graph = helper.make_graph(nodes, "g", [vi(n) for n in inputs], [vi(output)], [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8
    )  # ORT 1.19 reads IR <= 10
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"], disabled_optimizers=["ConstantFolding"]
    )  # as device_runner's step session


def _cpu_seconds(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        c0 = time.process_time()
        run()
        times.append(time.process_time() - c0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--rows", type=int, default=32, help="batch * query tokens")
    parser.add_argument("--k", type=int, default=768)
    parser.add_argument("--n", type=int, default=3072)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((args.layers, args.k, args.n), dtype=np.float32) * 0.02
    x = rng.standard_normal((args.layers, args.rows, args.k), dtype=np.float32)
    dy = rng.standard_normal((args.layers, args.rows, args.n), dtype=np.float32)
    mm, tr = helper.make_node, lambda a, b: helper.make_node("Transpose", [a], [b], perm=[0, 2, 1])
    forward = _session([mm("MatMul", ["x", "W"], ["y"])], ["x"], "y", w, args.threads)
    as_b = _session([tr("W", "Wt"), mm("MatMul", ["dy", "Wt"], ["dx"])], ["dy"], "dx", w, args.threads)
    as_a = _session(
        [tr("dy", "dyt"), mm("MatMul", ["W", "dyt"], ["dxt"]), tr("dxt", "dx")], ["dy"], "dx", w, args.threads
    )
    diff = float(np.abs(as_b.run(None, {"dy": dy})[0] - as_a.run(None, {"dy": dy})[0]).max())
    print(
        f"onnxruntime {onnxruntime.__version__}, {args.threads} thread(s), W [{args.layers}, {args.k}, {args.n}], "
        f"{args.rows} rows; CPU seconds per call (median of {args.repeats})"
    )
    print(f"forward   x @ W          {_cpu_seconds(lambda: forward.run(None, {'x': x}), args.repeats):.4f}")
    print(
        f"backward  dy @ W^T       {_cpu_seconds(lambda: as_b.run(None, {'dy': dy}), args.repeats):.4f}  (W as B: packed every call)"
    )
    print(
        f"backward  (W @ dy^T)^T   {_cpu_seconds(lambda: as_a.run(None, {'dy': dy}), args.repeats):.4f}  (W as A: read in place)"
    )
    print(f"largest difference between the two backward forms: {diff:.2g}")


if __name__ == "__main__":
    main()
