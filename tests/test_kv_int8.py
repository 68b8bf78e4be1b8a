"""The int8 K/V cache (device_runner/kv_int8.py): exact against an independent numpy quantizer, through
the RAM and disk stores, across kill -9 and --resume, and never stale."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from device_runner.data import iter_batches
from device_runner.features import DiskCache, FrozenBackbone, build_ram_store, image_sha256
from device_runner.kv_int8 import dequantize_into, quantize
from tests.conftest import run_cli
from tests.test_faults import assert_same_adapter, kill_mid_epoch, start_cli, wait_for
from vqt_edge import manifest as mf
from vqt_edge.kv_cache import cache_bytes, cache_specs


def reference_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel symmetric int8, written independently: (q, scale, dequantized) for x [..., tokens, channels]."""
    x = x.astype(np.float32)
    scale = np.max(np.abs(x), axis=-2, keepdims=True) / np.float32(127.0)
    scale = np.where(scale == 0, np.float32(1.0), scale).astype(np.float32)
    q = np.minimum(np.maximum(np.round(x / scale), -127), 127).astype(np.int8)
    return q, scale, q.astype(np.float32) * scale


def test_quantize_and_dequantize_equal_an_independent_numpy_version():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 2, 4, 197, 64)).astype(np.float32)
    x[0, 1, 2, 5] *= 40  # an outlier token
    x[1, 0, 0, :, 7] = 0  # an all-zero channel
    x[2, 1, 3, :, 9] *= 25  # an outlier channel
    q, s = quantize(x, (-2,))
    want_q, want_s, want = reference_int8(x)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (3, 2, 4, 1, 64)
    assert np.array_equal(q, want_q) and np.array_equal(s, want_s)
    out = np.full(x.shape, np.nan, np.float32)
    for i in range(len(x)):  # row by row, as FeatureStore.gather writes the feed
        dequantize_into(q[i], s[i], out[i])
    assert np.array_equal(out.view(np.int32), want.view(np.int32))  # bit for bit
    assert np.all(np.abs(out - x) <= s / 2 + 1e-6 * np.abs(x))  # rounding error at most half a step
    assert np.array_equal(out[1, 0, 0, :, 7], np.zeros(197, np.float32))


def test_dequantize_rejects_mismatched_arrays():
    with pytest.raises(ValueError):
        dequantize_into(np.zeros((4, 8), np.int8), np.ones((4, 1), np.float32), np.zeros((4, 8), np.float16))


def _outputs(bundle: Path, paths: list[Path]) -> dict[str, np.ndarray]:
    m = mf.read_manifest(bundle)
    pixels = next(iter_batches([(p, 0) for p in paths], len(paths), m.spec.arch.image_size, m.mean, m.std))[0]
    return FrozenBackbone(bundle, m, threads=1)(pixels)


def _expected(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What an int8 store must hand the step: K/V through the reference quantizer, cls as stored (fp32)."""
    return {name: reference_int8(v)[2] if name in ("keys", "values") else v for name, v in outputs.items()}


def test_ram_and_disk_int8_stores_feed_the_independent_dequantization(tmp_path, tiny_bundle, task):
    m = mf.read_manifest(tiny_bundle)
    paths = sorted(task["train"].rglob("*.png"))[:12]
    want = _expected(_outputs(tiny_bundle, paths))
    ram = build_ram_store(FrozenBackbone(tiny_bundle, m, threads=1), paths, m, 5, lambda n: None, "int8")
    assert ram.arrays["keys"].dtype == np.int8 and "keys_scale" in ram.arrays
    cache = DiskCache.for_bundle(tmp_path, m, "int8")
    hashes = [image_sha256(p) for p in paths]
    cache.fill(lambda: FrozenBackbone(tiny_bundle, m, threads=1), paths, hashes, m, 5, lambda n: None)
    disk = cache.store(hashes)
    rows = np.array([7, 0, 11, 3])
    buffers = None
    for store in (ram, disk, disk):  # the second disk read writes into the first's buffers
        got = store.gather(rows, out=buffers)
        assert set(got) == set(want)
        for name in want:
            assert got[name].dtype == np.float32 and np.array_equal(got[name], want[name][rows]), name
        buffers = got
    # The int8 cache is its own cache: an fp16 cache of the same bundle lives elsewhere.
    assert DiskCache.for_bundle(tmp_path, m).folder != cache.folder
    kv = 3 * 4 * 17 * 8  # layers x heads x tokens x head_dim of the tiny ViT
    assert cache_bytes(m.spec.frozen_output_specs, "fp16") == 2 * 2 * kv + 4 * 32
    assert cache_bytes(m.spec.frozen_output_specs, "int8") == 2 * (kv + 4 * kv // 17) + 4 * 32  # + a scale per channel
    assert cache_specs(m.spec.frozen_output_specs, "int8")["keys_scale"][1] == "float32"


def test_a_changed_image_is_not_served_stale_from_the_int8_cache(tmp_path, tiny_bundle, task):
    m = mf.read_manifest(tiny_bundle)
    data = tmp_path / "data"
    shutil.copytree(task["train"] / "red", data)
    paths = sorted(data.glob("*.png"))[:6]
    cache = DiskCache.for_bundle(tmp_path / "run", m, "int8")
    cache.fill(
        lambda: FrozenBackbone(tiny_bundle, m, threads=1), paths, [image_sha256(p) for p in paths], m, 4, lambda n: None
    )
    before = cache.store([image_sha256(paths[2])]).gather(np.array([0]))["keys"]
    Image.open(task["train"] / "blue" / "000.png").save(paths[2])  # same path, other pixels
    again = DiskCache.for_bundle(tmp_path / "run", m, "int8")  # a later process
    hashes = [image_sha256(p) for p in paths]
    assert again.missing(hashes) == 1
    again.fill(lambda: FrozenBackbone(tiny_bundle, m, threads=1), paths, hashes, m, 4, lambda n: None)
    got = again.store(hashes).gather(np.array([2]))["keys"]
    assert not np.array_equal(got, before)
    assert np.array_equal(got, _expected(_outputs(tiny_bundle, [paths[2]]))["keys"])


def test_sigkill_then_resume_with_an_int8_disk_cache_is_bit_identical(tmp_path, tiny_bundle, task):
    args = [
        "--bundle",
        tiny_bundle,
        "--data",
        task["train"],
        "--epochs",
        3,
        "--batch-size",
        8,
        "--kv",
        "disk",
        "--kv-dtype",
        "int8",
        "--checkpoint-every",
        3,
        "--seed",
        3,
        "--backend",
        "portable",
    ]
    reference = tmp_path / "reference"
    out = run_cli("train", "--run", reference, *args)
    assert out.returncode == 0, out.stderr
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["kv_dtype"] == "int8" and summary["kv"] == "disk"
    assert [p.suffix for p in sorted(next((reference / "kv_cache").iterdir()).glob("keys*"))] == [".int8", ".float32"]

    run = tmp_path / "killed"

    def start(*extra):
        return start_cli("train", "--run", run, *extra, stdout=subprocess.DEVNULL)

    proc = start(*args)  # killed during the frozen pass into the int8 cache (or just after)
    wait_for(lambda: any((run / "kv_cache").glob("*/keys.int8")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = start("--resume")  # killed mid-epoch, right after a step checkpoint
    kill_mid_epoch(proc, run)
    out = run_cli("train", "--run", run, "--resume")
    assert out.returncode == 0, out.stderr
    assert_same_adapter(run, reference)
