"""Peak memory of VQT on-device training against the baselines, at the same batch (docs/design.md 5-6).

One run measures, each configuration in a process of its own (peaks never mix), the peak resident
memory of the whole training process (VmHWM, and /usr/bin/time -v's "Maximum resident set size"
where available) over a few training steps on random images:

- vqt            `vqt-edge train` on a VQT bundle (query tokens in all layers, T=1), default settings
- vqt_disk       the same with `--kv disk`: K/V read from the disk cache, none kept in RAM
- vqt_planned    the same under `--memory-budget` set to the smallest budget the planner accepts
- vpt, adaptformer  `vqt-edge train` on VPT-Deep / AdaptFormer bundles adapting all layers (last k = depth)
- torch_official VQT in PyTorch as the official code does it: query tokens concatenated into every
                 layer's sequence (attention masked so they read only the original tokens), autograd
                 through the whole backbone
- torch_nograd   the same with the backbone under torch.no_grad() (K/V computed without a graph),
                 only the query path and head under autograd

and prints/writes the ratios to the VQT rows: bench/results/memory_vs_baselines.json and .md.

    .venv/bin/python bench/memory_vs_baselines.py [--model vit_b16] [--batch-size 32] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results"


# -- PyTorch VQT, each in its own process ----------------------------------------------------------


def torch_child(mode: str, model: str, batch: int, steps: int, classes: int) -> None:
    import torch
    import torch.nn.functional as F

    from exporters.vit import VisionTransformer
    from vqt_edge.arch import PRESETS
    from vqt_edge.memory import peak_rss_mb

    torch.manual_seed(0)
    arch = PRESETS[model]
    backbone = VisionTransformer(arch)
    backbone.reset_parameters(seed=0)
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    d, h, depth = arch.dim, arch.heads, arch.depth
    bound = math.sqrt(6.0 / (3 * 16 * 16 + d))
    tokens = torch.nn.Parameter(torch.empty(depth, 1, d).uniform_(-bound, bound))
    head = torch.nn.Linear(d * (1 + depth), classes)
    opt = torch.optim.AdamW([tokens, *head.parameters()], lr=1e-3, weight_decay=1e-4)

    def block_with_queries(block, x, p):
        """Official VQT: [x; P] through the block, queries reading only x, nobody reading queries."""
        seq = torch.cat([x, p.expand(x.shape[0], -1, -1)], dim=1)
        b, s, _ = seq.shape
        n = x.shape[1]
        qkv = block.attn.qkv(block.norm1(seq)).reshape(b, s, 3, h, d // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = (q @ k.transpose(-2, -1)) * (d // h) ** -0.5
        mask = torch.zeros(s, s, dtype=torch.bool)
        mask[:, n:] = True
        attn = (scores.masked_fill(mask, float("-inf")).softmax(-1) @ v).transpose(1, 2).reshape(b, s, d)
        z = seq + block.attn.proj(attn)
        z = z + block.mlp(block.norm2(z))
        return z[:, :n], z[:, n:]

    def query_only(block, k, v, p):
        """Query path on given K/V (what the backbone under no_grad leaves to autograd)."""
        q = block.attn.qkv(block.norm1(p))[..., :d].reshape(1, -1, h, d // h).transpose(1, 2)
        attn = ((q @ k.transpose(-2, -1)) * (d // h) ** -0.5).softmax(-1) @ v
        z = p + block.attn.proj(attn.transpose(1, 2).reshape(k.shape[0], -1, d))
        return z + block.mlp(block.norm2(z))

    def forward(x):
        if mode == "official":
            h_ = backbone.embed(x)
            zs = []
            for i, block in enumerate(backbone.blocks):
                h_, z = block_with_queries(block, h_, tokens[i].unsqueeze(0))
                zs.append(z.flatten(1))
            cls = backbone.norm(h_)[:, 0]
        else:
            with torch.no_grad():
                cls, keys, values = backbone(x)
            zs = [
                query_only(block, keys[:, i], values[:, i], tokens[i].unsqueeze(0)).flatten(1)
                for i, block in enumerate(backbone.blocks)
            ]
        feats = [cls] + zs
        feats = [f / f.norm(dim=-1, keepdim=True).clamp_min(1e-6) for f in feats]
        return head(torch.cat(feats, dim=-1))

    times, cpu = [], []
    losses = []
    for step in range(steps):
        x = torch.randn(batch, 3, arch.image_size, arch.image_size, generator=torch.Generator().manual_seed(step))
        y = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(100 + step))
        t0, c0 = time.perf_counter(), time.process_time()
        loss = F.cross_entropy(forward(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # what a step costs even on a shared machine (bench/step_bench.py)
        losses.append(float(loss))
    print(
        json.dumps(
            {
                "peak_mb": round(peak_rss_mb(), 1),
                "seconds_per_step": round(sum(times[1:] or times) / len(times[1:] or times), 2),
                "cpu_seconds_per_step": round(sum(cpu[1:] or cpu) / len(cpu[1:] or cpu), 3),
                "losses": losses,
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


# -- vqt-edge runs ---------------------------------------------------------------------------------


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "vqt_edge.cli", *map(str, args)]


def timed(cmd: list[str], log: Path) -> tuple[int, float | None, float]:
    """Run under /usr/bin/time -v when present: (exit code, its max RSS in MiB, wall seconds)."""
    wrap = ["/usr/bin/time", "-v"] if Path("/usr/bin/time").exists() else []
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(
            wrap + [str(c) for c in cmd],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        ).returncode
    wall = time.perf_counter() - t0
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log.read_text(errors="replace"))
    return rc, (int(m.group(1)) / 1024 if m else None), wall


def random_images(folder: Path, count: int, size: int, classes: int) -> None:
    from vqt_edge.sweep import random_images as make

    if not folder.exists():
        make(folder, count, size, classes)


def run_vqt_edge(
    name: str, method: str, args, work: Path, data: Path, extra_train: list[str] = (), bundle: Path | None = None
) -> dict:
    bundle_given = bundle is not None
    bundle = bundle or work / f"bundle_{name}"
    if not bundle_given:
        shutil.rmtree(bundle, ignore_errors=True)
        export = cli("export", "--model", args.model, "--random-init", "--num-classes", args.classes, "--out", bundle)
        if method != "vqt":
            export += ["--method", method, "--last-k", args.depth]
        print(f"{name}: export ...", flush=True)
        rc, _, wall = timed(export, work / f"{name}.export.log")
        if rc:
            return {"name": name, "status": f"export failed (exit {rc})", "log": str(work / f"{name}.export.log")}
        print(f"{name}: exported in {wall:.0f} s", flush=True)
    run = work / f"run_{name}"
    shutil.rmtree(run, ignore_errors=True)
    train = cli(
        "train",
        "--bundle",
        bundle,
        "--data",
        data,
        "--run",
        run,
        "--epochs",
        1,
        "--batch-size",
        args.batch_size,
        *extra_train,
    )
    print(f"{name}: training {args.steps} steps at batch {args.batch_size} ...", flush=True)
    rc, time_peak, wall = timed(train, work / f"{name}.train.log")
    if rc or not (run / "summary.json").exists():
        return {
            "name": name,
            "status": f"train failed (exit {rc})",
            "log": str(work / f"{name}.train.log"),
            "time_v_peak_mb": time_peak,
        }
    s = json.loads((run / "summary.json").read_text())
    steps = math.ceil(s["train_images"] / args.batch_size)
    out = {
        "name": name,
        "status": "ok",
        "peak_mb": s["peak_rss_mb"],
        "time_v_peak_mb": round(time_peak, 1) if time_peak else None,
        "predicted_peak_mb": s.get("predicted_peak_mb"),
        "kv": s.get("kv"),
        "micro_batch": s.get("micro_batch") or args.batch_size,
        "seconds_per_step": s.get("seconds_per_step") or round(s["seconds_per_epoch"] / steps, 2),
        "wall_s": round(wall, 1),
        "peak_by_phase": s.get("peak_rss_mb_after"),
        "backend": s.get("backend"),
    }
    print(
        f"{name}: peak {out['peak_mb']:.0f} MiB (time -v {out['time_v_peak_mb']}), {out['seconds_per_step']} s/step",
        flush=True,
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="vit_b16")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--only", default="vqt,vqt_disk,vqt_planned,vpt,adaptformer,torch_official,torch_nograd")
    ap.add_argument("--work", type=Path, help="Scratch folder (bundles, runs, logs) [default: a temp folder]")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument(
        "--merge", action="store_true", help="Keep the results of configurations not run now from the existing JSON"
    )
    ap.add_argument("--torch-child", choices=["official", "nograd"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.torch_child:
        return torch_child(args.torch_child, args.model, args.batch_size, args.steps, args.classes)

    from vqt_edge.arch import PRESETS
    from vqt_edge.spec import METHODS

    arch = PRESETS[args.model]
    args.depth = arch.depth
    work = args.work or Path(tempfile.mkdtemp(prefix="vqt-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "images"
    random_images(data, args.steps * args.batch_size, arch.image_size, args.classes)
    only = args.only.split(",")
    results = []
    vqt_bundle = None
    if {"vqt", "vqt_disk", "vqt_planned"} & set(only):
        r = run_vqt_edge("vqt", "vqt", args, work, data)
        vqt_bundle = work / "bundle_vqt"
        if "vqt" in only:
            results.append(r)
    if "vqt_disk" in only and vqt_bundle is not None and (vqt_bundle / "manifest.json").exists():
        results.append(run_vqt_edge("vqt_disk", "vqt", args, work, data, ["--kv", "disk"], bundle=vqt_bundle))
    if "vqt_planned" in only and vqt_bundle is not None and (vqt_bundle / "manifest.json").exists():
        plan = subprocess.run(
            cli(
                "plan",
                "--bundle",
                vqt_bundle,
                "--memory-budget",
                "1MB",
                "--images",
                args.steps * args.batch_size,
                "--batch-size",
                args.batch_size,
                "--json",
            ),
            capture_output=True,
            text=True,
        )
        need = json.loads(plan.stdout)["smallest_budget_mb"]
        r = run_vqt_edge(
            "vqt_planned", "vqt", args, work, data, ["--memory-budget", f"{need:.0f}MB"], bundle=vqt_bundle
        )
        r["memory_budget_mb"] = need
        results.append(r)
    shutil.rmtree(work / "bundle_vqt", ignore_errors=True)
    for method in ("vpt", "adaptformer"):
        if method not in only:
            continue
        if method not in METHODS:
            results.append({"name": method, "status": "not supported by this export yet"})
            continue
        results.append(run_vqt_edge(method, method, args, work, data))
        shutil.rmtree(work / f"bundle_{method}", ignore_errors=True)
    for mode in ("official", "nograd"):
        name = f"torch_{mode}"
        if name not in only:
            continue
        print(f"{name}: {args.steps} steps at batch {args.batch_size} ...", flush=True)
        cmd = [
            sys.executable,
            __file__,
            "--torch-child",
            mode,
            "--model",
            args.model,
            "--batch-size",
            str(args.batch_size),
            "--steps",
            str(args.steps),
            "--classes",
            str(args.classes),
        ]
        rc, time_peak, wall = timed(cmd, work / f"{name}.log")
        lines = [line for line in (work / f"{name}.log").read_text().splitlines() if line.startswith("{")]
        if rc or not lines:
            results.append({"name": name, "status": f"failed (exit {rc})", "log": str(work / f"{name}.log")})
            continue
        r = {
            "name": name,
            "status": "ok",
            **json.loads(lines[-1]),
            "time_v_peak_mb": round(time_peak, 1) if time_peak else None,
            "wall_s": round(wall, 1),
        }
        print(f"{name}: peak {r['peak_mb']:.0f} MiB, {r['seconds_per_step']} s/step", flush=True)
        results.append(r)

    previous = args.out / "memory_vs_baselines.json"
    if args.merge and previous.exists():
        now = {r["name"] for r in results}
        kept = [r for r in json.loads(previous.read_text())["results"] if r["name"] not in now]
        order = list(LABELS)
        results = sorted(kept + results, key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    for r in results:
        for ref in RATIO_TO:
            base = next((b for b in results if b["name"] == ref and b["status"] == "ok"), None)
            if base and r.get("peak_mb"):
                r[f"ratio_to_{ref}"] = round(r["peak_mb"] / base["peak_mb"], 2)
    record = {
        "model": args.model,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "measured": time.strftime("%Y-%m-%d %H:%M"),
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory_vs_baselines.json").write_text(json.dumps(record, indent=2) + "\n")
    md = markdown(record)
    (args.out / "memory_vs_baselines.md").write_text(md)
    print(md)


RATIO_TO = ("vqt", "vqt_disk", "vqt_planned")
"""The VQT rows every peak is divided by. `vqt_disk` is the like-for-like one: the same batch and no
micro-batches, like the baselines, and no K/V cache in RAM, whose size grows with the data set
(the baselines at k = 12 cache only the patch embeddings)."""
LABELS = {  # {backend}: the backend the run used (its summary.json); ort-training in runs that predate the field
    "vqt": "VQT, vqt-edge ({backend}, K/V in RAM, no micro-batches)",
    "vqt_disk": "VQT, vqt-edge ({backend}, K/V from the disk cache, no micro-batches)",
    "vqt_planned": "VQT, vqt-edge ({backend}) under the smallest --memory-budget the planner accepts",
    "vpt": "VPT-Deep, all layers, vqt-edge ({backend})",
    "adaptformer": "AdaptFormer, all layers, vqt-edge ({backend})",
    "torch_official": "VQT in PyTorch, official style (autograd through the backbone)",
    "torch_nograd": "VQT in PyTorch, backbone under no_grad",
}


def markdown(record: dict) -> str:
    lines = [
        f"Peak RSS of the whole training process, {record['model']} (random init), batch {record['batch_size']}, "
        f"{record['steps']} steps, {record['machine']}, measured {record['measured']}.",
        "",
        "Peak: VmHWM of the training process (equal to /usr/bin/time -v's maximum RSS); predicted: "
        "vqt_edge/memory.py for the vqt-edge runs; x: ratio to the first three VQT rows (RAM / disk / planned); "
        "s/step: the optimizer step alone "
        "(2 cores shared with other jobs: indicative only).",
        "",
        "| configuration | peak MiB | predicted MiB | x VQT RAM | x VQT disk | x VQT planned | s/step |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in record["results"]:
        label = LABELS.get(r["name"], r["name"]).format(backend=r.get("backend") or "ort-training")
        if r["name"] == "vqt_planned" and r.get("memory_budget_mb"):
            label += f" ({r['memory_budget_mb']:.0f} MiB; kv {r.get('kv')}, micro-batch {r.get('micro_batch')})"
        if r.get("status") != "ok":
            lines.append(f"| {label} | {r.get('status')} | | | | | |")
            continue
        pred = f"{r['predicted_peak_mb']:.0f}" if r.get("predicted_peak_mb") else ""
        ratios = " | ".join(str(r.get(f"ratio_to_{ref}", "")) for ref in RATIO_TO)
        lines.append(f"| {label} | {r['peak_mb']:.0f} | {pred} | {ratios} | {r.get('seconds_per_step', '')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
