"""`vqt-edge info`: what a person with a new device runs first (docs/devices.md).

What this Python, onnxruntime and machine can do before anything is trained: the onnxruntime
package and its execution providers, which training backends can run, cores, memory and disk; with
a bundle, the plan `train` would choose by default (vqt_edge/memory/planner.py) and the smallest memory
budget any plan fits. Torch-free and read-only: it never writes to the bundle or the run folder.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import sys
from pathlib import Path

import click

#: The onnxruntime distributions that provide `import onnxruntime` (docs/install.md).
ORT_PACKAGES = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-training", "onnxruntime-training-cpu")
DEFAULT_IMAGES = 1000  # as `plan`: without --data, a run of this many images is planned


def _onnxruntime() -> dict:
    from device_runner import ort

    installed = {}
    for name in ORT_PACKAGES:
        try:
            installed[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        module = ort.onnxruntime()
    except Exception as e:  # noqa: BLE001 - a broken install is what this command must report, not die on
        return {
            "packages": installed,
            "version": None,
            "error": str(e).splitlines()[0],
            "providers": [],
            "training_api": False,
        }
    return {
        "packages": installed,
        "version": module.__version__,
        "providers": module.get_available_providers(),
        "training_api": ort.has_training_api(),
    }


def _memory() -> dict:
    from vqt_edge.memory.measure import AVAILABLE_ENV, available_mb, cgroup_memory_mb, meminfo_available_mb

    cgroup = cgroup_memory_mb()
    return {
        "mem_available_mb": _round(meminfo_available_mb()),
        "cgroup_limit_mb": _round(cgroup[0]) if cgroup else None,
        "cgroup_used_mb": _round(cgroup[1]) if cgroup else None,
        "override": os.environ.get(AVAILABLE_ENV) or None,
        "available_mb": _round(available_mb()),
    }


def _disk(run: Path) -> dict:
    """Free space on the file system the run folder would be created on (its nearest existing parent)."""
    where = run.absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    usage = shutil.disk_usage(where)
    return {"path": str(run), "checked": str(where), "free_mb": _round(usage.free / 2**20)}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def _backends(bundle: Path | None, onnxruntime: dict) -> dict:
    """Each training backend: whether it can run here (and with the bundle, on it), and why not."""
    if onnxruntime["version"] is None:
        return {name: {"runs": False, "why": "onnxruntime cannot be imported"} for name in ("portable", "ort-training")}
    step = None
    if bundle is not None:
        from device_runner.backends import has_step_graph
        from vqt_edge import manifest as mf

        step = has_step_graph(mf.read_manifest(bundle, verify=False))
    out = {
        "portable": {
            "runs": step is not False,
            "why": None if step is not False else "the bundle has no train/step.onnx",
        },
        "ort-training": {
            "runs": onnxruntime["training_api"],
            "why": None if onnxruntime["training_api"] else "this onnxruntime build has no training API",
        },
    }
    return out


def _plans(bundle: Path, data: Path | None, batch_size: int, available: float | None) -> dict:
    """The plan `train --bundle B --data D` would choose with no --kv or --memory-budget, and the smallest
    budget any configuration fits (what `plan` names when a budget is too small)."""
    from device_runner import backends
    from vqt_edge import manifest as mf
    from vqt_edge.kv_cache import DEFAULT_KV_DTYPE
    from vqt_edge.memory import BundleFootprint, NoPlan, choose, default_kv
    from vqt_edge.memory.disk import footprint

    images = DEFAULT_IMAGES
    if data is not None:
        from device_runner.data import load_dataset

        images = len(load_dataset(data))
    fp = footprint(BundleFootprint.from_bundle(bundle), DEFAULT_KV_DTYPE)  # the cache train keeps by default
    choices = backends.candidates("auto", mf.read_manifest(bundle, verify=False))
    default = default_kv(
        fp, images=images, batch_size=batch_size, micro_batch=None, available=available, backend=choices[0]
    )
    try:
        smallest = choose(fp, 0.0, images=images, batch_size=batch_size, backends=choices)  # nothing fits 0 MiB
    except NoPlan as e:
        smallest = e.best
    return {
        "images": images,
        "images_counted": data is not None,
        "default_plan": default.to_dict(),
        "smallest_budget_mb": smallest.needs_mb,
        "smallest_plan": smallest.to_dict(),
    }


def collect(bundle: Path | None = None, data: Path | None = None, run: Path = Path("."), batch_size: int = 32) -> dict:
    """Everything `info` prints, as one JSON-able dict."""
    from device_runner import ort

    ort.block_torch()
    onnxruntime = _onnxruntime()
    memory = _memory()
    info = {
        "vqt_edge": _version("vqt-edge"),
        "python": {
            "version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
        },
        "machine": {
            "architecture": platform.machine(),
            "system": platform.system(),
            "release": platform.release(),
            "libc": " ".join(platform.libc_ver()).strip() or None,
            "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        },
        "onnxruntime": onnxruntime,
        "backends": _backends(bundle, onnxruntime),
        "memory": memory,
        "disk": _disk(run),
    }
    if bundle is not None:
        info["bundle"] = {"path": str(bundle), **_plans(bundle, data, batch_size, memory["available_mb"])}
    return info


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _mb(x: float | None) -> str:
    return "unknown" if x is None else f"{x:.0f} MiB"


@click.command()
@click.option(
    "--bundle",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A bundle: also show the plan `train` would choose by default and the smallest budget that fits.",
)
@click.option(
    "--data", type=click.Path(exists=True, path_type=Path), help="With --bundle: plan for these images (default: 1000)."
)
@click.option(
    "--run",
    "run_dir",
    type=click.Path(path_type=Path),
    default=Path("."),
    show_default=True,
    help="Where the run folder would go: its file system's free space is shown.",
)
@click.option(
    "--batch-size", type=int, default=32, show_default=True, help="With --bundle: the batch size to plan for."
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(bundle, data, run_dir, batch_size, as_json) -> None:
    """What this device can run: Python, architecture, onnxruntime and its execution providers, the
    training backends, cores, memory and disk; with --bundle, the default training plan."""
    from vqt_edge.errors import UserError

    if data is not None and bundle is None:
        raise UserError("--data needs --bundle")
    found = collect(bundle, data, run_dir, batch_size)
    if as_json:
        click.echo(json.dumps(found))
        return
    py, m, o, mem, disk = found["python"], found["machine"], found["onnxruntime"], found["memory"], found["disk"]
    click.echo(f"vqt-edge      {found['vqt_edge']}")
    click.echo(f"python        {py['version']} ({py['implementation']}, {py['executable']})")
    click.echo(f"machine       {m['architecture']}, {m['system']} {m['release']}, {m['libc'] or 'libc unknown'}")
    click.echo(f"cores         {m['cores']} ({m['usable_cores']} usable by this process)")
    packages = ", ".join(f"{k} {v}" for k, v in o["packages"].items()) or "none installed"
    click.echo(f"onnxruntime   {o['version'] or 'cannot be imported: ' + o.get('error', '')} (packages: {packages})")
    click.echo(f"providers     {', '.join(o['providers']) or 'none'}")
    for name, b in found["backends"].items():
        click.echo(f"backend       {name}: " + ("can run" if b["runs"] else f"cannot run ({b['why']})"))
    cgroup = (
        "no cgroup limit"
        if mem["cgroup_limit_mb"] is None
        else f"cgroup limit {_mb(mem['cgroup_limit_mb'])}, {_mb(mem['cgroup_used_mb'])} used"
    )
    override = f", $VQT_EDGE_MEM_AVAILABLE={mem['override']}" if mem["override"] else ""
    click.echo(
        f"memory        {_mb(mem['available_mb'])} available to a run (MemAvailable {_mb(mem['mem_available_mb'])}, "
        f"{cgroup}{override})"
    )
    click.echo(f"disk          {_mb(disk['free_mb'])} free at {disk['checked']}")
    if bundle is not None:
        b = found["bundle"]
        d, s = b["default_plan"], b["smallest_plan"]
        counted = "counted in --data" if b["images_counted"] else "none given: 1000 assumed"
        click.echo(f"bundle        {bundle}: {b['images']} images ({counted}), batch {batch_size}")
        click.echo(
            f"train default --backend {d['backend']} --kv {d['kv']}: predicted peak {d['predicted_peak_mb']:.0f} MiB"
        )
        click.echo(
            f"smallest      --memory-budget {b['smallest_budget_mb']:.0f}MB (--backend {s['backend']} --kv {s['kv']} "
            f"--micro-batch {s['micro_batch']})"
        )
