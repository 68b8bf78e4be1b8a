"""device_runner/fp16.py: the cache's fp16 -> fp32 conversion is numpy's cast, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from device_runner.features import FeatureStore
from device_runner.fp16 import CHUNK, fp16_to_fp32


def _bits(x: np.ndarray) -> np.ndarray:
    return x.view(np.uint32)


def test_every_fp16_pattern_converts_as_numpy_does():
    """All 65536 patterns: zeros of both signs, subnormals, normals, infinities, NaN payloads."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    out = np.empty(every.shape, np.float32)
    fp16_to_fp32(every, out)
    assert np.array_equal(_bits(out), _bits(every.astype(np.float32)))


def test_chunks_with_and_without_an_infinity_or_nan():
    rng = np.random.default_rng(0)
    every_finite = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    every_finite = every_finite[np.isfinite(every_finite)]
    src = rng.choice(every_finite, 3 * CHUNK + 17)  # several chunks and a ragged end
    src[CHUNK + 5] = np.inf
    src[2 * CHUNK + 9] = -np.nan
    out = np.full(src.shape, 7.0, np.float32)
    fp16_to_fp32(src, out)
    assert np.array_equal(_bits(out), _bits(src.astype(np.float32)))


def test_rows_of_a_larger_array_and_non_contiguous_input():
    rng = np.random.default_rng(1)
    src = (rng.standard_normal((4, 3, 50)) * 100).astype(np.float16)
    dst = np.zeros((4, 3, 50), np.float32)
    for i in range(4):
        fp16_to_fp32(src[i], dst[i])
    assert np.array_equal(dst, src.astype(np.float32))
    strided = np.empty((3, 50), np.float32)
    fp16_to_fp32(src[::2, 0, :], strided[:2])  # a strided source takes numpy's cast
    assert np.array_equal(strided[:2], src[::2, 0, :].astype(np.float32))
    with pytest.raises(ValueError):
        fp16_to_fp32(src.astype(np.float32), dst)


def test_feature_store_gathers_cached_fp16_rows_as_fp32(tmp_path):
    rng = np.random.default_rng(2)
    keys = (rng.standard_normal((6, 2, 3, 5, 4)) * 10).astype(np.float16)
    path = tmp_path / "keys.float16"
    keys.tofile(path)
    mapped = np.memmap(path, dtype=np.float16, mode="r", shape=keys.shape)
    rows = np.array([4, 1, 1, 5])
    got = FeatureStore({"keys": mapped}).gather(rows)["keys"]
    assert got.dtype == np.float32
    assert np.array_equal(got, keys[rows].astype(np.float32))
    as_cached = FeatureStore({"keys": keys}).gather(rows, {"keys": np.dtype(np.float16)})["keys"]
    assert as_cached.dtype == np.float16 and np.array_equal(as_cached, keys[rows])
