"""Run a study in Flower's Deployment Engine, on this machine.

:func:`run_in_local_deployment` is the one-call path (``radfed run --transport
deployment``): it starts a SuperLink and one SuperNode per study site on 127.0.0.1,
submits the radfed Flower App (``deploy/flower_app``) with ``flwr run``, waits for the
run to finish and returns the ``results.json`` the ServerApp wrote.

The pieces are public so that secured and containerised deployments can reuse them:

* :class:`SiteNode` and :func:`site_nodes`: what each SuperNode is started with
  (``--node-config``, read by :mod:`radfed.client.app`).
* :func:`superlink_command` / :func:`supernode_command`: the command lines.
* :class:`LocalFederation`: a context manager that starts the SuperLink and SuperNodes
  as process groups, writes a private Flower configuration (``FLWR_HOME``) and always
  stops everything it started.
* :class:`Connection` and :func:`submit_run`: submit the app to a SuperLink with the
  ``flwr`` CLI and wait for its final status.

What Flower 1.41 does (checked against the installed sources):

* ``flower-superlink`` serves the Fleet, Control and Runtime APIs over HTTP on one
  address, ``--host``/``--port`` (default 127.0.0.1:8000). With the default
  ``--isolation subprocess`` it starts a ``flower-superexec`` that launches one
  ``flwr-serverapp`` process per run. Runtime dependency installation (``uv sync`` of
  the app's dependencies) is on by default for the SuperLink; radfed turns it off
  (``--disable-runtime-dependency-installation``) because radfed is already installed.
* ``flower-supernode --superlink HOST:PORT`` connects to that address; it serves its own
  Runtime API on ``--host``/``--port`` (default 127.0.0.1:9094, so every local
  SuperNode needs its own port) and, with the default ``--isolation subprocess``,
  starts a ``flower-superexec`` that launches one ``flwr-clientapp`` process per
  message. With ``--isolation process`` it starts nothing: an external process serves
  its Runtime API. A local federation uses that by default (``clientapp="runner"``,
  below).
* ``flwr run APP CONNECTION`` names a SuperLink *connection* of the Flower
  configuration file ``$FLWR_HOME/config.toml`` (``[superlink.NAME]`` with ``address``
  and ``insecure`` or ``root-certificates``); run config overrides are given with
  ``--run-config`` (here a TOML file, so any path quotes correctly).

ClientApps: ``clientapp="runner"`` (the default of :class:`LocalFederation` and
:func:`run_in_local_deployment`; else the environment variable ``RADFED_CLIENTAPP``)
starts each SuperNode with ``--isolation process`` beside one long-lived
:mod:`radfed.deploy.clientapp_runner` process that answers every message of that site
in-process, instead of a fresh ``flwr-clientapp`` process per message
(``clientapp="flower"``, Flower's own path; docs/performance.md).

TLS: pass :class:`TLSFiles` to :class:`LocalFederation`. SuperNode authentication and
other flags can be added with ``superlink_args``/``supernode_args`` (or per site with
:attr:`SiteNode.extra_args`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import tomli_w

from radfed.shared.config import StudyConfig
from radfed.shared.errors import FederationError, StudyConfigError
from radfed.shared.messages import PROGRESS

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
CONNECTION_NAME = "radfed-local"
LOG_DIR = "deployment-logs"
RESULTS = "results.json"
SERVERAPP_LOG = "serverapp.log"
SUPERLINK_LOG = "superlink.log"
CLI_LOG = "flwr-cli.log"
#: How SuperNodes run their ClientApps: radfed's long-lived runner, or Flower's own
#: ``flwr-clientapp`` process per message.
CLIENTAPP_MODES = ("runner", "flower")
#: Environment variable choosing the default ClientApp mode of local federations.
CLIENTAPP_ENV = "RADFED_CLIENTAPP"
TAIL_LINES = 25
#: Finished statuses reported by ``flwr ls`` (``finished:completed`` is success).
COMPLETED = "finished:completed"


def app_dir() -> Path:
    """The radfed Flower App folder (``deploy/flower_app``, holding its pyproject.toml)."""
    import radfed.deploy

    return Path(radfed.deploy.__file__).resolve().parent / "flower_app"


def clientapp_mode(value: str | None = None) -> str:
    """``value`` (else ``$RADFED_CLIENTAPP``, else ``"runner"``), checked."""
    mode = (value if value is not None else os.environ.get(CLIENTAPP_ENV, "")).strip()
    mode = mode or "runner"
    if mode not in CLIENTAPP_MODES:
        source = "clientapp" if value is not None else CLIENTAPP_ENV
        raise FederationError(f"{source} must be one of {', '.join(CLIENTAPP_MODES)}, not {mode!r}")
    return mode


# --------------------------------------------------------------------------- sites


@dataclass(frozen=True)
class SiteNode:
    """One hospital's SuperNode: its site name, data and own privacy limits.

    ``node_config()`` gives the ``--node-config`` keys read by :mod:`radfed.client.app`.
    ``extra_args`` are appended to this SuperNode's command line (e.g. its
    authentication key).
    """

    name: str
    data_dir: Path
    min_cell: int | None = None
    max_param_fraction: float | None = None
    cache_dir: Path | None = None
    jobs: int | None = None
    extra_args: tuple[str, ...] = ()
    #: The site's state folder (secret, pinned studies, audit log); default: the
    #: ClientApp's own (radfed.client.site_state.default_state_dir).
    state_dir: Path | None = None
    #: Protocol hashes the site approved in advance; empty: any study, pinned when first
    #: answered.
    approved_studies: tuple[str, ...] = ()
    #: The highest bootstrap replicate the site answers (None: the ClientApp's default).
    max_bootstrap: int | None = None
    #: The most classifier-comparison rounds the site answers (None: the default).
    max_classifier_rounds: int | None = None

    def node_config(self) -> dict[str, str | int | float]:
        values: dict[str, str | int | float] = {
            "site-name": self.name,
            "data-dir": str(Path(self.data_dir).resolve()),
        }
        if self.min_cell is not None:
            values["min-cell"] = int(self.min_cell)
        if self.max_param_fraction is not None:
            values["max-param-fraction"] = float(self.max_param_fraction)
        if self.cache_dir is not None:
            values["cache-dir"] = str(Path(self.cache_dir).resolve())
        if self.jobs is not None:
            values["jobs"] = int(self.jobs)
        if self.state_dir is not None:
            values["state-dir"] = str(Path(self.state_dir).resolve())
        if self.approved_studies:
            values["approved-studies"] = ",".join(self.approved_studies)
        if self.max_bootstrap is not None:
            values["max-bootstrap"] = int(self.max_bootstrap)
        if self.max_classifier_rounds is not None:
            values["max-classifier-rounds"] = int(self.max_classifier_rounds)
        return values


def site_nodes(config: StudyConfig) -> list[SiteNode]:
    """One SuperNode per study site, with the study's privacy rules as the site's own."""
    return [
        SiteNode(
            name=site.name,
            data_dir=Path(site.path),
            min_cell=config.privacy.min_cell,
            max_param_fraction=config.privacy.max_param_fraction,
        )
        for site in config.sites
    ]


def format_node_config(values: Mapping[str, str | int | float | bool]) -> str:
    """``--node-config`` text: ``key='string' key=3 key=0.5 key=true``.

    Strings are TOML literal strings (single quotes, no escapes); a string holding a
    single quote is written as a basic string instead. Flower's parser cannot read a
    string holding both quote characters (or a backslash with a single quote).
    """
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        elif "'" not in value:
            text = f"'{value}'"
        elif '"' not in value and "\\" not in value:
            text = f'"{value}"'
        else:
            raise FederationError(
                f"node-config value for {key!r} cannot be quoted for Flower: {value!r}"
            )
        parts.append(f"{key}={text}")
    return " ".join(parts)


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class TLSFiles:
    """PEM files of a TLS-secured SuperLink.

    ``server_cert`` must name the SuperLink's address (for a local federation: the IP
    SAN 127.0.0.1). SuperNodes and the ``flwr`` CLI verify it with ``ca_cert``, and
    need nothing else (a SuperNode's ``TLSFiles`` may leave the server files out).
    """

    ca_cert: Path
    server_cert: Path | None = None
    server_key: Path | None = None


def executable(name: str) -> str:
    """A Flower command from this interpreter's environment (else from ``PATH``)."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FederationError(f"cannot find the Flower command {name!r}: is flwr installed?")
    return found


def superlink_command(
    host: str,
    port: int,
    tls: TLSFiles | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """``flower-superlink`` serving Fleet, Control and Runtime APIs on ``host:port``.

    The ServerApp runs in a ``flwr-serverapp`` subprocess (``--isolation subprocess``)
    with the app's dependencies taken from the installed environment.
    """
    cmd = [executable("flower-superlink"), "--host", host, "--port", str(port)]
    cmd += ["--isolation", "subprocess", "--disable-runtime-dependency-installation"]
    if tls is None:
        cmd += ["--insecure"]
    else:
        if tls.server_cert is None or tls.server_key is None:
            raise FederationError("a TLS SuperLink needs its server certificate and key")
        cmd += [
            "--ssl-ca-certfile", str(tls.ca_cert),
            "--ssl-certfile", str(tls.server_cert),
            "--ssl-keyfile", str(tls.server_key),
        ]  # fmt: skip
    return cmd + list(extra_args)


def supernode_command(
    site: SiteNode,
    superlink: str,
    host: str,
    port: int,
    tls: TLSFiles | None = None,
    extra_args: Sequence[str] = (),
    clientapp: str = "flower",
) -> list[str]:
    """``flower-supernode`` for ``site``, connecting to the SuperLink at ``superlink``.

    ``host:port`` is the SuperNode's own Runtime API (used by its ``flwr-clientapp``
    processes, or by the runner); every SuperNode on one machine needs its own port.
    ``clientapp="flower"``: ``--isolation subprocess`` (a ``flwr-clientapp`` process per
    message); ``"runner"``: ``--isolation process``, to be served by
    :func:`runner_command`.
    """
    isolation = {"flower": "subprocess", "runner": "process"}[clientapp_mode(clientapp)]
    cmd = [
        executable("flower-supernode"),
        "--superlink",
        superlink,
        "--host",
        host,
        "--port",
        str(port),
    ]
    cmd += ["--isolation", isolation, "--node-config", format_node_config(site.node_config())]
    if tls is None:
        cmd += ["--insecure"]
    else:
        cmd += ["--root-certificates", str(tls.ca_cert)]
    return cmd + list(extra_args) + list(site.extra_args)


def runner_command(runtime_api: str, parent_pid: int | None = None) -> list[str]:
    """The radfed ClientApp runner serving a SuperNode's Runtime API at ``runtime_api``.

    The Runtime API of a local SuperNode is plain HTTP on 127.0.0.1; with ``parent_pid``
    (the SuperNode) the runner exits when the SuperNode is gone.
    """
    cmd = [sys.executable, "-m", "radfed.deploy.clientapp_runner"]
    cmd += ["--runtime-api-address", runtime_api, "--insecure"]
    if parent_pid is not None:
        cmd += ["--parent-pid", str(parent_pid)]
    return cmd


def free_port(host: str = HOST) -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def flower_env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: a private ``FLWR_HOME``, no network calls home."""
    env = dict(os.environ if base is None else base)
    bin_dir = str(Path(sys.executable).parent)
    # SuperLink and SuperNodes start flower-superexec, flwr-serverapp, ... by name.
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    # Many small Python processes share the machine: keep numerical libraries
    # single-threaded, and (clientapp="flower") let SuperExec look for new tasks more
    # often than once a second.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, "1")
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.25")
    return env


# --------------------------------------------------------------------------- processes

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_NOISE = ("uvicorn.access", '"POST /v1/', '"GET /v1/')


def tail(path: Path, lines: int = TAIL_LINES) -> str:
    """The last ``lines`` meaningful lines of a log file (colours and HTTP access lines removed)."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    kept = []
    for line in _ANSI.sub("", text).splitlines():
        stripped = line.strip()
        if not stripped or stripped in {"INFO :", "INFO:"} or any(n in line for n in _NOISE):
            continue
        kept.append(line.rstrip())
    return "\n".join(kept[-lines:]) or "(empty)"


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time) of every process (Linux ``/proc``; else empty)."""
    table: dict[int, tuple[int, int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return table
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 19:
            table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def descendant_pids(pid: int) -> dict[int, int]:
    """Every living descendant of ``pid`` as ``{pid: start time}`` (Linux only)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    found: dict[int, int] = {}
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        if child not in found:
            found[child] = table[child][1]
            todo.extend(children.get(child, []))
    return found


def _start_time(pid: int) -> int | None:
    """Start time of a living (not zombie) process, in clock ticks since boot."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    if len(fields) < 20 or fields[0] == "Z":
        return None
    return int(fields[19])


def alive_pids(pids: Mapping[int, int]) -> list[int]:
    """Those of ``{pid: start time}`` still running (a reused pid does not count)."""
    return [pid for pid, start in pids.items() if _start_time(pid) == start]


def _alive(pid: int, start: int) -> bool:
    return _start_time(pid) == start


@dataclass
class ManagedProcess:
    """A process started in its own process group, with its output in a log file."""

    name: str
    cmd: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes]
    _log: IO[bytes]
    descendants: dict[int, int] = field(default_factory=dict)
    start_time: int = -1

    @classmethod
    def start(
        cls, name: str, cmd: list[str], log_path: Path, env: Mapping[str, str], cwd: Path
    ) -> ManagedProcess:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = log_path.open("ab")
        out.write(("$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        try:
            popen = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env),
                cwd=str(cwd),
                start_new_session=True,  # its own process group: stopped as a whole
            )
        except BaseException:
            out.close()
            raise
        log.debug("started %s (pid %s): %s", name, popen.pid, " ".join(cmd))
        return cls(name, cmd, log_path, popen, out, start_time=_start_time(popen.pid) or -1)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def remember_descendants(self) -> None:
        """Note the processes this one started (some start their own sessions)."""
        if self.running():
            self.descendants.update(descendant_pids(self.pid))

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def close_log(self) -> None:
        if not self._log.closed:
            self._log.close()


def stop_processes(processes: Sequence[ManagedProcess], grace: float = 10.0) -> None:
    """SIGTERM every process group, SIGKILL what is left after ``grace`` seconds, then
    end their remaining descendants (e.g. SuperExec, in its own session)."""
    for proc in processes:
        proc.remember_descendants()
    for proc in processes:
        if proc.running():
            proc.signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in processes:
        try:
            proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning(
                "%s (pid %s) did not stop within %.0f s: killing it", proc.name, proc.pid, grace
            )
        proc.signal_group(signal.SIGKILL)  # anything left in the group
        try:
            proc.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - unkillable
            log.error("%s (pid %s) survived SIGKILL", proc.name, proc.pid)
    # Descendants outside the groups: give them a moment to follow their parents.
    leftovers = {pid: start for proc in processes for pid, start in proc.descendants.items()}
    deadline = time.monotonic() + 3.0
    while any(_alive(p, s) for p, s in leftovers.items()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid, start in leftovers.items():
        if _alive(pid, start):
            log.debug("killing leftover process %s", pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for proc in processes:
        proc.close_log()


# --------------------------------------------------------------------------- connection


@dataclass(frozen=True)
class Connection:
    """A SuperLink connection for the ``flwr`` CLI, kept in a private ``FLWR_HOME``.

    ``flwr run APP NAME`` looks ``NAME`` up in ``$FLWR_HOME/config.toml``.
    """

    address: str
    flwr_home: Path
    name: str = CONNECTION_NAME
    root_certificates: Path | None = None
    cli_log: Path | None = None

    def write_config(self) -> Path:
        """Write ``$FLWR_HOME/config.toml`` with this connection as the default."""
        entry: dict[str, Any] = {"address": self.address}
        if self.root_certificates is None:
            entry["insecure"] = True
        else:
            entry["root-certificates"] = str(Path(self.root_certificates).resolve())
        path = Path(self.flwr_home) / "config.toml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tomli_w.dumps({"superlink": {"default": self.name, self.name: entry}}))
        return path

    def env(self) -> dict[str, str]:
        return flower_env(Path(self.flwr_home))

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS`` against this connection; its output is appended to ``cli_log``."""
        cmd = [executable("flwr"), *args]
        try:
            done = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                timeout=timeout,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired as exc:
            raise FederationError(
                f"`flwr {' '.join(args)}` did not answer within {timeout:.0f} s"
            ) from exc
        if self.cli_log is not None:
            with Path(self.cli_log).open("a") as out:
                out.write(
                    f"$ {' '.join(cmd)}\n{done.stdout}{done.stderr}[exit {done.returncode}]\n"
                )
        return done

    def flwr_json(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run ``flwr ARGS --format json`` and return its JSON answer (raise if it failed)."""
        done = self.flwr(*args, "--format", "json", timeout=timeout)
        try:
            answer = json.loads(done.stdout[done.stdout.find("{") :])
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or not answer.get("success", False) or done.returncode != 0:
            reason = (answer or {}).get("error-message") if isinstance(answer, dict) else None
            text = reason or (done.stdout + done.stderr).strip()[-2000:]
            raise FederationError(
                f"`flwr {' '.join(args)}` failed (exit {done.returncode}): {text}"
            )
        return answer


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class RunStatus:
    """A Flower run's status as ``flwr ls`` reports it."""

    run_id: int
    status: str
    details: str = ""

    @property
    def finished(self) -> bool:
        return self.status.startswith("finished")

    @property
    def succeeded(self) -> bool:
        return self.status == COMPLETED


def start_run(
    connection: Connection,
    run_config: Mapping[str, Any],
    app: Path | str | None = None,
    work_dir: Path | None = None,
) -> int:
    """``flwr run APP CONNECTION --run-config FILE``: submit the app and return the run id.

    ``app`` is an app folder (default: radfed's), or an app spec ``@publisher/name==x.y.z``
    that the SuperLink fetches with its signatures (see :mod:`radfed.deploy.signing`).
    """
    if isinstance(app, str) and app.startswith("@"):
        target = app
    else:
        target = str(Path(app or app_dir()).resolve())
    work_dir = Path(work_dir or connection.flwr_home)
    work_dir.mkdir(parents=True, exist_ok=True)
    overrides = work_dir / f"run-config-{time.time_ns()}.toml"
    overrides.write_text(tomli_w.dumps(dict(run_config)))
    answer = connection.flwr_json("run", target, connection.name, "--run-config", str(overrides))
    return int(answer["run-id"])


def run_status(connection: Connection, run_id: int) -> RunStatus:
    """``flwr ls --run-id RUN``: the run's status and details."""
    answer = connection.flwr_json("ls", connection.name, "--run-id", str(run_id))
    runs = answer.get("runs") or []
    if not runs:
        raise FederationError(f"the SuperLink does not know run {run_id}")
    run = runs[0]
    details = str(run.get("status-details", ""))
    return RunStatus(run_id, str(run.get("status", "")), "" if details == "N/A" else details)


def stop_run(connection: Connection, run_id: int) -> None:
    """``flwr stop RUN``; failures are logged, not raised (used while giving up)."""
    try:
        done = connection.flwr("stop", str(run_id), connection.name, timeout=60)
        if done.returncode != 0:
            log.warning(
                "flwr stop %s failed: %s", run_id, (done.stdout + done.stderr).strip()[-500:]
            )
    except FederationError as exc:
        log.warning("%s", exc)


#: The marker of the ServerApp's progress lines (phase, rounds done), relayed to the
#: coordinator's log while a run goes on (written by radfed.server.federation.flower).


def _relay_progress(log_path: Path, offset: int) -> int:
    """Log the progress lines the ServerApp wrote to ``log_path`` after ``offset``;
    return the new offset (only whole lines are read)."""
    try:
        with open(log_path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except OSError:
        return offset
    end = chunk.rfind(b"\n") + 1
    for line in chunk[:end].decode(errors="replace").splitlines():
        if PROGRESS in line:
            log.info("%s", line[line.index(PROGRESS) + len(PROGRESS) :].strip())
    return offset + end


def wait_for_run(
    connection: Connection,
    run_id: int,
    timeout: float | None,
    log_path: Path,
    check_alive: Callable[[], None] | None = None,
    poll_interval: float = 15.0,
) -> RunStatus:
    """Wait until run ``run_id`` finishes, streaming its ServerApp log into ``log_path``.

    ``flwr log RUN --stream`` ends when the run finishes; ``flwr ls`` is also asked every
    ``poll_interval`` seconds. ``check_alive`` is called while waiting and may raise
    (e.g. when a process of the federation died). On timeout the run is stopped and a
    :class:`FederationError` is raised; ``timeout`` None (or 0) waits without a limit
    (each round has its own limit in the ServerApp: the study's ``round_timeout``).
    The ServerApp's progress lines (phase, rounds done) are logged as they arrive.
    """
    env = connection.env()
    stream = ManagedProcess.start(
        "flwr log",
        [executable("flwr"), "log", str(run_id), connection.name, "--stream"],
        Path(log_path),
        env,
        Path(connection.flwr_home),
    )
    deadline = time.monotonic() + timeout if timeout else float("inf")
    next_poll = time.monotonic() + poll_interval
    stream_ended = False
    relayed = 0
    try:
        while True:
            if check_alive is not None:
                check_alive()
            relayed = _relay_progress(Path(log_path), relayed)
            now = time.monotonic()
            ended = not stream.running()
            if (ended and not stream_ended) or now >= next_poll:
                stream_ended = stream_ended or ended
                status = run_status(connection, run_id)
                if status.finished:
                    break
                next_poll = time.monotonic() + (
                    min(poll_interval, 5.0) if stream_ended else poll_interval
                )
            if now >= deadline:
                stop_run(connection, run_id)
                raise FederationError(
                    f"Flower run {run_id} did not finish within {timeout:.0f} s (it was stopped)"
                )
            time.sleep(0.25)
        try:  # let the stream print the last lines of the log
            stream.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        _relay_progress(Path(log_path), relayed)
        return status
    finally:
        stop_processes([stream], grace=3.0)


def submit_run(
    connection: Connection,
    run_config: Mapping[str, Any],
    *,
    log_path: Path,
    timeout: float | None = 600.0,
    app: Path | str | None = None,
    check_alive: Callable[[], None] | None = None,
    diagnostics: Callable[[], str] | None = None,
) -> RunStatus:
    """Submit the radfed app with ``run_config`` and wait until it has finished.

    Raises :class:`FederationError` (with ``diagnostics()``, e.g. log tails, appended)
    when the run fails, is stopped or does not finish within ``timeout`` seconds
    (None or 0: no limit).
    """

    def fail(message: str) -> FederationError:
        parts = [message, f"--- ServerApp log ({log_path}) ---\n{tail(log_path)}"]
        if diagnostics is not None:
            parts.append(diagnostics())
        return FederationError("\n".join(parts))

    try:
        run_id = start_run(connection, run_config, app=app)
        log.info("submitted Flower run %s to %s", run_id, connection.address)
        status = wait_for_run(connection, run_id, timeout, log_path, check_alive=check_alive)
    except FederationError as exc:
        raise fail(str(exc)) from exc
    if not status.succeeded:
        raise fail(
            f"Flower run {run_id} ended as {status.status}: {status.details or 'no details'}"
        )
    log.info("Flower run %s completed", run_id)
    return status


# --------------------------------------------------------------------------- federation


class LocalFederation:
    """A SuperLink and one SuperNode per site, on this machine, as a context manager.

    Every process runs in its own process group with its log in ``log_dir``
    (``superlink.log``, ``supernode-<site>.log``); leaving the context stops them all,
    whatever happened. Ports are chosen free at start.

    Parameters
    ----------
    sites : sequence of SiteNode
    work_dir : Path
        Private folder for Flower's state (``FLWR_HOME``: configuration, installed apps).
    log_dir : Path, optional
        Where the logs go (default ``work_dir/logs``).
    host : str
        Address every API binds to (127.0.0.1).
    tls : TLSFiles, optional
        Secure the SuperLink with TLS (default: insecure).
    superlink_args, supernode_args : sequence of str
        Extra flags for ``flower-superlink`` / every ``flower-supernode``.
    startup_timeout : float
        Seconds each process may take to open its port.
    clientapp : {"runner", "flower"}, optional
        ``"runner"``: each SuperNode (``--isolation process``) gets one long-lived
        :mod:`radfed.deploy.clientapp_runner` process (``clientapp-<site>.log``);
        ``"flower"``: Flower's ``flwr-clientapp`` process per message. Default:
        ``$RADFED_CLIENTAPP``, else ``"runner"``.
    """

    def __init__(
        self,
        sites: Sequence[SiteNode],
        work_dir: str | Path,
        *,
        log_dir: str | Path | None = None,
        host: str = HOST,
        tls: TLSFiles | None = None,
        superlink_args: Sequence[str] = (),
        supernode_args: Sequence[str] = (),
        startup_timeout: float = 60.0,
        clientapp: str | None = None,
    ) -> None:
        names = [s.name for s in sites]
        if len(set(names)) != len(names):
            raise FederationError(f"two SuperNodes for one site in {names}")
        self.sites = list(sites)
        self.work_dir = Path(work_dir).resolve()
        self.log_dir = Path(log_dir).resolve() if log_dir else self.work_dir / "logs"
        self.flwr_home = self.work_dir / "flwr-home"
        self.host = host
        self.tls = tls
        self.superlink_args = list(superlink_args)
        self.supernode_args = list(supernode_args)
        self.startup_timeout = startup_timeout
        self.clientapp = clientapp_mode(clientapp)
        self.port: int | None = None
        self.superlink: ManagedProcess | None = None
        self.supernodes: dict[str, ManagedProcess] = {}
        #: The ClientApp runner of each SuperNode (``clientapp="runner"``).
        self.runners: dict[str, ManagedProcess] = {}
        #: ``{pid: start time}`` of the processes stopped so far, with their descendants.
        self.started_pids: dict[int, int] = {}

    # ----------------------------------------------------------------- addresses

    @property
    def address(self) -> str:
        """The SuperLink's address (Fleet, Control and Runtime APIs)."""
        if self.port is None:
            raise FederationError("the federation is not started")
        return f"{self.host}:{self.port}"

    @property
    def connection(self) -> Connection:
        return Connection(
            address=self.address,
            flwr_home=self.flwr_home,
            root_certificates=self.tls.ca_cert if self.tls else None,
            cli_log=self.log_dir / CLI_LOG,
        )

    @property
    def processes(self) -> list[ManagedProcess]:
        return [
            *self.runners.values(),
            *self.supernodes.values(),
            *([self.superlink] if self.superlink else []),
        ]

    # ----------------------------------------------------------------- lifecycle

    def __enter__(self) -> LocalFederation:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> LocalFederation:
        """Start the SuperLink, then the SuperNodes; wait until each has opened its port."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = flower_env(self.flwr_home)
        try:
            self.superlink, self.port = self._start_listening(
                "SuperLink",
                lambda port: superlink_command(self.host, port, self.tls, self.superlink_args),
                self.log_dir / SUPERLINK_LOG,
                env,
            )
            for site in self.sites:
                self.supernodes[site.name], runtime_port = self._start_listening(
                    f"SuperNode {site.name}",
                    lambda port, s=site: supernode_command(
                        s,
                        self.address,
                        self.host,
                        port,
                        self.tls,
                        self.supernode_args,
                        clientapp=self.clientapp,
                    ),
                    self.supernode_log(site.name),
                    env,
                )
                if self.clientapp == "runner":
                    self.runners[site.name] = ManagedProcess.start(
                        f"ClientApp runner {site.name}",
                        runner_command(
                            f"{self.host}:{runtime_port}", self.supernodes[site.name].pid
                        ),
                        self.runner_log(site.name),
                        env,
                        self.work_dir,
                    )
            self.connection.write_config()
        except BaseException:
            self.stop()
            raise
        log.info(
            "local federation: SuperLink %s, SuperNodes %s", self.address, list(self.supernodes)
        )
        return self

    def _start_listening(
        self,
        name: str,
        command: Callable[[int], list[str]],
        log_path: Path,
        env: Mapping[str, str],
        attempts: int = 3,
    ) -> tuple[ManagedProcess, int]:
        """Start a process that must open ``host:port``; retry with another port if taken."""
        for attempt in range(1, attempts + 1):
            port = free_port(self.host)
            proc = ManagedProcess.start(name, command(port), log_path, env, self.work_dir)
            deadline = time.monotonic() + self.startup_timeout
            while proc.running() and time.monotonic() < deadline:
                if _port_open(self.host, port):
                    return proc, port
                time.sleep(0.2)
            why = (
                f"exited with code {proc.popen.returncode}"
                if not proc.running()
                else "did not open its port"
            )
            stop_processes([proc], grace=3.0)
            text = tail(log_path, 200).lower()
            if attempt < attempts and ("address already in use" in text or "errno 98" in text):
                log.info("%s: port %s was taken, retrying", name, port)
                continue
            raise FederationError(
                f"{name} {why} (startup timeout {self.startup_timeout:.0f} s)\n"
                f"--- {log_path} ---\n{tail(log_path)}"
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def stop(self) -> None:
        """Stop every process this federation started (idempotent)."""
        processes = self.processes
        if not processes:
            return
        stop_processes(processes)
        for proc in processes:
            self.started_pids[proc.pid] = proc.start_time
            self.started_pids.update(proc.descendants)
        self.superlink = None
        self.supernodes = {}
        self.runners = {}

    # ----------------------------------------------------------------- inspection

    def supernode_log(self, site: str) -> Path:
        return self.log_dir / f"supernode-{site}.log"

    def runner_log(self, site: str) -> Path:
        """The log of a site's ClientApp runner (its ClientApps' output too)."""
        return self.log_dir / f"clientapp-{site}.log"

    def check_alive(self) -> None:
        """Raise :class:`FederationError` if the SuperLink, a SuperNode or a ClientApp
        runner has exited."""
        self._check_running(self.processes)

    def check_superlink(self) -> None:
        """Raise :class:`FederationError` if the SuperLink has exited (a study that drops
        a failing site carries on without a SuperNode; the ServerApp notices it)."""
        self._check_running([self.superlink] if self.superlink else [])

    def _check_running(self, processes: Iterable[ManagedProcess]) -> None:
        dead = [p for p in processes if not p.running()]
        if dead:
            lines = [f"{p.name} exited with code {p.popen.returncode}" for p in dead]
            raise FederationError("; ".join(lines) + "\n" + self.log_tails(dead))

    def log_tails(
        self, processes: Iterable[ManagedProcess] | None = None, lines: int = TAIL_LINES
    ) -> str:
        """The last lines of the SuperLink's and SuperNodes' logs."""
        chosen = list(self.processes if processes is None else processes)
        paths = [p.log_path for p in chosen] or [
            self.log_dir / SUPERLINK_LOG,
            *(self.supernode_log(s.name) for s in self.sites),
            *(self.runner_log(s.name) for s in self.sites if self.clientapp == "runner"),
        ]
        return "\n".join(f"--- {path} ---\n{tail(path, lines)}" for path in paths)


# --------------------------------------------------------------------------- one call


def run_config_for(
    config: StudyConfig,
    out_dir: Path,
    track: bool,
    connect_timeout: float | None = None,
    pooled: bool = False,
) -> dict[str, Any]:
    """The run config of the radfed app (keys of ``deploy/flower_app/pyproject.toml``)."""
    if config.source is None:
        raise StudyConfigError(
            "the Deployment Engine needs a study file: load the study with load_study(path)"
        )
    values: dict[str, Any] = {
        "study": str(Path(config.source).resolve()),
        "out": str(Path(out_dir).resolve()),
        "track": bool(track),
        "pooled": bool(pooled),
    }
    if connect_timeout is not None:
        values["connect-timeout"] = float(connect_timeout)
    return values


def run_in_local_deployment(
    config: StudyConfig,
    out_dir: Path,
    track: bool = True,
    timeout: float | None = None,
    connect_timeout: float | None = None,
    sites: Sequence[SiteNode] | None = None,
    work_dir: Path | None = None,
    pooled: bool = False,
    clientapp: str | None = None,
) -> Path:
    """Run ``config`` in a local Flower Deployment Engine; return the path of results.json.

    Starts a SuperLink and one SuperNode per site on 127.0.0.1, submits
    ``deploy/flower_app`` with the run config ``study`` (the study file), ``out``
    (``out_dir``) and ``track``, waits at most ``timeout`` seconds for the run to
    finish, and stops every process, whatever happened. Logs go to
    ``out_dir/deployment-logs/``.

    Parameters
    ----------
    timeout : float, optional
        Seconds for the whole run; None: the study's (``[federation] timeout``, else
        derived from its expected rounds:
        :func:`radfed.server.federation.timeouts.run_timeout`); 0: no overall limit
        (every round is still limited by ``round_timeout``).
    connect_timeout : float, optional
        Seconds the ServerApp waits for every study site to connect (run config
        ``connect-timeout``; default: the app's, 120 s).
    sites : sequence of SiteNode, optional
        The SuperNodes to start (default: one per study site, with the study's privacy
        rules as the site's own).
    work_dir : Path, optional
        Folder for Flower's state (``FLWR_HOME``); default: a temporary folder, removed.
    pooled : bool
        The ServerApp also fits the pooled reference and records the equivalence table
        with the run (results.json, report, MLflow), as ``radfed run --pooled`` does.
    clientapp : {"runner", "flower"}, optional
        How the SuperNodes run their ClientApps (:class:`LocalFederation`); default
        ``$RADFED_CLIENTAPP``, else ``"runner"``.

    Raises
    ------
    FederationError
        The run failed or timed out, or a process died; the message ends with the tails
        of the ServerApp, SuperLink and SuperNode logs.
    """
    if timeout is None:
        from radfed.server.federation.timeouts import run_timeout

        timeout = run_timeout(config)
    out_dir = Path(out_dir).resolve()
    run_config = run_config_for(config, out_dir, track, connect_timeout, pooled)
    log_dir = out_dir / LOG_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    results = out_dir / RESULTS
    nodes = site_nodes(config) if sites is None else list(sites)
    clientapp = clientapp_mode(clientapp)  # a bad value fails before anything starts
    started = time.time()
    with contextlib.ExitStack() as stack:
        if work_dir is None:
            work_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="radfed-flwr-")))
        federation = stack.enter_context(
            LocalFederation(nodes, work_dir, log_dir=log_dir, clientapp=clientapp)
        )
        submit_run(
            federation.connection,
            run_config,
            log_path=log_dir / SERVERAPP_LOG,
            timeout=timeout,
            check_alive=federation.check_superlink
            if config.on_site_failure == "drop"
            else federation.check_alive,
            diagnostics=federation.log_tails,
        )
    if not results.is_file() or results.stat().st_mtime < started - 1:
        raise FederationError(
            f"the Flower run completed but wrote no {results}; see the logs in {log_dir}"
        )
    return results
