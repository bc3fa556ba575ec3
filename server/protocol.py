"""The protocol runner: moves requests to sites and aggregates back, over a transport.

The study driver only ever calls :meth:`Transport.ask`. Three transports implement it:
:class:`InProcessTransport` (sites in this process), and the Flower Simulation and
Deployment Engines (:mod:`radfed.server.flower_transport`), which carry the same
encoded records as Flower messages.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping

from flwr.app import RecordDict

from radfed.client.site import SiteSettings, SiteWorker
from radfed.shared.config import StudyConfig
from radfed.shared.errors import FederationError
from radfed.shared.messages import Payload, from_record, to_record

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
    def _exchange(self, requests: Mapping[str, RecordDict]) -> dict[str, RecordDict]:
        """Deliver one encoded request per site and collect the encoded replies."""

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
        encoded = to_record(request)
        self.rounds[self.step] += 1
        replies = {
            site: from_record(rec)
            for site, rec in self._exchange(dict.fromkeys(targets, encoded)).items()
        }
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

    def _exchange(self, requests: Mapping[str, RecordDict]) -> dict[str, RecordDict]:
        return self.parent._exchange(requests)


class InProcessTransport(Transport):
    """All sites in this Python process: tests, notebooks and single-machine runs.

    Requests and replies still go through the Flower record encoding, so what a site
    receives is exactly what it would receive over the network.
    """

    name = "inprocess"

    def __init__(self, workers: Mapping[str, SiteWorker]) -> None:
        super().__init__()
        self.workers = dict(workers)
        self.sites = list(self.workers)

    @property
    def reachable(self) -> list[str]:
        return list(self.workers)

    @classmethod
    def from_study(
        cls, config: StudyConfig, jobs: int = 1, progress: bool = False
    ) -> InProcessTransport:
        """One worker per study site, each enforcing the study's privacy rules."""
        return cls(
            {
                s.name: SiteWorker(
                    SiteSettings(s.name, s.path, config.privacy, jobs=jobs, progress=progress)
                )
                for s in config.sites
            }
        )

    def _exchange(self, requests: Mapping[str, RecordDict]) -> dict[str, RecordDict]:
        return {
            site: to_record(self.workers[site].handle(from_record(rec)))
            for site, rec in requests.items()
        }
