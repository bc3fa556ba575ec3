"""How long a Flower run may take: an estimate of a study's rounds, and the limit."""

from __future__ import annotations

from radfed.shared.config import StudyConfig

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
