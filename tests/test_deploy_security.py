"""The deployment's security pieces, each checked against Flower 1.41's own code: the
study PKI, app signing (Flower's SuperNode verifier), the app registry (Flower's Hub
client), the entrypoints' configuration and start-up errors, and the site's privacy
limits, which nothing the coordinator sends can lower."""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from radfed.deploy import checks, pki
from radfed.deploy.local_federation import app_dir, free_port
from radfed.deploy.settings import ConfigError, coordinator_settings, site_settings
from radfed.deploy.signing import build_fab, load_signing_key, sign, verify, write_signed_app

# ----------------------------------------------------------------- study PKI


def test_study_pki_makes_what_flower_accepts(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    pki.make_demo(tmp_path, ["hospital_a"], hosts=["coordinator.example.org"], key_id="s")
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "superlink.crt").read_bytes())
    ca.public_key().verify(
        cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
    )
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"coordinator.example.org", "localhost"}
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]

    # Node keys: Flower's CLI registers the public key, the SuperNode loads the private one.
    assert try_load_public_key(tmp_path / "nodes" / "hospital_a.pub")
    key = load_ssh_private_key((tmp_path / "nodes" / "hospital_a.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and uses_nist_ec_curve(key.public_key())
    checks.check_node_key(tmp_path / "nodes" / "hospital_a.key")

    for private in ("ca.key", "superlink.key", "nodes/hospital_a.key", "study-signing.key"):
        assert stat.S_IMODE((tmp_path / private).stat().st_mode) == 0o600, private
    with pytest.raises(pki.PKIError, match="exists"):
        pki.make_node_key(tmp_path / "nodes", "hospital_a")  # never overwrites a key


# ----------------------------------------------------------------- signed apps


@pytest.fixture
def signed(tmp_path):
    pki.make_signing_key(tmp_path, "study")
    fab, publisher, name, version = build_fab(app_dir())
    record = sign(fab, load_signing_key(tmp_path / pki.SIGNING_KEY), "study")
    app = write_signed_app(tmp_path / "apps", fab, publisher, name, version, record)
    return tmp_path, fab, record, app


def test_flower_supernode_verifies_our_signature(signed, tmp_path):
    """Flower's own check (the one ``--trusted-entities`` enables) accepts the study's
    signature and refuses a changed bundle or another key; ours agrees."""
    from flwr.supercore.fab import Fab
    from flwr.supernode.cli.flower_supernode import _validate_public_keys_ed25519
    from flwr.supernode.start_client_internal import _verify_fab

    folder, fab, record, app = signed
    trusted = yaml.safe_load((folder / pki.TRUSTED_ENTITIES).read_text())
    _validate_public_keys_ed25519(trusted)  # Flower's start-up check of the YAML
    assert app.spec == "@radfed/radfed-app==0.1.0"

    def flower(content: bytes, rec: dict) -> bool:
        verifications = {rec["public_key_id"]: json.dumps(rec), "valid_license": "Valid"}
        return _verify_fab(Fab("h", content, verifications), trusted)

    assert flower(fab, record) and verify(fab, [record], trusted) == "study"
    changed = fab + b"\0"
    assert not flower(changed, record) and verify(changed, [record], trusted) is None
    pki.make_signing_key(tmp_path / "other", "study")  # same id, another key
    forged = sign(fab, load_signing_key(tmp_path / "other" / pki.SIGNING_KEY), "study")
    assert not flower(fab, forged) and verify(fab, [forged], trusted) is None


def test_registry_answers_flower_hub_requests(signed):
    """The SuperLink's own Hub client gets the bundle and its signatures from the registry."""
    import requests
    from flwr.supercore.utils import request_download_link
    from flwr.superlink.servicer.control.control_handlers import _format_verification

    from radfed.deploy.registry import FETCH, AppRegistry

    _, fab, record, app = signed
    registry = AppRegistry(app.fab.parents[2]).start()
    try:
        url, verifications, _ = request_download_link(
            app.app_id, app.version, registry.url + FETCH, "fab_url"
        )
        assert requests.get(url, timeout=10).content == fab
        assert verifications == [record]
        assert json.loads(_format_verification(verifications)["study"])["signature"]
        available = re.escape("Available app versions for @radfed/radfed-app: 0.1.0")
        with pytest.raises(ValueError, match=available):
            request_download_link(app.app_id, "9.9.9", registry.url + FETCH, "fab_url")
    finally:
        registry.stop()


# ----------------------------------------------------------------- configuration


def site_env(tmp_path: Path, **values: str) -> dict[str, str]:
    env = {"RADFED_SITE_NAME": "hospital_a", "RADFED_SUPERLINK": "coordinator.example.org:443"}
    env.update(values)
    return env


def test_site_privacy_limits_may_only_be_stricter(tmp_path):
    assert site_settings(site_env(tmp_path)).privacy.min_cell == 3
    assert site_settings(site_env(tmp_path, RADFED_MIN_CELL="10")).privacy.min_cell == 10
    stricter = site_settings(site_env(tmp_path, RADFED_MAX_PARAM_FRACTION="0.1"))
    assert stricter.privacy.max_param_fraction == 0.1
    with pytest.raises(ConfigError, match="RADFED_MIN_CELL=2 is below radfed's floor of 3"):
        site_settings(site_env(tmp_path, RADFED_MIN_CELL="2"))
    with pytest.raises(ConfigError, match=r"RADFED_MAX_PARAM_FRACTION=0\.5 must be in"):
        site_settings(site_env(tmp_path, RADFED_MAX_PARAM_FRACTION="0.5"))
    with pytest.raises(ConfigError, match="RADFED_SITE_NAME is not set"):
        site_settings({"RADFED_SUPERLINK": "x:1"})
    with pytest.raises(ConfigError, match="RADFED_SUPERLINK='coordinator' is not host:port"):
        site_settings(site_env(tmp_path, RADFED_SUPERLINK="coordinator"))


@pytest.mark.parametrize(
    ("variable", "attribute", "values", "bad"),
    [
        ("RADFED_MAX_BOOTSTRAP", "max_bootstrap", (("0", 0), ("50", 50), (None, 200)),
         ("-1", "1001")),
        ("RADFED_MAX_CLASSIFIER_ROUNDS", "max_classifier_rounds",
         (("0", 0), ("7", 7), (None, 20)), ("-1", "21")),
    ],
)  # fmt: skip
def test_a_sites_task_limits_reach_its_clientapp(tmp_path, variable, attribute, values, bad):
    """RADFED_MAX_BOOTSTRAP and RADFED_MAX_CLASSIFIER_ROUNDS -> ``--node-config`` ->
    Flower's parser -> the ClientApp's settings; out-of-range values are refused with
    one line."""
    from flwr.app import Context, RecordDict
    from flwr.common.config import parse_config_args

    from radfed.client.app import settings_from_node_config
    from radfed.deploy.site import command

    for value, expected in values:
        env = site_env(tmp_path) | ({variable: value} if value else {})
        cmd = command(site_settings(env))
        node_config = parse_config_args([cmd[cmd.index("--node-config") + 1]])
        context = Context(
            run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={}
        )
        assert getattr(settings_from_node_config(context), attribute) == expected
    for value in bad:
        with pytest.raises(ConfigError, match=f"{variable}={value} must be from 0"):
            site_settings(site_env(tmp_path, **{variable: value}))


def test_coordinator_cannot_lower_a_sites_limits(heart_dir):
    """The chain a deployed site runs: environment -> the entrypoint's ``--node-config``
    -> Flower's parser -> the ClientApp's settings. A study (and a run config) asking
    for ``min_cell = 1`` changes nothing: the site still refuses below its own 200."""
    from flwr.app import Context, RecordDict
    from flwr.common.config import parse_config_args

    from radfed.client.app import settings_from_node_config
    from radfed.client.site import SiteWorker
    from radfed.deploy.site import command
    from radfed.server.federation.inprocess import InProcessTransport
    from radfed.server.study.driver import FederatedStudy
    from radfed.shared.config import load_study
    from radfed.shared.errors import FederationError
    from radfed.tests.conftest import heart_study_text

    sites = ["cleveland", "hungarian", "va"]
    workers = {}
    for name in sites:
        env = site_env(heart_dir, RADFED_SITE_NAME=name, RADFED_MIN_CELL="200")
        env["RADFED_DATA_DIR"] = str(heart_dir / "sites" / name)
        env["RADFED_SITE_STATE_DIR"] = str(heart_dir / "state" / name)
        cmd = command(site_settings(env))
        node_config = parse_config_args([cmd[cmd.index("--node-config") + 1]])
        context = Context(
            run_id=1,
            node_id=1,
            node_config=node_config,
            state=RecordDict(),
            run_config={"min-cell": 1, "min_cell": 1, "max-param-fraction": 1.0},
        )
        settings = settings_from_node_config(context)
        assert settings.privacy.min_cell == 200
        assert settings.state_dir == (heart_dir / "state" / name).resolve()
        workers[name] = SiteWorker(settings)

    path = heart_dir / "study.toml"
    path.write_text(heart_study_text(sites, min_cell=1))
    study = load_study(path)
    assert study.privacy.min_cell == 1
    assert "min_cell" not in json.dumps(study.protocol())  # the limits never travel
    with pytest.raises(FederationError, match="minimum cell size 200"):
        FederatedStudy(study, InProcessTransport(workers)).run()


def test_state_folder_and_approved_studies_reach_the_client_app(heart_dir):
    """RADFED_SITE_STATE_DIR and RADFED_APPROVED_STUDIES travel environment ->
    ``--node-config`` -> the ClientApp's settings: the site keeps its audit log there
    and answers the approved study only."""
    from flwr.app import Context, RecordDict
    from flwr.common.config import parse_config_args

    from radfed.client.app import settings_from_node_config
    from radfed.client.audit_report import study_hash
    from radfed.client.site import SiteWorker
    from radfed.client.site_state import read_audit
    from radfed.deploy.site import command
    from radfed.shared.config import load_study
    from radfed.shared.messages import roundtrip
    from radfed.tests.conftest import heart_study_text

    path = heart_dir / "study.toml"
    path.write_text(heart_study_text(["cleveland", "va"]))
    approved, state = study_hash(path), heart_dir / "state" / "va"
    env = site_env(
        heart_dir,
        RADFED_SITE_NAME="va",
        RADFED_DATA_DIR=str(heart_dir / "sites" / "va"),
        RADFED_SITE_STATE_DIR=str(state),
        RADFED_APPROVED_STUDIES=f" {approved.upper()}, ",
    )
    assert site_settings(env).approved_studies == (approved,)
    cmd = command(site_settings(env))
    node_config = parse_config_args([cmd[cmd.index("--node-config") + 1]])
    context = Context(
        run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={}
    )
    settings = settings_from_node_config(context)
    assert settings.state_dir == state.resolve() and settings.approved_studies == (approved,)
    worker = SiteWorker(settings)
    protocol = load_study(path).protocol()
    assert "error" not in worker.handle(roundtrip({"task": "split", "protocol": protocol}))
    other = worker.handle(roundtrip({"task": "split", "protocol": {**protocol, "seed": 8}}))
    assert "refused by the pinned-study rule" in other["error"]
    assert [e["outcome"] for e in read_audit(state)] == ["answered", "refused"]
    assert site_settings(site_env(heart_dir)).state_dir == Path("/state")
    with pytest.raises(ConfigError, match="RADFED_APPROVED_STUDIES: 'abc' is not a study"):
        site_settings(site_env(heart_dir, RADFED_APPROVED_STUDIES="abc"))


def test_coordinator_settings_and_commands(tmp_path):
    from radfed.deploy.coordinator import command as superlink_cmd
    from radfed.deploy.site import command as supernode_cmd

    settings = coordinator_settings({"RADFED_STATE_DIR": str(tmp_path)})
    assert settings.local_address == "127.0.0.1:9093"
    cmd = superlink_cmd(settings)
    assert "--enable-supernode-auth" in cmd and "--insecure" not in cmd
    assert cmd[cmd.index("--database") + 1] == str(tmp_path / "superlink.db")
    assert cmd[cmd.index("--ssl-certfile") + 1] == "/etc/radfed/superlink.crt"
    cmd = supernode_cmd(site_settings(site_env(tmp_path)))
    assert "--insecure" not in cmd
    assert cmd[cmd.index("--root-certificates") + 1] == "/etc/radfed/ca.crt"
    assert cmd[cmd.index("--auth-supernode-private-key") + 1] == "/etc/radfed/node.key"
    assert cmd[cmd.index("--trusted-entities") + 1] == "/etc/radfed/trusted-entities.yaml"
    assert cmd[cmd.index("--superlink") + 1] == "coordinator.example.org:443"
    with pytest.raises(ConfigError, match=r"RADFED_APP='\./app' is not a signed app spec"):
        coordinator_settings({"RADFED_APP": "./app"})


# ----------------------------------------------------------------- start-up errors


def run_site(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "radfed.deploy.site"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def site_files(tmp_path):
    pki.make_demo(tmp_path / "pki", ["hospital_a"], hosts=[], key_id="s")
    data = tmp_path / "data"
    data.mkdir()
    (data / "features.csv").write_text("patient_id\n")
    return site_env(
        tmp_path,
        RADFED_DATA_DIR=str(data),
        RADFED_CACHE_DIR=str(tmp_path / "cache"),
        RADFED_CA_CERT=str(tmp_path / "pki" / "ca.crt"),
        RADFED_AUTH_KEY=str(tmp_path / "pki" / "nodes" / "hospital_a.key"),
        RADFED_TRUSTED_ENTITIES=str(tmp_path / "pki" / "trusted-entities.yaml"),
        RADFED_CONNECT_TIMEOUT="2",
    )


def closed_port() -> int:
    port = free_port()
    with socket.socket() as probe:  # nothing listens there
        assert probe.connect_ex(("127.0.0.1", port)) != 0
    return port


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"RADFED_DATA_DIR": "EMPTY"}, "has no manifest.csv or features.parquet or features.csv"),
        ({"RADFED_CA_CERT": "/nowhere/ca.crt"}, "study CA certificate not found: /nowhere/ca.crt"),
        ({"RADFED_AUTH_KEY": "CA"}, "is not an unencrypted OpenSSH EC private key"),
        ({"RADFED_CA_CERT": "KEY"}, "is not a PEM certificate: NO_CERTIFICATE_OR_CRL_FOUND"),
        ({"RADFED_SUPERLINK": "CLOSED"}, "cannot reach the coordinator at 127.0.0.1:"),
    ],
)
def test_site_startup_errors_are_one_clear_line(site_files, tmp_path, change, message):
    env = dict(site_files)
    for key, value in change.items():
        if value == "EMPTY":
            value = str(tmp_path / "empty")
            Path(value).mkdir()
        elif value == "CA":
            value = env["RADFED_CA_CERT"]
        elif value == "KEY":
            value = str(tmp_path / "pki" / "ca.key")
        elif value == "CLOSED":
            value = f"127.0.0.1:{closed_port()}"
        env[key] = value
    done = run_site(env)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("radfed-site: error: ")
    assert message in done.stderr
    assert done.stdout == ""  # the SuperNode was not started


def test_coordinator_startup_error_for_a_missing_certificate(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "radfed.deploy.coordinator", "serve"],
        env={**os.environ, "RADFED_STATE_DIR": str(tmp_path), "RADFED_CA_CERT": "/nowhere.crt"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "radfed-coordinator: error: study CA certificate not found: /nowhere.crt "
        "(set RADFED_CA_CERT)"
    )
