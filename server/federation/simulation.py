"""Run a study in the Flower Simulation Engine: one virtual SuperNode per site."""

from __future__ import annotations

import logging
import os

from flwr.app import Context
from flwr.serverapp import Grid
from flwr.simulation import run_simulation

from radfed.client.app import make_client_app
from radfed.client.site import SiteSettings
from radfed.server.federation.server_app import make_server_app, serve_study
from radfed.server.results import StudyResult
from radfed.shared.config import StudyConfig
from radfed.shared.errors import FederationError

log = logging.getLogger(__name__)


class _DropDeprecation(logging.Filter):
    # Flower deprecates run_simulation in favour of `flwr run`; radfed keeps it as the
    # in-process entry to the Simulation Engine, so its notice is noise for users.
    def filter(self, record: logging.LogRecord) -> bool:
        return "run_simulation` function is deprecated" not in record.getMessage()


def _quiet_flower() -> None:
    flwr_log = logging.getLogger("flwr")
    flwr_log.addFilter(_DropDeprecation())
    if not log.isEnabledFor(logging.DEBUG):
        flwr_log.setLevel(logging.WARNING)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def run_in_simulation(config: StudyConfig, cpus_per_site: float = 1.0) -> StudyResult:
    """Run the study with Flower's Simulation Engine (Ray backend).

    Virtual SuperNode ``i`` serves the study's site ``i`` (its ``partition-id``), with
    the study's privacy rules as the site's own.
    """
    settings = [SiteSettings(s.name, s.path, config.privacy) for s in config.sites]
    results: list[StudyResult] = []

    def run(grid: Grid, context: Context) -> None:
        results.append(serve_study(grid, config, engine="simulation"))

    def settings_of(context: Context) -> SiteSettings:
        return settings[int(context.node_config["partition-id"])]

    _quiet_flower()
    run_simulation(
        server_app=make_server_app(run),
        client_app=make_client_app(settings_of),
        num_supernodes=len(settings),
        backend_config={"client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0}},
    )
    if not results:
        raise FederationError(
            "the Flower simulation ended without a study result (see the log above)"
        )
    return results[0]
