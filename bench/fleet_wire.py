"""Bytes on the wire per client per round, with TLS (docs/fleet-security.md).

A fleet of the tiny test bundle on localhost, as `fleet simulate` runs it (TLS, SuperNode
authentication), except that every SuperNode reaches the SuperLink through a counting TCP relay in
this process: the bytes counted are the TLS records both ways, everything a device's network sees
(tensors, HTTP, Flower's polling and heartbeats, TLS handshakes). First the clients sit idle for
--idle seconds (what a connected device costs with no round running), then --rounds rounds run.

    python bench/fleet_wire.py [--clients 2] [--rounds 3] [--idle 20] [--insecure]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import export_tiny_bundle, make_task  # noqa: E402

from vqt_edge.fleet.certs import enroll, make_certificates  # noqa: E402
from vqt_edge.fleet.launch import Federation, free_port  # noqa: E402
from vqt_edge.fleet.server_app import FleetSettings  # noqa: E402


class Relay:
    """127.0.0.1:port -> target, counting bytes each way."""

    def __init__(self, target: int) -> None:
        self.target, self.up, self.down = target, 0, 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.sock.accept()
            server = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, server, "up"), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, "down"), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, way: str) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                with self.lock:
                    setattr(self, way, getattr(self, way) + len(data))
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.up, self.down


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle", type=float, default=20.0)
    ap.add_argument("--insecure", action="store_true")
    ap.add_argument(
        "--out", type=Path, default=None, help="[default: bench/results/fleet_wire_tls.json or _insecure.json]"
    )
    args = ap.parse_args()
    args.out = args.out or Path(f"bench/results/fleet_wire_{'insecure' if args.insecure else 'tls'}.json")
    root = Path(tempfile.mkdtemp(prefix="fleet_wire_"))
    bundle = export_tiny_bundle(root / "bundle")
    train = make_task(root / "train", 40, seed=1)
    files = sorted(p for p in train.rglob("*.png"))
    run = root / "run"
    (run / "fleet").mkdir(parents=True)
    settings = FleetSettings(
        bundle=str(bundle),
        run=str(run),
        rounds=args.rounds,
        clients=args.clients,
        classes=["blue", "green", "red"],
        batch_size=16,
    )
    (run / "fleet.json").write_text(json.dumps(asdict(settings)))
    tls = None if args.insecure else make_certificates(root / "certs", [])
    keys = [None if args.insecure else enroll(root / "certs" / "devices", f"c{k}") for k in range(args.clients)]
    with Federation(run / "fleet") as fed:
        fed.env["OMP_NUM_THREADS"] = "1"
        port = free_port()
        fed.superlink(port=port, tls=tls, auth=tls is not None)
        if tls:
            fed.register([k[1] for k in keys if k])
        relay = Relay(port)
        for k in range(args.clients):
            shard = root / f"shard_{k}.txt"
            shard.write_text("".join(f"{p},{p.parent.name}\n" for p in files[k :: args.clients]))
            fed.supernode(
                f"127.0.0.1:{relay.port}",
                {
                    "bundle": str(bundle),
                    "data": str(shard),
                    "state": str(root / f"state_{k}"),
                    "threads": 1,
                    "backend": "portable",
                },
                f"c{k}",
                tls.ca if tls else None,
                keys[k][0] if keys[k] else None,
            )
        time.sleep(10)  # connected and registered
        idle0, t0 = relay.counts(), time.monotonic()
        time.sleep(args.idle)
        idle1, t1 = relay.counts(), time.monotonic()
        submit = fed.submit(run / "fleet.json")
        submit.wait(1800)
        end = relay.counts()
        seconds = time.monotonic() - t1
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tensor_bytes = lines[-1]["bytes_down"]
    per = args.clients * args.rounds
    result = {
        "tls": not args.insecure,
        "clients": args.clients,
        "rounds": args.rounds,
        "tensor_bytes_each_way": tensor_bytes,
        "idle_bytes_per_client_per_second": round(sum(idle1) - sum(idle0)) / args.clients / (t1 - t0),
        "run_seconds": round(seconds, 1),
        "up_bytes_per_client_per_round": (end[0] - idle1[0]) / per,
        "down_bytes_per_client_per_round": (end[1] - idle1[1]) / per,
        "rounds_finished": [r["round"] for r in lines],
    }
    print(json.dumps(result, indent=2))
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
