"""The fleet's keys: a CA and a server certificate for Flower's TLS, and one key pair per device for
Flower's SuperNode authentication (docs/fleet-security.md).

Everything is made in Python with `cryptography` (a dependency of flwr itself), never by shelling out
to openssl. Formats are the ones flwr 1.42 reads: PEM certificates and a PKCS#8 server key for
`flower-superlink --ssl-*`; OpenSSH ECDSA keys on a NIST curve for `flower-supernode
--auth-supernode-private-key` and `flwr supernode register` (which refuses other curves and types).
Private keys are created with mode 0600 (opened that way, not chmod-ed after writing) and their
contents are never printed.

Layout of a certificates folder (`vqt-edge fleet certs --out DIR`):
  ca.crt, ca.key          the fleet's own CA (ca.crt goes to every device; ca.key stays on the server)
  server.pem, server.key  the SuperLink's certificate, with every --host as a SAN
  devices/NAME.key, .pub  one key pair per enrolled device; the server's allow-list is devices/*.pub
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vqt_edge.errors import UserError

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, DEVICES = "ca.crt", "ca.key", "server.pem", "server.key", "devices"
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")  # always in the server certificate: the server's own helpers use them
VALID_DAYS = 825  # the longest validity current TLS clients accept for a leaf certificate
CURVE = ec.SECP384R1  # Flower's own example uses P-384 for SuperNode keys; used for the certificates too


@dataclass(frozen=True)
class ServerFiles:
    """What `flower-superlink --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile` takes."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_folder(cls, folder: Path) -> ServerFiles:
        files = cls(folder / CA_CERT, folder / SERVER_CERT, folder / SERVER_KEY)
        missing = [p.name for p in (files.ca, files.cert, files.key) if not p.is_file()]
        if missing:
            raise UserError(
                f"--certificates {folder}: missing {', '.join(missing)}; make them with "
                "`vqt-edge fleet certs --out DIR --host SERVER_NAME`"
            )
        return files


def write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only: created 0600, so it is never briefly world-readable."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vqt-edge fleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        if not host or any(c.isspace() or c in "/:@" for c in host):
            raise UserError(f"--host {host!r}: give a host name or an IP address") from None
        return x509.DNSName(host)


def make_certificates(out: Path, hosts: list[str], days: int = VALID_DAYS) -> ServerFiles:
    """A new CA and a server certificate it signs, valid for `hosts` plus localhost. Refuses to
    overwrite an existing CA: devices trust it, and a new one would lock them all out."""
    if (out / CA_CERT).exists():
        raise UserError(
            f"{out / CA_CERT} exists: this folder already has a fleet CA (devices trust it); choose another --out"
        )
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(CURVE())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("vqt-edge fleet CA"))
        .issuer_name(_name("vqt-edge fleet CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    names = list(dict.fromkeys([*hosts, *LOCAL_HOSTS]))
    server_key = ec.generate_private_key(CURVE())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    out.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    pkcs8 = dict(
        encoding=pem, format=serialization.PrivateFormat.PKCS8, encryption_algorithm=serialization.NoEncryption()
    )
    write_private(out / CA_KEY, ca_key.private_bytes(**pkcs8))
    write_private(out / SERVER_KEY, server_key.private_bytes(**pkcs8))
    (out / CA_CERT).write_bytes(ca_cert.public_bytes(pem))
    (out / SERVER_CERT).write_bytes(server_cert.public_bytes(pem))
    return ServerFiles(out / CA_CERT, out / SERVER_CERT, out / SERVER_KEY)


def server_hosts(cert: Path) -> list[str]:
    """The SANs of a server certificate, as text."""
    c = x509.load_pem_x509_certificate(cert.read_bytes())
    san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in (*san.get_values_for_type(x509.DNSName), *san.get_values_for_type(x509.IPAddress))]


def enroll(devices: Path, name: str) -> tuple[Path, Path]:
    """A key pair for one device: (private key, public key), OpenSSH ECDSA P-384. The public key goes
    on the server's allow-list (`devices/NAME.pub`), the private key to the device only."""
    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise UserError(f"device name {name!r}: use letters, digits, '-', '_' and '.'")
    key_path, pub_path = devices / f"{name}.key", devices / f"{name}.pub"
    if pub_path.exists():
        raise UserError(f"{pub_path} exists: device {name!r} is already enrolled")
    key = ec.generate_private_key(CURVE())
    write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    pub_path.write_bytes(pub + f" vqt-edge-device-{name}\n".encode())
    return key_path, pub_path


def allow_list(folder: Path) -> list[Path]:
    """The public keys of the enrolled devices (every `*.pub` in the folder), each checked to be one
    Flower accepts, so a bad file fails here with its name rather than inside Flower."""
    keys = sorted(folder.glob("*.pub")) if folder.is_dir() else []
    for path in keys:
        try:
            key = serialization.load_ssh_public_key(path.read_bytes())
        except (ValueError, TypeError) as e:
            raise UserError(f"{path}: not an OpenSSH public key ({e})") from None
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise UserError(f"{path}: Flower's SuperNode authentication needs an ECDSA key")
    return keys
