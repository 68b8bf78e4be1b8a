"""The Python API (vqt_edge/api.py): the quickstart example, a library caller's process left as it
was, and self-describing adapters (adapter_config.json) that predict exactly as model.onnx."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from vqt_edge import adapter_config
from vqt_edge import manifest as mf
from vqt_edge.errors import UserError
from vqt_edge.spec import AdapterSpec


def _python(code: str, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    env_code = "import os; os.environ.setdefault('OMP_NUM_THREADS', '1')\n"
    return subprocess.run(
        [sys.executable, "-c", env_code + code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


def test_api_quickstart_runs_in_one_process(tmp_path):
    """examples/api_quickstart.py: export, train (with a test set), evaluate, predict and load the
    adapter in one process, then import torch there."""
    out = subprocess.run(
        [sys.executable, "examples/api_quickstart.py", "--out", tmp_path, "--tiny"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "import torch after training: ok" in out.stdout
    gap = float(out.stdout.split("largest logit difference to model.onnx ")[1].split()[0])
    assert gap < 1e-5, out.stdout
    assert "test accuracy" in out.stderr  # progress went through logging, configured by the script
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["test_accuracy"] > 0.5


LIBRARY_CALLER = """
import json, logging, signal, sys
from vqt_edge import api
from vqt_edge.spec import AdapterSpec
bundle, data, test, run = (sys.argv[1:5])
before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), logging.getLogger().level)
lines, during, events = [], set(), []
def progress(line):  # also records the SIGINT handler while training runs
    lines.append(line)
    during.add(signal.getsignal(signal.SIGINT))
summary = api.train(bundle, data, run, api.TrainConfig(epochs=2, batch_size=16, kv="ram"), test=test, progress=progress,
                    on_progress=events.append)
images = [str(p) for p in sorted(__import__('pathlib').Path(test, 'red').iterdir())[:5]]
predictions = api.predict(run, images)
accuracy = api.evaluate(run, test)["accuracy"]
model = api.load_adapter(run)
from_adapter = model.predict(images)
after = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM), logging.getLogger().level)
torch_seen = "torch" in sys.modules
import torch
print(json.dumps({"same_process_state": before == after and during == {before[0]}, "torch_seen": torch_seen, "torch": torch.__version__,
                  "lines": lines, "events": [[e.task, e.done, e.total, e.info] for e in events], "test_accuracy": summary["test_accuracy"], "accuracy": accuracy,
                  "predictions": predictions, "from_adapter": from_adapter}))
"""


def test_library_caller_process_is_left_as_it_was(tmp_path, tiny_bundle, task):
    """Train, predict, evaluate and load an adapter through the API in a process that never
    imported torch: no signal handler or logging level is changed, onnxruntime did not pull torch
    in, and `import torch` works afterwards. Messages and progress events arrive through the callbacks;
    nothing is drawn on the terminal (no click progress bars)."""
    out = _python(LIBRARY_CALLER, tiny_bundle, task["train"], task["test"], tmp_path / "run")
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(out.stdout.splitlines()) == 1 and "epoch" not in out.stderr and "frozen pass" not in out.stderr, (
        out.stderr
    )
    got = json.loads(out.stdout)
    events = got["events"]
    frozen = [e for e in events if e[0] == "frozen pass (K/V to RAM)"]
    assert frozen[0][1] == 0 and frozen[-1][1] == frozen[-1][2] == 120  # the task's 120 training images
    for epoch in ("epoch 1/2", "epoch 2/2"):  # 120 images in batches of 16: 8 steps, 0..8 in order
        assert [e[1] for e in events if e[0] == epoch] == list(range(9)), events
        assert all(e[2] == 8 for e in events if e[0] == epoch)
    assert [e for e in events if e[0] == "epoch 2/2"][-1][3].startswith("loss ")
    assert got["same_process_state"] and not got["torch_seen"] and got["torch"]
    assert any(line.startswith("epoch=2 ") for line in got["lines"]), got["lines"]
    assert any(line.startswith("test accuracy") for line in got["lines"]), got["lines"]
    assert got["test_accuracy"] == got["accuracy"] > 0.5  # train(test=...) ran the test, as --test does
    for p, q in zip(got["predictions"], got["from_adapter"], strict=True):
        assert p["label"] == q["label"]
        np.testing.assert_allclose(p["logits"], q["logits"], atol=1e-5)


def test_adapter_config_describes_the_adapter(tiny_run, tiny_bundle):
    config = json.loads((tiny_run / adapter_config.ADAPTER_CONFIG).read_text())
    m = mf.read_manifest(tiny_bundle)
    assert config["frozen_sha256"] == mf.sha256_file(tiny_bundle / mf.FROZEN)
    assert (config["method"], config["query_tokens"], config["query_layers"]) == ("vqt", 2, [0, 1, 2])
    assert config["arch"] == m.spec.arch.to_dict() and config["class_names"] == ["blue", "green", "red"]
    assert (config["mean"], config["std"], config["feature_norm"]) == (m.mean, m.std, m.spec.feature_norm)
    assert config["tensors"] == {"query_tokens": [3, 2, 32], "head.weight": [3, 32 * 7], "head.bias": [3]}


def test_adapter_folder_alone_predicts_as_model_onnx(tmp_path, tiny_run, tiny_bundle, task):
    """adapter.safetensors + adapter_config.json copied away from the run, applied to the bundle."""
    from device_runner import ort
    from vqt_edge import api

    folder = tmp_path / "adapter"
    folder.mkdir()
    for name in ("adapter.safetensors", adapter_config.ADAPTER_CONFIG):
        shutil.copy(tiny_run / name, folder / name)
    with pytest.raises(UserError, match="give the bundle"):
        api.load_adapter(folder)  # nothing in the folder names the bundle
    model = api.load_adapter(folder, bundle=tiny_bundle)
    images = sorted((task["test"] / "green").iterdir())[:6]
    pixels = model.pixels(images)
    session = ort.onnxruntime().InferenceSession(str(tiny_run / "model.onnx"), providers=["CPUExecutionProvider"])
    want = session.run(["logits"], {"pixel_values": pixels})[0]
    np.testing.assert_allclose(model.logits(pixels), want, atol=1e-5)
    from PIL import Image

    with Image.open(images[0]) as img:  # a PIL image, as a notebook holds it
        assert model.predict([img])[0]["label"] == model.predict(images[:1])[0]["label"]


def test_load_adapter_refuses_another_bundle_or_edited_config(tmp_path, tiny_run, tiny_backbone):
    from exporters.export import export_bundle
    from vqt_edge import api

    other = tmp_path / "other"  # same backbone and frozen.onnx (it does not depend on T), another T
    export_bundle(
        tiny_backbone,
        other,
        AdapterSpec.create(tiny_backbone.arch, "vqt", 3, query_tokens=1),
        model_name="tiny",
        int8_step=False,  # the int8-fed step graph: 15 s of export, tiny_bundle has it
        log=lambda _: None,
    )
    with pytest.raises(UserError, match="query_tokens is 2, the bundle's is 1"):
        api.load_adapter(tiny_run, bundle=other)
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = json.loads((run / adapter_config.ADAPTER_CONFIG).read_text())
    config["frozen_sha256"] = "0" * 64
    (run / adapter_config.ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(UserError, match="adapter_config.json: sha256 does not match summary.json"):
        api.load_adapter(run)  # the run's recorded hashes catch the edit first


def test_cli_train_still_reports_test_accuracy(tested_run):
    """`vqt-edge train --test` now runs through api.train: same output, accuracy recorded."""
    run, out = tested_run  # the real CLI (tests/conftest.py)
    assert "test accuracy" in out.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_images"] == 60 and 0 <= summary["test_accuracy"] <= 1
    assert (run / adapter_config.ADAPTER_CONFIG).is_file()


def test_api_export_refuses_bad_input_without_touching_the_process(tmp_path):
    import logging

    from vqt_edge import api

    level = logging.getLogger().level
    with pytest.raises(UserError, match="give --num-classes"):
        api.export(tmp_path / "b", model="vit_fmnist")
    with pytest.raises(UserError, match="K must be in"):
        api.parse_query_layers("last:9", 6)
    assert api.parse_query_layers("-1,0", 6) == [0, 5]
    assert logging.getLogger().level == level


def test_train_leaves_the_callers_config_as_it_was(tiny_bundle, task, tmp_path):
    """A notebook reuses one TrainConfig for a second, larger data set: the first run's plan (K/V in
    RAM, the backend it chose) must not be written back into it, or the second run would force a
    RAM cache that may not fit. The config is frozen, and the trainer applies a plan to a copy."""
    from vqt_edge import api

    config = api.TrainConfig(epochs=1, batch_size=16)
    before = dataclasses.asdict(config)
    summary = api.train(tiny_bundle, task["train"], tmp_path / "run", config, progress=lambda _: None)
    assert summary["kv"] in ("ram", "disk") and summary["backend"] == "portable"  # the plan chose both ...
    assert dataclasses.asdict(config) == before and config.kv == "auto" and config.backend == "auto"  # ... on a copy
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.kv = "ram"  # type: ignore[misc]
