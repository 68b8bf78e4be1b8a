"""Flower's deployment engine as real processes: a SuperLink, SuperNodes, and `flwr run` (docs/design.md
section 12).

`fleet simulate` runs all of them on localhost; `fleet server` / `fleet client` run one side each on
real machines. The simulation engine (`flwr[simulation]`) would need Ray, hundreds of MB for what
localhost processes do as well, and it would test a different path from the one devices use.

Flower 1.42 serves every API of the SuperLink (Fleet, Control, runtime) over one HTTP port; each
SuperNode has a local runtime port for its ClientApp processes. Flower starts helpers (SuperExec,
one ClientApp process per message) as children of these processes: `Federation.close()` ends the
whole tree it started, children first, SIGTERM then SIGKILL, and nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from vqt_edge.errors import UserError
from vqt_edge.fleet.certs import ServerFiles

#: The Flower App that `flwr run` submits: the apps are the installed vqt-edge modules.
APP_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "vqt-edge-fleet"
version = "1.0.0"
description = "vqt-edge fleet adaptation (FedAvg over the trainable tensors of a vqt-edge bundle)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "vqt-edge"

[tool.flwr.app.components]
serverapp = "vqt_edge.fleet.server_app:app"
clientapp = "vqt_edge.fleet.client_app:app"

[tool.flwr.app.config]
settings = ""
"""
CONNECTION = "vqt-edge"
STOP_SECONDS = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"{Path(proc.args[0]).name} exited with code {proc.returncode}; see {log}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise UserError(f"{Path(proc.args[0]).name} did not listen on {host}:{port} within {timeout:.0f} s; see {log}")


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc), deepest last."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def node_config(values: dict[str, object]) -> str:
    """Flower's --node-config: space-separated key=value with TOML values (strings quoted)."""
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in values.items())


class Federation:
    """The processes of one fleet run; a context manager that always ends them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home = workdir / "flwr_home"  # FLWR_HOME: Flower's config and installed apps, per run
        self.procs: list[subprocess.Popen] = []
        bindir = str(Path(sys.executable).parent)  # Flower finds its helpers (flower-superexec) on PATH
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
        }

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self, name: str, args: list[str], log_name: str) -> subprocess.Popen:
        exe = Path(sys.executable).parent / name
        if not exe.exists():
            raise UserError(f"{exe} not found: install the fleet extra (pip install 'vqt-edge[fleet]')")
        log = open(self.logs / log_name, "w")
        proc = subprocess.Popen(
            [str(exe), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            cwd=self.workdir,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def superlink(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        timeout: float = 60.0,
        tls: ServerFiles | None = None,
        auth: bool = False,
    ) -> str:
        """Start the SuperLink: with TLS when `tls` is given (else plain HTTP), with SuperNode
        authentication when `auth` (Flower requires TLS for it); `register` then adds devices."""
        port = port or free_port()
        security = (
            ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
            if tls
            else ["--insecure"]
        ) + (["--enable-supernode-auth"] if auth else [])
        # Flower's in-memory state, not --database FILE: its SQLite file gave "database is locked" errors
        # that failed rounds with 9 SuperNodes on 2 cores; a stopped run is resumed from its round files.
        proc = self._start("flower-superlink", [*security, "--host", host, "--port", str(port)], "superlink.log")
        wait_for_port(
            "127.0.0.1" if host in ("0.0.0.0", "::") else host, port, timeout, proc, self.logs / "superlink.log"
        )
        self.home.mkdir(parents=True, exist_ok=True)
        trust = f'root-certificates = "{tls.ca.resolve()}"\n' if tls else "insecure = true\n"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n{trust}'
        )
        return f"127.0.0.1:{port}"

    def register(self, public_keys: list[Path]) -> None:
        """Put devices' public keys on the SuperLink's allow-list (`flwr supernode register`, all at once)."""
        exe = Path(sys.executable).parent / "flwr"
        procs = [
            subprocess.Popen(
                [str(exe), "supernode", "register", str(key), CONNECTION],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=self.env,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
            )
            for key in public_keys
        ]
        for key, proc in zip(public_keys, procs):
            out, _ = proc.communicate(timeout=300)
            if proc.returncode != 0 or "registered successfully" not in out:
                raise UserError(f"could not enroll {key.name} on the SuperLink: {out.strip()}")

    def supernode(
        self,
        superlink: str,
        config: dict[str, object],
        name: str,
        root_certificate: Path | None = None,
        key: Path | None = None,
    ) -> subprocess.Popen:
        """A SuperNode: TLS trusting `root_certificate` when given (else plain HTTP), authenticated by
        the private `key` when given."""
        security = ["--root-certificates", str(root_certificate)] if root_certificate else ["--insecure"]
        if key is not None:
            security += ["--auth-supernode-private-key", str(key)]
        return self._start(
            "flower-supernode",
            [*security, "--superlink", superlink, "--port", str(free_port()), "--node-config", node_config(config)],
            f"{name}.log",
        )

    def submit(self, settings: Path, clientapp: str = "vqt_edge.fleet.client_app:app") -> subprocess.Popen:
        """`flwr run` of vqt-edge's Flower App; streams the ServerApp's log until the run ends.
        `clientapp` is for tests only (tests/fleet_attack.py); devices run vqt_edge.fleet.client_app."""
        app = self.workdir / "app"
        app.mkdir(exist_ok=True)
        (app / "pyproject.toml").write_text(APP_PYPROJECT.replace("vqt_edge.fleet.client_app:app", clientapp))
        return self._start(
            "flwr",
            [
                "run",
                str(app),
                CONNECTION,
                "--stream",
                "--run-config",
                f"settings={json.dumps(str(settings.resolve()))}",
            ],
            "flwr_run.log",
        )

    def close(self) -> None:
        """SIGTERM to every process started here and all their descendants, SIGKILL after a grace period
        to those still alive (the same process: its start time is checked, so a reused pid is spared)."""
        pids = []
        for proc in self.procs:
            if proc.poll() is None:
                pids += [proc.pid, *_children(proc.pid)]
        pids += _adopted([proc.pid for proc in self.procs], pids)
        started = {pid: _start_time(pid) for pid in pids}
        for pid in pids:
            _signal(pid, signal.SIGTERM, started[pid])
        deadline = time.monotonic() + STOP_SECONDS
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for pid in pids:
            _signal(pid, signal.SIGKILL, started[pid])
        for proc in self.procs:
            proc.wait()
        self.procs.clear()


def _adopted(parents: list[int], known: list[int]) -> list[int]:
    """Flower helpers started with `--parent-pid P` for one of `parents` whose parent already exited
    (a SuperNode the SuperLink refused leaves its SuperExec retrying for seconds), and their children."""
    wanted = {f"--parent-pid\0{p}\0".encode() for p in parents}
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in known:
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if any(w in cmdline for w in wanted):
                out += [int(entry), *_children(int(entry))]
    return out


def _start_time(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _signal(pid: int, sig: int, started: str | None) -> None:
    if started is None or _start_time(pid) != started:
        return  # gone, or the pid now belongs to another process
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
