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
from typing import TYPE_CHECKING

from radfed.shared.errors import FederationError

if TYPE_CHECKING:  # the encoding (and Flower) belong to the transports, not here
    from radfed.shared.messages import Payload

log = logging.getLogger(__name__)


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

    @property
    def reachable(self) -> list[str]:
        """Every site this transport can deliver to (``sites`` are those a study uses)."""
        return list(self.sites)

    @abstractmethod
    def _deliver(self, request: Payload, sites: list[str]) -> dict[str, Payload]:
        """Deliver ``request`` to each of ``sites`` and collect the replies that came."""

    def ask(
        self,
        task: str,
        payload: Payload | None = None,
        sites: list[str] | None = None,
    ) -> dict[str, Payload]:
        """Run one round: send ``task`` with ``payload`` to ``sites`` (default: all).

        Raises
        ------
        FederationError
            When any site refuses or fails; the message lists every such site and why.
        """
        targets = list(sites or self.sites)
        request = {"task": task, **self.context, **(payload or {})}
        if self.protocol is not None:
            request["protocol"] = self.protocol
        self.rounds[self.step] += 1
        replies = self._deliver(request, targets)
        missing = set(targets) - set(replies)
        errors = [f"{s}: no reply" for s in sorted(missing)]
        errors += [f"{s}: {r['error']}" for s, r in replies.items() if "error" in r]
        if errors:
            raise FederationError(
                f"task {task!r} failed at {len(errors)} site(s):\n  " + "\n  ".join(errors)
            )
        return {site: replies[site] for site in targets}

    def subset(self, sites: list[str]) -> Transport:
        """A transport over some of these sites, with its own context and round counts
        (a leave-one-site-out fit); it delivers through this one."""
        return SiteSubset(self, sites)


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

    @property
    def reachable(self) -> list[str]:
        return self.parent.reachable

    def _deliver(self, request: Payload, sites: list[str]) -> dict[str, Payload]:
        return self.parent._deliver(request, sites)
