"""Run a study over a chosen transport and record what it produced."""

from __future__ import annotations

import logging
from pathlib import Path

from radfed.server.protocol import InProcessTransport
from radfed.server.results import StudyResult
from radfed.server.study import FederatedStudy
from radfed.shared.config import StudyConfig

log = logging.getLogger(__name__)

TRANSPORTS = ("inprocess", "simulation", "deployment")
RESULTS = "results.json"


def record_result(
    result: StudyResult, config: StudyConfig, out_dir: Path, track: bool = True
) -> Path:
    """Write ``results.json``, the figures and the report into ``out_dir`` and log the
    run to MLflow (when enabled)."""
    out_dir = Path(out_dir)
    if track and config.tracking_enabled:
        from radfed.server.tracking import log_study

        log_study(result, config, out_dir)  # writes the outputs with the run id, as artifacts
    else:
        from radfed.server.outputs import write_outputs

        write_outputs(result, out_dir)
    path = out_dir / RESULTS
    log.info("results written to %s", path)
    return path


def run_study(
    config: StudyConfig,
    transport: str = "inprocess",
    out_dir: str | Path = "radfed-out",
    track: bool = True,
    jobs: int = 1,
    progress: bool = False,
    pooled: bool = False,
) -> StudyResult:
    """Run ``config`` over ``transport`` and record the result in ``out_dir``.

    With ``pooled``, the study is also fitted centrally with the reference libraries and
    the federated-versus-pooled equivalence table is added to the result.
    """
    if transport == "inprocess":
        result = FederatedStudy(
            config, InProcessTransport.from_study(config, jobs=jobs, progress=progress)
        ).run()
    elif transport == "simulation":
        from radfed.server.simulation import run_in_simulation

        result = run_in_simulation(config)
    elif transport == "deployment":
        from radfed.server.deployment import run_in_local_deployment

        # In the Deployment Engine the ServerApp process records the run itself, as it
        # does at a real coordinator; here we read back what it wrote.
        result = StudyResult.read_json(run_in_local_deployment(config, Path(out_dir), track=track))
        if pooled:
            _add_equivalence(result, config)
            result.write_json(Path(out_dir) / RESULTS)
        return result
    else:
        raise ValueError(f"unknown transport {transport!r}; choose one of {TRANSPORTS}")
    if pooled:
        _add_equivalence(result, config)
    record_result(result, config, Path(out_dir), track=track)
    return result


def _add_equivalence(result: StudyResult, config: StudyConfig) -> None:
    from radfed.server.pooled import equivalence

    log.info("fitting the pooled reference (neuroCombat, scikit-learn, statsmodels)")
    result.details["equivalence"] = [row.to_dict() for row in equivalence(config, result)]
