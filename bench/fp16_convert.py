"""fp16 -> fp32 conversion of one batch of cached K (or V), side by side in one process.

docs/design.md section 10. Every training step converts the fp16 K/V rows it reads to fp32; on
vit_b16 at batch 32 that is 2 x 58 M values. Three ways, one thread, CPU seconds, median of --repeat:

- numpy       numpy's own cast (`np.copyto(fp32, fp16)`), what `astype` does
- fp16_to_fp32  device_runner/fp16.py (what the runner uses): vectorized integer/float ufuncs per chunk
- ort Cast    a one-node Cast graph on this environment's onnxruntime with the step session's
              options (what a step graph taking fp16 would run inside)

    .venv/bin/python bench/fp16_convert.py [--model vit_b16] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from bench.frozen_matmul import _cpu_seconds
    from device_runner import ort
    from device_runner.backends import step_session_options
    from device_runner.fp16 import fp16_to_fp32
    from vqt_edge.arch import PRESETS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_b16", choices=sorted(PRESETS))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    a = PRESETS[args.model]
    shape = (args.batch_size, a.depth, a.heads, a.num_tokens, a.head_dim)
    src = (np.random.default_rng(0).standard_normal(shape, dtype=np.float32) * 3).astype(np.float16)
    out = np.empty(shape, np.float32)

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        "cast",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    rt = ort.onnxruntime()
    session = rt.InferenceSession(
        model.SerializeToString(), step_session_options(1), providers=["CPUExecutionProvider"]
    )  # arena on, as a step

    rows = {
        "numpy": _cpu_seconds(lambda: np.copyto(out, src), args.repeat),
        "fp16_to_fp32": _cpu_seconds(lambda: fp16_to_fp32(src, out), args.repeat),
        f"onnxruntime {rt.__version__} Cast": _cpu_seconds(lambda: session.run(None, {"x": src}), args.repeat),
    }
    fp16_to_fp32(src, out)
    assert np.array_equal(out.view(np.uint32), src.astype(np.float32).view(np.uint32))
    print(
        f"{args.model} K at batch {args.batch_size}: {shape}, {src.size / 1e6:.1f} M values, 1 thread, "
        f"median of {args.repeat}, CPU s; onnx {onnx.__version__}, numpy {np.__version__}"
    )
    print("| conversion | s | x numpy | G values/s |\n|---|---:|---:|---:|")
    for name, s in rows.items():
        print(f"| {name} | {s:.4f} | {s / rows['numpy']:.2f} | {src.size / s / 1e9:.2f} |")


if __name__ == "__main__":
    main()
