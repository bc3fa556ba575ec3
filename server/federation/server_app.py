"""The Flower ServerApp: a thin shell that runs the study driver over the Grid.

Run configuration (``flwr run ... --run-config``): ``study`` (path of the study file on
the coordinator), ``out`` (output folder), ``track`` (log to MLflow, default true),
``pooled`` (add the pooled reference fit; only where the coordinator may read every
site's folder, as in a local test federation).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from radfed.server.federation.flower import GridTransport
from radfed.server.results import StudyResult
from radfed.server.study.driver import FederatedStudy
from radfed.server.study.record import finish_run
from radfed.shared.config import StudyConfig, load_study


def serve_study(
    grid: Grid, config: StudyConfig, engine: str, connect_timeout: float = 120.0
) -> StudyResult:
    """Run a study over a Flower Grid."""
    transport = GridTransport(
        grid,
        config.site_names,
        connect_timeout=connect_timeout,
        reply_timeout=config.round_timeout,
        engine=engine,
    )
    result = FederatedStudy(config, transport).run()
    transport.finish()
    return result


def make_server_app(run: Callable[[Grid, Context], None]) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run(grid, context)

    return app


def _deployment_main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    config = load_study(str(cfg["study"]))
    result = serve_study(
        grid, config, engine="deployment", connect_timeout=float(cfg.get("connect-timeout", 120.0))
    )
    finish_run(
        result,
        config,
        Path(str(cfg["out"])),
        track=bool(cfg.get("track", True)),
        pooled=bool(cfg.get("pooled", False)),
    )


app = make_server_app(_deployment_main)
