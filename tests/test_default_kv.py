"""Defaults that never exhaust a device: without --kv and --memory-budget, `train` keeps K/V in RAM
only if the memory model says the cache fits in the available memory (vqt_edge/memory.py
`default_kv`, `available_mb`). The available memory is injected through $VQT_EDGE_MEM_AVAILABLE,
the override the library itself reads."""

from __future__ import annotations

import json

import pytest

from exporters.export import export_bundle
from exporters.vit import VisionTransformer
from tests.conftest import make_task, run_cli
from tests.test_memory import _vitb_like
from vqt_edge.arch import ViTArch
from vqt_edge.kv_cache import DEFAULT_KV_DTYPE
from vqt_edge.memory import AVAILABLE_ENV, AVAILABLE_SHARE, BundleFootprint, available_mb, default_kv, predict_peak
from vqt_edge.memory.disk import footprint
from vqt_edge.spec import AdapterSpec

# The tests' tiny ViT at 64 px with 4 px patches: 257 tokens, so the K/V cache of a few dozen images
# (100 KiB each) is what separates the RAM plan from the disk plan.
LONG = ViTArch(depth=3, dim=32, heads=4, mlp_dim=64, patch=4, image_size=64)


def test_available_mb_reads_meminfo_the_cgroup_limit_and_the_override(tmp_path, monkeypatch):
    monkeypatch.delenv(AVAILABLE_ENV, raising=False)
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:         1000000 kB\nMemAvailable:    2048000 kB\n")
    assert available_mb(meminfo, tmp_path / "no-cgroup") == 2000
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.max").write_text("max\n")
    assert available_mb(meminfo, cgroup) == 2000  # no limit
    (cgroup / "memory.max").write_text(f"{2**30}\n")
    (cgroup / "memory.current").write_text(f"{768 * 2**20}\n")
    assert available_mb(meminfo, cgroup) == 256  # the container's limit is the tighter one
    assert available_mb(tmp_path / "absent", tmp_path / "absent") is None
    monkeypatch.setenv(AVAILABLE_ENV, "1.5GB")
    assert available_mb(meminfo, cgroup) == 1536


def test_default_kv_keeps_ram_only_when_the_cache_fits():
    fp = _vitb_like()  # 7.3 MB of K/V per image
    ram = predict_peak(fp, images=1000, batch_size=32, micro_batch=None, kv="ram")
    disk = predict_peak(fp, images=1000, batch_size=32, micro_batch=None, kv="disk")
    assert ram.peak_mb > disk.peak_mb + 6000  # 1000 images: 6.9 GiB of cache
    kw = dict(images=1000, batch_size=32, micro_batch=None)
    assert default_kv(fp, available=64_000, **kw).kv == "ram"
    assert default_kv(fp, available=(ram.needs_mb - 1) / AVAILABLE_SHARE, **kw).kv == "disk"
    assert default_kv(fp, available=ram.needs_mb / AVAILABLE_SHARE, **kw).kv == "ram"
    small = default_kv(fp, available=300, **kw)  # nothing fits: the smallest predicted peak, never the RAM cache
    assert small.kv != "ram" and small.micro_batch == 32  # the user's batch is not changed behind their back
    assert default_kv(fp, available=None, **kw).kv == "ram"  # unknown (not Linux): as before


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("default_kv")
    backbone = VisionTransformer(LONG)
    backbone.reset_parameters(seed=0)
    export_bundle(
        backbone.eval(),
        root / "bundle",
        AdapterSpec.create(backbone.arch, "vqt", 3),
        model_name="long",
        int8_step=False,  # the int8-fed step graph: 15 s of export, tiny_bundle has it
        log=lambda _: None,
    )
    data = make_task(root / "data", 16, seed=1, size=64)
    fp = footprint(BundleFootprint.from_bundle(root / "bundle"), DEFAULT_KV_DTYPE)  # the cache train keeps
    plans = {kv: predict_peak(fp, images=48, batch_size=16, micro_batch=None, kv=kv) for kv in ("ram", "disk")}
    assert plans["ram"].needs_mb > plans["disk"].needs_mb  # else this model cannot tell them apart
    return root / "bundle", data, plans


@pytest.mark.parametrize("fits", [False, True])
def test_train_without_kv_picks_disk_when_the_ram_cache_does_not_fit(fits, long_run, tmp_path, monkeypatch):
    bundle, data, plans = long_run
    need = plans["ram"].needs_mb if fits else plans["ram"].needs_mb - 1  # whole MiB, as the planner compares
    monkeypatch.setenv(AVAILABLE_ENV, f"{need / AVAILABLE_SHARE:.3f}MB")  # inherited by the CLI process
    out = run_cli(
        "train", "--bundle", bundle, "--data", data, "--run", tmp_path / "run", "--epochs", 1, "--batch-size", 16
    )
    assert out.returncode == 0, out.stderr + out.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["kv"] == ("ram" if fits else "disk")
    assert f"K/V {summary['kv']}" in out.stdout
    assert json.loads((tmp_path / "run" / "run.json").read_text())["config"]["kv"] == summary["kv"]  # --resume keeps it


def test_an_explicit_kv_ram_is_kept_whatever_is_available(long_run, tmp_path, monkeypatch):
    bundle, data, _ = long_run
    monkeypatch.setenv(AVAILABLE_ENV, "1MB")
    out = run_cli(
        "train",
        "--bundle",
        bundle,
        "--data",
        data,
        "--run",
        tmp_path / "run",
        "--epochs",
        1,
        "--batch-size",
        16,
        "--kv",
        "ram",
    )
    assert out.returncode == 0, out.stderr + out.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["kv"] == "ram"
