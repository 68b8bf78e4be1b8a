"""Memory budgets: size parsing, the planner, `train --memory-budget` measured against its
promise, the streamed model.onnx merge, and `sweep` end to end (all on the tiny ViT)."""

from __future__ import annotations

import csv
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import BUDGET_TRAIN, TINY, TINY_SIZES, invoke, run_cli
from vqt_edge.errors import UserError
from vqt_edge.memory import BundleFootprint, NoPlan, choose, parse_size_mb, peak_rss_mb, predict_peak
from vqt_edge.memory import model as memory


def test_parse_size_mb():
    assert parse_size_mb("600MB") == 600
    assert parse_size_mb("1.5GB") == 1536
    assert parse_size_mb(" 800 ") == 800
    assert parse_size_mb("512KiB") == 0.5
    assert parse_size_mb("2g") == 2048
    for bad in ("", "MB", "1.2.3GB", "600 parsecs", "-5MB"):
        with pytest.raises(UserError):
            parse_size_mb(bad)


def _vitb_like() -> BundleFootprint:
    """A footprint with ViT-B/16's sizes (as exported by vqt-edge), without exporting it."""
    return BundleFootprint(
        name="vit_b16",
        method="vqt",
        last_k=0,
        query_layers=12,
        query_tokens=1,
        frozen_bytes=342_880_695,
        head_bytes=283_794_435,
        ckpt_bytes=283_958_448,
        trainable_bytes=436_264,
        pixels_per_sample=602_112,
        feed_per_sample=14_527_488,
        cache_per_sample=7_265_280,
        layer_work=4_888_752,
        query_path_per_sample=816_768,
        largest_weight_bytes=9_437_184,
        step_bytes=283_871_223,
        model_bytes=343_723_514,
    )


def test_model_phases_follow_the_kv_mode():
    fp = _vitb_like()
    ram = [predict_peak(fp, images=n, batch_size=32, micro_batch=4, kv="ram").peak_mb for n in (100, 1000)]
    disk = [predict_peak(fp, images=n, batch_size=32, micro_batch=4, kv="disk") for n in (100, 1000)]
    assert ram[1] - ram[0] == pytest.approx(900 * fp.cache_per_sample / 2**20, rel=1e-6)  # RAM cache grows
    assert disk[0].phases["train"] == disk[1].phases["train"]  # disk: training does not hold the cache
    stream = predict_peak(fp, images=1000, batch_size=32, micro_batch=4, kv="stream", backend="ort-training")
    assert "frozen" not in stream.phases  # one phase, frozen session and module both resident
    both = (memory.FROZEN_RESIDENT * fp.frozen_bytes + memory.CKPT_LOAD * fp.ckpt_bytes) / 2**20  # ort-training's terms
    assert stream.phases["train"] >= both - 1e-6
    bigger = predict_peak(fp, images=100, batch_size=32, micro_batch=32, kv="ram")
    assert bigger.peak_mb > ram[0]  # larger micro-batches cost more
    with_test = predict_peak(fp, images=100, batch_size=32, micro_batch=4, kv="ram", test_batch=4)
    assert with_test.phases["test"] > 0 and with_test.peak_mb >= ram[0]


def test_choose_prefers_ram_then_largest_micro_batch_and_names_the_smallest_budget():
    fp = _vitb_like()
    roomy = choose(fp, 64_000, images=64, batch_size=32)
    assert (roomy.kv, roomy.micro_batch) == ("ram", 32)
    ram_min = min(
        predict_peak(fp, images=64, batch_size=32, micro_batch=m, kv="ram").needs_mb for m in (1, 2, 4, 8, 16)
    )
    tight = choose(fp, ram_min, images=64, batch_size=32)
    assert tight.needs_mb <= ram_min and tight.kv == "ram" and tight.micro_batch < 32
    below = choose(fp, ram_min - 1, images=64, batch_size=32)  # RAM no longer fits: the disk cache
    assert below.kv == "disk" and below.needs_mb < ram_min
    with pytest.raises(NoPlan) as info:
        choose(fp, 300, images=64, batch_size=32)
    need = info.value.needs_mb
    assert choose(fp, need, images=64, batch_size=32).needs_mb <= need  # that budget does fit
    with pytest.raises(NoPlan):
        choose(fp, need - 1, images=64, batch_size=32)
    with pytest.raises(NoPlan, match="--kv stream"):  # a user's choice is kept, and must fit
        choose(fp, tight.needs_mb, images=64, batch_size=32, kv="stream", micro_batch=32)


def test_planner_takes_the_portable_backend_where_ort_training_cannot_fit():
    """ViT-B/16, 64 images, batch 32 (docs/design.md section 6): the ORT checkpoint (frozen query-path
    weights, loaded at twice its size and re-serialized at each save) sets ort-training's floor at
    865 MiB; the portable backend fits 512 MiB with a small micro-batch and frozen-pass batch."""
    fp = _vitb_like()
    both = ("ort-training", "portable")
    with pytest.raises(NoPlan, match="smallest budget that fits is 865 MiB"):
        choose(fp, 512, images=64, batch_size=32, backends=("ort-training",))
    tight = choose(fp, 512, images=64, batch_size=32, backends=both)
    assert (tight.backend, tight.kv) == ("portable", "disk") and tight.micro_batch <= 4 and tight.frozen_batch <= 2
    assert tight.frozen_batch <= tight.micro_batch
    roomy = choose(fp, 2000, images=64, batch_size=32, backends=both)  # the preferred backend whenever it fits
    assert (roomy.backend, roomy.kv, roomy.micro_batch, roomy.frozen_batch) == ("ort-training", "ram", 32, 1)
    # The step graph is counted by its real size (a quantized step.onnx is smaller): 100 MiB less
    # of it lowers the portable training phase by STEP_RESIDENT * 100 MiB where the step, not the
    # session's load, sets that phase's peak (micro-batch 32; at 4 the load does, STEP_LOAD * 100).
    small = dataclasses.replace(fp, step_bytes=fp.step_bytes - 100 * 2**20)
    kw = dict(images=64, batch_size=32, micro_batch=32, kv="disk", backend="portable")
    drop = predict_peak(fp, **kw).phases["train"] - predict_peak(small, **kw).phases["train"]
    assert drop == pytest.approx(100 * memory.STEP_RESIDENT)
    kw4 = {**kw, "micro_batch": 4}
    drop = predict_peak(fp, **kw4).phases["train"] - predict_peak(small, **kw4).phases["train"]
    assert drop == pytest.approx(100 * memory.STEP_LOAD)
    # The test pass runs model.onnx at the frozen-pass batch, counted by model.onnx's size.
    test = choose(fp, 1000, images=64, batch_size=32, backends=both, test=True)
    assert test.phases["test"] == pytest.approx(
        predict_peak(
            fp,
            **{**kw, "backend": test.backend, "kv": test.kv, "micro_batch": test.micro_batch},
            test_batch=test.frozen_batch,
        ).phases["test"]
    )


def test_plan_picks_a_config_for_the_tiny_bundle(tiny_bundle):
    result = invoke("plan", "--bundle", tiny_bundle, "--memory-budget", "600MB", "--images", 120, "--json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["fits"] and plan["kv"] == "ram" and plan["micro_batch"] == 32
    assert 0 < plan["predicted_peak_mb"] <= 600
    text = invoke("plan", "--bundle", tiny_bundle, "--memory-budget", "600MB", "--images", 120)
    assert text.exit_code == 0 and "--kv ram --micro-batch 32" in text.output and "predicted peak" in text.output


def test_plan_refuses_an_impossible_budget_naming_the_smallest_that_fits(tiny_bundle):
    result = invoke("plan", "--bundle", tiny_bundle, "--memory-budget", "10MB", "--images", 120)
    assert result.exit_code == 2
    m = re.search(r"smallest budget that fits is (\d+) MiB", result.output)
    assert m, result.output
    need = int(m.group(1))
    assert invoke("plan", "--bundle", tiny_bundle, "--memory-budget", f"{need}MB", "--images", 120).exit_code == 0
    assert invoke("plan", "--bundle", tiny_bundle, "--memory-budget", f"{need - 1}MB", "--images", 120).exit_code == 2


def test_train_within_budget_records_measured_and_predicted_peak(budget_run):
    """budget_run (tests/conftest.py): BUDGET_TRAIN, shared with tests/test_memory_portable.py."""
    out, summary = budget_run
    assert "memory budget 300 MiB: kv ram" in out.stdout
    assert summary["memory_budget_mb"] == 300 and summary["budget_exceeded"] is False
    assert 0 < summary["peak_rss_mb"] <= 300
    assert summary["memory_plan"]["kv"] == summary["kv"] == "ram"
    # The model, measured: within 15% of the real peak (ram mode, the tiny model).
    assert abs(summary["predicted_peak_mb"] - summary["peak_rss_mb"]) <= 0.15 * summary["peak_rss_mb"]


def test_budget_just_below_the_measured_peak_is_refused_or_flagged(budget_run, tiny_bundle, task, tmp_path):
    _, summary = budget_run
    budget = int(summary["peak_rss_mb"]) - 2
    args = [a if a != "300MB" else f"{budget}MB" for a in BUDGET_TRAIN]  # budget_run's command, a smaller budget
    out = run_cli(
        "train",
        "--bundle",
        tiny_bundle,
        "--data",
        task["train"],
        "--run",
        tmp_path / "run",
        *args,
        "--test",
        task["test"],
        "--kv",
        "ram",
    )
    if out.returncode == 2:  # refused before any work
        assert "smallest budget that fits" in out.stderr and not (tmp_path / "run" / "run.json").exists()
    else:
        assert out.returncode == 3, out.stderr
        assert "MEMORY BUDGET EXCEEDED" in out.stderr
        assert json.loads((tmp_path / "run" / "summary.json").read_text())["budget_exceeded"] is True


def test_a_broken_promise_exits_3_with_the_flag_in_summary(tiny_bundle, task, tmp_path, monkeypatch):
    """In this (pytest) process torch is loaded, so the real peak is far above what the planner,
    told that the runtime costs nothing, predicts: the run must fail loudly, not warn."""
    monkeypatch.setattr(memory, "BASE_MB", 0.0)
    assert peak_rss_mb() > 60
    result = invoke(
        "train",
        "--bundle",
        tiny_bundle,
        "--data",
        task["train"],
        "--run",
        tmp_path / "run",
        "--epochs",
        1,
        "--memory-budget",
        "60MB",
    )
    assert result.exit_code == 3, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["budget_exceeded"] is True and summary["peak_rss_mb"] > 60 and summary["memory_budget_mb"] == 60


def test_train_refuses_a_user_choice_that_cannot_fit(tiny_bundle, task, tmp_path):
    result = invoke(
        "train",
        "--bundle",
        tiny_bundle,
        "--data",
        task["train"],
        "--run",
        tmp_path / "run",
        "--memory-budget",
        "20MB",
        "--kv",
        "stream",
    )
    assert result.exit_code == 2 and "smallest budget that fits" in result.output
    assert not (tmp_path / "run" / "run.json").exists()


def test_streamed_model_onnx_equals_the_onnx_compose_merge(tiny_bundle, tmp_path):
    import onnx
    import onnxruntime
    from onnx import compose, numpy_helper

    from device_runner.onnx_io.stream import merge_streaming
    from vqt_edge import manifest as mf

    manifest = mf.read_manifest(tiny_bundle)
    rng = np.random.default_rng(0)
    head = onnx.load(str(tiny_bundle / mf.HEAD_MODEL))
    inits = {t.name: t for t in head.graph.initializer}
    learned = {g: rng.standard_normal(list(inits[g].dims)).astype(np.float32) for g in manifest.spec.trainable_shapes}
    for name, value in learned.items():
        inits[name].CopyFrom(numpy_helper.from_array(value, name))
    reference = compose.merge_models(
        onnx.load(str(tiny_bundle / mf.FROZEN)),
        compose.add_prefix(head, "head/"),
        io_map=[(n, "head/" + n) for n in manifest.spec.frozen_outputs],
        outputs=["head/logits"],
    )
    onnx.save(reference, str(tmp_path / "reference.onnx"))
    merge_streaming(
        tiny_bundle / mf.FROZEN, tiny_bundle / mf.HEAD_MODEL, tmp_path / "model.onnx", learned, doc_string="d"
    )
    model = onnx.load(str(tmp_path / "model.onnx"))
    onnx.checker.check_model(model)
    assert [o.name for o in model.graph.output] == ["logits"] and model.doc_string == "d"
    x = rng.standard_normal((3, 3, TINY.image_size, TINY.image_size)).astype(np.float32)
    got, want = (
        onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"pixel_values": x})
        for p in (tmp_path / "model.onnx", tmp_path / "reference.onnx")
    )
    np.testing.assert_array_equal(got[0], want[0])


def test_sweep_memory_only_writes_results_and_plot(tmp_path):
    from vqt_edge.spec import METHODS

    methods = "vqt,linear" if "linear" in METHODS else "vqt"  # linear: a single point, no k
    out = tmp_path / "sweep"
    result = run_cli(
        "sweep",
        *TINY_SIZES,
        "--random-init",
        "--methods",
        methods,
        "--last-k",
        "1,3",
        "--batch-size",
        8,
        "--steps",
        2,
        "--out",
        out,
        torch_free=False,
        timeout=900,  # three exports and three runs, each its own process: minutes on a loaded machine
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "[1/" in result.stdout and "peak" in result.stdout
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == len(methods.split(",")) + 1
    assert all(r["status"] == "ok" and float(r["peak_mb"]) > 0 and float(r["seconds_per_step"]) > 0 for r in rows)
    assert {(r["method"], r["k"]) for r in rows} >= {("vqt", "1"), ("vqt", "3")}
    assert json.loads((out / "results.json").read_text())[0]["T"] == 1
    assert (out / "accuracy_vs_memory.png").stat().st_size > 1000
    assert not any((out / "bundles").iterdir())  # bundles removed unless --keep-bundles


def test_sweep_refuses_unknown_methods(tmp_path):
    result = invoke(
        "sweep", *TINY_SIZES, "--random-init", "--methods", "vqt,lora", "--steps", 1, "--out", tmp_path / "s"
    )
    assert result.exit_code == 2 and "lora" in result.output


def _mapped_rss_kb(path) -> int:
    """Resident kB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_gather_converts_rows_in_order_and_unmaps_what_it_read(tmp_path):
    """The training feed: fp32 rows in the asked order (duplicates too); from a memory-mapped
    cache, its pages are not left resident (they would count in the run's peak), while a plain
    numpy read of the same rows leaves them resident."""
    from device_runner.features import FeatureStore

    rng = np.random.default_rng(0)
    values = rng.standard_normal((40, 3, 1000)).astype(np.float16)  # rows of 6000 bytes: not page-aligned
    path = tmp_path / "keys.float16"
    values.tofile(path)
    rows = np.array([7, 3, 39, 3, 0, 21])
    mapped = np.memmap(path, dtype=np.float16, mode="r", shape=values.shape)
    np.testing.assert_array_equal(mapped[rows], values[rows])
    resident = _mapped_rss_kb(path)
    assert resident >= 6 * 6000 // 1024, resident
    del mapped
    store = FeatureStore({"keys": np.memmap(path, dtype=np.float16, mode="r", shape=values.shape)})
    got = store.gather(rows)["keys"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, values[rows].astype(np.float32))
    resident = _mapped_rss_kb(path)
    assert resident == 0, resident


def test_an_int8_cache_feeds_the_int8_step_graph_where_the_bundle_has_one():
    """--kv-dtype int8 on the portable backend: a bundle with train/step_int8.onnx is fed the int8 rows
    as they are (plus STEP_INT8_WIDEN layers' widened codes) instead of the fp32 feed; streaming, the
    other backend and a bundle without that graph keep the fp32 feed."""
    from vqt_edge.memory.disk import footprint

    fp = dataclasses.replace(_vitb_like(), cache_int8_per_sample=3_709_440, step_int8_bytes=283_871_223)
    kw = dict(images=64, batch_size=32, micro_batch=32, backend="portable")
    old, new = (
        predict_peak(footprint(f, "int8"), kv="disk", **kw).phases["train"]
        for f in (dataclasses.replace(fp, step_int8_bytes=0), fp)
    )
    widened = memory.STEP_INT8_WIDEN * fp.feed_per_sample / (2 * fp.query_layers)
    assert old - new == pytest.approx(32 * (fp.feed_per_sample - fp.cache_int8_per_sample - widened) / 2**20)
    for other in (dict(kw, kv="stream"), dict(kw, kv="disk", backend="ort-training")):
        assert predict_peak(footprint(fp, "int8"), **other).phases["train"] == predict_peak(fp, **other).phases["train"]
    assert not footprint(fp, "fp16").int8_feed
