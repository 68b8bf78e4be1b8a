"""bench/step_bench.py's whole-run projection (issue 10): the arithmetic from measured parts.

The bench itself runs vit_b16 for minutes; this checks only how it turns measured parts into hours
and peaks, on made-up parts whose answer is known.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SPEC = importlib.util.spec_from_file_location("step_bench", Path(__file__).parent.parent / "bench" / "step_bench.py")
step_bench = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(step_bench)


def test_projection_adds_frozen_pass_steps_and_checkpoints():
    results = {
        "portable": {"seconds_per_step": 0.3, "checkpoint_save_s": 0.01, "peak_rss_mb_after_save": 1000.0},
        "ort-training": {"seconds_per_step": 0.45, "checkpoint_save_s": 0.7, "peak_rss_mb_after_save": 900.0},
        "torch": {"seconds_per_step": 0.6},
    }
    frozen = {"cpu_s_per_image": 0.4, "peak_rss_mb": 1100.0}
    baselines = {
        "official": {"cpu_seconds_per_step": 30.0, "peak_mb": 5000.0},
        "nograd": {"cpu_seconds_per_step": 15.0, "peak_mb": 2000.0},
    }
    rows = {
        r["approach"]: r for r in step_bench.projection(results, frozen, baselines, images=1000, epochs=100, batch=32)
    }
    steps = 100 * 32  # 1000 images in batches of 32: 32 steps per epoch, the last one partial
    portable = rows["vqt-edge, portable"]
    assert (portable["frozen_s"], portable["steps_s"], portable["checkpoints_s"]) == (400, round(steps * 0.3), 1)
    assert portable["hours"] == pytest.approx((400 + steps * 0.3 + 1) / 3600, abs=0.005)
    assert portable["peak_mb"] == 1100  # the frozen pass's peak is the larger part here
    assert rows["vqt-edge, ort-training"]["checkpoints_s"] == 70
    official = rows["PyTorch VQT, official style"]
    assert official["hours"] == pytest.approx(steps * 30 / 3600, abs=0.005) and official["x_official"] == 1.0
    assert rows["PyTorch VQT, backbone under no_grad"]["x_official"] == pytest.approx(0.5, abs=0.001)
    assert "vqt-edge, portable-stock" not in rows  # not measured: not projected


def test_projection_without_baselines_has_no_ratio():
    rows = step_bench.projection(
        {"portable": {"seconds_per_step": 0.3, "checkpoint_save_s": 0.0, "peak_rss_mb_after_save": 1.0}},
        {"cpu_s_per_image": 0.1, "peak_rss_mb": 1.0},
        {},
        images=10,
        epochs=1,
        batch=32,
    )
    assert [r["x_official"] for r in rows] == [None]
