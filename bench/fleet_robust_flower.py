"""Robust aggregation under a scaled-but-finite attacker, with real Flower processes (docs/fleet-security.md).

One fleet run per (rule, attacker or not): a SuperLink over TLS with SuperNode authentication, one
enrolled SuperNode per client, the ServerApp submitted with `flwr run`, as `fleet simulate` starts them
(vqt_edge/fleet/launch.py). The tiny test bundle and the generated colour task (tests/conftest.py); the
120 training images split iid over --clients shards. The last client is the attacker when there is one:
tests/fleet_attack.py's ClientApp with `test-attack="against:F,..."`, which trains its shard like an
honest device, then sends the round's start minus its update, scaled to F x the server's default update
bound, claiming --claim images (<= --max-examples): finite, float32, the adapter's shapes and in-bound,
so every check passes. No attack code is in the package: tests/ goes on the ClientApps' PYTHONPATH.
The server tests each round's adapter on 60 held-out images (metrics.jsonl test_acc).

    python bench/fleet_robust_flower.py [--clients 5] [--rounds 3] [--fraction 0.9] [--claim 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from conftest import export_tiny_bundle, make_task  # noqa: E402

from vqt_edge.fleet.certs import enroll, make_certificates  # noqa: E402
from vqt_edge.fleet.launch import Federation  # noqa: E402
from vqt_edge.fleet.server_app import FleetSettings  # noqa: E402

CLASSES = ["blue", "green", "red"]
RULES = ("fedavg", "median", "trimmed:0.2")


def shards(train: Path, root: Path, n: int) -> list[Path]:
    """Round-robin over the sorted images of each class: iid shards of (almost) equal size."""
    files = [(p, c) for c in CLASSES for p in sorted((train / c).iterdir())]
    out = []
    for k in range(n):
        path = root / f"shard_{k}.txt"
        path.write_text("".join(f"{p},{c}\n" for p, c in files[k::n]))
        out.append(path)
    return out


def fleet_run(
    root: Path, bundle: Path, test: Path, parts: list[Path], rule: str, attack: str | None, args
) -> list[dict]:
    """One fleet run; its metrics.jsonl records."""
    run = root / "run"
    (run / "fleet").mkdir(parents=True)
    settings = FleetSettings(
        bundle=str(bundle),
        run=str(run),
        rounds=args.rounds,
        clients=len(parts),
        classes=CLASSES,
        test=str(test),
        calibrate_head="off",  # the attacker's ClientApp answers training messages only
        aggregation=rule,
        min_clients=1,
        round_timeout=args.round_timeout,
        max_examples=args.max_examples,
    )
    (run / "fleet.json").write_text(json.dumps(asdict(settings)))
    files = make_certificates(root / "certs", [])
    keys = [enroll(root / "certs" / "devices", f"device_{k}") for k in range(len(parts))]
    with Federation(run / "fleet") as fed:
        fed.env.update(
            PYTHONPATH=os.pathsep.join([str(REPO / "tests"), fed.env.get("PYTHONPATH", "")]),
            OMP_NUM_THREADS="1",
        )
        superlink = fed.superlink(tls=files, auth=True)
        fed.register([pub for _, pub in keys])
        starts = []
        for k, part in enumerate(parts):
            config: dict[str, object] = {
                "bundle": str(bundle),
                "data": str(part),
                "state": str(root / f"state_{k}"),
                "threads": 1,
            }
            if attack and k == len(parts) - 1:
                config.update({"test-attack": ",".join([attack] * args.rounds), "test-claim": args.claim})
            starts.append(
                lambda k=k, config=config: fed.supernode(superlink, config, f"client_{k}", files.ca, keys[k][0])
            )
        nodes = [start() for start in starts]
        submit = fed.submit(run / "fleet.json", clientapp="fleet_attack:app")
        deadline = time.monotonic() + args.run_timeout
        while submit.poll() is None and time.monotonic() < deadline:
            for k, node in enumerate(nodes):  # a SuperNode gives up when its activation times out under load
                if node.poll() is not None:
                    nodes[k] = starts[k]()
            time.sleep(1)
        if submit.poll() != 0 or not (run / "summary.json").exists():  # `flwr run` can end before the run
            log = (run / "fleet" / "logs" / "flwr_run.log").read_text(errors="replace")
            raise SystemExit(f"{rule} attack={attack}: the fleet run failed:\n{log[-3000:]}")
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=5, help="clients in all; with the attacker, the last one")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fraction", type=float, default=0.9, help="the attacker's update norm / the server's bound")
    ap.add_argument("--claim", type=int, default=100_000, help="num_examples the attacker claims")
    ap.add_argument("--max-examples", type=int, default=100_000)
    ap.add_argument("--round-timeout", type=float, default=600)
    ap.add_argument("--run-timeout", type=float, default=1800)
    ap.add_argument("--rules", default=",".join(RULES), help="comma-separated aggregation rules to run")
    ap.add_argument("--no-baseline", action="store_true", help="skip the runs without the attacker")
    ap.add_argument("--baseline-only", action="store_true", help="only the runs without the attacker")
    ap.add_argument("--out", type=Path, default=REPO / "bench/results/fleet_robust_flower.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fleet_robust_flower_"))
    bundle = export_tiny_bundle(root / "bundle")
    train, test = make_task(root / "train", 40, seed=1), make_task(root / "test", 20, seed=2)
    parts = shards(train, root, args.clients)
    attack = f"against:{args.fraction}"
    results = {}
    rules = args.rules.split(",")
    cases = ([] if args.baseline_only else [(rule, attack) for rule in rules]) + (
        [] if args.no_baseline else [(rule, None) for rule in rules]
    )
    for rule, attacker in cases:
        name = f"{rule}{' + attacker' if attacker else ''}"
        t0, cpu0 = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
        records = fleet_run(root / name.replace(" + ", "_").replace(":", ""), bundle, test, parts, rule, attacker, args)
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        last = records[-1]
        results[name] = {
            "test_acc_per_round": [round(r.get("test_acc", float("nan")), 4) for r in records],
            "clients_per_round": [len(r.get("clients", [])) for r in records[1:]],
            "rejected": sum(len(r.get("rejected", [])) for r in records),
            "norm_over_bound_last_round": {
                str(c["node"])[-6:]: round(c["update_norm"] / c["norm_bound"], 4) for c in last["clients"]
            },
            "claimed_last_round": sorted(c["num-examples"] for c in last["clients"]),
            "wall_seconds": round(time.monotonic() - t0, 1),
            "cpu_seconds_children": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1),
        }
        print(f"{name:22s} {json.dumps(results[name])}", flush=True)
    print(f"\n| rule | test acc, attacker ({attack}, claims {args.claim}) | no attacker |\n|---|---|---|")
    for rule in rules:
        accs = [results.get(name, {}).get("test_acc_per_round", [None])[-1] for name in (f"{rule} + attacker", rule)]
        print(f"| {rule} | {accs[0]} | {accs[1]} |")
    args.out.write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
