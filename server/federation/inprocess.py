"""The in-process transport: every site's worker in this Python process.

For tests, notebooks and single-machine runs; requests and replies still go through the
Flower record encoding, so a site receives exactly what it would over the network.
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import RecordDict

from radfed.client.site import SiteSettings, SiteWorker
from radfed.server.federation.encoded import EncodedTransport
from radfed.shared.config import StudyConfig
from radfed.shared.messages import from_record, to_record


class InProcessTransport(EncodedTransport):
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
