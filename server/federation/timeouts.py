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


#: Rounds the leave-one-site-out refits add after the main fit, whose rounds they share:
#: their external evaluation (one round, then the calibration curve's Newton fit).
EXTERNAL_TAIL = 10


def expected_rounds(config: StudyConfig) -> int:
    """A generous estimate of a study's federated rounds, from its settings.

    The leave-one-site-out refits, the clinical screening and the calibration fits share
    the main fit's rounds (:mod:`~radfed.server.federation.shared_rounds`), so a study
    takes about one fit's rounds. Measured (docs/performance.md): the heart-disease
    study 32-34 rounds and the demo 43 (191 and 285 when the fits took turns); this
    estimate gives 58 and 65 (64 and 71 with their ``[classifiers]`` comparison, which
    adds its rounds plus one: 37 rounds measured for the heart-disease study).
    """
    features = bool(config.features)
    radiomics = 0
    if features and config.harmonization.method == "combat":
        radiomics += 3
    if features:
        radiomics += 1 + config.selection.mrmr_k + 8  # standardise, mRMR, LASSO path + CV
    screening = 8 if config.clinical else 0  # univariable Newton, beside the radiomics
    one_fit = 2 + max(radiomics, screening)  # consistency, split
    one_fit += 12 + 16  # the models' Newton fits, evaluation (calibration fits shared)
    one_fit += 1 if config.validation_sites else 0
    # Seed 000's classifier comparison: its training rounds and one evaluation round.
    one_fit += config.classifiers.rounds + 1 if config.classifiers.compare else 0
    return one_fit + (EXTERNAL_TAIL if config.runs_leave_one_site_out else 0)


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
