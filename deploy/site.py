"""A hospital's container entrypoint: ``python -m radfed.deploy.site [run|check|public-key]``.

``run`` (the default) checks the configuration (see :mod:`radfed.deploy.settings`) and
then *replaces itself* with ``flower-supernode``: TLS to the coordinator verified with
the study CA, authenticated with this hospital's key, running only app bundles signed
by the study's key, and with this site's own data folder and privacy limits in its
``--node-config`` (the ClientApp reads them there; nothing the coordinator sends can
change them), with its state folder (``RADFED_SITE_STATE_DIR``: secret, pinned studies,
audit log) and the study hashes it approved (``RADFED_APPROVED_STUDIES``).

``check`` runs the same checks, including a TLS handshake with the coordinator, prints
what it found and exits. ``public-key`` prints the public key the coordinator registers.

Any problem is one ``radfed-site: error: ...`` line and exit status 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from radfed.deploy import checks
from radfed.deploy.local_federation import SiteNode, TLSFiles, flower_env, supernode_command
from radfed.deploy.settings import ConfigError, SiteSettings, site_settings

PROG = "radfed-site"
LOOPBACK = "127.0.0.1"


def site_node(settings: SiteSettings) -> SiteNode:
    """The SuperNode's ``--node-config``: this site's data, cache, state folder, approved
    studies and own limits."""
    return SiteNode(
        name=settings.name,
        data_dir=settings.data_dir,
        min_cell=settings.privacy.min_cell,
        max_param_fraction=settings.privacy.max_param_fraction,
        cache_dir=settings.feature_cache,
        jobs=settings.jobs,
        state_dir=settings.state_dir,
        approved_studies=settings.approved_studies,
        max_bootstrap=settings.max_bootstrap,
        max_classifier_rounds=settings.max_classifier_rounds,
    )


def command(settings: SiteSettings) -> list[str]:
    """The ``flower-supernode`` command line this container runs."""
    return supernode_command(
        site_node(settings),
        settings.superlink,
        LOOPBACK,
        settings.runtime_port,
        tls=TLSFiles(ca_cert=settings.ca_cert),
        extra_args=[
            "--auth-supernode-private-key", str(settings.auth_key),
            "--trusted-entities", str(settings.trusted_entities),
        ],
    )  # fmt: skip


def environment(settings: SiteSettings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = flower_env(settings.flwr_home, base)
    env["RADFED_CACHE"] = str(settings.feature_cache)
    return env


def preflight(settings: SiteSettings, report: bool = False) -> None:
    """Every start-up check, in the order a site's IT would fix them."""
    say = print if report else (lambda *_: None)
    source = checks.check_data_dir(settings.data_dir)
    say(f"{PROG}: site {settings.name}, data {settings.data_dir} ({source})")
    say(
        f"{PROG}: privacy limits min_cell={settings.privacy.min_cell}, "
        f"max_param_fraction={settings.privacy.max_param_fraction:.4g}, "
        f"bootstrap replicates up to {settings.max_bootstrap}, "
        f"classifier rounds up to {settings.max_classifier_rounds}"
    )
    checks.require_writable_dir(settings.cache_dir, "cache folder", "RADFED_CACHE_DIR")
    checks.require_writable_dir(settings.state_dir, "state folder", "RADFED_SITE_STATE_DIR")
    approved = (
        ", ".join(h[:12] for h in settings.approved_studies) or "any, pinned when first answered"
    )
    say(f"{PROG}: state and audit log in {settings.state_dir}; studies answered: {approved}")
    checks.require_ca(settings.ca_cert, "RADFED_CA_CERT")
    checks.check_node_key(settings.auth_key)
    checks.require_file(
        settings.trusted_entities, "trusted entities file", "RADFED_TRUSTED_ENTITIES"
    )
    from radfed.deploy.signing import SigningError, load_trusted

    try:
        trusted = load_trusted(settings.trusted_entities)
    except SigningError as exc:
        raise checks.StartupError(f"{exc} (RADFED_TRUSTED_ENTITIES)") from None
    say(f"{PROG}: runs only apps signed by {', '.join(sorted(trusted))}")
    host, port = settings.superlink_host_port
    checks.check_reachable(host, port, settings.connect_timeout, "RADFED_SUPERLINK")
    subject = checks.check_tls(host, port, settings.ca_cert, settings.connect_timeout)
    say(f"{PROG}: coordinator {host}:{port} reachable, TLS verified ({subject})")


def public_key(settings: SiteSettings) -> str:
    from radfed.deploy.pki import openssh_public

    checks.check_node_key(settings.auth_key)
    key = load_ssh_private_key(settings.auth_key.read_bytes(), None)
    return openssh_public(key, settings.name)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    action = args[0] if args else "run"
    if action not in ("run", "check", "public-key"):
        print("usage: python -m radfed.deploy.site [run|check|public-key]", file=sys.stderr)
        return 2
    try:
        settings = site_settings()
        if action == "public-key":
            print(public_key(settings))
            return 0
        preflight(settings, report=action == "check")
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    if action == "check":
        print(f"{PROG}: ready")
        return 0
    cmd = command(settings)
    print(f"{PROG}: starting SuperNode for {settings.name} -> {settings.superlink}", flush=True)
    os.execvpe(cmd[0], cmd, environment(settings))  # the SuperNode becomes this process
    return 0  # pragma: no cover - exec does not return


if __name__ == "__main__":
    sys.exit(main())
