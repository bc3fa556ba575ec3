"""Start-up checks of the entrypoints: each failure is one line saying what to fix."""

from __future__ import annotations

import os
import socket
import ssl
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from radfed.deploy.settings import ConfigError


class StartupError(ConfigError):
    """The container cannot start as configured."""


def require_file(path: Path, what: str, variable: str) -> Path:
    """``path`` must be a readable file."""
    path = Path(path)
    if not path.is_file():
        raise StartupError(f"{what} not found: {path} (set {variable})")
    if not os.access(path, os.R_OK):
        raise StartupError(f"{what} {path} is not readable by uid {os.getuid()} ({variable})")
    return path


def require_writable_dir(path: Path, what: str, variable: str) -> Path:
    """``path`` must be (or become) a folder this process can write."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise StartupError(f"{what} {path} is not writable: {exc.strerror} ({variable})") from None
    return path


def require_ca(path: Path, variable: str) -> Path:
    """``path`` must hold the study CA certificate (PEM)."""
    require_file(path, "study CA certificate", variable)
    try:
        ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        raise StartupError(f"{variable} {path} is not a PEM certificate: {exc.reason}") from None
    return Path(path)


def check_data_dir(path: Path) -> str:
    """A site's data folder must hold a manifest or a feature table; returns which."""
    from radfed.client.data import FEATURE_FILES, MANIFEST

    path = Path(path)
    if not path.is_dir():
        raise StartupError(f"data folder not found: {path} (set RADFED_DATA_DIR)")
    for name in (MANIFEST, *FEATURE_FILES):
        if (path / name).is_file():
            return name
    wanted = " or ".join((MANIFEST, *FEATURE_FILES))
    raise StartupError(f"data folder {path} has no {wanted} (RADFED_DATA_DIR)")


def check_node_key(path: Path) -> None:
    """The SuperNode key must be an OpenSSH elliptic-curve private key (Flower's format)."""
    require_file(path, "SuperNode private key", "RADFED_AUTH_KEY")
    try:
        key = load_ssh_private_key(Path(path).read_bytes(), None)
    except (ValueError, TypeError) as exc:
        key, reason = None, str(exc)
    else:
        reason = f"a {type(key).__name__}"
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise StartupError(
            f"RADFED_AUTH_KEY {path} is not an unencrypted OpenSSH EC private key ({reason}); "
            "make one with `ssh-keygen -t ecdsa -b 384 -N ''` or "
            "`python -m radfed.deploy.pki node-key`"
        )


def check_reachable(host: str, port: int, timeout: float, variable: str) -> None:
    """A TCP connection to ``host:port`` must open within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
    raise StartupError(
        f"cannot reach the coordinator at {host}:{port} within {timeout:g} s ({reason}): "
        f"check {variable} and that this host may open outbound TCP port {port}"
    )


def check_tls(host: str, port: int, ca_cert: Path, timeout: float) -> str:
    """A TLS handshake verified against the study CA; returns the server's subject."""
    context = ssl.create_default_context(cafile=str(ca_cert))
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            subject = dict(x[0] for x in tls.getpeercert().get("subject", ()))
            return str(subject.get("commonName", "?"))
    except ssl.SSLCertVerificationError as exc:
        raise StartupError(
            f"the coordinator at {host}:{port} is not trusted: {exc.verify_message} "
            f"(RADFED_CA_CERT must be the study CA, and the coordinator's certificate "
            f"must name {host!r})"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(f"TLS handshake with {host}:{port} failed: {exc}") from None
