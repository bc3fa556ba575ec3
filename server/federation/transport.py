"""The transport interface: one federated round is ``ask(task, payload, sites)``.

The statistics and the study driver only ever call :meth:`Transport.ask`, so this module
imports neither Flower nor the site code. The transports live beside it:
:mod:`~radfed.server.federation.inprocess` (sites in this process) and
:mod:`~radfed.server.federation.flower` (the Simulation and Deployment Engines); both
carry requests as encoded Flower records (:mod:`~radfed.server.federation.encoded`).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import Counter
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from radfed.shared.errors import FederationError

if TYPE_CHECKING:  # the encoding (and Flower) belong to the transports, not here
    from radfed.shared.messages import Payload

log = logging.getLogger(__name__)

#: The key of a reply a transport makes up for a site that could not be reached (its
#: value says why, e.g. Flower's "node unavailable"): the site failed, it did not refuse.
UNAVAILABLE = "unavailable"
#: What a user can do about a site that stopped answering.
ADVICE = (
    "restart the site's SuperNode (or ask the hospital to), or set "
    'on_site_failure = "drop" in the study\'s [federation] section to continue '
    "without it (the fit then restarts on the remaining sites)"
)


class SiteFailure(FederationError):
    """Sites stopped answering during a round: no reply within the wait, or unreachable.

    Unlike a refusal (a site answering with an error), the site is gone: the study's
    ``[federation] on_site_failure`` policy decides whether the run stops or continues
    without it. ``failures`` maps each failed site to the reason; ``phase``, ``task``
    and ``round`` (the round's number within its phase) say where it happened.
    """

    def __init__(
        self,
        failures: dict[str, str],
        task: str,
        phase: str,
        round_: int,
        time: str | None = None,
    ) -> None:
        self.failures = dict(failures)
        self.task, self.phase, self.round = task, phase, round_
        self.time = time or datetime.now(UTC).isoformat(timespec="seconds")
        super().__init__(f"{self.what}: {ADVICE}")

    @property
    def sites(self) -> list[str]:
        return list(self.failures)

    @property
    def what(self) -> str:
        """What happened, without advice: the sites, why, the phase, task and round."""
        who = "; ".join(f"site {s!r} stopped answering ({why})" for s, why in self.failures.items())
        return (
            f"{who}, in phase {self.phase!r} (task {self.task!r}, round {self.round} of the phase)"
        )

    def records(self) -> list[dict[str, Any]]:
        """One ``{site, phase, round, task, reason, time}`` per failed site (results.json)."""
        return [
            {
                "site": site,
                "phase": self.phase,
                "round": self.round,
                "task": self.task,
                "reason": why,
                "time": self.time,
            }
            for site, why in self.failures.items()
        ]


class SiteRefusal(FederationError):
    """Sites answered a round with an error: ``kinds`` maps each to the error's kind
    (``"privacy"`` for a refusal by a privacy rule, ``"data"``, ``"internal"``)."""

    def __init__(self, message: str, kinds: dict[str, str]) -> None:
        super().__init__(message)
        self.kinds = dict(kinds)

    @property
    def privacy_only(self) -> bool:
        """Whether every error was a privacy rule's refusal (of this very request)."""
        return bool(self.kinds) and all(k == "privacy" for k in self.kinds.values())


class Transport(ABC):
    """Sends one request to each site and returns their replies (one federated round)."""

    name = "abstract"

    def __init__(self) -> None:
        self.rounds: Counter[str] = Counter()
        self.step = "setup"
        self.sites: list[str] = []
        self.protocol: dict | None = None
        # The pipeline fitted so far (ComBat estimates, the Radscore): sent with every
        # request, so sites keep no state between rounds.
        self.context: Payload = {}
        # Parameters one request may fit per subset at every site (the study's
        # parameter rule on the smallest site), once the split is known; fits beyond it
        # are spread over several requests.
        self.param_budget: dict[str, float] = {}
        #: Seconds a round waits for a site's reply (None: no limit), for messages.
        self.reply_wait: float | None = None
        #: Sites that stopped answering in this run, with the failure: later rounds
        #: that include them fail at once instead of waiting again.
        self.failed: dict[str, SiteFailure] = {}
        #: Put before ``step`` where a failure is recorded (a leave-one-site-out refit).
        self.scope = ""

    @property
    def reachable(self) -> list[str]:
        """Every site this transport can deliver to (``sites`` are those a study uses)."""
        return list(self.sites)

    def _deliver(self, request: Payload, sites: list[str]) -> dict[str, Payload]:
        """Deliver ``request`` to each of ``sites`` and collect the replies that came."""
        return self._deliver_each(dict.fromkeys(sites, request))

    @abstractmethod
    def _deliver_each(self, requests: dict[str, Payload]) -> dict[str, Payload]:
        """Deliver each site its own request, all in one round, and collect the replies
        that came (fits sharing a round send each site the requests it is part of)."""

    def ask(
        self,
        task: str,
        payload: Payload | None = None,
        sites: list[str] | None = None,
    ) -> dict[str, Payload]:
        """Run one round: send ``task`` with ``payload`` to ``sites`` (default: all).

        Raises
        ------
        SiteFailure
            When sites did not reply (within ``reply_wait``) or could not be reached,
            and no site refused; also at once, without sending, when a site already
            failed earlier in the run.
        FederationError
            When any site refuses or fails; the message lists every such site and why.
        """
        targets = list(sites or self.sites)
        gone = [s for s in targets if s in self.failed]
        if gone:
            first = self.failed[gone[0]]
            raise SiteFailure(
                {
                    s: f"it stopped answering earlier, in phase {self.failed[s].phase!r}"
                    for s in gone
                },
                task,
                self.scope + self.step,
                self.rounds[self.step],
                first.time,
            )
        request = {"task": task, **self.context, **(payload or {})}
        if self.protocol is not None:
            request["protocol"] = self.protocol
        self.rounds[self.step] += 1
        replies = self._deliver(request, targets)
        failures = {s: self._silence() for s in targets if s not in replies}
        failures |= {s: str(r[UNAVAILABLE]) for s, r in replies.items() if UNAVAILABLE in r}
        errors = [f"{s}: {r['error']}" for s, r in replies.items() if "error" in r]
        errors = [e for e in errors if e.partition(":")[0] not in failures]
        if errors:  # a refusal stops the study whatever failed beside it
            kinds = {
                s: str(r.get("error_kind", "")) for s, r in replies.items() if "error" in r
            } | dict.fromkeys(failures, "failure")
            errors += [f"{s}: {why}" for s, why in failures.items()]
            raise SiteRefusal(
                f"task {task!r} failed at {len(errors)} site(s):\n  " + "\n  ".join(errors),
                kinds,
            )
        if failures:
            failure = SiteFailure(failures, task, self.scope + self.step, self.rounds[self.step])
            for site in failures:
                self.failed[site] = failure
            log.warning("%s", failure.what)
            raise failure
        return {site: replies[site] for site in targets}

    def _silence(self) -> str:
        """Why a site counts as failed when its reply did not come."""
        if self.reply_wait is None:
            return "no reply"
        return f"no reply within {self.reply_wait:g} s, the study's [federation] round_timeout"

    def subset(self, sites: list[str], scope: str = "") -> Transport:
        """A transport over some of these sites, with its own context and round counts
        (a leave-one-site-out fit); it delivers through this one. ``scope`` names the
        fit in the phase of a failure ("leave-one-site-out without a: ")."""
        sub = SiteSubset(self, sites)
        sub.scope = scope
        return sub


class SiteSubset(Transport):
    """Some of another transport's sites: their rounds go through the parent."""

    def __init__(self, parent: Transport, sites: list[str]) -> None:
        super().__init__()
        unknown = sorted(set(sites) - set(parent.reachable))
        if unknown:
            raise FederationError(f"sites {unknown} are not reachable through {parent.name}")
        self.parent = parent
        self.name = parent.name
        self.sites = list(sites)
        self.reply_wait = parent.reply_wait
        self.failed = parent.failed  # one run's failed sites, whichever fit noticed them

    @property
    def reachable(self) -> list[str]:
        return self.parent.reachable

    def _deliver_each(self, requests: dict[str, Payload]) -> dict[str, Payload]:
        return self.parent._deliver_each(requests)
