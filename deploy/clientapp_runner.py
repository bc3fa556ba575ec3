"""A long-lived ClientApp runner for a SuperNode started with ``--isolation process``.

Why it exists: with ``--isolation subprocess`` a SuperNode starts ``flower-superexec``,
which launches one ``flwr-clientapp`` process per message. Each such process spends
~2.3 CPU-s importing Flower and ~0.7 CPU-s importing radfed's site code before it
answers, so a federation of a few sites on a small machine is CPU-bound by process
starts (docs/performance.md). Flower documents the other mode: ``flower-supernode
--isolation process`` starts no SuperExec and lets an external process serve its
Runtime API. This module is that process, for radfed: it does the job of
``flower-superexec`` + ``flwr-clientapp`` in one warm Python process, so Flower and the
site code are imported once per site, not once per message::

    flower-supernode ... --isolation process --host 127.0.0.1 --port 9094
    python -m radfed.deploy.clientapp_runner --runtime-api-address 127.0.0.1:9094 --insecure

Per task it does what ``flwr.supernode.runtime.run_clientapp.run_clientapp`` does, with
Flower's own functions (``pull_task_input``, ``push_message``, ``push_task_output``,
``install_from_fab``, ``get_load_client_app_fn``): a Runtime client holding the task's
token, a task heartbeat, the ClientApp's reply (or Flower's ``Error`` reply when it
raises) and the task's final status. Tasks run one at a time, in this process. Only the
FAB installation and ClientApp loading are done once per FAB hash.

It relies on the Runtime API of the pinned Flower (1.41.0: ``AcquireTask`` and the
``flwr.supernode.runtime.run_clientapp`` helpers); a Flower upgrade must re-check it
(tests/test_clientapp_runner.py runs it against real SuperNodes).

Differences from ``flwr-clientapp``, on purpose: a task's refused heartbeat or token
(the run was stopped) ends that task, not the process; runtime dependency
installation is not supported (radfed is installed beside Flower).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.cli.install import install_from_fab
from flwr.clientapp.client_app import ClientApp, LoadClientAppError
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
)
from flwr.supercore.protobuf.client import ProtobufClientInterceptor
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.runtime.tracing import RuntimeTracingInterceptor
from flwr.supernode.runtime.run_clientapp import (
    pull_task_input,
    push_message,
    push_task_output,
)

#: Seconds the runner keeps retrying a SuperNode it cannot reach before it gives up.
RECONNECT_TIMEOUT = 60.0
#: Longest pause between two AcquireTask calls while idle.
IDLE_POLL = 0.5
#: Seconds one task's Runtime API calls are retried (transport errors, 502/503/504).
TASK_RETRY_SECONDS = 30.0
#: Marker of the runner's one line per task (read by tests and when reading logs).
TASK_LINE = "radfed clientapp-runner:"

log = logging.getLogger("radfed.clientapp_runner")


class RunnerExit(Exception):
    """The runner must stop: the SuperNode or the parent process is gone."""


@dataclass
class Runner:
    """Serve CLIENT_APP tasks of one SuperNode's Runtime API, one at a time, in-process.

    Parameters
    ----------
    runtime_api_address : str
        The SuperNode's Runtime API, ``HOST:PORT`` (its ``--host``/``--port``).
    insecure : bool
        Plain HTTP (the SuperNode was started without ``--ssl-certfile``).
    root_certificates : str, optional
        CA file of the SuperNode's Runtime API TLS certificate.
    poll : float
        Seconds between AcquireTask calls after a task; backs off to ``IDLE_POLL``.
    reconnect_timeout : float
        Seconds of failed AcquireTask calls after which the runner exits.
    parent_pid : int, optional
        Exit when this process is gone (as ``flower-superexec --parent-pid``).
    """

    runtime_api_address: str
    insecure: bool = True
    root_certificates: str | None = None
    poll: float = 0.05
    reconnect_timeout: float = RECONNECT_TIMEOUT
    parent_pid: int | None = None
    #: Loaded ClientApps by (fab_id, fab_version, fab_hash).
    apps: dict[tuple[str, str, str], ClientApp] = field(default_factory=dict)
    served: int = 0
    failed: int = 0

    # ----------------------------------------------------------------- clients

    def _client(self, token: str | None) -> RuntimeHttpClient:
        """A Runtime API client; with ``token`` it speaks for that task (as flwr-clientapp)."""
        interceptors: list[ProtobufClientInterceptor] = [RuntimeTracingInterceptor()]
        if token is None:
            interceptors.append(RuntimeVersionHttpInterceptor(component_name="SuperExec"))
            retry = None  # the AcquireTask loop retries itself, with its own limit
        else:
            interceptors.append(RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"))
            interceptors.append(RuntimeTokenHttpInterceptor(token))
            retry = _task_retry_invoker()
        return RuntimeHttpClient.from_server_address(
            server_address=self.runtime_api_address,
            insecure=self.insecure,
            root_certificates=None if self.insecure else self.root_certificates,
            interceptors=interceptors,
            retry_invoker=retry,
        )

    # ----------------------------------------------------------------- main loop

    def serve(self, stop: threading.Event | None = None) -> None:
        """Acquire and run tasks until ``stop`` is set or the SuperNode is gone."""
        stop = stop or threading.Event()
        acquirer = self._client(None)
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value])
        failing_since: float | None = None
        wait = self.poll
        log.info("%s pid=%d serving %s", TASK_LINE, os.getpid(), self.runtime_api_address)
        try:
            while not stop.is_set():
                self._check_parent()
                try:
                    answer = acquirer.AcquireTask(request)
                except httpx.HTTPError as exc:
                    now = time.monotonic()
                    if failing_since is None:
                        log.warning("the SuperNode did not answer (%s); retrying", exc)
                    failing_since = failing_since or now
                    if now - failing_since > self.reconnect_timeout:
                        raise RunnerExit(
                            f"the SuperNode's Runtime API at {self.runtime_api_address} "
                            f"has not answered for {self.reconnect_timeout:.0f} s "
                            f"({type(exc).__name__}); exiting"
                        ) from exc
                    wait = min(max(wait * 2, 0.5), 5.0)
                    stop.wait(wait)
                    continue
                failing_since = None
                if answer.HasField("task") and answer.token:
                    self.run_task(answer.token, answer.task.task_id)
                    wait = self.poll
                else:
                    wait = min(wait * 1.5, max(IDLE_POLL, self.poll))
                stop.wait(wait)
        finally:
            acquirer.close()

    def _check_parent(self) -> None:
        if self.parent_pid is not None and not _pid_alive(self.parent_pid):
            raise RunnerExit(f"the parent process {self.parent_pid} is gone; exiting")

    # ----------------------------------------------------------------- one task

    def run_task(self, token: str, task_id: int) -> bool:
        """Run one acquired task as ``run_clientapp`` does; True if it completed.

        Never raises for a failure of the task itself: the SuperNode gets Flower's error
        reply and a FAILED status, and the runner carries on.
        """
        started = time.perf_counter()
        client = self._client(token)
        heartbeat = HeartbeatSender(_task_heartbeat_fn(client, task_id))
        message: Message | None = None
        reply: Message | None = None
        context: Context | None = None
        sub_status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            heartbeat.start()
            message, context, run, fab = pull_task_input(client)
            client_app = self._client_app(run.fab_id, run.fab_version, fab.hash_str, fab.content)
            reply = client_app(message=message, context=context)
            sub_status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # one task's failure must not stop the runner
            # Flower's error reply, exactly as run_clientapp builds it.
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            reason = str(type(ex)) + ":<'" + str(ex) + "'>"
            if isinstance(ex, LoadClientAppError):
                reason = "An exception was raised when attempting to load `ClientApp`"
                code = ErrorCode.LOAD_CLIENT_APP_EXCEPTION
            log.error("ClientApp raised an exception", exc_info=ex)
            sub_status, details = SubStatus.FAILED, reason
            if message is not None:
                reply = Message(Error(code=code, reason=reason), reply_to=message)
        try:
            if reply is not None and context is not None:
                try:
                    push_message(client, reply, context)
                except Exception as ex:
                    log.error("Failed to push reply message", exc_info=ex)
                    sub_status = SubStatus.FAILED
            push_task_output(client, context, sub_status, details)
        except Exception as ex:  # e.g. the run was stopped meanwhile
            log.error("Failed to finish task %s", task_id, exc_info=ex)
        finally:
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
        ok = sub_status == SubStatus.COMPLETED
        self.served += 1
        self.failed += 0 if ok else 1
        print(
            f"{TASK_LINE} pid={os.getpid()} task={task_id} "
            f"status={'completed' if ok else 'failed'} "
            f"seconds={time.perf_counter() - started:.3f} served={self.served}",
            file=sys.stderr,
            flush=True,
        )
        return ok

    def _client_app(
        self, fab_id: str, fab_version: str, fab_hash: str, content: bytes
    ) -> ClientApp:
        """The ClientApp of this FAB: installed and imported once, then reused."""
        key = (fab_id, fab_version, fab_hash)
        if key not in self.apps:
            # install_from_fab checks the FAB's file hashes and installs it under the
            # hash of its content; a FAB whose content is not the hash it is sent under
            # would be loaded from another folder: refuse it.
            if hashlib.sha256(content).hexdigest() != fab_hash:
                raise LoadClientAppError(f"the FAB's content does not match its hash {fab_hash}")
            install_from_fab(content, skip_prompt=True)
            load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)
            self.apps[key] = load(fab_id, fab_version, fab_hash)
            log.info(
                "%s loaded ClientApp of %s %s (%s)", TASK_LINE, fab_id, fab_version, fab_hash[:12]
            )
        return self.apps[key]


def _task_retry_invoker() -> RetryInvoker:
    """Retries for one task's calls: transport errors and 502/503/504, for a while.

    Flower's ``make_simple_http_retry_invoker`` sends SIGINT to its own process on a
    refused token (401) — right for a one-task ``flwr-clientapp``, fatal for a runner.
    """

    def give_up(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError):
            return exc.response.status_code not in (502, 503, 504)
        return False

    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=5),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None,
        max_time=TASK_RETRY_SECONDS,
        should_giveup=give_up,
    )


def _task_heartbeat_fn(client: RuntimeHttpClient, task_id: int) -> Callable[[], bool]:
    """A task heartbeat as Flower's ``make_task_heartbeat_fn_http``, without its SIGINT.

    Flower's version ends the whole process when the SuperNode refuses the heartbeat (the
    task expired or its run was stopped); here the task's own calls will fail instead.
    """
    request = SendTaskHeartbeatRequest()
    warned = False

    def beat() -> bool:
        nonlocal warned
        try:
            answer = client.SendTaskHeartbeat(request)
        except httpx.TransportError:
            return False
        except httpx.HTTPError as exc:
            if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code in (503, 504):
                return False
            answer = None
        if (answer is None or not answer.success) and not warned:
            warned = True
            log.warning("task %s: the SuperNode refused its heartbeat (run stopped?)", task_id)
        return True

    return beat


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rfind(")") + 2 :].split()[0] != "Z"
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m radfed.deploy.clientapp_runner",
        description="Serve a SuperNode's ClientApp tasks (flower-supernode --isolation "
        "process) in one long-lived process.",
    )
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's HOST:PORT")
    tls = parser.add_mutually_exclusive_group()
    tls.add_argument("--insecure", action="store_true", help="plain HTTP Runtime API")
    tls.add_argument("--root-certificates", help="CA file of the Runtime API's certificate")
    parser.add_argument(
        "--poll", type=float, default=0.05, help="seconds between AcquireTask calls (0.05)"
    )
    parser.add_argument(
        "--reconnect-timeout",
        type=float,
        default=RECONNECT_TIMEOUT,
        help=f"seconds without the SuperNode before exiting ({RECONNECT_TIMEOUT:.0f})",
    )
    parser.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    args = parser.parse_args(argv)
    if not 0.01 <= args.poll <= 60:
        parser.error("--poll must be between 0.01 and 60 seconds")
    if not args.insecure and not args.root_certificates:
        parser.error("give --insecure or --root-certificates")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: serve until SIGTERM/SIGINT (0) or the SuperNode is gone (1)."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()  # finish the running task, then leave

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    runner = Runner(
        runtime_api_address=args.runtime_api_address,
        insecure=args.insecure,
        root_certificates=args.root_certificates,
        poll=args.poll,
        reconnect_timeout=args.reconnect_timeout,
        parent_pid=args.parent_pid,
    )
    try:
        runner.serve(stop)
    except RunnerExit as exc:
        print(f"clientapp_runner: {exc}", file=sys.stderr, flush=True)
        return 1
    log.info("%s stopped after %d tasks (%d failed)", TASK_LINE, runner.served, runner.failed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
