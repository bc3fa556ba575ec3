"""Record a finished run: the pooled check, results.json, figures, report and MLflow.

Every transport ends here through :func:`finish_run` (the Deployment Engine's ServerApp
too), so an option such as ``--pooled`` or tracking behaves the same on all of them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from radfed.server.outputs.run_folder import RESULTS
from radfed.server.results import StudyResult
from radfed.shared.config import StudyConfig

log = logging.getLogger(__name__)


def finish_run(
    result: StudyResult, config: StudyConfig, out_dir: Path, track: bool, pooled: bool
) -> Path:
    """Add the pooled equivalence table (with ``pooled``), then :func:`record_result`."""
    if pooled:
        add_equivalence(result, config)
    if config.nomogram_labels or config.nomogram_levels:
        result.details["nomogram_display"] = {
            "labels": dict(config.nomogram_labels),
            "levels": {
                k: dict(v) if isinstance(v, dict) else list(v)
                for k, v in config.nomogram_levels.items()
            },
        }
    return record_result(result, config, out_dir, track=track)


def record_result(
    result: StudyResult, config: StudyConfig, out_dir: Path, track: bool = True
) -> Path:
    """Write ``results.json``, the figures and the report into ``out_dir`` and log the
    run to MLflow (when enabled).

    Nothing computed is lost to a later failure: ``results.json`` is written first, and
    a figure, report or MLflow error is recorded in its ``federation["errors"]`` (and
    logged) instead of discarding the run. Only an unwritable ``out_dir`` raises.

    Returns
    -------
    Path
        The ``results.json`` written.

    Raises
    ------
    OutputError
        ``results.json`` cannot be written.
    """
    from radfed.server.outputs.run_folder import record_error, write_outputs, write_results

    out_dir = Path(out_dir)
    result.federation["output_dir"] = str(out_dir.absolute())
    path = out_dir / RESULTS
    if track and config.tracking_enabled:
        from radfed.server.tracking.runs import log_study

        try:
            log_study(result, config, out_dir)  # writes the outputs with the run id
        except Exception as exc:  # the run's results are kept: recorded, not lost
            record_error(result, "MLflow tracking", exc)
            if path.is_file():
                write_results(result, out_dir)
            else:
                write_outputs(result, out_dir)
    else:
        write_outputs(result, out_dir)
    log.info("results written to %s", path)
    return path


def prepare_output(
    config: StudyConfig, out_dir: str | Path, track: bool = True, new_folder: bool = True
) -> Path:
    """Check, before any round, that the run's results can be kept; return its folder.

    With ``new_folder``, ``out_dir`` is an output root: the run gets its own new folder
    ``out_dir/YYYYMMDD-HHMMSS-<id>`` (``out_dir/latest`` points at it), so no run ever
    overwrites another. A local MLflow store must be writable when the run is tracked.

    Raises
    ------
    OutputError
        The output folder or the tracking store cannot be written.
    """
    from radfed.server.outputs.run_folder import check_writable, new_run_folder

    if track and config.tracking_enabled:
        from radfed.server.tracking.runs import check_tracking_store

        check_tracking_store(config)
    return new_run_folder(out_dir) if new_folder else check_writable(out_dir)


def add_equivalence(result: StudyResult, config: StudyConfig) -> None:
    """Fit the study centrally with the reference libraries and compare (``--pooled``)."""
    from radfed.server.study.pooled import equivalence

    log.info("fitting the pooled reference (neuroCombat, scikit-learn, statsmodels)")
    result.details["equivalence"] = [row.to_dict() for row in equivalence(config, result)]
