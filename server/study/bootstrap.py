"""Harrell's bootstrap optimism correction, federated.

For b = 1..B the whole pipeline (ComBat, standardisation, mRMR, LASSO-CV, screening and
the models) is fitted again on bootstrap replicate b: every request of the refit carries
``bootstrap = b``, and each training site answers over its training rows repeated by
Poisson(1) weights it draws itself with its secret
(:func:`radfed.shared.bootstrap.poisson_weights`; the weights never leave it). The
replicate's models are then evaluated twice over the training sites' training rows: on
the replicate (apparent_b, requests with ``bootstrap = b``) and on the original rows
(test_b, the same models, requests without it). With optimism_b = apparent_b - test_b,

    corrected = apparent (the study's own models on the original training rows)
                - mean over b of optimism_b.

The B refits are jobs beside the main fit and the leave-one-site-out refits: they share
their rounds.

Metrics, pooled over the training sites (each exact from the sites' sums, so a pooled
bootstrap with the same weights gives the same numbers):

* ``auc_within_site``: the concordance of pairs within a site,
  sum_s AUC_s e_s n_s / sum_s e_s n_s (AUC_s each site's exact AUC, e_s and n_s its events
  and non-events) -- the stratified concordance; exact.
* ``brier``: sum_s Brier_s N_s / sum_s N_s; exact.
* ``cal_intercept``, ``cal_slope``: the pooled logistic fit of y on the model's logit p
  (federated Newton, as the study's evaluation); exact to the Newton tolerance.

The study's pooled AUC (pairs across sites compared on the sites' 0.01 threshold grid)
is not corrected: within a replicate a site merges its threshold cells to its minimum
cell size times the replicate's largest weight, coarser than on the original rows, so
the difference of the two grid AUCs would mix optimism with the coarsening.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from radfed.server.federation.shared_rounds import together
from radfed.server.federation.transport import SiteSubset, Transport
from radfed.server.results import POOLED, LogisticFit
from radfed.server.stats.evaluation import (
    evaluation_request,
    model_payload,
    pooled_calibration,
)
from radfed.shared.config import StudyConfig
from radfed.shared.errors import FederationError
from radfed.shared.messages import Payload

if TYPE_CHECKING:
    from radfed.server.study.driver import FittedStudy

log = logging.getLogger(__name__)

#: The request field naming the replicate.
FIELD = "bootstrap"
#: Tasks over all of a site's rows or both splits (consistency, split): a replicate's
#: refit asks them as the main fit does, without the replicate (the sites refuse them in
#: one); they are the same questions, answered over the same patients.
ROWLESS = ("describe", "split")
#: The metrics reported, each exact (checked against a pooled bootstrap).
EXACT = ("auc_within_site", "brier", "cal_intercept", "cal_slope")
RULE = (
    "Harrell's bootstrap optimism correction: for each replicate b (each training site's "
    "training rows repeated by Poisson(1) weights the site draws with its secret) the whole "
    "pipeline is refitted; optimism_b = metric on replicate b - metric of the same models "
    "on the original training rows; corrected = apparent - mean optimism. Metrics over the "
    "training sites' training rows: auc_within_site = sum_s AUC_s e_s n_s / sum_s e_s n_s "
    "(pairs within a site; exact), brier (exact), cal_intercept and cal_slope (pooled "
    "logistic recalibration; exact)"
)


class Replicate(SiteSubset):
    """The training sites, asked for bootstrap replicate ``b``: the context carries the
    replicate, so every request of a refit (and of the fits it forks) names it, except
    the row-less questions of :data:`ROWLESS`."""

    def __init__(self, parent: Transport, sites: list[str], b: int) -> None:
        super().__init__(parent, sites)
        self.b = b
        self.scope = f"bootstrap replicate {b}: "
        self.context = {FIELD: b}
        self.step = parent.step

    def ask(
        self, task: str, payload: Payload | None = None, sites: list[str] | None = None
    ) -> dict[str, Payload]:
        if task not in ROWLESS:
            return super().ask(task, payload, sites)
        kept = self.context
        self.context = {k: v for k, v in kept.items() if k != FIELD}
        try:
            return super().ask(task, payload, sites)
        finally:
            self.context = kept


def bootstrap_jobs(
    config: StudyConfig, refit: Callable[[Transport], FittedStudy]
) -> list[Callable[[Transport], dict[str, Any]]]:
    """One job per replicate 1..B (none when ``[validation] bootstrap`` is 0).

    ``refit(transport)`` fits the study's pipeline on ``transport.sites`` (the driver's
    :meth:`~radfed.server.study.driver.FederatedStudy.fit`). Each job takes a transport
    over the training sites and returns the replicate's metrics (see :func:`replicate`).
    """
    return [
        (lambda lane, b=b: replicate(config, lane, b, refit))
        for b in range(1, config.bootstrap + 1)
    ]


def replicate(
    config: StudyConfig,
    transport: Transport,
    b: int,
    refit: Callable[[Transport], FittedStudy],
) -> dict[str, Any]:
    """Refit the pipeline on replicate ``b`` and evaluate its models on the replicate
    (apparent) and on the original training rows (test)."""
    sites = list(config.training_sites)
    boot = Replicate(transport, sites, b)
    log.info("bootstrap: replicate %d", b)
    try:
        fitted = refit(boot)
        names = list(fitted.models)

        def apparent(lane: Transport) -> dict[str, dict[str, float]]:
            lane.step = "bootstrap"
            return _metrics(lane, fitted.models, config.outcome)

        def test(lane: Transport) -> dict[str, dict[str, float]]:
            lane.step = "bootstrap"
            lane.context.pop(FIELD, None)
            return _metrics(lane, fitted.models, config.outcome)

        on_replicate, on_original = together(boot, [apparent, test])
    except FederationError as exc:
        log.warning("bootstrap replicate %d failed: %s", b, exc)
        return {"b": b, "status": "failed", "reason": str(exc)[:500]}
    return {
        "b": b,
        "status": "ok",
        "models": names,
        "fit": _fit_record(fitted),
        "apparent": on_replicate,
        "test": on_original,
    }


def _fit_record(fitted: FittedStudy) -> dict[str, Any]:
    """What a replicate's refit chose (for the record and for checking it): the mRMR
    picks, the λ path and the chosen λ, the Radscore and the retained clinical
    variables."""
    selection = fitted.details.get("selection", {})
    lasso = selection.get("lasso", {})
    rule = str(lasso.get("rule", "lambda.min")).replace(".", "_")
    return {
        "mrmr": selection.get("mrmr", {}).get("selected"),
        "lambdas": lasso.get("lambdas"),
        "lambda": lasso.get(rule),
        "radscore": lasso.get("coef"),
        "retained": fitted.details.get("clinical_screening", {}).get("retained"),
        "models": {name: fit.columns for name, fit in fitted.models.items()},
    }


def _metrics(
    transport: Transport, models: Mapping[str, LogisticFit], outcome: str
) -> dict[str, dict[str, float]]:
    """Each model's metrics over the training rows of ``transport.sites`` (see the
    module's docstring); every site must be evaluable."""
    names = list(models)
    transport.context.update(model_payload(models))
    replies = transport.ask("evaluate", evaluation_request(names, ["train"]))
    bad = {s: r.get("train_reason") for s, r in replies.items() if r["train_status"] != "ok"}
    if bad:
        raise FederationError(f"training rows not evaluable at {sorted(bad)}: {bad}"[:500])
    calibration = pooled_calibration(
        transport, replies, names, "train", outcome, slopes=True, curves=False
    )
    return {
        m: {
            **site_sums(replies, j),
            "cal_intercept": float(calibration[m]["intercept"]),
            "cal_slope": float(calibration[m]["slope"]),
        }
        for j, m in enumerate(names)
    }


def within_sites(sites: list[tuple[int, int, float, float]]) -> dict[str, float]:
    """Within-site concordance and Brier over sites given as (n, events, AUC, Brier)."""
    pairs = concordant = rows = squares = 0.0
    for n, events, auc, brier in sites:
        pairs += events * (n - events)
        concordant += auc * events * (n - events)
        rows += n
        squares += brier * n
    return {"auc_within_site": concordant / pairs, "brier": squares / rows}


def site_sums(replies: Mapping[str, Payload], j: int) -> dict[str, float]:
    """Within-site concordance and Brier of model ``j`` from the sites' train replies."""
    return within_sites(
        [
            (
                int(r["train_n"]),
                int(r["train_events"]),
                float(np.asarray(r["train_auc"])[j]),
                float(np.asarray(r["train_brier"])[j]),
            )
            for r in replies.values()
        ]
    )


def from_performance(performance: Mapping[str, Any], sites: list[str]) -> dict[str, Any]:
    """The apparent metrics of the study's own models, from its evaluation."""
    out: dict[str, Any] = {}
    for m, per_site in performance.items():
        train = [per_site[s]["train"] for s in sites]
        pooled = per_site[POOLED]["train"]
        out[m] = {
            **within_sites(
                [(int(t["n"]), int(t["events"]), float(t["auc"]), float(t["brier"])) for t in train]
            ),
            "cal_intercept": pooled["calibration"]["intercept"],
            "cal_slope": pooled["calibration"]["slope"],
        }
    return out


def summary(
    config: StudyConfig, performance: Mapping[str, Any], replicates: list[dict[str, Any]]
) -> dict[str, Any]:
    """``evaluation.bootstrap`` of results.json: per model and metric the apparent value,
    the mean optimism over the replicates that ran and the corrected value."""
    apparent = from_performance(performance, list(config.training_sites))
    done = [r for r in replicates if r["status"] == "ok"]
    failed = {r["b"]: r["reason"] for r in replicates if r["status"] != "ok"}
    models: dict[str, Any] = {}
    for m, values in apparent.items():
        entry: dict[str, Any] = {}
        for metric in EXACT:
            optimism = [
                r["apparent"][m][metric] - r["test"][m][metric] for r in done if m in r["apparent"]
            ]
            mean = float(np.mean(optimism)) if optimism else None
            value = values[metric]
            entry[metric] = {
                "apparent": value,
                "optimism": mean,
                "optimism_sd": float(np.std(optimism, ddof=1)) if len(optimism) > 1 else None,
                "corrected": None if mean is None or value is None else value - mean,
                "replicates": len(optimism),
            }
        models[m] = entry
    return {
        "B": config.bootstrap,
        "replicates_ok": len(done),
        "failed": failed,
        "rule": RULE,
        "exact": list(EXACT),
        "not_corrected": {
            "auc (pooled)": "pairs across sites are compared on the sites' threshold grid, "
            "merged more coarsely within a replicate: see auc_within_site"
        },
        "models": models,
        "per_replicate": [
            {"b": r["b"], "fit": r["fit"], "apparent": r["apparent"], "test": r["test"]}
            for r in done
        ],
    }
