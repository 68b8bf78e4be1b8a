"""Measure the components of the memory model in vqt_edge/memory.py on this machine.

Each component is measured in a fresh, torch-free process, from the kernel's counters
(VmRSS, and VmHWM reset through /proc/self/clear_refs before each piece), exactly as the
trainer runs it. Prints one JSON object per measurement; the constants in vqt_edge/memory.py
were read off these numbers (see its docstring).

    .venv/bin/python bench/calibrate_memory.py --bundle BUNDLE [--micro 1,8,32] [--frozen 1,8,32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def status() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def reset_peak() -> float:
    """Reset VmHWM to the current RSS; returns that RSS (MiB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status()["VmRSS"]


def child(args) -> None:
    sys.modules["torch"] = None
    sys.path.insert(0, str(REPO))
    import gc

    import numpy as np

    from device_runner import ort
    from device_runner import trainer  # noqa: F401  (everything `train` imports)
    from device_runner.deploy import build_model
    from device_runner.features import FeatureStore, FrozenBackbone
    from vqt_edge import manifest as mf

    from vqt_edge.memory import lean_malloc

    lean_malloc()  # as `train` does
    bundle = Path(args.bundle)
    m = mf.read_manifest(bundle, verify=False)
    ort.onnxruntime()
    api = ort.training_api()
    gc.collect()
    rec: dict = {"what": args.child, "value": args.value}
    rec["baseline_hwm"] = status()["VmHWM"]
    rec["baseline_rss"] = reset_peak()
    a = m.spec.arch
    rng = np.random.default_rng(0)
    if args.child == "baseline":
        pass
    elif args.child == "frozen":
        base = reset_peak()
        fb = FrozenBackbone(bundle, m, "cpu", None)
        st = status()
        rec["load_peak"], rec["load_resident"] = st["VmHWM"] - base, st["VmRSS"] - base
        b = int(args.value)
        pixels = rng.standard_normal((b, a.channels, a.image_size, a.image_size), dtype=np.float32)
        before = reset_peak()
        out = fb(pixels)
        st = status()
        rec["run_peak"] = st["VmHWM"] - before
        rec["run_outputs"] = sum(v.nbytes for v in out.values()) / 2**20
        rec["after_run_resident"] = st["VmRSS"] - before
        del out
        fb.close()
        gc.collect()
        rec["after_close_rss_over_base_untrimmed"] = status()["VmRSS"] - base
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        rec["after_close_rss_over_base"] = status()["VmRSS"] - base
    elif args.child == "store":
        n = int(args.value)
        base = reset_peak()
        arrays = {k: np.ones((n, *s), d) for k, (s, d) in m.spec.frozen_output_specs.items()}
        rec["store"] = status()["VmHWM"] - base
        rec["store_bytes"] = sum(v.nbytes for v in arrays.values()) / 2**20
    elif args.child in ("module", "finish"):
        mb = int(args.value)
        specs = m.spec.frozen_output_specs
        arrays = {k: rng.standard_normal((max(mb, 2), *s)).astype(d) for k, (s, d) in specs.items()}
        store = FeatureStore(arrays)
        base = reset_peak()
        state = api.CheckpointState.load_checkpoint(str(bundle / mf.CHECKPOINT))
        st = status()
        rec["ckpt_peak"], rec["ckpt_resident"] = st["VmHWM"] - base, st["VmRSS"] - base
        module = api.Module(str(bundle / mf.TRAINING_MODEL), state, str(bundle / mf.EVAL_MODEL), device="cpu")
        opt = api.Optimizer(str(bundle / mf.OPTIMIZER_MODEL), module)
        st = status()
        rec["module_peak"], rec["module_resident"] = st["VmHWM"] - base, st["VmRSS"] - base
        names = list(module.input_names())
        for step in range(args.steps):
            before = reset_peak() if step == args.steps - 1 else None
            feed = store.gather(np.arange(mb) % len(next(iter(arrays.values()))))
            feed["targets"] = np.full((mb, m.spec.num_classes), 1.0 / mb, np.float32)
            if "query_keep" in names:
                feed["query_keep"] = np.ones((mb, *m.spec.query_keep_shape), np.float32)
            module(*[feed[n] for n in names])
            del feed
            opt.step()
            module.lazy_reset_grad()
        st = status()
        rec["step_peak"], rec["step_resident_after"] = st["VmHWM"] - before, st["VmRSS"] - before
        rec["feed_fp32"] = mb * sum(int(np.prod(s)) * 4 for s, _ in specs.values()) / 2**20
        rec["total_over_base"] = st["VmRSS"] - base
        import tempfile

        before = reset_peak()
        with tempfile.TemporaryDirectory() as tmp:
            api.CheckpointState.save_checkpoint(state, str(Path(tmp) / "ckpt"), include_optimizer_state=True)
        st = status()
        rec["ckpt_save_peak"] = st["VmHWM"] - before
        if args.child == "finish":
            adapter = {k: np.array(state.parameters[k].data) for k in m.spec.trainable_shapes}
            module = opt = store = arrays = state = None
            gc.collect()
            before = reset_peak()
            with tempfile.TemporaryDirectory() as tmp:
                build_model(bundle, m, adapter, Path(tmp) / "model.onnx")
            st = status()
            rec["finish_peak"] = st["VmHWM"] - before
            rec["finish_peak_over_base"] = st["VmHWM"] - base
            rec["state_resident_before_finish"] = before - base
    print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", required=True)
    p.add_argument("--frozen", default="1,8,32")
    p.add_argument("--micro", default="1,8,32")
    p.add_argument("--store", default="64")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--only", default="baseline,frozen,store,module,finish")
    p.add_argument("--child")
    p.add_argument("--value")
    args = p.parse_args()
    if args.child:
        return child(args)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(json.dumps({"bundle": args.bundle, "files_mib": {p.name: round(p.stat().st_size / 2**20, 1)
                      for p in [*Path(args.bundle).glob("*.onnx"), *Path(args.bundle).glob("train/*")]}}), flush=True)
    plan = {"baseline": ["0"], "frozen": args.frozen.split(","), "store": args.store.split(","),
            "module": args.micro.split(","), "finish": args.micro.split(",")[:1]}
    for what in args.only.split(","):
        for v in plan[what]:
            subprocess.run([sys.executable, __file__, "--bundle", args.bundle, "--child", what, "--value", v,
                            "--steps", str(args.steps)], check=True, env=env)


if __name__ == "__main__":
    main()
