"""Fleet adaptation with Flower (docs/design.md section 12): splits, the client's tensor access for
each method, and real Flower processes (SuperLink, SuperNodes, ClientApp/ServerApp) on localhost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import REPO, run_cli
from vqt_edge.errors import UserError
from vqt_edge.fleet.split import Split, assign, parse_split
from vqt_edge.spec import AdapterSpec

pytest.importorskip("flwr")

FLEET_TIMEOUT = 420  # seconds for one whole federated run of the tiny model (about 80 s measured here)


# -- splits -------------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["", "iid:3", "dirichlet", "dirichlet:0", "dirichlet:-1", "dirichlet:x",
                                  "dirichlet:nan", "classes:0", "classes:1.5", "shards:2"])
def test_parse_split_refuses_bad_text(text):
    with pytest.raises(UserError, match="--split"):
        parse_split(text)


@pytest.mark.parametrize("split", ["iid", "dirichlet:0.3", "dirichlet:100", "classes:1", "classes:2"])
def test_every_image_goes_to_exactly_one_client_and_the_split_is_seeded(split):
    labels = np.repeat(np.arange(5), 40)
    s = parse_split(split)
    parts = assign(labels, 10, s, seed=3)
    assert len(parts) == 10 and all(len(p) for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(len(labels)))
    assert all(np.array_equal(a, b) for a, b in zip(parts, assign(labels, 10, s, seed=3)))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, assign(labels, 10, s, seed=4)))
    if s.kind == "classes":
        assert all(len(set(labels[p])) <= s.k for p in parts)


def test_small_dirichlet_alpha_is_skewed_and_iid_is_balanced():
    labels = np.repeat(np.arange(5), 200)
    dominant = [np.bincount(labels[p], minlength=5).max() / len(p) for p in assign(labels, 10, Split("dirichlet", 0.3), 0)]
    assert np.mean(dominant) > 0.6
    sizes = [len(p) for p in assign(labels, 10, Split("iid"), 0)]
    assert max(sizes) - min(sizes) <= 1


def test_split_refuses_impossible_requests():
    labels = np.repeat(np.arange(3), 4)
    with pytest.raises(UserError, match="--clients"):
        assign(labels, 13, Split("iid"), 0)
    with pytest.raises(UserError, match="only 3 classes"):
        assign(labels, 2, Split("classes", k=4), 0)
    with pytest.raises(UserError, match="cannot cover"):
        assign(labels, 2, Split("classes", k=1), 0)


# -- the client's tensors, for every method -----------------------------------------------------
@pytest.fixture(scope="module")
def method_bundles(tmp_path_factory, tiny_backbone) -> dict[str, Path]:
    from exporters.export import export_bundle

    root = tmp_path_factory.mktemp("fleet_bundles")
    for method, k in {"linear": 0, "adaptformer": 2}.items():
        export_bundle(tiny_backbone, root / method, AdapterSpec.create(tiny_backbone.arch, method, 3, last_k=k or None,
                      query_tokens=2), model_name="tiny", log=lambda _: None)
    return {m: root / m for m in ("linear", "adaptformer")}


@pytest.mark.parametrize("method", ["vqt", "linear", "adaptformer"])
def test_client_round_starts_from_the_servers_tensors_for_each_method(method, method_bundles, tiny_bundle, task, tmp_path):
    """Two rounds of the device side in this process: round 1 from tensors S (not the bundle's),
    round 2 resumes the client's run and continues from new tensors S2, with the carried optimizer."""
    from device_runner.fleet import train_round
    from device_runner.trainer import TrainConfig
    from vqt_edge import manifest as mf

    bundle = tiny_bundle if method == "vqt" else method_bundles[method]
    shapes = mf.read_manifest(bundle).spec.trainable_shapes
    rng = np.random.default_rng(0)
    start = {name: rng.normal(0, 0.05, shape).astype(np.float32) for name, shape in shapes.items()}
    cfg = TrainConfig(epochs=2, batch_size=16, lr=1e-9, weight_decay=0.0, kv="disk", threads=1)
    classes = ["blue", "green", "red"]
    out1, metrics = train_round(tmp_path, bundle, task["train"], start, cfg, classes, server_round=1, local_epochs=1)
    assert set(out1) == set(shapes) and metrics["num-examples"] == 120
    for name in shapes:  # lr ~ 0: what comes back is what was set, so set_tensors really took effect
        np.testing.assert_allclose(out1[name], start[name], atol=1e-5)
    cfg.lr = 1e-2  # a changed config is another fleet run: refused, not silently mixed
    with pytest.raises(UserError, match="another fleet run"):
        train_round(tmp_path, bundle, task["train"], start, cfg, classes, server_round=2, local_epochs=1)
    cfg.lr = 1e-9
    cache = {f: f.stat().st_mtime_ns for f in (tmp_path / "run" / "kv_cache").rglob("*") if f.is_file()}
    assert cache  # K/V cached in round 1 ...
    start2 = {name: v + 0.5 for name, v in start.items()}
    out2, _ = train_round(tmp_path, bundle, task["train"], start2, cfg, classes, server_round=2, local_epochs=1)
    for name in shapes:
        np.testing.assert_allclose(out2[name], start2[name], atol=1e-5)
    assert cache == {f: f.stat().st_mtime_ns for f in cache}  # ... and only read in round 2
    with pytest.raises(UserError, match="bundle trains"):
        train_round(tmp_path / "other", bundle, task["train"], {"x": np.zeros(1, np.float32)}, cfg, classes, 1, 1)


# -- real Flower processes -------------------------------------------------------------------------
def _ours(marker: Path) -> list[int]:
    """Live processes (not zombies) whose environment or command line names `marker`: those a fleet
    run under this test's folder started."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            blob = Path(f"/proc/{entry}/environ").read_bytes() + Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if state != "Z" and str(marker).encode() in blob:
            pids.append(int(entry))
    return pids


@pytest.fixture
def reaper(tmp_path):
    """After the test, every process it left under tmp_path is an error, and is killed."""
    yield tmp_path
    left = _ours(tmp_path)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"fleet processes left running: {left}"


def _weighted_mean(tensors: list[dict[str, np.ndarray]], weights: list[int]) -> dict[str, np.ndarray]:
    w = np.array(weights, np.float64) / sum(weights)
    return {name: sum(wi * t[name].astype(np.float64) for wi, t in zip(w, tensors)) for name in tensors[0]}


def test_simulate_with_real_flower_processes_is_sample_weighted_fedavg(tiny_bundle, task, reaper):
    run = reaper / "run"
    out = run_cli("fleet", "simulate", "--bundle", tiny_bundle, "--data", task["train"], "--test", task["test"],
                  "--run", run, "--clients", 2, "--rounds", 2, "--split", "dirichlet:1", "--seed", 1, "--threads", 1,
                  "--batch-size", 16, "--timeout", FLEET_TIMEOUT - 60, timeout=FLEET_TIMEOUT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "round  test_acc" in out.stdout and out.stdout.count(" 2 clients, ") == 2, out.stdout
    clients = sorted((run / "fleet" / "clients").iterdir())
    sizes = [len((c / "train.txt").read_text().splitlines()) for c in clients]
    assert len(sizes) == 2 and sizes[0] != sizes[1] and sum(sizes) == 120  # unequal: weighted != plain mean
    for r in (1, 2):
        sent = [load_file(str(c / "state" / "rounds" / f"round_{r}.safetensors")) for c in clients]
        aggregated = load_file(str(run / "rounds" / f"round_{r}.safetensors"))
        expected = _weighted_mean(sent, sizes)
        for name, value in aggregated.items():
            np.testing.assert_allclose(value, expected[name], rtol=1e-5, atol=1e-6)
            assert not np.allclose(value, _weighted_mean(sent, [1, 1])[name], rtol=1e-4, atol=1e-6)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert sorted(c["num-examples"] for c in records[2]["clients"]) == sorted(sizes)
    nbytes = sum(v.nbytes for v in aggregated.values())
    assert all(nbytes <= c["bytes_up"] < nbytes + 1024 for c in records[2]["clients"])
    final = load_file(str(run / "adapter.safetensors"))
    assert all(np.array_equal(final[k], aggregated[k]) for k in final)
    # An ordinary run folder: eval and predict accept it, and its recorded hashes match.
    ev = run_cli("eval", "--run", run, "--data", task["test"], "--json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["accuracy"] == pytest.approx(records[-1]["test_acc"])
    image = next((task["test"] / "red").iterdir())
    pr = run_cli("predict", "--run", run, image)
    assert pr.returncode == 0 and str(image) in pr.stdout, pr.stderr


def test_server_and_two_clients_as_separate_commands(method_bundles, task, reaper):
    """The deployment path: `fleet server` and two `fleet client` processes over localhost, with an
    AdaptFormer bundle; the clients leave cleanly on SIGTERM."""
    from vqt_edge.fleet.launch import free_port

    bundle, port, run = method_bundles["adaptformer"], free_port(), reaper / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    vqt = [sys.executable, "-m", "vqt_edge.cli"]
    server = subprocess.Popen([*vqt, "fleet", "server", "--bundle", bundle, "--run", run, "--clients", "2", "--rounds", "2",
                               "--classes", "blue,green,red", "--host", "127.0.0.1", "--port", str(port),
                               "--test", task["test"], "--batch-size", "16"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO)
    clients = []
    try:
        for k, cls in enumerate((["blue", "green"], ["green", "red"])):
            data = reaper / f"data_{k}.txt"  # each device its own images, some classes missing
            data.write_text("".join(f"{p},{c}\n" for c in cls for p in sorted((task["train"] / c).iterdir())[k::2]))
            clients.append(subprocess.Popen(
                [*vqt, "fleet", "client", "--superlink", f"127.0.0.1:{port}", "--bundle", bundle, "--data", data,
                 "--state", reaper / f"state_{k}", "--threads", "1"],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO))
        out, _ = server.communicate(timeout=FLEET_TIMEOUT)
        assert server.returncode == 0, out
        assert (run / "model.onnx").exists() and json.loads((run / "summary.json").read_text())["rounds"] == 2
        assert run_cli("eval", "--run", run, "--data", task["test"]).returncode == 0
        for c in clients:
            c.send_signal(signal.SIGTERM)
        for c in clients:
            c.communicate(timeout=60)
            assert c.returncode == 128 + signal.SIGTERM
        time.sleep(1)
        assert not _ours(reaper)
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()


def test_simulate_refuses_bad_input_with_exit_2(tiny_bundle, task, tmp_path):
    base = ["fleet", "simulate", "--bundle", tiny_bundle, "--data", task["train"], "--run", tmp_path / "r"]
    for extra, words in ((["--split", "dirichlet:-1"], "--split"), (["--clients", "0"], "--clients"),
                         (["--rounds", "0"], "--rounds"), (["--clients", "500"], "--clients 500"),
                         (["--test", tmp_path / "nope"], "does not exist")):
        out = run_cli(*base, *extra)
        assert out.returncode == 2 and out.stderr.startswith("error:") and words in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and not _ours(tmp_path)
