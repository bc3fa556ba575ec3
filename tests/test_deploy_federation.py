"""A secured federation on 127.0.0.1, started through the images' entrypoints.

The coordinator (``python -m radfed.deploy.coordinator serve``: SuperLink with TLS,
SuperNode authentication and a state database, plus the study's app registry) and three
hospitals (``python -m radfed.deploy.site``: SuperNodes with their own keys, the study
CA and the study's app-signing key) run as the containers would run them. The study is
submitted with ``coordinator submit`` as a signed app and must give the in-process
numbers; an unregistered SuperNode, a client without the study CA and an unsigned app
are refused.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from radfed.client.site import SiteSettings, SiteWorker
from radfed.deploy.local_federation import (
    ManagedProcess,
    app_dir,
    executable,
    flower_env,
    free_port,
    stop_processes,
    tail,
)
from radfed.deploy.pki import make_ca, make_demo
from radfed.deploy.signing import build_fab, load_signing_key, sign, write_signed_app
from radfed.server.federation.inprocess import InProcessTransport
from radfed.server.study.driver import FederatedStudy
from radfed.shared.config import load_study
from radfed.tests.conftest import heart_study_text
from radfed.tests.reference import assert_same_results

pytestmark = pytest.mark.slow

SITES = ["cleveland", "hungarian", "va"]
KEY_ID = "heart-study"


@dataclass
class Federation:
    """The running coordinator and sites, with what the tests need to reach them."""

    root: Path
    env: dict[str, str]
    processes: dict[str, ManagedProcess] = field(default_factory=dict)
    gateway: str | None = None

    @property
    def address(self) -> str:
        return self.env["RADFED_LISTEN"]

    def log(self, name: str) -> Path:
        return self.root / "logs" / f"{name}.log"

    def start(self, name: str, module: str, env: dict[str, str]) -> ManagedProcess:
        proc = ManagedProcess.start(
            name, [sys.executable, "-m", module], self.log(name), env, self.root
        )
        self.processes[name] = proc
        return proc

    def site_env(self, site: str, data: str | None = None, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            RADFED_SITE_NAME=site,
            RADFED_SUPERLINK=self.address,
            RADFED_DATA_DIR=str(self.root / "sites" / (data or site)),
            RADFED_CACHE_DIR=str(self.root / "cache" / site),
            RADFED_SITE_STATE_DIR=str(self.root / "state" / site),
            RADFED_CA_CERT=str(self.root / "pki" / "ca.crt"),
            RADFED_AUTH_KEY=str(self.root / "pki" / "nodes" / f"{site}.key"),
            RADFED_TRUSTED_ENTITIES=str(self.root / "pki" / "trusted-entities.yaml"),
            RADFED_RUNTIME_PORT=str(free_port()),
        )
        env.update(extra)
        return env

    def coordinator(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "radfed.deploy.coordinator", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )

    def nodes(self) -> dict[str, str]:
        done = self.coordinator("nodes")
        assert done.returncode == 0, done.stderr
        return {n["name"]: n["status"] for n in json.loads(done.stdout[done.stdout.index("[") :])}


def gateway_config(root: Path, upstream: str, port: int, ping_port: int) -> Path:
    """``deploy/gateway/nginx.conf`` with this machine's paths and ports."""
    text = (app_dir().parent / "gateway" / "nginx.conf").read_text()
    tmp = root / "gateway"
    tmp.mkdir(parents=True, exist_ok=True)
    # nginx's workers (another user when the test runs as root) write request bodies
    # over its buffer to client_body/: under pytest's 0700 folders they could not, and
    # every push of more than 16 kB failed with a 500. /tmp lets them through.
    spool = Path(tempfile.mkdtemp(prefix="radfed-gateway-"))
    spool.chmod(0o755)
    for sub in ("client_body", "proxy"):
        (spool / sub).mkdir()
        (spool / sub).chmod(0o777)
    for old, new in {
        "server coordinator:9093;": f"server {upstream};",
        "/etc/radfed/": f"{root / 'pki'}/",
        "listen 8443 ssl;": f"listen 127.0.0.1:{port} ssl;",
        "listen 127.0.0.1:8080;": f"listen 127.0.0.1:{ping_port};",
        "/tmp/nginx.pid": f"{tmp}/nginx.pid",
        "/tmp/client_body": f"{spool}/client_body",
        "/tmp/proxy": f"{spool}/proxy",
    }.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp / "nginx.conf"
    path.write_text(text)
    return path


def listening(address: str) -> bool:
    host, _, port = address.rpartition(":")
    with socket.socket() as probe:
        return probe.connect_ex((host, int(port))) == 0


def wait_for(predicate, timeout: float, what: str, federation: Federation) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            tails = "\n".join(
                f"--- {name} ---\n{tail(p.log_path)}" for name, p in federation.processes.items()
            )
            pytest.fail(f"{what} within {timeout:.0f} s\n{tails}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def federation(tmp_path_factory, shared_data) -> Iterator[Federation]:
    from radfed.experiments.heart_disease import write_sites

    root = tmp_path_factory.mktemp("secured").resolve()
    write_sites(root / "sites", shared_data / "heart_disease")
    # The coordinator's side: study CA, SuperLink certificate, the study's signing key.
    # "stranger" has a key pair but is never registered.
    make_demo(root / "pki", [*SITES, "stranger"], hosts=["coordinator"], key_id=KEY_ID)
    study = root / "study"
    (study / "nodes").mkdir(parents=True)
    for site in SITES:
        shutil.copy(root / "pki" / "nodes" / f"{site}.pub", study / "nodes")
    (study / "nodes" / "broken.pub").write_text("not a key\n")  # must not stop the others
    fab, publisher, name, version = build_fab(app_dir())
    record = sign(fab, load_signing_key(root / "pki" / "study-signing.key"), KEY_ID)
    write_signed_app(study / "apps", fab, publisher, name, version, record)
    (study / "study.toml").write_text(
        heart_study_text(SITES).replace('path = "sites/', 'path = "../sites/')
    )

    env = dict(os.environ)
    env.update(
        RADFED_LISTEN=f"127.0.0.1:{free_port()}",
        RADFED_CA_CERT=str(root / "pki" / "ca.crt"),
        RADFED_SERVER_CERT=str(root / "pki" / "superlink.crt"),
        RADFED_SERVER_KEY=str(root / "pki" / "superlink.key"),
        RADFED_STATE_DIR=str(root / "state"),
        RADFED_NODES_DIR=str(study / "nodes"),
        RADFED_APPS_DIR=str(study / "apps"),
        RADFED_STUDY=str(study / "study.toml"),
        RADFED_RUNS_DIR=str(root / "runs"),
        RADFED_SITE_TIMEOUT="60",
        RADFED_RUN_TIMEOUT="3000",
    )
    fed = Federation(root, env)
    try:
        fed.start("coordinator", "radfed.deploy.coordinator", env)
        wait_for(
            lambda: "ready;" in fed.log("coordinator").read_text(),
            90,
            "the coordinator did not register the hospitals",
            fed,
        )
        via = {}
        if shutil.which("nginx"):  # the last hospital goes through the coordinator's gateway
            fed.gateway = f"127.0.0.1:{free_port()}"
            conf = gateway_config(
                root, fed.address, int(fed.gateway.rpartition(":")[2]), free_port()
            )
            nginx = [shutil.which("nginx"), "-c", str(conf), "-p", str(conf.parent)]
            proc = ManagedProcess.start(
                "gateway", [*nginx, "-g", "daemon off;"], fed.log("gateway"), env, root
            )
            fed.processes["gateway"] = proc
            wait_for(lambda: listening(fed.gateway), 30, "nginx did not listen", fed)
            via[SITES[-1]] = {"RADFED_SUPERLINK": fed.gateway}
        for site in SITES:
            fed.start(site, "radfed.deploy.site", fed.site_env(site, **via.get(site, {})))
        wait_for(
            lambda: set(fed.nodes().items()) >= {(s, "online") for s in SITES},
            90,
            "the three authenticated SuperNodes did not come online",
            fed,
        )
        yield fed
    finally:
        stop_processes(list(fed.processes.values()))


# ----------------------------------------------------------------- refused


def test_unregistered_supernode_is_refused(federation):
    proc = federation.start(
        "stranger", "radfed.deploy.site", federation.site_env("stranger", data="switzerland")
    )
    proc.popen.wait(timeout=60)
    assert proc.popen.returncode != 0
    text = proc.log_path.read_text()
    assert "Failed to activate SuperNode" in text
    assert "stranger" not in federation.nodes()
    # A bad key file is reported and skipped; the hospitals' keys were registered.
    assert "broken.pub: not an OpenSSH public key" in federation.log("coordinator").read_text()


def test_client_without_the_study_ca_cannot_connect(federation, tmp_path):
    # The SuperNode itself, trusting only the system's CAs.
    cmd = [
        executable("flower-supernode"),
        "--superlink", federation.address,
        "--host", "127.0.0.1", "--port", str(free_port()),
        "--auth-supernode-private-key", str(federation.root / "pki/nodes/stranger.key"),
        "--node-config", "site-name='stranger' data-dir='/nonexistent'",
    ]  # fmt: skip
    proc = ManagedProcess.start(
        "no-ca", cmd, tmp_path / "no-ca.log", flower_env(tmp_path / "flwr"), tmp_path
    )
    try:
        proc.popen.wait(timeout=60)
    finally:
        stop_processes([proc], grace=3)  # and the SuperExec it started
    assert proc.popen.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in proc.log_path.read_text()

    # The site entrypoint with another CA stops before starting the SuperNode.
    make_ca(tmp_path / "other")
    env = federation.site_env("cleveland", RADFED_CA_CERT=str(tmp_path / "other" / "ca.crt"))
    done = subprocess.run(
        [sys.executable, "-m", "radfed.deploy.site"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("radfed-site: error: the coordinator at 127.0.0.1:")
    assert "is not trusted" in done.stderr


def test_unsigned_app_is_refused_by_every_site(federation):
    """``flwr run ./app`` sends the same code without the study's signature: no site runs it."""
    from radfed.deploy.coordinator import connection
    from radfed.deploy.local_federation import run_status, start_run
    from radfed.deploy.settings import coordinator_settings

    settings = coordinator_settings(federation.env)
    conn = connection(settings)
    out = federation.root / "runs" / "unsigned"
    run_config = {"study": str(settings.study), "out": str(out), "track": False}
    run_id = start_run(conn, {**run_config, "connect-timeout": 10.0}, app=app_dir())
    wait_for(
        lambda: run_status(conn, run_id).finished,
        120,
        "the unsigned run did not end",
        federation,
    )
    assert run_status(conn, run_id).status == "finished:failed"
    assert not (out / "results.json").exists()
    for site in SITES:
        assert "The FAB could not be verified" in federation.log(site).read_text(), site


def test_gateway_publishes_the_fleet_api_only(federation):
    """Through the gateway: health and the Fleet API reach the SuperLink (a hospital is
    connected through it), the Control and Runtime APIs do not."""
    import ssl
    import urllib.error
    import urllib.request

    if federation.gateway is None:
        pytest.fail("the gateway test needs nginx: apt-get install nginx (make test does)")
    context = ssl.create_default_context(cafile=str(federation.root / "pki" / "ca.crt"))

    def status(path: str, method: str = "POST") -> int:
        request = urllib.request.Request(
            f"https://{federation.gateway}{path}", data=b"" if method == "POST" else None
        )
        try:
            with urllib.request.urlopen(request, timeout=10, context=context) as answer:
                return answer.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert status("/health", "GET") == 200
    assert status("/v1/control/list-runs") == 404
    assert status("/v1/control/register-node") == 404
    assert status("/v1/runtime/pull-task-input") == 404
    assert status("/v1/fleet/pull-messages") not in (404, 502)  # reaches the SuperLink
    assert federation.nodes()[SITES[-1]] == "online"


# ----------------------------------------------------------------- the study


@pytest.mark.timeout(3600)  # the whole study over Flower's Deployment Engine
def test_signed_study_run_equals_in_process(federation):
    out = federation.root / "runs" / "heart"
    done = federation.coordinator("submit", "--no-track", "--out", str(out), timeout=3000)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == str(out / "results.json")

    results = json.loads((out / "results.json").read_text())
    assert results["transport"] == "deployment"
    assert results["federation"]["sites"] == SITES
    config = load_study(federation.env["RADFED_STUDY"])
    # The same hospitals in this process, with their own state folders: each site's
    # secret (hence its split and folds) is its own, so the comparison must use it.
    workers = {
        s.name: SiteWorker(
            SiteSettings(
                s.name, s.path, config.privacy, state_dir=federation.root / "state" / s.name
            )
        )
        for s in config.sites
    }
    in_process = FederatedStudy(config, InProcessTransport(workers)).run()
    assert_same_results(results, json.loads(json.dumps(in_process.to_dict())), tol=1e-9)
    # Every hospital ran the signed bundle from the study's registry.
    for site in SITES:
        assert "radfed-app" in federation.log(site).read_text()
