"""The protocol runner over Flower: a transport that sends records as Flower messages.

Used by the ServerApp in both the Simulation Engine and the Deployment Engine. Sites
are found by asking every connected SuperNode who it is (``hello``), so a study names
hospitals, not Flower node ids.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from radfed.server.federation.encoded import EncodedTransport
from radfed.server.federation.transport import UNAVAILABLE
from radfed.shared.errors import FederationError
from radfed.shared.messages import CONFIG, PROGRESS, from_record, to_record

log = logging.getLogger(__name__)

MESSAGE_TYPE = "query"
#: Pull replies after this long, then ever less often (x1.5 per empty pull) up to
#: POLL_MAX_SECONDS. Each pull costs the SuperLink CPU (a steady 0.1 s poll kept it at a
#: third of a core, which a 2-core site shares with the ClientApps), while a
#: Deployment Engine reply needs seconds anyway (the SuperNode polls every 3 s).
POLL_SECONDS = 0.05
POLL_MAX_SECONDS = 0.5
#: A progress line every this many rounds within a phase (and one when a phase ends).
PROGRESS_EVERY = 10
#: Flower's error codes (``flwr.common.constant.ErrorCode``) that mean the site is gone,
#: not that it refused: message or reply unavailable (expired, node removed), node
#: unavailable (no heartbeat), ClientApp process crashed. Such a site failed (see
#: ``[federation] on_site_failure``) like one that did not reply within round_timeout.
UNAVAILABLE_CODES = {3, 4, 5, 8}


def _ensure_log_output() -> None:
    """Send radfed's INFO lines to stderr when nothing else shows them (the Deployment
    Engine's ServerApp process, whose stderr Flower mirrors into the run's log)."""
    radfed_log = logging.getLogger("radfed")
    if radfed_log.hasHandlers():
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("radfed %(levelname)s: %(message)s"))
    radfed_log.addHandler(handler)
    if radfed_log.getEffectiveLevel() > logging.INFO:
        radfed_log.setLevel(logging.INFO)


class GridTransport(EncodedTransport):
    """Send each round's requests through a Flower ``Grid`` and wait for the replies.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
    expected_sites : list of str
        The study's sites; every one must be connected within ``connect_timeout``.
    connect_timeout : float
        Seconds to wait for all expected SuperNodes to connect.
    reply_timeout : float or None
        Seconds to wait for the replies of one round (None: until every site replies);
        a site that has not replied by then failed (``SiteFailure``: the study's
        ``on_site_failure`` decides), as does one Flower reports unavailable.
    """

    name = "flower"

    def __init__(
        self,
        grid: Grid,
        expected_sites: list[str],
        connect_timeout: float = 120.0,
        reply_timeout: float | None = None,
        hello_timeout: float = 120.0,
        engine: str = "flower",
    ) -> None:
        super().__init__()
        self.grid = grid
        self.reply_timeout = reply_timeout
        self.reply_wait = reply_timeout
        self.hello_timeout = hello_timeout
        self.name = engine
        if engine == "deployment":
            _ensure_log_output()
        self.started = time.monotonic()
        self.total_rounds = 0
        self._phase: tuple[str, int] = ("", 0)  # the current phase and its rounds
        self.node_of = self._discover(expected_sites, connect_timeout)
        self.sites = list(expected_sites)

    @property
    def reachable(self) -> list[str]:
        return list(self.node_of)

    def _discover(self, expected: list[str], timeout: float) -> dict[str, int]:
        deadline = time.monotonic() + timeout
        found: dict[str, int] = {}
        refused: dict[int, str] = {}  # nodes that answered hello with an error, and why
        asked: set[int] = set()
        while True:
            new = [n for n in self.grid.get_node_ids() if n not in asked]
            if new:
                asked.update(new)
                messages = [self._message(to_record({"task": "hello"}), n) for n in new]
                # A connected node may take seconds to start its ClientApp: the hello
                # round has its own timeout, apart from the wait for nodes to connect.
                for reply in self._send_and_receive(messages, timeout=self.hello_timeout):
                    if reply.has_error():
                        refused[reply.metadata.src_node_id] = reply.error.reason
                        log.warning(
                            "node %s did not say hello: %s",
                            reply.metadata.src_node_id,
                            reply.error.reason,
                        )
                        continue
                    site = from_record(reply.content)["site"]
                    if site in found:
                        raise FederationError(f"two SuperNodes claim to be site {site!r}")
                    found[site] = reply.metadata.src_node_id
                    log.info("site %s connected as node %s", site, found[site])
            missing = [s for s in expected if s not in found]
            if not missing:
                break
            if time.monotonic() > deadline:
                errors = "".join(f"; node {n} replied: {why}" for n, why in refused.items())
                raise FederationError(
                    f"site(s) {missing} did not connect within {timeout:.0f} s "
                    f"(connected: {sorted(found) or 'none'}){errors}"
                )
            time.sleep(0.5)
        unknown = sorted(set(found) - set(expected))
        if unknown:
            log.warning("ignoring connected site(s) not in the study: %s", unknown)
        return {s: found[s] for s in expected}

    def _send_and_receive(self, messages: list[Message], timeout: float | None) -> list[Message]:
        """Push messages and pull their replies.

        Like ``Grid.send_and_receive``, but polling from ``POLL_SECONDS`` backing off to
        ``POLL_MAX_SECONDS``: Flower 1.41's deployment Grid sleeps 3 s between pulls,
        which a study of many short rounds (Newton, LASSO paths) would pay at every round.
        """
        # A message Flower could not push has no id (None): it gets no reply.
        pending = {m for m in self.grid.push_messages(messages) if m is not None}
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        wait = POLL_SECONDS
        while pending:
            pulled = list(self.grid.pull_messages(pending))
            replies.extend(pulled)
            pending -= {m.metadata.reply_to_message_id for m in pulled}
            if not pending or (deadline is not None and time.monotonic() > deadline):
                break
            time.sleep(wait)
            wait = POLL_SECONDS if pulled else min(wait * 1.5, POLL_MAX_SECONDS)
        return replies

    def _message(self, content: RecordDict, node_id: int) -> Message:
        return Message(content=content, dst_node_id=node_id, message_type=MESSAGE_TYPE)

    def _progress(self, requests: Mapping[str, RecordDict]) -> None:
        """Log the phase and the rounds done in it (leave-one-site-out refits go
        through this transport too, under the phase that runs them)."""
        phase, done = self._phase
        if self.step != phase:
            if phase:
                self._log_phase(phase, done, "done")
            phase, done = self.step, 0
        self.total_rounds += 1
        self._phase = (phase, done + 1)
        if (done + 1) % PROGRESS_EVERY == 0:
            task = next(iter(requests.values()))[CONFIG].get("task", "?")
            self._log_phase(phase, done + 1, f"so far (task {task})")

    def _log_phase(self, phase: str, rounds: int, state: str) -> None:
        log.info(
            "%sphase %s: %d round(s) %s; %d in all, %.0f s",
            PROGRESS,
            phase,
            rounds,
            state,
            self.total_rounds,
            time.monotonic() - self.started,
        )

    def finish(self) -> None:
        """Log the last phase's rounds."""
        phase, done = self._phase
        if phase:
            self._log_phase(phase, done, "done")
        self._phase = ("", 0)

    def _exchange(self, requests: Mapping[str, RecordDict]) -> dict[str, RecordDict]:
        if requests:
            self._progress(requests)
        messages = [self._message(rec, self.node_of[site]) for site, rec in requests.items()]
        replies: dict[str, RecordDict] = {}
        received = self._send_and_receive(messages, timeout=self.reply_timeout)
        # By the message replied to (pushing set each message's id): the SuperLink
        # itself sends a gone node's error.
        site_of = {m.metadata.message_id: s for m, s in zip(messages, requests, strict=True)}
        site_of_node = {node: site for site, node in self.node_of.items()}
        for reply in received:
            meta = reply.metadata
            site = site_of.get(meta.reply_to_message_id) or site_of_node[meta.src_node_id]
            if reply.has_error():
                error = f"Flower error {reply.error.code}: {reply.error.reason}"
                gone = {UNAVAILABLE: error} if reply.error.code in UNAVAILABLE_CODES else {}
                replies[site] = to_record({"error": error, **gone})
            else:
                replies[site] = reply.content
        return replies
