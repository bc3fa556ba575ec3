"""Run a study over a chosen transport and record what it produced."""

from __future__ import annotations

import logging
from pathlib import Path

from radfed.server.federation.inprocess import InProcessTransport
from radfed.server.federation.timeouts import expected_rounds, run_timeout
from radfed.server.outputs.run_folder import point_latest, record_failure
from radfed.server.results import StudyResult
from radfed.server.study.checkpoint import Checkpoint, unfinished_run
from radfed.server.study.driver import FederatedStudy
from radfed.server.study.record import finish_run, prepare_output
from radfed.shared.config import StudyConfig
from radfed.shared.errors import RadfedError

log = logging.getLogger(__name__)

TRANSPORTS = ("inprocess", "simulation", "deployment")


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
    resume: bool = False,
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

    An in-process run keeps its completed phases in the run folder
    (:mod:`~radfed.server.study.checkpoint`); with ``resume``, the newest unfinished run
    under ``out_dir`` continues from its last completed phase, in its own folder.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; choose one of {TRANSPORTS}")
    root = Path(out_dir)
    if resume:
        if transport != "inprocess":
            raise RadfedError(
                "--resume continues in-process runs; a Flower run restarts from the start"
            )
        out_dir = unfinished_run(root)
        if out_dir is None:
            raise RadfedError(f"no unfinished run under {root} to resume")
        prepare_output(config, out_dir, track=track, new_folder=False)
        log.warning("resuming the run in %s", out_dir.resolve())
    else:
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
    checkpoint = None
    if transport == "inprocess":
        checkpoint = Checkpoint(out_dir, config)
        result = FederatedStudy(
            config,
            InProcessTransport.from_study(config, jobs=jobs, progress=progress),
            checkpoint=checkpoint,
        ).run()
    elif transport == "simulation":
        from radfed.server.federation.simulation import run_in_simulation

        result = run_in_simulation(config)
    elif transport == "deployment":
        from radfed.deploy.local_federation import run_in_local_deployment

        # In the Deployment Engine the ServerApp process records the run itself (the
        # same finish_run, with the same options), as it does at a real coordinator;
        # here we read back what it wrote.
        limit = run_timeout(config, timeout)
        log.info(
            "run timeout: %s (about %d rounds expected; %.0f s per round at most)",
            "none" if limit is None else f"{limit:.0f} s",
            expected_rounds(config),
            config.round_timeout,
        )
        return StudyResult.read_json(
            run_in_local_deployment(
                config, Path(out_dir), track=track, timeout=limit or 0, pooled=pooled
            )
        )
    else:
        raise ValueError(f"unknown transport {transport!r}; choose one of {TRANSPORTS}")
    finish_run(result, config, Path(out_dir), track=track, pooled=pooled)
    if checkpoint is not None:
        checkpoint.clear()  # the results are kept: nothing left to resume
    return result
