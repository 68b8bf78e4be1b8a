"""Measure the components of the memory model in vqt_edge/memory.py on this machine.

Each component is measured in a fresh, torch-free process, from the kernel's counters
(VmRSS, and VmHWM reset through /proc/self/clear_refs before each piece), exactly as the
trainer runs it. Prints one JSON object per measurement; the constants in vqt_edge/memory.py
were read off these numbers (see its docstring).

    .venv/bin/python bench/calibrate_memory.py --bundle BUNDLE [--micro 1,8,32] [--frozen 1,8,32]

`portable` measures the portable backend's step session (train/step.onnx, device_runner/backends.py)
with the memory arena on and off, `model` an eval session on model.onnx as `eval` and `train --test`
open it. At the end the constants of the memory model that these runs determine are printed, as
ratios to the bundle's file sizes and per-sample tensor sizes (one JSON line, "constants"): rerun
after a change to the step graph or the sessions' options and compare them with vqt_edge/memory.py.
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
    import time

    import numpy as np

    from device_runner import (
        ort,
        trainer,  # noqa: F401  (everything `train` imports)
    )
    from device_runner.deploy import build_model
    from device_runner.features import FeatureStore, FrozenBackbone
    from vqt_edge import manifest as mf
    from vqt_edge.memory import lean_malloc, trim_malloc

    lean_malloc()  # as `train` does
    bundle = Path(args.bundle)
    m = mf.read_manifest(bundle, verify=False)
    ort.onnxruntime()
    api = ort.training_api() if args.child in ("baseline", "module", "finish") and ort.has_training_api() else None
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
        fb = FrozenBackbone(bundle, m, "cpu", None, prepack=args.prepack)
        rec["prepack"] = args.prepack
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
        trim_malloc()
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
            t = time.perf_counter()
            api.CheckpointState.save_checkpoint(state, str(Path(tmp) / "ckpt"), include_optimizer_state=True)
            rec["ckpt_save_ms"] = 1000 * (time.perf_counter() - t)
            rec["ckpt_bytes"] = (Path(tmp) / "ckpt").stat().st_size
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
    elif args.child == "portable":
        from device_runner import backends

        mb = int(args.value)
        arrays = {k: rng.standard_normal((mb, *s)).astype(d) for k, (s, d) in m.spec.frozen_output_specs.items()}
        store = FeatureStore(arrays)
        base = reset_peak()
        backend = backends.open_backend("portable", bundle, m, "cpu", 1, None, arena=args.arena)
        st = status()
        rec["arena"] = args.arena
        rec["load_peak"], rec["load_resident"] = st["VmHWM"] - base, st["VmRSS"] - base
        peaks = []
        for _ in range(args.steps):  # the first step at this size grows the arena, if any
            before = reset_peak()
            feed = store.gather(np.arange(mb), backend.input_dtypes)
            feed["targets"] = np.full((mb, m.spec.num_classes), 1.0 / mb, np.float32)
            if "query_keep" in backend.input_names:
                feed["query_keep"] = np.ones((mb, *m.spec.query_keep_shape), np.float32)
            backend.forward(feed)
            del feed
            backend.step(1e-3, 1e-4)
            peaks.append(status()["VmHWM"] - before)
        rec["step_peak"] = max(peaks)
        rec["resident_after_steps"] = status()["VmRSS"] - base
        from vqt_edge.memory import BundleFootprint

        rec["step_fed"] = (
            mb * BundleFootprint.from_bundle(bundle).step_fed_per_sample / 2**20
        )  # fed rows (+ a Cast's copy)
        rec["feed_fp32"] = mb * sum(int(np.prod(s)) * 4 for s, _ in m.spec.frozen_output_specs.values()) / 2**20
        import tempfile

        before = reset_peak()
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            backend.save(Path(tmp) / "checkpoint.safetensors", {"epoch": 1, "step": 0})
            rec["ckpt_save_ms"] = 1000 * (time.perf_counter() - t)
            rec["ckpt_bytes"] = (Path(tmp) / "checkpoint.safetensors").stat().st_size
        rec["ckpt_save_peak"] = status()["VmHWM"] - before
    elif args.child == "model":
        import tempfile

        from safetensors.numpy import load_file

        b = int(args.value)
        adapter = {n: v for n, v in load_file(str(bundle / mf.STEP_INIT)).items()}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.onnx"
            build_model(bundle, m, adapter, path)
            del adapter
            gc.collect()
            trim_malloc()
            rec["model_bytes"] = path.stat().st_size
            base = reset_peak()
            # as `eval` and `train --test` open it (device_runner/evaluate.py): no prepacking
            session = ort.onnxruntime().InferenceSession(
                str(path), sess_options=ort.session_options(prepack=False), providers=["CPUExecutionProvider"]
            )
            st = status()
            rec["load_peak"], rec["load_resident"] = st["VmHWM"] - base, st["VmRSS"] - base
            pixels = rng.standard_normal((b, a.channels, a.image_size, a.image_size), dtype=np.float32)
            peaks = []
            for _ in range(2):
                before = reset_peak()
                session.run(["logits"], {"pixel_values": pixels})
                peaks.append(status()["VmHWM"] - before)
            rec["run_peak"] = max(peaks)
    print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", required=True)
    p.add_argument("--frozen", default="1,8,32")
    p.add_argument("--micro", default="1,8,32")
    p.add_argument("--portable", default="1,4,8,32", help="micro-batches of the portable step")
    p.add_argument("--model", default="1,8,32", help="batches of an eval session on model.onnx")
    p.add_argument("--store", default="64")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--only", default="baseline,frozen,store,module,finish,portable,model")
    p.add_argument("--child")
    p.add_argument("--value")
    p.add_argument("--prepack", type=int, default=1)
    p.add_argument("--arena", type=int, default=1)
    args = p.parse_args()
    if args.child:
        args.prepack, args.arena = bool(args.prepack), bool(args.arena)
        return child(args)
    sys.path.insert(0, str(REPO))
    from device_runner.ort import has_training_api

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    bundle = Path(args.bundle)
    files = {
        p.relative_to(bundle).as_posix(): p.stat().st_size for p in [*bundle.glob("*.onnx"), *bundle.glob("train/*")]
    }
    print(
        json.dumps({"bundle": args.bundle, "files_mib": {k: round(v / 2**20, 1) for k, v in files.items()}}), flush=True
    )
    runs = {
        "baseline": [("0", {})],
        "store": [(v, {}) for v in args.store.split(",")],
        "frozen": [(v, {"prepack": pp}) for pp in (1, 0) for v in args.frozen.split(",")],
        "module": [(v, {}) for v in args.micro.split(",")],
        "finish": [(v, {}) for v in args.micro.split(",")[:1]],
        "portable": [(v, {"arena": ar}) for ar in (1, 0) for v in args.portable.split(",")],
        "model": [(v, {}) for v in args.model.split(",")],
    }
    records = []
    for what in args.only.split(","):
        if what in ("module", "finish") and not has_training_api():
            continue
        if what == "portable" and not (bundle / "train" / "step.onnx").exists():
            continue
        for v, flags in runs[what]:
            extra = [x for k, f in flags.items() for x in (f"--{k}", str(f))]
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--bundle",
                    args.bundle,
                    "--child",
                    what,
                    "--value",
                    v,
                    "--steps",
                    str(args.steps),
                    *extra,
                ],
                check=True,
                env=env,
                capture_output=True,
                text=True,
            )
            print(out.stdout, end="", flush=True)
            records.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(json.dumps({"constants": constants(records, files)}), flush=True)


def constants(records: list[dict], files: dict[str, int]) -> dict:
    """The memory model's constants these measurements determine (vqt_edge/memory.py names them):
    ratios to the file sizes, and per-sample slopes between the smallest and largest batch."""
    mib = 2**20
    out: dict = {}

    def slope(rows: list[dict], key: str, per: str) -> float | None:
        rows = sorted(rows, key=lambda r: int(r["value"]))
        if len(rows) < 2 or int(rows[-1]["value"]) == int(rows[0]["value"]):
            return None
        db = int(rows[-1]["value"]) - int(rows[0]["value"])
        return round((rows[-1][key] - rows[0][key]) / db / (rows[-1][per] / int(rows[-1]["value"])), 3)

    from vqt_edge.memory.model import SESSION_MB

    def ratio(value: float, file: str) -> float:
        """Per byte of the file, beyond a session's fixed cost."""
        return round((value - SESSION_MB) / (files[file] / mib), 3)

    for pp in (True, False):
        rows = [r for r in records if r["what"] == "frozen" and r.get("prepack") == pp]
        if rows:
            tag = "" if pp else "_NO_PREPACK"
            out[f"FROZEN_LOAD{tag}"] = ratio(max(r["load_peak"] for r in rows), "frozen.onnx")
            out[f"FROZEN_RESIDENT{tag}"] = ratio(max(r["load_resident"] for r in rows), "frozen.onnx")
            out[f"frozen_run_peak_mib{tag}"] = {r["value"]: r["run_peak"] for r in rows}
    for ar in (True, False):
        rows = [r for r in records if r["what"] == "portable" and r.get("arena") == ar]
        if rows:
            tag = "" if ar else "_NO_ARENA"
            out["STEP_LOAD"] = ratio(max(r["load_peak"] for r in rows), "train/step.onnx")
            out["STEP_RESIDENT"] = ratio(max(r["load_resident"] for r in rows), "train/step.onnx")
            # the step's peak beyond its fed rows, per sample, in units of the fp32 feed
            for r in rows:
                r["work"] = r["step_peak"] - r["step_fed"]
            out[f"STEP_WORK{tag}"] = slope(rows, "work", "feed_fp32")
            # what a step costs at any micro-batch: QUANTIZED_STEP_DEQUANT x its largest dequantized weight for a quantized step graph (~0 for fp32)
            lo, hi = sorted(rows, key=lambda r: int(r["value"]))[0], sorted(rows, key=lambda r: int(r["value"]))[-1]
            if int(hi["value"]) > int(lo["value"]):
                per = (hi["step_peak"] - lo["step_peak"]) / (int(hi["value"]) - int(lo["value"]))
                out[f"step_fixed_mib{tag}"] = round(lo["step_peak"] - per * int(lo["value"]), 1)
            out[f"step_peak_mib{tag}"] = {r["value"]: r["step_peak"] for r in rows}
            out["portable_checkpoint"] = {
                "bytes": rows[0]["ckpt_bytes"],
                "save_ms": rows[0]["ckpt_save_ms"],
                "save_peak_mib": rows[0]["ckpt_save_peak"],
            }
    rows = [r for r in records if r["what"] == "module"]
    if rows:
        out["ort_checkpoint"] = {
            "bytes": rows[0]["ckpt_bytes"],
            "save_ms": rows[0]["ckpt_save_ms"],
            "save_peak_mib": rows[0]["ckpt_save_peak"],
        }
    rows = [r for r in records if r["what"] == "model"]
    if rows:
        size = rows[0]["model_bytes"] / mib
        out["MODEL_LOAD"] = round((max(r["load_peak"] for r in rows) - SESSION_MB) / size, 3)
        out["MODEL_RESIDENT"] = round((max(r["load_resident"] for r in rows) - SESSION_MB) / size, 3)
        out["model_run_peak_mib"] = {r["value"]: r["run_peak"] for r in rows}
    return out


if __name__ == "__main__":
    main()
