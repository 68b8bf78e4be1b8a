"""A fleet client SIGKILLed mid-round 2 and restarted with its own state and key (docs/fleet-security.md).

`fleet server` over TLS (3 rounds, --round-timeout 120) and two enrolled `fleet client`s on the tiny
test bundle; once round 1 is written and client 1's round-2 ClientApp runs, client 1's whole process
tree is SIGKILLed and started again 5 s later. Prints each round's participants, the rounds client 1
sent, its run's epochs and whether its K/V cache was rewritten.

    python bench/fleet_kill_client.py WORKDIR FIXTURES   # FIXTURES: bundle/ and train/ from tests/conftest.py
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from vqt_edge.fleet.launch import _children, free_port

W, F = (
    Path(sys.argv[1]),
    Path(sys.argv[2]),
)  # a new folder; export_tiny_bundle(F / "bundle"), make_task(F / "train", 40, 1)
W.mkdir(parents=True, exist_ok=True)
certs, run, port = W / "certs", W / "run", free_port()
vqt = [sys.executable, "-m", "vqt_edge.cli", "fleet"]
env = {**os.environ, "OMP_NUM_THREADS": "1"}
subprocess.run([*vqt, "certs", "--out", str(certs), "--devices", "2"], check=True, env=env)
shards = []
for k, sl in enumerate((slice(0, 24), slice(24, 40))):
    p = W / f"d{k}.txt"
    p.write_text(
        "".join(f"{x},{c}\n" for c in ("blue", "green", "red") for x in sorted((F / "train" / c).iterdir())[sl])
    )
    shards.append(p)


def start(args, log):
    return subprocess.Popen(
        [*vqt, *map(str, args)], stdout=open(W / log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True
    )


def client(k):
    return start(
        [
            "client",
            "--superlink",
            f"127.0.0.1:{port}",
            "--bundle",
            F / "bundle",
            "--data",
            shards[k],
            "--state",
            W / f"state_{k}",
            "--threads",
            1,
            "--backend",
            "portable",
            "--root-certificate",
            certs / "ca.crt",
            "--key",
            certs / "devices" / f"device_{k}.key",
        ],
        f"client_{k}.out",
    )


def kill(p):
    for pid in [p.pid, *_children(p.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


t0 = time.monotonic()
server = start(
    [
        "server",
        "--bundle",
        F / "bundle",
        "--run",
        run,
        "--clients",
        2,
        "--rounds",
        3,
        "--classes",
        "blue,green,red",
        "--host",
        "127.0.0.1",
        "--port",
        port,
        "--batch-size",
        16,
        "--certificates",
        certs,
        "--round-timeout",
        120,
    ],
    "server.out",
)
clients = [client(0), client(1)]


def lines():
    return (
        [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        if (run / "metrics.jsonl").exists()
        else []
    )


while len(lines()) < 2:
    time.sleep(0.5)
print(f"round 1 written at {time.monotonic() - t0:.0f} s", flush=True)
# mid-round 2: once client 1's round-2 ClientApp is running (a flwr-clientapp under its SuperNode)
while not any(
    "flwr-clientapp" in Path(f"/proc/{c}/cmdline").read_text(errors="replace")
    for c in _children(clients[1].pid)
    if Path(f"/proc/{c}").exists()
):
    time.sleep(0.2)
time.sleep(1)
kill(clients[1])
clients[1].wait()
print(f"client 1 SIGKILLed at {time.monotonic() - t0:.0f} s", flush=True)
cache = {str(f): f.stat().st_mtime_ns for f in (W / "state_1" / "run" / "kv_cache").rglob("*") if f.is_file()}
time.sleep(5)
clients[1] = client(1)
print(f"client 1 restarted at {time.monotonic() - t0:.0f} s", flush=True)
server.wait(1500)
print(f"server exit {server.returncode} at {time.monotonic() - t0:.0f} s", flush=True)
for r in lines():
    print(
        r["round"],
        r.get("round_seconds"),
        [(c["num-examples"]) for c in r.get("clients", [])],
        r.get("failures"),
        r.get("rejected"),
    )
print("client 1 rounds sent:", sorted(p.name for p in (W / "state_1" / "rounds").iterdir()))
print(
    "client 1 run epochs:",
    [m.get("epoch") for m in map(json.loads, (W / "state_1" / "run" / "metrics.jsonl").read_text().splitlines())],
)
print(
    "K/V cache untouched after restart:",
    cache == {str(f): f.stat().st_mtime_ns for f in (W / "state_1" / "run" / "kv_cache").rglob("*") if f.is_file()},
    len(cache),
)
for c in clients:
    c.send_signal(signal.SIGTERM)
for c in clients:
    try:
        c.wait(60)
    except subprocess.TimeoutExpired:
        kill(c)
