"""`vqt-edge fleet simulate | server | client` (docs/design.md section 12).

simulate: one data set split over N clients, each a real SuperNode process on localhost with its
own shard and state folder, one SuperLink, the ServerApp submitted with `flwr run`; prints one row
per round as the server writes it. server / client: the same processes on separate machines.
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import click

from vqt_edge.cli.fleet_guard import (
    certs,
    client_security,
    client_security_options,
    enroll_command,
    insecure_option,
    resume_settings,
    server_security_options,
    simulate_security,
    start_server,
)
from vqt_edge.cli.options import build_config, config_options, parse_list
from vqt_edge.config import FleetConfig, TrainConfig
from vqt_edge.errors import UserError
from vqt_edge.kv_cache import DEFAULT_KV_DTYPE, KV_DTYPES

FLEET_DIR = "fleet"  # inside the run folder: settings, logs, Flower's state, the simulated clients
POLL_SECONDS = 0.5
TOKEN_FAILED = "Runtime task-token authentication failed"  # Flower's log line for a ClientApp it gave up on
STALL_LINES = 9  # about three restarts: each given-up ClientApp logs TOKEN_FAILED three times
RECONNECT_SECONDS = 5.0  # `fleet client` restarts its SuperNode after this when it stops


FLEET_OPTIONS = [f.name for f in dataclasses.fields(FleetConfig)]
CLIENT_OPTIONS = ("threads", "kv", "kv_dtype", "memory_budget_mb", "backend")
_DEFAULTS = FleetConfig()
HELP = f"""\b
Defaults (docs/fleet-defaults.md; chosen on validation folds of training images, never test images):
- Each round every client makes --local-steps {_DEFAULTS.local_steps} AdamW steps of min(--batch-size, its images)
  images: a device with 10 images trains as many steps as one with 300, and one lr schedule (warm-up
  once, cosine over rounds x steps) runs on every device. --local-epochs E makes a round E passes over
  each device's own images instead (a device with few images then makes few steps).
  Why: a round of one pass at batch 32 gave a client of 18-69 images 1-3 steps and its own lr
  schedule sized to them; the default run stayed at chance where `train` learned the task.
- After the last round the head is recalibrated (--calibrate-head {_DEFAULTS.calibrate_head}, CCVR): each client SENDS,
  once, per class its image count and the mean and covariance of its head's input features (never
  images or per-image features). --calibrate-head off: only the trainable tensors leave a device.
"""


def _common(command):
    """Options the server decides for every client (vqt_edge/config.py FleetConfig; they reach the clients in
    each round's config), and the run's bundle, folder and test images."""
    options = [
        click.option("--bundle", type=click.Path(path_type=Path), required=True, help="Bundle from `vqt-edge export`."),
        click.option(
            "--run",
            "run_dir",
            type=click.Path(path_type=Path),
            required=True,
            help="Run folder for the federated result (adapter, model.onnx, metrics per round).",
        ),
        click.option(
            "--test",
            type=click.Path(path_type=Path),
            help="Test images: the server reports accuracy after every round.",
        ),
        config_options(
            FleetConfig,
            FLEET_OPTIONS,
            local_steps={
                "default": None,
                "help": FleetConfig.__dataclass_fields__["local_steps"].metadata["help"]
                + f" [default: {_DEFAULTS.local_steps}]",
            },
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _fleet_config(options: dict) -> FleetConfig:
    """The FleetConfig of a command's options (removed from `options`), checked."""
    values = {name: options.pop(name) for name in FLEET_OPTIONS}
    if values["local_epochs"] is not None and values["local_steps"] is not None:
        raise UserError("give --local-steps or --local-epochs, not both")
    if values["local_steps"] is None:
        del values["local_steps"]
    config = build_config(FleetConfig, values)
    config.validate()
    return config


def _client_options(command):
    """What each device decides for itself (passed to its SuperNode as node config)."""
    options = [
        config_options(TrainConfig, ["threads"], threads={"help": "Threads per client [default: all cores]."}),
        click.option(
            "--kv",
            type=click.Choice(["disk", "ram", "stream"]),
            default="disk",
            show_default=True,
            help="K/V of the frozen backbone: disk caches them once for all rounds (each round is a new process).",
        ),
        config_options(
            TrainConfig, ["kv_dtype"], kv_dtype={"type": click.Choice(KV_DTYPES), "default": DEFAULT_KV_DTYPE}
        ),
        config_options(
            TrainConfig,
            ["memory_budget_mb", "backend"],
            memory_budget_mb={"help": "Peak memory each client's training must stay within, e.g. 600MB."},
            backend={
                "help": "Each client's training step, as `train --backend`; auto also picks portable "
                "when --proximal-mu needs it."
            },
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _node_values(
    threads: int | None, kv: str, memory_budget_mb: str | None, backend: str, kv_dtype: str = DEFAULT_KV_DTYPE
) -> dict[str, object]:
    from vqt_edge.memory import parse_size_mb

    values: dict[str, object] = {"kv": kv, "backend": backend, "kv-dtype": kv_dtype}
    if threads is not None:
        if threads < 1:
            raise UserError("--threads must be at least 1")
        values["threads"] = threads
    if memory_budget_mb is not None:
        values["memory-budget-mb"] = float(parse_size_mb(memory_budget_mb))
    return values


def _settings(
    bundle: Path, run_dir: Path, clients: int, classes: list[str], config: FleetConfig, test: Path | None, **extra
):
    from vqt_edge import manifest as mf
    from vqt_edge.fleet.server_app import FleetSettings

    manifest = mf.read_manifest(bundle, verify=True)
    if manifest.class_names is not None and manifest.class_names != classes:
        raise UserError(f"classes {classes} differ from the bundle's {manifest.class_names}")
    if len(classes) != manifest.spec.num_classes:
        raise UserError(f"{len(classes)} classes, but the bundle was exported for {manifest.spec.num_classes}")
    if clients < 1:
        raise UserError("--clients must be at least 1")
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise UserError(f"{run_dir}: exists and is not an empty folder; choose another --run")
    if test is not None and not test.exists():
        raise UserError(f"--test {test} does not exist")
    return FleetSettings(
        **dataclasses.asdict(config),
        bundle=str(bundle.resolve()),
        run=str(run_dir.resolve()),
        clients=clients,
        classes=classes,
        test=str(test.resolve()) if test else None,
        extra=extra,
    )


def _write_settings(run_dir: Path, settings) -> Path:
    from vqt_edge.fleet.server_app import SETTINGS

    (run_dir / FLEET_DIR).mkdir(parents=True, exist_ok=True)
    path = run_dir / SETTINGS
    path.write_text(json.dumps(asdict(settings), indent=2) + "\n")
    return path


def _format_row(record: dict) -> str:
    acc = f"{record['test_acc']:.4f}" if "test_acc" in record else "-"
    if not record["round"]:
        return f"{0:>5}  {acc:>8}  {'-':>10}  {'-':>9}  {'-':>9}  {'-':>8}  (initial adapter)"
    clients = record["clients"]
    up = max(c["bytes_up"] for c in clients)
    peak = max(c["peak_rss_mb"] for c in clients)
    fails = f"  {len(record['failures'])} client(s) failed" if record.get("failures") else ""
    fails += "".join(f"; rejected node {r['node']}: {r['reason']}" for r in record.get("rejected", []))
    return (
        f"{record['round']:>5}  {acc:>8}  {record['train_loss']:>10.4f}  {record['bytes_down']:>9}  {up:>9}  "
        f"{peak:>8.0f}  {len(clients)} clients, {record['round_seconds']:.1f} s{fails}"
    )


HEADER = f"{'round':>5}  {'test_acc':>8}  {'train_loss':>10}  {'bytes_down':>9}  {'bytes_up':>9}  {'peak_MiB':>8}"


def _stalled(client_logs: list[Path]) -> Path | None:
    """A simulated client whose ClientApp Flower keeps restarting: Flower gives a ClientApp process
    30 s to start and report (its heartbeat), then starts another, forever; on a machine too loaded
    for this many clients no round ever ends. Returns the first such client's log."""
    for log in client_logs:
        try:
            if log.read_text(errors="replace").count(TOKEN_FAILED) >= STALL_LINES:
                return log
        except OSError:
            continue
    return None


def _follow(
    run_dir: Path,
    submit: subprocess.Popen,
    timeout: float | None,
    logs: Path,
    client_logs: list[Path] = (),
    watch=lambda: None,
) -> None:
    """Print each round's row as the server appends it, until `flwr run` ends; then check the result."""
    from vqt_edge.run_folder import METRICS, RunFolder

    click.echo(
        "per client: bytes_down = tensors received, bytes_up = tensors sent (largest client), "
        "peak_MiB = largest client process peak (VmHWM)"
    )
    click.echo(HEADER)
    shown, start = 0, time.monotonic()
    while True:
        done = submit.poll() is not None
        lines = (run_dir / METRICS).read_text().splitlines() if (run_dir / METRICS).exists() else []
        for line in lines[shown:]:
            if line.strip():
                click.echo(_format_row(json.loads(line)))
        shown = len(lines)
        if done:
            break
        watch()
        stalled = _stalled(client_logs)
        if stalled is not None:
            raise click.ClickException(
                "Flower keeps restarting a client's ClientApp because it does not start within 30 s "
                f"(see {stalled}): this machine is too loaded for {len(client_logs)} clients; use fewer --clients"
            )
        if timeout is not None and time.monotonic() - start > timeout:
            raise click.ClickException(f"the fleet run did not finish within --timeout {timeout:.0f} s; logs in {logs}")
        time.sleep(POLL_SECONDS)
    folder = RunFolder(run_dir)
    if not folder.is_finished():
        errors = [
            line.strip()
            for line in (logs / "flwr_run.log").read_text(errors="replace").splitlines()
            if re.match(r"\s*\w+(Error|Exception): ", line)
        ]
        raise click.ClickException(f"the fleet run failed ({errors[-1] if errors else 'no result'}); logs in {logs}")
    summary = folder.summary()
    acc = summary.get("test_accuracy")
    if summary.get("calibration"):
        c = summary["calibration"]
        click.echo(
            f"head calibrated ({c['covariance']}): {c['clients']} clients sent {c['bytes_up_per_client']} bytes "
            f"of feature statistics each, {c['seconds']:.1f} s"
        )
    click.echo(
        f"done in {summary['seconds']:.1f} s"
        + (f": test accuracy {acc:.4f}" if acc is not None else "")
        + f"; wrote {run_dir}/adapter.safetensors, {run_dir}/model.onnx"
    )


def _stop_on_sigterm() -> None:
    """SIGTERM ends a fleet command like Ctrl-C: through `Federation.close()`, so no Flower process is
    left behind (a command's own process, so it may set the handler)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


@click.group()
def fleet() -> None:
    """Federated adaptation over many devices with Flower (needs the `fleet` extra).

    \b
    One machine:  vqt-edge fleet simulate --bundle B --data DIR --run RUN --clients 10 --rounds 10
    Server:       vqt-edge fleet server --bundle B --run RUN --clients 10 --rounds 10 --port 9091
    Each device:  vqt-edge fleet client --superlink SERVER:9091 --bundle B --data DIR --state DIR

    The defaults of simulate and server, and why: `vqt-edge fleet simulate --help` (the end).
    """


@fleet.command(epilog=HELP)
@_common
@click.option(
    "--data", type=click.Path(path_type=Path), required=True, help="All training images; split over the clients."
)
@click.option("--clients", type=int, default=10, show_default=True, help="Simulated clients (SuperNode processes).")
@click.option("--split", "split_text", default="iid", show_default=True, help="iid, dirichlet:ALPHA or classes:K.")
@click.option("--timeout", type=float, help="Give up (and stop every process) after this many seconds.")
@_client_options
@insecure_option
def simulate(bundle, run_dir, test, data, clients, split_text, timeout, insecure, **options) -> None:
    """Simulate a fleet on this machine: every client a real Flower SuperNode process with its own shard."""
    import numpy as np

    from device_runner.data import load_dataset
    from vqt_edge.fleet.launch import Federation
    from vqt_edge.split import assign, parse_split

    _stop_on_sigterm()
    split = parse_split(split_text)
    node = _node_values(**{k: options.pop(k) for k in CLIENT_OPTIONS})
    config = _fleet_config(options)
    if config.proximal_mu and node["backend"] == "ort-training":
        raise UserError("--proximal-mu needs the portable backend: onnxruntime-training's optimizer cannot take it")
    dataset = load_dataset(data)
    settings = _settings(
        bundle, run_dir, clients, dataset.classes, config, test, split=str(split), data=str(data.resolve())
    )
    parts = assign(np.array([label for _, label in dataset.samples]), clients, split, config.seed)
    path = _write_settings(run_dir, settings)
    workdir = run_dir / FLEET_DIR
    click.echo(f"{clients} clients, split {split}: " + ", ".join(str(len(p)) for p in parts) + " images")
    tls, keys = simulate_security(workdir, clients, insecure)
    with Federation(workdir) as fed:
        superlink = fed.superlink(tls=tls, auth=tls is not None)
        fed.register([key.with_suffix(".pub") for key in keys if key is not None])
        nodes: list[list] = []  # per client: how to start its SuperNode, the running one
        for k, rows in enumerate(parts):
            home = workdir / "clients" / f"client_{k}"
            home.mkdir(parents=True, exist_ok=True)
            shard = home / "train.txt"
            shard.write_text(
                "".join(
                    f"{json.dumps(str(Path(dataset.samples[i][0]).resolve()))},"
                    f"{json.dumps(dataset.classes[dataset.samples[i][1]])}\n"
                    for i in rows
                )
            )
            node_config = {
                "bundle": str(bundle.resolve()),
                "data": str(shard.resolve()),
                "state": str((home / "state").resolve()),
                **node,
            }

            def start(k: int = k, node_config: dict = node_config) -> subprocess.Popen:  # restarts this SuperNode
                return fed.supernode(superlink, node_config, f"client_{k}", tls.ca if tls else None, keys[k])

            nodes.append([start, start()])

        def restart_stopped() -> None:  # a SuperNode gives up when activation times out on a loaded machine
            for entry in nodes:
                if entry[1].poll() is not None:
                    entry[1] = entry[0]()

        _follow(
            run_dir,
            fed.submit(path),
            timeout,
            workdir / "logs",
            [workdir / "logs" / f"client_{k}.log" for k in range(clients)],
            restart_stopped,
        )


@fleet.command(epilog=HELP)
@_common
@click.option("--clients", type=int, required=True, help="Clients that must connect; all train in every round.")
@click.option(
    "--classes", "class_list", help="Comma-separated class names [default: the bundle's, else --test's folders]."
)
@click.option("--host", default="0.0.0.0", show_default=True, help="Address the SuperLink listens on.")
@click.option("--port", type=int, default=9091, show_default=True, help="The SuperLink's port (clients connect here).")
@server_security_options
def server(
    bundle, run_dir, test, clients, class_list, host, port, certificates, allow_dir, resume, insecure, **options
):
    """Run the fleet's server: a Flower SuperLink, then the FedAvg ServerApp once --clients have connected.

    TLS with --certificates (only enrolled devices may join), or plain HTTP with --insecure.
    Ends when the last round is written; --resume continues a stopped run from its last round.
    """
    from vqt_edge import manifest as mf
    from vqt_edge.fleet.launch import Federation

    _stop_on_sigterm()
    if resume:
        settings = resume_settings(run_dir, bundle)
        click.echo(f"resuming {run_dir} after round {settings.resume_from} of {settings.rounds}")
        with Federation(run_dir / FLEET_DIR) as fed:
            start_server(fed, host, port, certificates, allow_dir, insecure)
            _follow(run_dir, fed.submit(run_dir / "fleet.json"), None, run_dir / FLEET_DIR / "logs")
        return
    config = _fleet_config(options)
    classes = (
        parse_list(class_list, str, "--classes") if class_list else mf.read_manifest(bundle, verify=False).class_names
    )
    if classes is None and test is not None:
        from device_runner.data import load_dataset

        classes = load_dataset(test).classes
    if classes is None:
        raise UserError("the bundle names no classes: give --classes (or --test, whose folders name them)")
    settings = _settings(bundle, run_dir, clients, classes, config, test)
    path = _write_settings(run_dir, settings)
    with Federation(run_dir / FLEET_DIR) as fed:
        _, enrolled = start_server(fed, host, port, certificates, allow_dir, insecure)
        click.echo(
            f"SuperLink listening on {host}:{port} ({f'TLS, {enrolled} enrolled devices' if enrolled else 'insecure'}); "
            f"waiting for {clients} clients"
        )
        _follow(run_dir, fed.submit(path), None, run_dir / FLEET_DIR / "logs")


@fleet.command()
@click.option("--superlink", required=True, help="The server's address, HOST:PORT.")
@click.option("--bundle", type=click.Path(path_type=Path), required=True, help="The same bundle as the server's.")
@click.option(
    "--data", type=click.Path(path_type=Path), required=True, help="This device's training images (never sent)."
)
@click.option(
    "--state",
    type=click.Path(path_type=Path),
    required=True,
    help="Folder this client keeps between rounds: K/V cache, checkpoint, the tensors it sent.",
)
@_client_options
@client_security_options
def client(
    superlink, bundle, data, state, threads, kv, kv_dtype, memory_budget_mb, backend, root_certificate, key, insecure
) -> None:
    """Join a fleet as one device: a Flower SuperNode that trains on --data each round (until Ctrl-C).

    How many steps, the batch, the lr schedule and whether the head is calibrated are the server's
    settings, sent with every round (`fleet server --help`); this device decides only the options below.
    """
    from device_runner.data import load_dataset
    from vqt_edge import manifest as mf
    from vqt_edge.fleet.launch import Federation

    _stop_on_sigterm()
    root_certificate, key = client_security(root_certificate, key, insecure)
    manifest = mf.read_manifest(bundle, verify=True)
    if manifest.class_names is not None:
        load_dataset(data, classes=manifest.class_names)  # bad --data fails here, not in the first round
    elif not data.exists():
        raise UserError(f"data path {data} does not exist")
    state.mkdir(parents=True, exist_ok=True)
    node = {
        "bundle": str(bundle.resolve()),
        "data": str(data.resolve()),
        "state": str(state.resolve()),
        **_node_values(threads, kv, memory_budget_mb, backend, kv_dtype),
    }
    with Federation(state / "flower") as fed:
        log = state / "flower" / "logs" / "supernode.log"
        click.echo(f"connecting to {superlink} as a fleet client; logs in {log.parent}; Ctrl-C to leave")
        while True:  # Flower's SuperNode gives up when the server is away (not started, restarting): start it again
            proc = fed.supernode(superlink, node, "supernode", root_certificate, key)
            try:
                code = proc.wait()
            except KeyboardInterrupt:
                return
            reason = next((line for line in log.read_text(errors="replace").splitlines() if "[code:" in line), "")
            click.echo(
                f"the SuperNode stopped (code {code}{': ' + reason.strip() if reason else ''}); "
                f"retrying in {RECONNECT_SECONDS:.0f} s (a device the server has not enrolled is refused "
                "every time)",
                err=True,
            )
            time.sleep(RECONNECT_SECONDS)


fleet.add_command(certs)
fleet.add_command(enroll_command)
