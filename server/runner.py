"""Run a study over a chosen transport and record what it produced."""

from __future__ import annotations

import logging
from pathlib import Path

from radfed.server.outputs import point_latest, record_failure
from radfed.server.protocol import InProcessTransport
from radfed.server.results import StudyResult
from radfed.server.study import FederatedStudy
from radfed.shared.config import StudyConfig

log = logging.getLogger(__name__)

TRANSPORTS = ("inprocess", "simulation", "deployment")
RESULTS = "results.json"

#: Seconds a Flower run gets to start (SuperNodes connect, the first ClientApps start).
STARTUP_SECONDS = 300.0
#: Seconds allowed per expected round when the run timeout is derived from the study.
#: A Deployment Engine round on 127.0.0.1 takes 4-8 s on an idle 2-core machine and
#: 16-26 s on one loaded 10-20 (docs/performance.md); the overall limit is a backstop,
#: a stuck round is caught sooner by the study's ``round_timeout``.
ROUND_ALLOWANCE_SECONDS = 60.0


def expected_rounds(config: StudyConfig) -> int:
    """A generous estimate of a study's federated rounds, from its settings.

    Measured on the heart-disease study (``radfed heart-disease``): 47 rounds for the
    fit on all training sites and as many again for each leave-one-site-out refit
    (188 in all) in the first release, 61 for one fit since the calibration fits joined
    the evaluation; this estimate gives 72 and 288.
    """
    features = bool(config.features)
    one_fit = 2  # consistency, split
    if features and config.harmonization.method == "combat":
        one_fit += 3
    if features:
        one_fit += 1 + config.selection.mrmr_k + 8  # standardise, mRMR, LASSO path + CV
    if config.clinical:
        one_fit += 8  # univariable screening (Newton, all variables together)
    one_fit += 12 + 32  # the models' Newton fits, evaluation (with calibration fits)
    one_fit += 1 if config.validation_sites else 0
    fits = 1 + (len(config.training_sites) if config.runs_leave_one_site_out else 0)
    return one_fit * fits


def run_timeout(config: StudyConfig, override: float | None = None) -> float | None:
    """Seconds a whole Flower run may take (None: no overall limit).

    ``override`` (``radfed run --timeout``), else the study's ``[federation] timeout``,
    else :data:`STARTUP_SECONDS` plus :data:`ROUND_ALLOWANCE_SECONDS` per expected round.
    Zero means no overall limit: each round is still limited by ``round_timeout``.
    """
    seconds = override if override is not None else config.timeout
    if seconds is None:
        return STARTUP_SECONDS + ROUND_ALLOWANCE_SECONDS * expected_rounds(config)
    return float(seconds) if seconds > 0 else None


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
    from radfed.server.outputs import record_error, write_outputs, write_results

    out_dir = Path(out_dir)
    result.federation["output_dir"] = str(out_dir.absolute())
    path = out_dir / RESULTS
    if track and config.tracking_enabled:
        from radfed.server.tracking import log_study

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
    from radfed.server.outputs import check_writable, new_run_folder

    if track and config.tracking_enabled:
        from radfed.server.tracking import check_tracking_store

        check_tracking_store(config)
    return new_run_folder(out_dir) if new_folder else check_writable(out_dir)


def run_study(
    config: StudyConfig,
    transport: str = "inprocess",
    out_dir: str | Path = "radfed-out",
    track: bool = True,
    jobs: int = 1,
    progress: bool = False,
    pooled: bool = False,
    timeout: float | None = None,
    new_folder: bool = True,
) -> StudyResult:
    """Run ``config`` over ``transport`` and record the result in ``out_dir``.

    With ``pooled``, the study is also fitted centrally with the reference libraries and
    the federated-versus-pooled equivalence table is added to the result. ``timeout``
    (seconds; 0: no limit) overrides the study's run timeout (see :func:`run_timeout`);
    it applies to the Deployment Engine, where every round is also limited by the
    study's ``round_timeout``.

    ``out_dir`` is the output root: each run writes into a new folder of its own there
    (``new_folder=False``: into ``out_dir`` itself); the folder is
    ``result.federation["output_dir"]``. Write permissions (and a local MLflow store's)
    are checked before the first round.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; choose one of {TRANSPORTS}")
    root = Path(out_dir)
    out_dir = prepare_output(config, root, track=track, new_folder=new_folder)
    try:
        result = _run_over(config, transport, out_dir, track, jobs, progress, pooled, timeout)
    except BaseException as exc:  # the run's folder says why it holds no results
        record_failure(out_dir, config.name, transport, exc)
        raise
    if new_folder:
        point_latest(root, out_dir)
    return result


def _run_over(
    config: StudyConfig,
    transport: str,
    out_dir: Path,
    track: bool,
    jobs: int,
    progress: bool,
    pooled: bool,
    timeout: float | None,
) -> StudyResult:
    """Run the study over ``transport`` and record it in the run folder ``out_dir``."""
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
        limit = run_timeout(config, timeout)
        log.info(
            "run timeout: %s (about %d rounds expected; %.0f s per round at most)",
            "none" if limit is None else f"{limit:.0f} s",
            expected_rounds(config),
            config.round_timeout,
        )
        result = StudyResult.read_json(
            run_in_local_deployment(config, Path(out_dir), track=track, timeout=limit or 0)
        )
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
