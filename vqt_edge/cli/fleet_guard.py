"""The fleet's protections as command options (docs/fleet-security.md): TLS and enrollment
(`fleet certs`, `fleet enroll`, --certificates / --root-certificate / --key / --insecure), the update
checks and the aggregation rule (--aggregation, --max-examples, --max-update-norm, --min-clients),
and `fleet server --resume`.

TLS is the default everywhere: `fleet server` needs --certificates (or an explicit --insecure),
`fleet client` --root-certificate, and `fleet simulate` makes a CA, a server certificate and one key
per client under its run folder. With TLS the SuperLink also runs Flower's SuperNode authentication:
only devices whose public key is on the allow-list (`CERTS/devices/*.pub`) may join.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from vqt_edge.errors import UserError

if TYPE_CHECKING:  # cryptography is imported by the commands that make or read certificates, not at CLI start
    from vqt_edge.fleet.certs import ServerFiles

INSECURE_WARNING = (
    "warning: --insecure: fleet traffic is plain HTTP and any machine that reaches the port can read "
    "the adapter, join the fleet and send updates; use only on a network you trust"
)


def _add(command, options):
    for option in reversed(options):
        command = option(command)
    return command


def insecure_option(command):
    return click.option(
        "--insecure",
        is_flag=True,
        help="No TLS and no enrollment: plain HTTP, anyone who reaches the port may join (prints a warning).",
    )(command)


def server_security_options(command):
    return _add(
        command,
        [
            click.option(
                "--certificates",
                type=click.Path(path_type=Path, file_okay=False),
                help="Folder from `vqt-edge fleet certs`: TLS with its server certificate, and only the devices "
                "enrolled in it (devices/*.pub) may join.",
            ),
            click.option(
                "--allow",
                "allow_dir",
                type=click.Path(path_type=Path, file_okay=False),
                help="Folder of enrolled devices' public keys (*.pub) [default: CERTIFICATES/devices].",
            ),
            click.option(
                "--resume",
                is_flag=True,
                help="Continue the run in --run from its last finished round (after the server stopped).",
            ),
            insecure_option,
        ],
    )


def client_security_options(command):

    return _add(
        command,
        [
            click.option(
                "--root-certificate",
                type=click.Path(path_type=Path, dir_okay=False),
                help="The fleet's CA certificate (ca.crt from `fleet certs`): the server is verified against it.",
            ),
            click.option(
                "--key",
                type=click.Path(path_type=Path, dir_okay=False),
                help="This device's private key from `fleet enroll` (NAME.key); the server refuses devices "
                "it did not enroll.",
            ),
            insecure_option,
        ],
    )


def warn_insecure() -> None:
    click.echo(INSECURE_WARNING, err=True)


def start_server(
    fed, host: str, port: int | None, certificates: Path | None, allow_dir: Path | None, insecure: bool
) -> tuple[str, int]:
    """The SuperLink with TLS and the allow-list registered, or plain with --insecure:
    (its local address, devices enrolled)."""
    from vqt_edge.fleet.certs import DEVICES, ServerFiles, allow_list

    if insecure:
        if certificates or allow_dir:
            raise UserError("--insecure turns TLS and enrollment off: drop --certificates / --allow, or --insecure")
        warn_insecure()
        return fed.superlink(host=host, port=port), 0
    if certificates is None:
        raise UserError(
            "give --certificates DIR (from `vqt-edge fleet certs --out DIR --host THIS_SERVER`), "
            "or --insecure for plain HTTP on a trusted network"
        )
    files = ServerFiles.in_folder(certificates)
    keys = allow_list(allow_dir or certificates / DEVICES)
    if not keys:
        raise UserError(
            f"no enrolled devices in {allow_dir or certificates / DEVICES}: run "
            f"`vqt-edge fleet enroll --certificates {certificates} NAME` for each device"
        )
    superlink = fed.superlink(host=host, port=port, tls=files, auth=True)
    fed.register(keys)
    return superlink, len(keys)


def client_security(root_certificate: Path | None, key: Path | None, insecure: bool) -> tuple[Path | None, Path | None]:
    if insecure:
        if root_certificate or key:
            raise UserError("--insecure turns TLS off: drop --root-certificate / --key, or --insecure")
        warn_insecure()
        return None, None
    if root_certificate is None:
        raise UserError(
            "give --root-certificate ca.crt (the fleet's CA, from the server's `fleet certs`), "
            "or --insecure for plain HTTP on a trusted network"
        )
    for path in (root_certificate, key):
        if path is not None and not path.is_file():
            raise UserError(f"{path} does not exist")
    return root_certificate.resolve(), key.resolve() if key else None


def simulate_security(workdir: Path, clients: int, insecure: bool) -> tuple[ServerFiles | None, list[Path | None]]:
    """TLS on localhost and one enrolled key per simulated client, made fresh under the run folder."""
    from vqt_edge.fleet.certs import DEVICES, enroll, make_certificates

    if insecure:
        warn_insecure()
        return None, [None] * clients
    folder = workdir / "certs"
    files = make_certificates(folder, [])
    return files, [enroll(folder / DEVICES, f"client_{k}")[0] for k in range(clients)]


def resume_settings(run_dir: Path, bundle: Path):
    """The run's own settings with `resume_from` = its last finished round (metrics.jsonl)."""
    from dataclasses import asdict, replace

    from vqt_edge.fleet.server_app import ROUNDS, SETTINGS, FleetSettings
    from vqt_edge.run_folder import METRICS

    path = run_dir / SETTINGS
    if not path.is_file():
        raise UserError(f"--resume: {path} not found; --run must be the run folder of the stopped server")
    settings = FleetSettings(**json.loads(path.read_text()))
    if Path(settings.bundle) != bundle.resolve():
        raise UserError(f"--resume: the run federates {settings.bundle}, not {bundle.resolve()}")
    lines = (
        [json.loads(line) for line in (run_dir / METRICS).read_text().splitlines() if line.strip()]
        if (run_dir / METRICS).exists()
        else []
    )
    done = max((r["round"] for r in lines), default=0)
    while done and not (run_dir / ROUNDS / f"round_{done}.safetensors").exists():
        done -= 1
    if done >= settings.rounds:
        raise UserError(f"--resume: {run_dir} already finished all {settings.rounds} rounds")
    (run_dir / METRICS).write_text("".join(json.dumps(r) + "\n" for r in lines if r["round"] <= done))
    settings = replace(settings, resume_from=done)
    path.write_text(json.dumps(asdict(settings), indent=2) + "\n")
    return settings


@click.command()
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="New folder for the CA, the server certificate and the enrolled devices' keys.",
)
@click.option(
    "--host",
    "hosts",
    multiple=True,
    help="Name or IP address clients use to reach the server (repeatable); localhost is always added.",
)
@click.option("--devices", type=int, default=0, show_default=True, help="Also enroll this many devices (device_0 ...).")
def certs(out: Path, hosts: tuple[str, ...], devices: int) -> None:
    """Make the fleet's CA and server certificate (TLS), and optionally enroll devices."""
    from vqt_edge.fleet.certs import DEVICES, enroll, make_certificates, server_hosts

    files = make_certificates(out, list(hosts))
    click.echo(
        f"wrote {files.ca} (give to every device), {files.cert} for {', '.join(server_hosts(files.cert))}; "
        f"private keys {files.key} and {out / 'ca.key'} (mode 0600: keep on the server)"
    )
    for k in range(devices):
        _enrolled(*enroll(out / DEVICES, f"device_{k}"))


def _enrolled(key: Path, pub: Path) -> None:
    click.echo(
        f"enrolled {pub.stem}: public key {pub} (on the server's allow-list), private key {key} "
        "(mode 0600: copy to that device only, with ca.crt)"
    )


@click.command(name="enroll")
@click.option(
    "--certificates",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The fleet's folder from `fleet certs`; the key pair goes to its devices/ folder.",
)
@click.argument("names", nargs=-1, required=True)
def enroll_command(certificates: Path, names: tuple[str, ...]) -> None:
    """Make a key pair for each named device and put its public key on the server's allow-list."""
    from vqt_edge.fleet.certs import DEVICES, ServerFiles, enroll

    ServerFiles.in_folder(certificates)
    for name in names:
        _enrolled(*enroll(certificates / DEVICES, name))
