"""Signed Flower App Bundles: ``python -m radfed.deploy.signing sign|verify``.

A hospital's SuperNode runs only app bundles (FABs) signed by the study's key: it is
started with ``--trusted-entities trusted-entities.yaml`` and Flower 1.41 itself then
checks, for every run, an Ed25519 signature over ``signed_at`` (8 bytes, big-endian)
followed by the SHA-256 digest of the FAB (``flwr.supernode.start_client_internal``),
and replies with an error instead of running anything else.

Flower only attaches signatures to FABs that the SuperLink fetches from "Flower Hub"
(``flwr run @publisher/app==x.y.z``); a FAB sent with ``flwr run ./app`` carries none
and is refused. So the study signs its FAB here, offline, into an *apps folder*
(``APPS/publisher/app/VERSION.fab`` and ``VERSION.json``), and the coordinator serves
that folder to its own SuperLink in Flower Hub's place (:mod:`radfed.deploy.registry`).

Commands::

    python -m radfed.deploy.signing sign --key study-signing.key --id radfed-study \\
        --out APPS [--app deploy/flower_app]
    python -m radfed.deploy.signing verify --trusted trusted-entities.yaml APPS/.../0.1.0.fab
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519


class SigningError(Exception):
    """An app cannot be signed, found or verified."""


@dataclass(frozen=True)
class SignedApp:
    """One signed FAB in an apps folder."""

    publisher: str
    name: str
    version: str
    fab: Path

    @property
    def app_id(self) -> str:
        return f"@{self.publisher}/{self.name}"

    @property
    def spec(self) -> str:
        """What ``flwr run`` takes: ``@publisher/name==version``."""
        return f"{self.app_id}=={self.version}"

    @property
    def signatures(self) -> Path:
        return self.fab.with_suffix(".json")

    def verifications(self) -> list[dict[str, str | int]]:
        return list(json.loads(self.signatures.read_text()))


def message_to_sign(fab: bytes, signed_at: int) -> bytes:
    """Flower's signed message: ``signed_at`` as 8 big-endian bytes, then SHA-256(FAB)."""
    return signed_at.to_bytes(8, "big") + hashlib.sha256(fab).digest()


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def load_signing_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_ssh_private_key(Path(path).read_bytes(), None)
    except (OSError, ValueError) as exc:
        raise SigningError(f"cannot read the signing key {path}: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SigningError(f"{path} is not an Ed25519 key (Flower verifies Ed25519 only)")
    return key


def sign(
    fab: bytes, key: ed25519.Ed25519PrivateKey, key_id: str, signed_at: int | None = None
) -> dict[str, str | int]:
    """A verification record for ``fab``, as Flower Hub's ``fetch-fab`` returns it."""
    signed_at = int(time.time()) if signed_at is None else int(signed_at)
    signature = key.sign(message_to_sign(fab, signed_at))
    return {"public_key_id": key_id, "signature": _b64url(signature), "signed_at": signed_at}


def load_trusted(path: Path) -> dict[str, str]:
    """``trusted-entities.yaml``: key id -> OpenSSH Ed25519 public key."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SigningError(f"cannot read trusted entities {path}: {exc}") from exc
    if not isinstance(data, dict) or not data:
        raise SigningError(f"{path} must map key ids to public keys")
    return {str(k): str(v) for k, v in data.items()}


def verify(
    fab: bytes, verifications: Sequence[Mapping[str, str | int]], trusted: Mapping[str, str]
) -> str | None:
    """The id of a trusted key whose signature of ``fab`` is valid, else ``None``.

    The same rule as Flower's SuperNode, so a hospital can check a FAB by hand.
    """
    for record in verifications:
        key_id = str(record.get("public_key_id", ""))
        if key_id not in trusted:
            continue
        public = serialization.load_ssh_public_key(trusted[key_id].encode())
        if not isinstance(public, ed25519.Ed25519PublicKey):
            continue
        sig = str(record["signature"])
        signature = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
        try:
            public.verify(signature, message_to_sign(fab, int(record["signed_at"])))
        except InvalidSignature:
            continue
        return key_id
    return None


# --------------------------------------------------------------------------- apps folder


def build_fab(app_dir: Path) -> tuple[bytes, str, str, str]:
    """Build the FAB of ``app_dir``: (bytes, publisher, name, version)."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate

    config, _ = load_and_validate(Path(app_dir) / "pyproject.toml")
    if config is None:
        raise SigningError(f"{app_dir} is not a valid Flower App")
    fab = build_fab_from_disk(Path(app_dir))
    project = config["project"]
    return fab, config["tool"]["flwr"]["app"]["publisher"], project["name"], project["version"]


def app_path(apps: Path, publisher: str, name: str, version: str) -> Path:
    return Path(apps) / publisher / name / f"{version}.fab"


def write_signed_app(
    apps: Path, fab: bytes, publisher: str, name: str, version: str, record: Mapping
) -> SignedApp:
    """Store ``fab`` with its signature; a different FAB under the same version is refused
    (bump the app's version instead), another signature of the same FAB is added."""
    path = app_path(apps, publisher, name, version)
    app = SignedApp(publisher, name, version, path)
    records: list = []
    if path.exists():
        if path.read_bytes() != fab:
            raise SigningError(
                f"{path} holds a different bundle for version {version}: bump the version "
                "in the app's pyproject.toml"
            )
        records = [r for r in app.verifications() if r["public_key_id"] != record["public_key_id"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(fab)
    app.signatures.write_text(json.dumps([*records, dict(record)], indent=2) + "\n")
    return app


def find_app(apps: Path, app_id: str, version: str | None) -> SignedApp | None:
    """The signed app ``@publisher/name`` at ``version`` (default: the highest)."""
    publisher, _, name = app_id.lstrip("@").partition("/")
    versions = available_versions(apps, app_id)
    if not versions:
        return None
    chosen = version or versions[-1]
    if chosen not in versions:
        return None
    return SignedApp(publisher, name, chosen, app_path(apps, publisher, name, chosen))


def available_versions(apps: Path, app_id: str) -> list[str]:
    publisher, _, name = app_id.lstrip("@").partition("/")
    folder = Path(apps) / publisher / name
    found = [p.stem for p in folder.glob("*.fab") if p.with_suffix(".json").is_file()]
    return sorted(found, key=lambda v: tuple(int(x) for x in v.split(".") if x.isdigit()))


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    from radfed.deploy.local_federation import app_dir

    p = argparse.ArgumentParser(
        prog="python -m radfed.deploy.signing", description="Sign or verify radfed app bundles."
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("sign", help="build the Flower App and sign it into an apps folder")
    s.add_argument("--key", type=Path, required=True, help="the study's Ed25519 signing key")
    s.add_argument("--id", required=True, help="its key id in trusted-entities.yaml")
    s.add_argument("--out", type=Path, required=True, help="the apps folder")
    s.add_argument("--app", type=Path, default=None, help="app folder (default: radfed's)")
    s = sub.add_parser("verify", help="check a FAB's signature against trusted entities")
    s.add_argument("--trusted", type=Path, required=True, help="trusted-entities.yaml")
    s.add_argument("fab", type=Path)
    args = p.parse_args(argv)
    try:
        if args.command == "sign":
            fab, publisher, name, version = build_fab(args.app or app_dir())
            record = sign(fab, load_signing_key(args.key), args.id)
            app = write_signed_app(args.out, fab, publisher, name, version, record)
            print(f"{app.spec} sha256={hashlib.sha256(fab).hexdigest()} -> {app.fab}")
        else:
            app_file = Path(args.fab)
            records = json.loads(app_file.with_suffix(".json").read_text())
            key_id = verify(app_file.read_bytes(), records, load_trusted(args.trusted))
            if key_id is None:
                print(f"NOT signed by a trusted key: {app_file}")
                return 1
            print(f"signed by {key_id}: {app_file}")
    except (SigningError, OSError, ValueError) as exc:
        print(f"radfed-signing: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
