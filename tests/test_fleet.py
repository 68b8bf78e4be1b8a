"""Fleet adaptation with Flower (docs/design.md section 12): splits, the client's tensor access for
each method, and real Flower processes (SuperLink, SuperNodes, ClientApp/ServerApp) on localhost."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, run_cli
from safetensors.numpy import load_file

from vqt_edge.errors import UserError
from vqt_edge.split import Split, assign, parse_split

pytest.importorskip("flwr")

FLEET_TIMEOUT = 420  # seconds for one whole federated run of the tiny model (about 80 s measured here)


# -- splits -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "",
        "iid:3",
        "dirichlet",
        "dirichlet:0",
        "dirichlet:-1",
        "dirichlet:x",
        "dirichlet:nan",
        "classes:0",
        "classes:1.5",
        "shards:2",
    ],
)
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
    dominant = [
        np.bincount(labels[p], minlength=5).max() / len(p) for p in assign(labels, 10, Split("dirichlet", 0.3), 0)
    ]
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
def method_bundles(tiny_method_bundle) -> dict[str, Path]:
    return {"linear": tiny_method_bundle("linear"), "adaptformer": tiny_method_bundle("adaptformer", 2)}


@pytest.mark.parametrize("method", ["vqt", "linear", "adaptformer"])
def test_client_round_starts_from_the_servers_tensors_for_each_method(
    method, method_bundles, tiny_bundle, task, tmp_path
):
    """Two rounds of the device side in this process: round 1 from tensors S (not the bundle's),
    round 2 resumes the client's run and continues from new tensors S2, with the carried optimizer."""
    from vqt_edge import manifest as mf
    from vqt_edge.config import TrainConfig
    from vqt_edge.fleet.client_app import train_round

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
    changed = dataclasses.replace(cfg, lr=1e-2)  # a changed config is another fleet run: refused, not silently mixed
    with pytest.raises(UserError, match="another fleet run"):
        train_round(tmp_path, bundle, task["train"], start, changed, classes, server_round=2, local_epochs=1)
    cache = {f: f.stat().st_mtime_ns for f in (tmp_path / "run" / "kv_cache").rglob("*") if f.is_file()}
    assert cache  # K/V cached in round 1 ...
    start2 = {name: v + 0.5 for name, v in start.items()}
    out2, _ = train_round(tmp_path, bundle, task["train"], start2, cfg, classes, server_round=2, local_epochs=1)
    for name in shapes:
        np.testing.assert_allclose(out2[name], start2[name], atol=1e-5)
    assert cache == {f: f.stat().st_mtime_ns for f in cache}  # ... and only read in round 2
    with pytest.raises(UserError, match="bundle trains"):
        train_round(tmp_path / "other", bundle, task["train"], {"x": np.zeros(1, np.float32)}, cfg, classes, 1, 1)


def test_prior_shift_is_the_centred_log_prior_with_absent_classes_finite():
    from vqt_edge.fleet.client_app import prior_shift

    shift = prior_shift(np.array([0, 0, 0, 1]), 3, tau=2.0)  # counts + 1: 4, 2, 1
    np.testing.assert_allclose(shift, 2 * (np.log([4, 2, 1]) - np.log([4, 2, 1]).mean()), rtol=1e-6)
    assert shift[0] > shift[1] > shift[2] and abs(shift.sum()) < 1e-5


def test_logit_adjusted_round_trains_with_the_prior_and_sends_without_it(tiny_bundle, task, tmp_path):
    """The client trains with head.bias + tau * log(prior) (its checkpoint holds that bias) and sends
    back the bias without the shift: with lr ~ 0 exactly what the server sent."""
    from safetensors.numpy import load_file as load

    from vqt_edge import manifest as mf
    from vqt_edge.config import TrainConfig
    from vqt_edge.fleet.client_app import HEAD_BIAS, LocalRule, prior_shift, train_round
    from vqt_edge.fleet.server_app import initial_tensors

    rng = np.random.default_rng(1)
    initial = initial_tensors(tiny_bundle, mf.read_manifest(tiny_bundle))
    start = {name: (value + rng.normal(0, 0.05, value.shape)).astype(np.float32) for name, value in initial.items()}
    shapes = {name: value.shape for name, value in start.items()}
    data = tmp_path / "skewed.txt"  # 40 blue, 10 green, no red
    data.write_text(
        "".join(
            f"{p},{c}\n" for c, k in (("blue", 40), ("green", 10)) for p in sorted((task["train"] / c).iterdir())[:k]
        )
    )
    cfg = TrainConfig(epochs=1, batch_size=16, lr=1e-9, weight_decay=0.0, kv="ram", threads=1, backend="portable")
    out, _ = train_round(
        tmp_path / "c", tiny_bundle, data, start, cfg, ["blue", "green", "red"], 1, 1, LocalRule(logit_adjust=1.0)
    )
    for name in shapes:
        np.testing.assert_allclose(out[name], start[name], atol=1e-5)
    trained_with = load(str(tmp_path / "c" / "run" / "checkpoint.safetensors"))[f"param/{HEAD_BIAS}"]
    shift = prior_shift(np.array([0] * 40 + [1] * 10), 3, 1.0)
    np.testing.assert_allclose(trained_with, start[HEAD_BIAS] + shift, atol=1e-5)


def test_proximal_term_adds_mu_times_the_distance_to_the_rounds_start(tiny_bundle):
    """PortableBackend.step with zero loss gradients: only mu * (w - start) drives AdamW, whose first
    step moves every element by lr towards `start`; without the term nothing moves."""
    from device_runner.backends import PortableBackend
    from vqt_edge import manifest as mf

    manifest = mf.read_manifest(tiny_bundle)
    for mu in (0.0, 10.0):
        backend = PortableBackend(tiny_bundle, manifest, "cpu", 1, None)
        before = backend.parameters()
        if mu:
            backend.proximal = (mu, {n: p + 1 for n, p in before.items()})  # the start lies 1 above every element
        backend.grads = {n: np.zeros_like(p) for n, p in before.items()}
        backend.step(1e-3, 0.0)
        for n, p in backend.parameters().items():
            np.testing.assert_allclose(p - before[n], 1e-3 if mu else 0.0, rtol=1e-3)


def test_rules_that_need_the_portable_backend_refuse_ort_training_and_auto_picks_portable():
    from vqt_edge.fleet.client_app import LocalRule

    with pytest.raises(UserError, match="--backend portable"):
        LocalRule(proximal_mu=0.1).check("ort-training")
    LocalRule(logit_adjust=1.0).check("ort-training")  # a bias shift: any backend
    assert LocalRule(proximal_mu=0.1).backend("auto") == "portable"
    assert (
        LocalRule().backend("auto") == "auto" and LocalRule(proximal_mu=0.1).backend("ort-training") == "ort-training"
    )


def test_class_weighted_rows_average_each_class_over_the_clients_that_have_it():
    from vqt_edge.fleet.server_app import class_weighted_rows

    sent = [
        {
            "head.weight": np.full((3, 2), 1.0, np.float32),
            "head.bias": np.ones(3, np.float32),
            "q": np.zeros(2, np.float32),
        },
        {
            "head.weight": np.full((3, 2), 3.0, np.float32),
            "head.bias": np.full(3, 3.0, np.float32),
            "q": np.ones(2, np.float32),
        },
    ]
    fedavg = {k: (sent[0][k] + 3 * sent[1][k]) / 4 for k in sent[0]}  # 1 and 3 images
    out = class_weighted_rows(fedavg, sent, [[1, 0, 0], [0, 3, 0]])
    np.testing.assert_array_equal(out["head.bias"], [1.0, 3.0, 2.5])  # class 2: nobody has it, FedAvg's row
    np.testing.assert_array_equal(out["head.weight"][:, 0], [1.0, 3.0, 2.5])
    assert out["q"] is fedavg["q"]  # not a head row: FedAvg's


def test_calibration_pools_client_stats_exactly_and_refits_a_separating_head():
    """CCVR (vqt_edge/calibrate.py): two skewed clients' statistics pool to the statistics of
    all their features at once, and a head that first calls everything class 0 is refitted on
    virtual features to separate fresh draws of three correlated Gaussians."""
    from vqt_edge.calibrate import COV, calibrate_head, class_stats, pool, stats_bytes

    rng = np.random.default_rng(0)
    f, classes = 6, 3
    means = 2.0 * rng.standard_normal((classes, f))
    roots = [0.7 * rng.standard_normal((f, f)) for _ in range(classes)]  # correlated: a diagonal misses this

    def draw(n: int, c: int) -> np.ndarray:
        return means[c] + rng.standard_normal((n, f)) @ roots[c].T

    y = np.repeat(np.arange(classes), [300, 40, 200])
    x = np.concatenate([draw(n, c) for c, n in enumerate([300, 40, 200])])
    first = (y == 0) | ((y == 1) & (np.arange(len(y)) % 2 == 0))  # client 0: all of class 0, half of 1
    stats = [
        class_stats(x[first], y[first], classes, diagonal=False),
        class_stats(x[~first], y[~first], classes, diagonal=False),
    ]
    assert stats[1]["calib.count"][0] == 0 and stats[0]["calib.count"][2] == 0
    count, mean, cov = pool(stats)
    for c in range(classes):
        np.testing.assert_allclose(mean[c], x[y == c].mean(0), atol=1e-5)
        np.testing.assert_allclose(cov[c], np.cov(x[y == c].T, bias=True), atol=1e-4)
    assert stats_bytes(stats[0]) == 4 * (classes + classes * f + classes * f * (f + 1) // 2)
    assert stats[0][COV].shape == (classes, f * (f + 1) // 2)  # the symmetric matrix's upper triangle
    diagonal = pool(
        [
            class_stats(x[first], y[first], classes, diagonal=True),
            class_stats(x[~first], y[~first], classes, diagonal=True),
        ]
    )[2]
    np.testing.assert_allclose(diagonal, np.stack([x[y == c].var(0) for c in range(classes)]), atol=1e-4)

    start = {
        "head.weight": np.zeros((classes, f), np.float32),
        "head.bias": np.array([5, 0, 0], np.float32),
        "query": np.ones(4, np.float32),
    }
    out = calibrate_head(start, stats, seed=0)
    fresh_y = np.repeat(np.arange(classes), 500)
    fresh = np.concatenate([draw(500, c) for c in range(classes)])
    before = ((fresh @ start["head.weight"].T + start["head.bias"]).argmax(1) == fresh_y).mean()
    after = ((fresh @ out["head.weight"].T + out["head.bias"]).argmax(1) == fresh_y).mean()
    assert before == pytest.approx(1 / 3) and after > 0.95, after
    assert out["query"] is start["query"]  # only the head is refitted
    again = calibrate_head(start, stats, seed=0)  # seeded: the same head again
    assert np.array_equal(again["head.weight"], out["head.weight"])


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
    out = run_cli(
        "fleet",
        "simulate",
        "--bundle",
        tiny_bundle,
        "--data",
        task["train"],
        "--test",
        task["test"],
        "--run",
        run,
        "--clients",
        2,
        "--rounds",
        2,
        "--split",
        "dirichlet:1",
        "--seed",
        1,
        "--threads",
        1,
        "--batch-size",
        16,
        "--backend",
        "portable",
        "--logit-adjust",
        1,
        "--calibrate-head",
        "off",
        "--timeout",
        FLEET_TIMEOUT - 60,
        timeout=FLEET_TIMEOUT,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "round  test_acc" in out.stdout and out.stdout.count(" 2 clients, ") == 2, out.stdout
    clients = sorted((run / "fleet" / "clients").iterdir())
    sizes = [len((c / "train.txt").read_text().splitlines()) for c in clients]
    assert len(sizes) == 2 and sizes[0] != sizes[1] and sum(sizes) == 120  # unequal: weighted != plain mean
    for c in clients:  # --backend reached every client (node config)
        assert json.loads((c / "state" / "run" / "run.json").read_text())["config"]["backend"] == "portable"
    assert json.loads((run / "run.json").read_text())["fleet"]["logit_adjust"] == 1.0
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
    backends = ("portable", "ort-training")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    vqt = [sys.executable, "-m", "vqt_edge.cli"]
    server = subprocess.Popen(
        [
            *vqt,
            "fleet",
            "server",
            "--bundle",
            bundle,
            "--run",
            run,
            "--clients",
            "2",
            "--rounds",
            "2",
            "--classes",
            "blue,green,red",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--test",
            task["test"],
            "--batch-size",
            "16",
            "--class-weighted-head",
            "--calibrate-head",
            "full",
            "--insecure",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO,
    )
    clients = []
    try:
        for k, cls in enumerate((["blue", "green"], ["green", "red"])):
            data = reaper / f"data_{k}.txt"  # each device its own images, some classes missing
            data.write_text("".join(f"{p},{c}\n" for c in cls for p in sorted((task["train"] / c).iterdir())[k::2]))
            clients.append(
                subprocess.Popen(
                    [
                        *vqt,
                        "fleet",
                        "client",
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--bundle",
                        bundle,
                        "--data",
                        data,
                        "--state",
                        reaper / f"state_{k}",
                        "--threads",
                        "1",
                        "--backend",
                        backends[k],
                        "--insecure",
                    ],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    text=True,
                    env=env,
                    cwd=REPO,
                )
            )
        out, _ = server.communicate(timeout=FLEET_TIMEOUT)
        assert server.returncode == 0, out
        assert (run / "model.onnx").exists() and json.loads((run / "summary.json").read_text())["rounds"] == 2
        for k, backend in enumerate(backends):  # one fleet, each device on the backend it chose
            assert json.loads((reaper / f"state_{k}" / "run" / "run.json").read_text())["config"]["backend"] == backend
        # --class-weighted-head: blue's row is client 0's, red's client 1's, green's their mean by green images;
        # the other tensors are FedAvg's sample-weighted mean.
        sent = [load_file(str(reaper / f"state_{k}" / "rounds" / "round_2.safetensors")) for k in (0, 1)]
        aggregated = load_file(str(run / "rounds" / "round_2.safetensors"))
        greens = [len(sorted((task["train"] / "green").iterdir())[k::2]) for k in (0, 1)]
        sizes = [len((reaper / f"data_{k}.txt").read_text().splitlines()) for k in (0, 1)]
        for name, value in aggregated.items():
            if name.startswith("head."):
                np.testing.assert_allclose(value[0], sent[0][name][0], rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(value[2], sent[1][name][2], rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(
                    value[1], _weighted_mean([{"r": t[name][1]} for t in sent], greens)["r"], rtol=1e-5, atol=1e-6
                )
            else:
                np.testing.assert_allclose(value, _weighted_mean(sent, sizes)[name], rtol=1e-5, atol=1e-6)
        # --calibrate-head: after round 2 each client sent its feature statistics under the round's
        # tensors; the head is refitted on them, everything else stays round 2's.
        from vqt_edge.calibrate import calibrate_head, stats_bytes
        from vqt_edge.fleet.client_app import feature_stats

        final = load_file(str(run / "adapter.safetensors"))
        stats = [
            feature_stats(
                reaper / f"state_{k}",
                bundle,
                reaper / f"data_{k}.txt",
                aggregated,
                ["blue", "green", "red"],
                diagonal=False,
            )
            for k in (0, 1)
        ]
        expected = calibrate_head(aggregated, stats, seed=0)
        for name, value in final.items():
            np.testing.assert_allclose(value, expected[name], rtol=1e-4, atol=1e-5)
            assert name.startswith("head.") or np.array_equal(value, aggregated[name])
        assert not np.allclose(final["head.weight"], aggregated["head.weight"])
        summary = json.loads((run / "summary.json").read_text())
        calibration = summary["calibration"]
        assert calibration["clients"] == 2  # the bytes: the statistics' float32 data plus each array's header
        assert stats_bytes(stats[0]) <= calibration["bytes_up_per_client"] < stats_bytes(stats[0]) + 1024
        assert summary["test_accuracy"] == calibration["test_acc"]
        ev = run_cli("eval", "--run", run, "--data", task["test"], "--json")
        assert ev.returncode == 0 and json.loads(ev.stdout)["accuracy"] == pytest.approx(calibration["test_acc"])
        image = next((task["test"] / "red").iterdir())
        pr = run_cli("predict", "--run", run, image)
        assert pr.returncode == 0 and str(image) in pr.stdout, pr.stderr
        assert "head calibrated (full)" in out and out.count("warning: --insecure") == 1
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
    for extra, words in (
        (["--split", "dirichlet:-1"], "--split"),
        (["--clients", "0"], "--clients"),
        (["--rounds", "0"], "--rounds"),
        (["--clients", "500"], "--clients 500"),
        (["--test", tmp_path / "nope"], "does not exist"),
        (["--logit-adjust", "-1"], "--logit-adjust"),
        (["--proximal-mu", "0.1", "--backend", "ort-training"], "portable"),
    ):
        out = run_cli(*base, *extra)
        assert out.returncode == 2 and out.stderr.startswith("error:") and words in out.stderr, out.stderr
        assert "Traceback" not in out.stderr and not _ours(tmp_path)
