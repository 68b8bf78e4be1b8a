"""A fleet client SIGKILLed mid-round, with real Flower processes over TLS and SuperNode authentication
(docs/fleet-security.md, Failures): the round ends with the other client after --round-timeout, the run
goes on, and the client started again with its own state folder and key takes part in a later round
from its own checkpoint, its K/V cache reused, not recomputed.

Flower (1.42) keeps a SIGKILLed SuperNode online until it misses two 30 s heartbeats and refuses to
activate its key again until then (code 2004), so the restarted client is started again until it is
admitted (as `fleet client` does), and the run has a fourth round: the round after the kill may still
be sent to the dead node (it ends at the time-out, or earlier with the node's "Node Unavailable" error,
or the restarted client, admitted meanwhile, trains it); the next one waits for both clients
(min_available_nodes), so the restarted client is in the last round."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

pytest.importorskip("flwr")

from test_fleet import reaper  # noqa: E402,F401  (the fixture that kills what a test leaves behind)
from test_fleet_security import _fedavg, _shard  # noqa: E402

#: The round the killed client misses lasts this long; a round of the other client must fit in it (about
#: 10 s on an idle 2-core machine: a ClientApp start and a few steps of the tiny bundle). Shorter than
#: Flower's earliest heartbeat expiry after the kill (30 s), so the time-out, not the expiry, ends it.
ROUND_TIMEOUT = 30
ROUNDS = 4
RUN_TIMEOUT = 400


def _clientapps(supernode: int) -> list[int]:
    """The ClientApp processes (one per message) under a SuperNode."""
    from vqt_edge.fleet.launch import _children

    out = []
    for pid in _children(supernode):
        try:
            if b"flwr-clientapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(pid)
        except OSError:
            pass
    return out


def _files(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under `folder`: (mtime_ns, sha256), to tell a reused cache from a recomputed one."""
    return {
        str(f.relative_to(folder)): (f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_client_killed_mid_round_is_waited_for_then_rejoins_with_its_own_state(tiny_bundle, task, reaper):  # noqa: F811
    """Two enrolled clients, 4 rounds of one local epoch. Once client 1's round-2 ClientApp has started
    (it holds the round's message: the SuperNode pulled it and started a process for it) client 1's
    whole process tree is stopped at once (SIGSTOP) and SIGKILLed, so it never replies; it is started
    again at once with the same state folder and key."""
    from vqt_edge.fleet.certs import enroll, make_certificates
    from vqt_edge.fleet.launch import Federation, _children
    from vqt_edge.fleet.server_app import FleetSettings

    files = make_certificates(reaper / "certs", [])
    keys = [enroll(reaper / "certs" / "devices", f"device_{k}") for k in (0, 1)]
    shards = [_shard(task, reaper / "d0.txt", slice(0, 24)), _shard(task, reaper / "d1.txt", slice(24, 40))]
    states = [reaper / "s0", reaper / "s1"]
    run = reaper / "run"
    (run / "fleet").mkdir(parents=True)
    settings = FleetSettings(
        bundle=str(tiny_bundle),
        run=str(run),
        rounds=ROUNDS,
        clients=2,
        classes=["blue", "green", "red"],
        batch_size=16,
        local_epochs=1,
        calibrate_head="off",
        min_clients=1,
        round_timeout=ROUND_TIMEOUT,
    )
    (run / "fleet.json").write_text(json.dumps(asdict(settings)))
    with Federation(run / "fleet") as fed:
        fed.env.update(OMP_NUM_THREADS="1")
        superlink = fed.superlink(tls=files, auth=True)
        fed.register([pub for _, pub in keys])

        def client(k: int, log: str):
            config = {
                "bundle": str(tiny_bundle),
                "data": str(shards[k]),
                "state": str(states[k]),
                "threads": 1,
                "backend": "portable",
            }
            return fed.supernode(superlink, config, log, files.ca, keys[k][0])

        nodes = [client(0, "client_0"), client(1, "client_1")]
        submit = fed.submit(run / "fleet.json")
        deadline = time.monotonic() + RUN_TIMEOUT
        round_1: set[int] = set()  # client 1's ClientApps seen before round 1 was written: round 1's
        while len(_records(run)) < 2:
            assert submit.poll() is None and time.monotonic() < deadline, "round 1 did not end"
            round_1.update(_clientapps(nodes[1].pid))
            time.sleep(0.05)
        while not set(_clientapps(nodes[1].pid)) - round_1:
            assert submit.poll() is None and time.monotonic() < deadline, "client 1 got no round-2 message"
            time.sleep(0.05)
        tree = [nodes[1].pid, *_children(nodes[1].pid)]
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in tree:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        nodes[1].wait()
        killed = len(_records(run))
        cache = _files(states[1] / "run" / "kv_cache")
        starts = 0
        while submit.poll() is None:  # started again whenever Flower refuses it (its old session still online)
            assert time.monotonic() < deadline, "the run did not end"
            if nodes[1].poll() is not None:
                starts += 1
                nodes[1] = client(1, f"client_1_restart_{starts}")
            time.sleep(0.5)
        log = (run / "fleet" / "logs" / "flwr_run.log").read_text(errors="replace")
        assert submit.returncode == 0 and (run / "summary.json").exists(), log[-3000:]  # `flwr run` can end early
    records = _records(run)
    assert killed == 2 and [r["round"] for r in records] == list(range(ROUNDS + 1)), records
    node = {c["num-examples"]: c["node"] for c in records[1]["clients"]}  # 72 images: client 0, 48: client 1
    assert sorted(node) == [48, 72], records[1]
    took_part = [r["round"] for r in records[1:] if any(c["node"] == node[48] for c in r["clients"])]
    assert all(any(c["node"] == node[72] for c in r["clients"]) for r in records[1:]), records  # the run went on
    assert not any(r["rejected"] for r in records[1:]), records
    # Round 2 ended at the time-out with client 0 only; client 1, same node (its key), is back by the last round
    assert [c["num-examples"] for c in records[2]["clients"]] == [72], records[2]
    assert records[2]["round_seconds"] >= ROUND_TIMEOUT - 1, records[2]
    assert took_part[0] == 1 and 2 not in took_part and took_part[-1] == ROUNDS, took_part
    # ... from its own state: it sent those rounds, its run went on from its checkpoint (the epochs it
    # missed caught up in its next round) and its K/V cache was reused, not recomputed
    # (admitted while round 3 still waits for it, it may train round 3's message: counted if it replies in time)
    sent_rounds = sorted(int(p.stem.split("_")[1]) for p in (states[1] / "rounds").iterdir())
    assert set(took_part) <= set(sent_rounds) <= {*took_part, 3}, (sent_rounds, took_part)
    epochs = [json.loads(line)["epoch"] for line in (states[1] / "run" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == list(range(1, ROUNDS + 1)), epochs
    assert cache and _files(states[1] / "run" / "kv_cache") == cache
    sent = [load_file(str(s / "rounds" / f"round_{ROUNDS}.safetensors")) for s in states]
    expected = _fedavg(sent, [72, 48])
    for name, value in load_file(str(run / "rounds" / f"round_{ROUNDS}.safetensors")).items():
        np.testing.assert_array_equal(value, expected[name])
