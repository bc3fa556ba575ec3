"""The coordinator's container entrypoint: ``python -m radfed.deploy.coordinator COMMAND``.

``serve`` (the default)
    Checks the configuration (see :mod:`radfed.deploy.settings`), starts the study's
    app registry on the loopback (:mod:`radfed.deploy.registry`) and ``flower-superlink``
    with TLS, SuperNode authentication and a persistent state database, registers every
    hospital key in ``RADFED_NODES_DIR``, and runs until stopped (SIGTERM/SIGINT are
    passed on to the SuperLink).
``register [KEY.pub ...]``
    Register hospital public keys (default: every ``*.pub`` in ``RADFED_NODES_DIR``);
    keys already registered are skipped. The file stem is the SuperNode's name.
``unregister SITE``
    Remove a hospital's SuperNode (its key no longer admits it): leaving a study, or the
    first half of a key rotation.
``nodes``
    The registered SuperNodes: id, name, status, key fingerprint.
``submit [--study FILE] [--out DIR] [--no-track]``
    Run the study with the signed app, wait for it to finish, print ``results.json``'s path.
``check``
    The start-up checks, and the SuperLink's health when it is running.

Inside the container, ``flwr`` also works as is: ``FLWR_HOME`` names the connection
``radfed`` (e.g. ``flwr ls``, ``flwr log RUN_ID --stream``, ``flwr supernode list``).
Any problem is one ``radfed-coordinator: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from radfed.deploy import checks
from radfed.deploy.local_federation import (
    SERVERAPP_LOG,
    Connection,
    TLSFiles,
    flower_env,
    run_config_for,
    start_run,
    stop_run,
    superlink_command,
    tail,
    wait_for_run,
)
from radfed.deploy.settings import ConfigError, CoordinatorSettings, coordinator_settings
from radfed.shared.errors import FederationError, RadfedError

PROG = "radfed-coordinator"
CONNECTION = "radfed"
STARTUP_TIMEOUT = 60.0

log = logging.getLogger(PROG)


def connection(settings: CoordinatorSettings, cli_log: Path | None = None) -> Connection:
    """The ``flwr`` CLI's connection to this SuperLink (TLS, verified with the study CA)."""
    return Connection(
        address=settings.local_address,
        flwr_home=settings.flwr_home,
        name=CONNECTION,
        root_certificates=settings.ca_cert,
        cli_log=cli_log,
    )


def command(settings: CoordinatorSettings) -> list[str]:
    """The ``flower-superlink`` command line this container runs."""
    host, port = settings.host_port
    tls = TLSFiles(settings.ca_cert, settings.server_cert, settings.server_key)
    extra = ["--enable-supernode-auth", "--database", str(settings.database)]
    return superlink_command(host, port, tls, extra)


def preflight(settings: CoordinatorSettings) -> None:
    """Certificates, key and state folder; a clear line for each problem."""
    checks.require_ca(settings.ca_cert, "RADFED_CA_CERT")
    checks.require_file(settings.server_cert, "SuperLink certificate", "RADFED_SERVER_CERT")
    checks.require_file(settings.server_key, "SuperLink private key", "RADFED_SERVER_KEY")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            settings.server_cert, settings.server_key
        )
    except (ssl.SSLError, ValueError) as exc:
        raise checks.StartupError(
            f"RADFED_SERVER_CERT and RADFED_SERVER_KEY do not make a TLS identity: {exc}"
        ) from None
    checks.require_writable_dir(settings.state_dir, "state folder", "RADFED_STATE_DIR")
    if not settings.nodes_dir.is_dir() or not any(settings.nodes_dir.glob("*.pub")):
        log.warning("no hospital keys in %s: no SuperNode can join yet", settings.nodes_dir)


def health(settings: CoordinatorSettings, timeout: float = 5.0) -> bool:
    """Whether the SuperLink answers ``GET /health`` over TLS."""
    context = ssl.create_default_context(cafile=str(settings.ca_cert))
    try:
        url = f"https://{settings.local_address}/health"
        with urllib.request.urlopen(url, timeout=timeout, context=context) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


# --------------------------------------------------------------------------- nodes


def _key_bytes(path: Path) -> bytes:
    """A public key as the SuperLink stores it (what ``flwr supernode register`` sends)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    try:
        key = load_ssh_public_key(Path(path).read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm) as exc:
        raise checks.StartupError(f"not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise checks.StartupError(f"a {type(key).__name__}, not an elliptic-curve key (P-384)")
    return public_key_to_bytes(key)


def list_nodes(settings: CoordinatorSettings) -> list[dict[str, Any]]:
    """Registered SuperNodes with their names and key fingerprints.

    ``flwr supernode list`` shows neither, so this asks the Control API with Flower's
    own client, as the CLI does.
    """
    from flwr.cli.flower_config import read_superlink_connection
    from flwr.cli.utils import init_http_client_from_connection
    from flwr.proto.control_pb2 import ListNodesRequest

    connection(settings).write_config()
    os.environ["FLWR_HOME"] = str(settings.flwr_home)
    with contextlib.redirect_stdout(sys.stderr):  # Flower prints "Using SuperLink: ..."
        client = init_http_client_from_connection(read_superlink_connection(CONNECTION))
    try:
        answer = client.ListNodes(ListNodesRequest())
    except Exception as exc:  # httpx or Flower errors: one line, not a traceback
        raise FederationError(
            f"cannot list SuperNodes at {settings.local_address}: {exc} "
            "(is the coordinator running?)"
        ) from None
    finally:
        client.close()
    return [
        {
            "node_id": int(n.node_id),
            "name": n.name,
            "status": n.status,
            "key_sha256": hashlib.sha256(n.public_key).hexdigest()[:16],
        }
        for n in answer.nodes_info
    ]


def _registered(status: str) -> bool:
    return status not in ("unregistered", "deleted")


def register(
    settings: CoordinatorSettings, keys: Sequence[Path] = ()
) -> tuple[list[str], list[str]]:
    """Register hospital keys not registered yet.

    Returns the names registered now and one line per key that could not be (a bad
    file does not stop the others, nor the SuperLink).
    """
    paths = list(keys) or sorted(settings.nodes_dir.glob("*.pub"))
    status = {n["key_sha256"]: n["status"] for n in list_nodes(settings)}
    conn = connection(settings)
    done, failed = [], []
    for path in paths:
        try:
            fingerprint = hashlib.sha256(_key_bytes(path)).hexdigest()[:16]
            if _registered(status.get(fingerprint, "deleted")):
                continue
            if fingerprint in status:
                # Flower keeps an unregistered key and refuses it ever after.
                raise FederationError(
                    "this key was unregistered and Flower does not admit it again: "
                    "the hospital must make a new key"
                )
            name = Path(path).stem
            conn.flwr_json("supernode", "register", str(path), CONNECTION, "--name", name)
        except (ConfigError, RadfedError) as exc:
            log.error("cannot register %s: %s", path, exc)
            failed.append(f"{path}: {exc}")
            continue
        log.info("registered SuperNode %s (%s)", name, path)
        done.append(name)
    return done, failed


def unregister(settings: CoordinatorSettings, name: str) -> list[int]:
    """Unregister every live SuperNode named ``name``; return their node ids."""
    ids = [
        n["node_id"] for n in list_nodes(settings) if n["name"] == name and _registered(n["status"])
    ]
    if not ids:
        raise FederationError(f"no registered SuperNode is named {name!r}")
    conn = connection(settings)
    for node_id in ids:
        conn.flwr_json("supernode", "unregister", str(node_id), CONNECTION)
    return ids


# --------------------------------------------------------------------------- serve


def serve(settings: CoordinatorSettings) -> int:
    """Registry + SuperLink until the SuperLink exits; returns its exit status."""
    from radfed.deploy.registry import AppRegistry

    preflight(settings)
    connection(settings).write_config()
    registry = AppRegistry(settings.apps_dir).start()
    env = flower_env(settings.flwr_home)
    # The SuperLink fetches signed apps from the study's registry, not Flower Hub.
    env["FLWR_SUPERGRID_API_URL"] = registry.url
    # The ServerApp's MLflow client trusts the study CA for an https:// tracking server.
    env.setdefault("MLFLOW_TRACKING_SERVER_CERT_PATH", str(settings.ca_cert))
    env["NO_PROXY"] = ",".join(filter(None, [env.get("NO_PROXY", ""), "127.0.0.1", "localhost"]))
    cmd = command(settings)
    print(f"{PROG}: starting SuperLink on {settings.listen}", flush=True)
    superlink = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)

    def forward(signum: int, _frame: object) -> None:
        superlink.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while superlink.poll() is None and not health(settings, timeout=2):
            if time.monotonic() > deadline:
                raise checks.StartupError(
                    f"the SuperLink did not answer within {STARTUP_TIMEOUT:.0f} s"
                )
            time.sleep(0.5)
        if superlink.poll() is None:
            names, _ = register(settings)
            print(f"{PROG}: ready; registered now: {', '.join(names) or 'none'}", flush=True)
        return superlink.wait()
    except BaseException:
        superlink.terminate()
        superlink.wait()
        raise
    finally:
        registry.stop()


# --------------------------------------------------------------------------- submit


def submit(
    settings: CoordinatorSettings,
    study: Path | None = None,
    out: Path | None = None,
    track: bool = True,
) -> Path:
    """Run the study with the signed app; return the path of its ``results.json``."""
    from radfed.deploy.signing import available_versions
    from radfed.shared.config import load_study

    app_id, _, version = settings.app.partition("==")
    if version not in available_versions(settings.apps_dir, app_id):
        raise checks.StartupError(
            f"RADFED_APP {settings.app} is not signed in {settings.apps_dir}: sign it with "
            "`python -m radfed.deploy.signing sign` (RADFED_APPS_DIR)"
        )
    config = load_study(study or settings.study)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    out = Path(out) if out else settings.runs_dir / f"{config.name}-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    run_config = run_config_for(config, out, track, connect_timeout=settings.site_timeout)
    conn = connection(settings, cli_log=out / "flwr-cli.log")
    conn.write_config()
    run_id = start_run(conn, run_config, app=settings.app)
    log.info("run %s of %s submitted; output in %s", run_id, settings.app, out)
    try:
        status = wait_for_run(conn, run_id, settings.run_timeout, out / SERVERAPP_LOG)
    except KeyboardInterrupt:
        stop_run(conn, run_id)  # Ctrl-C stops the run, not only this command
        raise
    if not status.succeeded:
        raise FederationError(
            f"run {run_id} ended as {status.status}: {status.details or 'no details'}\n"
            f"--- {out / SERVERAPP_LOG} ---\n{tail(out / SERVERAPP_LOG)}"
        )
    results = out / "results.json"
    if not results.is_file():
        raise FederationError(f"the run completed but wrote no {results}")
    return results


# --------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m radfed.deploy.coordinator", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = p.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the SuperLink (default)")
    s = sub.add_parser("register", help="register hospital public keys")
    s.add_argument("keys", nargs="*", type=Path)
    s = sub.add_parser("unregister", help="unregister a hospital's SuperNode")
    s.add_argument("site")
    sub.add_parser("nodes", help="list registered SuperNodes")
    s = sub.add_parser("submit", help="run the study and wait for its results")
    s.add_argument("--study", type=Path, default=None, help="default: RADFED_STUDY")
    s.add_argument("--out", type=Path, default=None, help="default: RADFED_RUNS_DIR/NAME-TIME")
    s.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    sub.add_parser("check", help="start-up checks and the SuperLink's health")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=f"{PROG}: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        settings = coordinator_settings()
        command_name = args.command or "serve"
        if command_name == "serve":
            return serve(settings)
        if command_name == "check":
            preflight(settings)
            up = health(settings)
            print(f"{PROG}: configuration ok; SuperLink {'healthy' if up else 'not running'}")
            return 0 if up else 1
        if command_name == "register":
            names, failed = register(settings, args.keys)
            print(f"registered: {', '.join(names) or 'none new'}")
            for line in failed:
                print(f"{PROG}: error: {line}", file=sys.stderr)
            return 2 if failed else 0
        elif command_name == "unregister":
            print(f"unregistered node(s) {unregister(settings, args.site)}")
        elif command_name == "nodes":
            print(json.dumps(list_nodes(settings), indent=2))
        elif command_name == "submit":
            print(submit(settings, args.study, args.out, track=not args.no_track))
    except (ConfigError, RadfedError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
