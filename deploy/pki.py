"""A study's keys and certificates: ``python -m radfed.deploy.pki COMMAND``.

Commands (every file is PEM or OpenSSH text; private keys are written mode 0600 and
never overwritten):

``ca --out DIR``
    The study CA: ``ca.crt`` (give it to every hospital) and ``ca.key`` (keep offline).
``server --ca DIR --out DIR --name superlink --host coordinator.example.org``
    A TLS server certificate signed by the study CA, ``NAME.crt`` and ``NAME.key``,
    valid for every ``--host`` (DNS name or IP address) plus ``localhost`` and
    ``127.0.0.1`` (the coordinator's own processes connect on the loopback).
``node-key --out DIR --name hospital_a``
    A hospital's SuperNode authentication key pair: ``NAME.key`` (stays at the
    hospital) and ``NAME.pub`` (sent to the coordinator, who registers it). Flower 1.41
    wants an elliptic-curve key on a NIST curve in OpenSSH format; this is P-384.
``signing-key --out DIR --id radfed-study``
    The study's app-signing key pair (Ed25519, OpenSSH format, as Flower's
    ``--trusted-entities`` requires): ``study-signing.key`` (kept by whoever approves
    the study's code) and ``trusted-entities.yaml`` (given to every hospital).
``demo --out DIR --sites a b c [--host NAME]``
    Everything above for a one-machine demo or test, in one folder.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SIGNING_KEY, SIGNING_PUB = "study-signing.key", "study-signing.pub"
TRUSTED_ENTITIES = "trusted-entities.yaml"
LOOPBACK = ("localhost", "127.0.0.1")
#: Certificates outlive a study's usual length; rotate keys as in the runbooks.
CA_DAYS, CERT_DAYS = 3650, 825

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class PKIError(Exception):
    """A key or certificate cannot be written or read."""


# --------------------------------------------------------------------------- files


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    """Write ``data``; refuse to replace an existing private key (rotation is explicit)."""
    if private and path.exists():
        raise PKIError(f"{path} exists: move it away first to make a new key")
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:
        # Created 0600 from the start, so the key is never readable by others.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
    else:
        path.write_bytes(data)
    return path


def _pem_key(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _openssh_key(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def openssh_public(key: PrivateKey, comment: str = "") -> str:
    """The OpenSSH one-line public key of ``key`` (``ecdsa-sha2-nistp384 AAAA... comment``)."""
    line = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    return (line.decode() + (f" {comment}" if comment else "")).strip()


def load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The study CA's certificate and key from ``ca_dir``."""
    try:
        cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise PKIError(f"cannot read the study CA in {ca_dir}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PKIError(f"{ca_dir / CA_KEY} is not an elliptic-curve key")
    return cert, key


# --------------------------------------------------------------------------- makers


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


_CA_USAGE = x509.KeyUsage(
    digital_signature=True, key_cert_sign=True, crl_sign=True,
    content_commitment=False, key_encipherment=False, data_encipherment=False,
    key_agreement=False, encipher_only=False, decipher_only=False,
)  # fmt: skip


def make_ca(out: Path, name: str = "radfed study CA", days: int = CA_DAYS) -> Path:
    """Write ``ca.crt`` and ``ca.key`` into ``out``; return the certificate's path."""
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write(out / CA_KEY, _pem_key(key), private=True)
    return _write(out / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_server_cert(
    ca_dir: Path, out: Path, name: str, hosts: Sequence[str] = (), days: int = CERT_DAYS
) -> Path:
    """Write ``NAME.crt``/``NAME.key``, valid for ``hosts`` plus the loopback names."""
    ca_cert, ca_key = load_ca(ca_dir)
    names = list(dict.fromkeys([*hosts, *LOOPBACK]))
    key = ec.generate_private_key(ec.SECP384R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write(out / f"{name}.key", _pem_key(key), private=True)
    return _write(out / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM))


def make_node_key(out: Path, name: str) -> Path:
    """Write a SuperNode key pair ``NAME.key``/``NAME.pub``; return the public key's path."""
    key = ec.generate_private_key(ec.SECP384R1())
    _write(out / f"{name}.key", _openssh_key(key), private=True)
    return _write(out / f"{name}.pub", (openssh_public(key, name) + "\n").encode())


def make_signing_key(out: Path, key_id: str) -> Path:
    """Write the study's Ed25519 app-signing key and ``trusted-entities.yaml``.

    The YAML maps ``key_id`` to the OpenSSH public key, the format of
    ``flower-supernode --trusted-entities``. Returns the YAML's path.
    """
    key = ed25519.Ed25519PrivateKey.generate()
    _write(out / SIGNING_KEY, _openssh_key(key), private=True)
    public = openssh_public(key)
    _write(out / SIGNING_PUB, f"{public} {key_id}\n".encode())
    return _write(out / TRUSTED_ENTITIES, f"{key_id}: '{public}'\n".encode())


def make_demo(out: Path, sites: Sequence[str], hosts: Sequence[str], key_id: str) -> Path:
    """CA, SuperLink certificate, node keys and signing key for a one-machine federation.

    Layout: ``out/ca.crt``, ``out/superlink.{crt,key}``, ``out/nodes/SITE.{key,pub}``,
    ``out/study-signing.key``, ``out/trusted-entities.yaml``.
    """
    make_ca(out)
    make_server_cert(out, out, "superlink", hosts)
    for site in sites:
        make_node_key(out / "nodes", site)
    make_signing_key(out, key_id)
    return out


# --------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m radfed.deploy.pki", description="A radfed study's keys and certificates."
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("ca", help="make the study CA")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--name", default="radfed study CA")
    s = sub.add_parser("server", help="make a TLS server certificate signed by the study CA")
    s.add_argument("--ca", type=Path, required=True, help="folder holding ca.crt and ca.key")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--name", default="superlink", help="file stem (default: superlink)")
    s.add_argument("--host", action="append", default=[], help="DNS name or IP (repeatable)")
    s = sub.add_parser("node-key", help="make a hospital's SuperNode authentication key pair")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--name", required=True, help="the site name")
    s = sub.add_parser("signing-key", help="make the study's app-signing key")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--id", default="radfed-study", help="key id in trusted-entities.yaml")
    s = sub.add_parser("demo", help="everything for a one-machine federation")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--sites", nargs="+", required=True)
    s.add_argument("--host", action="append", default=[], help="extra SuperLink name or IP")
    s.add_argument("--id", default="radfed-study")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "ca":
            print(make_ca(args.out, args.name))
        elif args.command == "server":
            print(make_server_cert(args.ca, args.out, args.name, args.host))
        elif args.command == "node-key":
            print(make_node_key(args.out, args.name))
        elif args.command == "signing-key":
            print(make_signing_key(args.out, args.id))
        else:
            print(make_demo(args.out, args.sites, args.host, args.id))
    except PKIError as exc:
        print(f"radfed-pki: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
