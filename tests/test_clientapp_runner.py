"""radfed's long-lived ClientApp runner (``radfed.deploy.clientapp_runner``) against real
SuperLink and SuperNodes (``--isolation process``) on 127.0.0.1.

A study over it gives the in-process numbers; one runner process per site answers every
message of its site (no ``flwr-clientapp`` process is started); a ClientApp that raises
gets Flower's error reply to the coordinator and the runner serves the next message.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from radfed.deploy.clientapp_runner import TASK_LINE
from radfed.deploy.local_federation import (
    LOG_DIR,
    LocalFederation,
    SiteNode,
    clientapp_mode,
    free_port,
    run_in_local_deployment,
    submit_run,
    supernode_command,
)
from radfed.experiments.heart_disease import write_sites
from radfed.server.federation.inprocess import InProcessTransport
from radfed.server.study.driver import FederatedStudy
from radfed.shared.config import StudyConfig, load_study
from radfed.shared.errors import FederationError
from radfed.tests.conftest import heart_study_text
from radfed.tests.reference import assert_same_results

SITES = ["cleveland", "hungarian", "va"]
_TASK = re.compile(re.escape(TASK_LINE) + r" pid=(\d+) task=\d+ status=(\w+)")


def runner_tasks(log: Path) -> list[tuple[int, str]]:
    """(pid, status) of every task a runner's log reports, in order."""
    return [(int(m[1]), m[2]) for m in _TASK.finditer(log.read_text(errors="replace"))]


# ----------------------------------------------------------------- fast checks


def test_clientapp_mode_is_checked(monkeypatch):
    monkeypatch.delenv("RADFED_CLIENTAPP", raising=False)
    assert clientapp_mode() == "runner"
    assert clientapp_mode("flower") == "flower"
    monkeypatch.setenv("RADFED_CLIENTAPP", "flower")
    assert clientapp_mode() == "flower"
    monkeypatch.setenv("RADFED_CLIENTAPP", "threads")
    with pytest.raises(FederationError, match="RADFED_CLIENTAPP must be one of runner, flower"):
        clientapp_mode()
    with pytest.raises(FederationError, match="clientapp must be one of"):
        clientapp_mode("process")


def test_supernode_isolation_follows_the_clientapp_mode(tmp_path):
    site = SiteNode("a", tmp_path)
    for mode, isolation in {"flower": "subprocess", "runner": "process"}.items():
        cmd = supernode_command(site, "127.0.0.1:1", "127.0.0.1", 2, clientapp=mode)
        assert cmd[cmd.index("--isolation") + 1] == isolation


def _runner(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "radfed.deploy.clientapp_runner", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_runner_exits_with_one_line_when_the_supernode_is_gone():
    done = _runner(
        "--runtime-api-address", f"127.0.0.1:{free_port()}", "--insecure",
        "--reconnect-timeout", "1",
    )  # fmt: skip
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("clientapp_runner: the SuperNode's Runtime API at 127.0.0.1:")
    assert "has not answered for 1 s" in last


def test_runner_exits_when_its_parent_is_gone():
    parent = subprocess.Popen([sys.executable, "-c", "pass"])
    parent.wait()  # reaped: the pid is gone
    done = _runner(
        "--runtime-api-address", f"127.0.0.1:{free_port()}", "--insecure",
        "--parent-pid", str(parent.pid),
    )  # fmt: skip
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"clientapp_runner: the parent process {parent.pid} is gone; exiting"


def test_runner_arguments_are_checked():
    done = _runner("--runtime-api-address", "127.0.0.1:1")
    assert done.returncode == 2
    assert "give --insecure or --root-certificates" in done.stderr


# ----------------------------------------------------------------- end to end


@dataclass
class RunnerRun:
    config: StudyConfig
    results: dict
    logs: Path


@pytest.fixture(scope="module")
def runner_run(tmp_path_factory: pytest.TempPathFactory, shared_data: Path) -> RunnerRun:
    """The heart-disease study once over the Deployment Engine with the runner."""
    root = tmp_path_factory.mktemp("runner")
    write_sites(root / "sites", shared_data / "heart_disease")
    (root / "study.toml").write_text(heart_study_text(SITES))
    config = load_study(root / "study.toml")
    out = root / "out"
    path = run_in_local_deployment(
        config, out, track=False, timeout=1800, work_dir=root / "flwr", clientapp="runner"
    )
    return RunnerRun(config, json.loads(path.read_text()), out / LOG_DIR)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_runner_gives_the_in_process_numbers(runner_run):
    results = runner_run.results
    assert results["transport"] == "deployment"
    assert results["federation"]["sites"] == SITES
    in_process = FederatedStudy(
        runner_run.config, InProcessTransport.from_study(runner_run.config)
    ).run()
    assert_same_results(results, json.loads(json.dumps(in_process.to_dict())), tol=1e-9)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_one_runner_process_answers_every_message_of_its_site(runner_run):
    for site in SITES:
        supernode = (runner_run.logs / f"supernode-{site}.log").read_text(errors="replace")
        assert "--isolation process" in supernode.splitlines()[0]
        # No SuperExec, hence no flwr-clientapp process (each logs this when it starts).
        assert "Starting Flower SuperExec" not in supernode
        assert "Start `flwr-clientapp` process" not in supernode
        tasks = runner_tasks(runner_run.logs / f"clientapp-{site}.log")
        assert len(tasks) > 1
        assert len({pid for pid, _ in tasks}) == 1, tasks  # one process served them all
        assert {status for _, status in tasks} == {"completed"}


# A ServerApp that sends one site a malformed request (a JSON field that is not JSON:
# radfed's ClientApp raises while decoding it), then a hello, twice.
PROBE_SERVER_APP = """
import json
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from radfed.shared.messages import from_record, to_record

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    deadline = time.monotonic() + 120
    nodes = list(grid.get_node_ids())
    while not nodes and time.monotonic() < deadline:
        time.sleep(0.5)
        nodes = list(grid.get_node_ids())
    bad = RecordDict({"config": ConfigRecord({"json:task": "{not json"})})
    answers = []
    for content in (bad, to_record({"task": "hello"}), bad, to_record({"task": "hello"})):
        message = Message(content, dst_node_id=nodes[0], message_type="query")
        [reply] = grid.send_and_receive([message], timeout=120)
        if reply.has_error():
            answers.append({"code": reply.error.code, "reason": reply.error.reason})
        else:
            answers.append({"reply": from_record(reply.content)})
    Path(str(context.run_config["out"])).write_text(json.dumps(answers))
"""

PROBE_PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "radfed-probe"
version = "0.1.0"
description = "radfed test: a ClientApp that raises"
license = "Apache-2.0"
dependencies = ["flwr==1.41.0", "radfed"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "radfed"

[tool.flwr.app.components]
serverapp = "radfed_probe:app"
clientapp = "radfed.client.app:app"

[tool.flwr.app.config]
out = ""
"""


@pytest.fixture
def probe_app(tmp_path: Path) -> Iterator[Path]:
    app = tmp_path / "probe-app"
    app.mkdir()
    (app / "pyproject.toml").write_text(PROBE_PYPROJECT)
    (app / "radfed_probe.py").write_text(PROBE_SERVER_APP)
    yield app


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_raising_clientapp_gets_an_error_reply_and_the_runner_carries_on(
    heart_dir, probe_app, tmp_path
):
    from flwr.common.constant import ErrorCode

    site = SiteNode("cleveland", heart_dir / "sites" / "cleveland")
    answers = tmp_path / "answers.json"
    with LocalFederation([site], tmp_path / "flwr", clientapp="runner") as federation:
        submit_run(
            federation.connection,
            {"out": str(answers)},
            log_path=federation.log_dir / "serverapp.log",
            timeout=600,
            app=probe_app,
            check_alive=federation.check_alive,  # the runner must not die
            diagnostics=federation.log_tails,
        )
        runner = federation.runners["cleveland"]
        assert runner.running()
        pid = runner.pid
        log = federation.runner_log("cleveland")
    bad, good, bad_again, good_again = json.loads(answers.read_text())
    for error in (bad, bad_again):
        assert error["code"] == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        assert "JSONDecodeError" in error["reason"]
    assert good == good_again == {"reply": {"site": "cleveland"}}
    assert runner_tasks(log) == [
        (pid, "failed"),
        (pid, "completed"),
        (pid, "failed"),
        (pid, "completed"),
    ]
