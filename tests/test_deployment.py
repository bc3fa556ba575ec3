"""The Flower Deployment Engine on this machine: SuperLink, one SuperNode per hospital,
the radfed app submitted with ``flwr run``. Its fit must equal statsmodels on the pooled
rows, and a study site without a SuperNode must fail clearly and quickly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from radfed.deploy.clientapp_runner import TASK_LINE
from radfed.deploy.local_federation import (
    LOG_DIR,
    SiteNode,
    app_dir,
    format_node_config,
    run_in_local_deployment,
    site_nodes,
    supernode_command,
)
from radfed.server.federation.inprocess import InProcessTransport
from radfed.server.study.driver import FederatedStudy
from radfed.shared.errors import FederationError
from radfed.tests.reference import (
    assert_matches_logit,
    assert_same_results,
    feature_tables,
    pooled_logit,
    pooled_training_rows,
)


def processes_using(flwr_home: Path) -> list[int]:
    """Living processes whose environment points FLWR_HOME at ``flwr_home``."""
    marker = f"FLWR_HOME={flwr_home}\0".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


# ----------------------------------------------------------------- fast checks


def test_flower_app_is_a_valid_fab():
    from flwr.cli.build import build_fab_from_disk
    from flwr.cli.config_utils import load_and_validate

    config, _warnings = load_and_validate(app_dir() / "pyproject.toml")
    app = config["tool"]["flwr"]["app"]
    assert app["publisher"] == "radfed"
    assert app["components"] == {
        "serverapp": "radfed.server.federation.server_app:app",
        "clientapp": "radfed.client.app:app",
    }
    assert app["config"] == {
        "study": "",
        "out": "",
        "track": True,
        "pooled": False,
        "connect-timeout": 120.0,
    }
    assert "flwr==1.41.0" in config["project"]["dependencies"]

    import io
    import zipfile

    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app_dir()))).namelist()
    assert sorted(n for n in names if not n.startswith(".info/")) == ["pyproject.toml"]


def test_node_config_reaches_the_client_app_unchanged(tmp_path):
    from flwr.common.config import parse_config_args

    odd = tmp_path / "Ward 7 (St. Mary's)"
    site = SiteNode("st-marys", odd, min_cell=5, max_param_fraction=1 / 3, jobs=2)
    parsed = parse_config_args([format_node_config(site.node_config())])
    assert parsed == {
        "site-name": "st-marys",
        "data-dir": str(odd.resolve()),
        "min-cell": 5,
        "max-param-fraction": 1 / 3,
        "jobs": 2,
    }


def test_supernode_command_binds_locally(heart_study):
    node = site_nodes(heart_study)[0]
    cmd = supernode_command(node, "127.0.0.1:9999", "127.0.0.1", 12345)
    assert cmd[cmd.index("--superlink") + 1] == "127.0.0.1:9999"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "--insecure" in cmd
    config = cmd[cmd.index("--node-config") + 1]
    assert f"site-name='{node.name}'" in config
    assert f"min-cell={heart_study.privacy.min_cell}" in config


# ----------------------------------------------------------------- end to end


@pytest.mark.slow
@pytest.mark.timeout(3600)  # ~60 rounds at Flower 1.41's several seconds a round
def test_deployment_engine_equals_in_process_and_statsmodels(heart_pipeline_study, tmp_path):
    """The whole pipeline over SuperLink + SuperNodes gives the in-process numbers, and
    its clinical model is statsmodels' on the pooled rows (ClientApps: radfed's runner,
    the default; Flower's own flwr-clientapp path: the next test and
    tests/test_deploy_federation.py)."""
    heart_study = heart_pipeline_study
    out, work = tmp_path / "out", tmp_path / "flwr"
    path = run_in_local_deployment(heart_study, out, track=False, timeout=3000, work_dir=work)
    assert processes_using(work.resolve() / "flwr-home") == []  # everything was stopped

    assert path == out / "results.json"
    results = json.loads(path.read_text())
    assert results["transport"] == "deployment"
    assert results["federation"]["sites"] == ["cleveland", "hungarian", "va"]

    model = results["models"]["clinical"]
    rows = pooled_training_rows(heart_study, feature_tables(heart_study))
    assert_matches_logit(model, pooled_logit(rows, heart_study.outcome, model["columns"]))
    in_process = FederatedStudy(heart_study, InProcessTransport.from_study(heart_study)).run()
    assert_same_results(results, json.loads(json.dumps(in_process.to_dict())), tol=1e-9)

    logs = out / LOG_DIR
    expected = {"superlink.log", "serverapp.log", "flwr-cli.log"}
    expected |= {f"supernode-{s}.log" for s in heart_study.site_names}
    expected |= {f"clientapp-{s}.log" for s in heart_study.site_names}
    assert expected <= {p.name for p in logs.iterdir()}
    assert TASK_LINE in (logs / "clientapp-va.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("clientapp", ["runner", "flower"])
def test_site_without_supernode_fails_within_connect_timeout(heart_study, tmp_path, clientapp):
    out, work = tmp_path / "out", tmp_path / "flwr"
    present = [n for n in site_nodes(heart_study) if n.name != "va"]
    started = time.monotonic()
    with pytest.raises(FederationError) as caught:
        run_in_local_deployment(
            heart_study,
            out,
            track=False,
            timeout=180,
            connect_timeout=20,
            sites=present,
            work_dir=work,
            clientapp=clientapp,
        )
    elapsed = time.monotonic() - started
    assert processes_using(work.resolve() / "flwr-home") == []

    message = str(caught.value)
    first = message.splitlines()[0]
    assert "finished:failed" in first
    assert "did not connect within 20 s" in first
    missing = first[first.index("site(s)") : first.index("did not connect")]
    assert "'va'" in missing
    # The tails of the ServerApp, SuperLink and SuperNode logs come with the error.
    assert "ServerApp log" in message
    assert "superlink.log ---" in message
    assert "supernode-cleveland.log ---" in message
    assert not (out / "results.json").exists()
    assert elapsed < 150, f"took {elapsed:.0f} s"
    # The present sites said hello through the chosen ClientApp path.
    logs = out / LOG_DIR
    if clientapp == "flower":
        assert "Start `flwr-clientapp` process" in (logs / "supernode-cleveland.log").read_text()
    else:
        assert TASK_LINE in (logs / "clientapp-cleveland.log").read_text()
