"""External validation: models evaluated on hospitals that were not used to fit them.

Two kinds, both on all of a hospital's patients:

* **validation-only sites** (``role = "validation"`` in the study file) are evaluated
  with the study's models;
* **leave-one-site-out** (by default with three or more training sites): for each
  training hospital, the whole pipeline, ComBat included, is fitted on the other
  training hospitals (their training splits, as in the main fit) and evaluated on it.
  The refits run beside the main fit, sharing its rounds.

A held-out site harmonises its own rows: it estimates its scanner's ComBat batch
effects locally from its features, without the outcome (see
:func:`radfed.harmonization.combat.estimate_new_batch`). The external AUCs of the
held-out sites are summarised by a random-effects meta-analysis on the logit scale (REML
τ², Hartung-Knapp-Sidik-Jonkman interval; DerSimonian-Laird beside it), with I².
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from radfed.server.federation.shared_rounds import rounds_so_far, together
from radfed.server.federation.transport import SiteFailure, Transport
from radfed.server.stats import inference
from radfed.server.stats.evaluation import (
    THRESHOLDS,
    evaluate_models,
    external_entries,
    external_metrics,
    external_replies,
)
from radfed.shared.config import StudyConfig
from radfed.shared.errors import FederationError

if TYPE_CHECKING:
    from radfed.server.study.checkpoint import Checkpoint
    from radfed.server.study.driver import FittedStudy

log = logging.getLogger(__name__)

#: Scalar metrics kept for the internal evaluation of each leave-one-site-out model.
SCALARS = ("n", "events", "status", "reason", "auc", "auc_ci", "brier")


def validation_sites(
    config: StudyConfig,
    transport: Transport,
    fitted: FittedStudy,
    cutoffs: dict[str, int],
) -> dict[str, Any]:
    """The study's models on each validation-only site (``role = "validation"``)."""
    if not config.validation_sites:
        return {}
    transport.step = "validation"
    out = external_metrics(
        transport, fitted.models, config.validation_sites, cutoffs, config.outcome
    )
    _mark_failed_sites(out, transport)
    return out


def leave_one_site_out(
    config: StudyConfig,
    training: list[str],
    refit: Callable[[Transport], FittedStudy],
    checkpoint: Checkpoint | None = None,
) -> tuple[dict[str, Any], dict[str, Callable[[Transport], dict[str, Any]]]]:
    """Whether leave-one-site-out runs, and one job per held-out training site.

    ``refit(transport)`` fits the study's pipeline on ``transport.sites`` (the driver's
    :meth:`~radfed.server.study.driver.FederatedStudy.fit`). Each job takes a transport
    over the training sites and returns the held-out site's entry (see
    :func:`hold_out`); the jobs do not depend on each other or on the main fit, so the
    driver runs them all at once, their rounds shared with the main fit's.

    Returns
    -------
    status : dict
        ``status`` ("ran" or "skipped") and ``reason`` (why it did not run).
    jobs : dict
        ``{held-out site: job}``; empty when skipped.
    """
    if not config.runs_leave_one_site_out:
        reason = (
            f"leave_one_site_out = {config.leave_one_site_out!r} with "
            f"{len(training)} training site(s) (auto needs three or more)"
        )
        return {"status": "skipped", "reason": reason}, {}
    if len(training) < 2:
        return {"status": "skipped", "reason": "needs at least two training sites"}, {}

    def job(held: str) -> Callable[[Transport], dict[str, Any]]:
        def run(transport: Transport) -> dict[str, Any]:
            key = f"held_out-{held}"
            saved = checkpoint.load(key) if checkpoint else None
            if saved is not None:  # a resumed run: this refit is done
                return saved[0]
            log.info("leave-one-site-out: fitting without %s", held)
            entry = hold_out(config, transport, held, refit)
            if checkpoint:
                checkpoint.save(key, (entry, rounds_so_far(transport)))
            return entry

        return run

    return {"status": "ran", "reason": None}, {held: job(held) for held in training}


def hold_out(
    config: StudyConfig,
    transport: Transport,
    held: str,
    refit: Callable[[Transport], FittedStudy],
) -> dict[str, Any]:
    """Fit the pipeline without ``held`` and evaluate it on all of ``held``'s patients."""
    others = [s for s in transport.sites if s != held]
    sub = transport.subset(others, scope=f"leave-one-site-out without {held}: ")
    entry: dict[str, Any] = {"training_sites": others}
    try:
        fitted = refit(sub)

        def internal(lane: Transport) -> tuple[dict[str, Any], Any, dict[str, int]]:
            lane.step = "evaluate"
            return evaluate_models(lane, fitted.models, config.outcome, curves=False)

        def external(lane: Transport) -> dict[str, Any]:
            lane.step = "external"
            return external_replies(lane, fitted.models, [held], config.outcome)

        # The held-out site's evaluation needs the cut-offs only for its metrics: it
        # shares rounds with the evaluation that chooses them.
        (performance, _, cutoffs), replies = together(sub, [internal, external])
        entry.update(external_entries(replies, list(fitted.models), cutoffs)[held])
        entry["radscore_formula"] = fitted.details.get("selection", {}).get("radscore_formula")
        entry["models"] = {name: fit.to_dict() for name, fit in fitted.models.items()}
        entry["cutoffs"] = {m: float(THRESHOLDS[c]) for m, c in cutoffs.items()}
        entry["internal"] = {
            m: {
                site: {split: {k: v.get(k) for k in SCALARS} for split, v in splits.items()}
                for site, splits in per_site.items()
            }
            for m, per_site in performance.items()
        }
    except FederationError as exc:
        log.warning("leave-one-site-out without %s failed: %s", held, exc)
        reason = exc.what if isinstance(exc, SiteFailure) else str(exc)
        entry.update({"status": "failed", "reason": reason, "metrics": {}})
    _mark_failed_sites({held: entry}, transport)
    return entry


def _mark_failed_sites(entries: dict[str, dict[str, Any]], transport: Transport) -> None:
    """A site that stopped answering while it was validated fails its entry, with the
    reason, also where a round's failure was recorded without stopping (a calibration
    curve), so that the entry does not look complete."""
    for site, entry in entries.items():
        failure = transport.failed.get(site)
        if failure is not None:
            entry.update(status="failed", reason=failure.what)


def meta_analysis(
    held_out: dict[str, dict[str, Any]],
    models: list[str],
    method: str = "reml",
    ci: str = "hksj",
) -> dict[str, Any]:
    """Random-effects summary of each model's external AUCs over the held-out sites.

    logit(AUC) is pooled with REML τ² and the Hartung-Knapp-Sidik-Jonkman interval by
    default (with three held-out sites a Wald interval is far too narrow);
    DerSimonian-Laird with a Wald interval is the option ``method="dl", ci="wald"`` and
    is also reported beside the default as ``dersimonian_laird`` (a sensitivity analysis).

    A site whose external AUC is 0 or 1 (complete separation: its DeLong variance is 0
    and its logit infinite) cannot be weighted; it is left out of the summary and named
    in ``excluded`` with the reason, and its own metrics stay in ``held_out``. So are
    sites whose evaluation failed or whose AUC has no standard error.

    Returns
    -------
    dict
        Per model: ``auc``, ``ci``, ``prediction_interval``, ``tau2``, ``i2``, ``q``,
        ``q_p``, ``k``, ``method`` (a short label), ``tau2_method``, ``ci_method``,
        ``sites``, ``excluded`` ({site: reason}) and ``dersimonian_laird``; or ``k``,
        ``reason`` and ``excluded`` when fewer than two sites can be pooled.
    """
    out: dict[str, Any] = {}
    for model in models:
        rows, excluded = [], {}
        for site, entry in held_out.items():
            metrics = entry.get("metrics", {}).get(model, {})
            reason = _unpoolable(entry, metrics)
            if reason:
                excluded[site] = reason
            else:
                rows.append((site, metrics))
        if len(rows) < 2:
            out[model] = {
                "k": len(rows),
                "reason": "needs at least two evaluated held-out sites",
                "excluded": excluded,
            }
            continue
        names = [s for s, _ in rows]
        auc = np.array([m["auc"] for _, m in rows])
        var = np.array([m["auc_se"] for _, m in rows]) ** 2
        re = inference.random_effects_auc(auc, var, names=names, method=method, ci=ci)
        dl = inference.random_effects_auc(auc, var, names=names, method="dl", ci="wald")
        out[model] = {
            **_summary(re),
            "tau2_method": method,
            "ci_method": ci,
            "sites": names,
            "excluded": excluded,
            "dersimonian_laird": _summary(dl),
        }
    return out


def _unpoolable(entry: dict[str, Any], metrics: dict[str, Any]) -> str | None:
    """Why a held-out site's AUC cannot enter the meta-analysis, or None."""
    if entry.get("status") != "ok":
        return f"not evaluated: {entry.get('reason')}"
    if metrics.get("status") != "ok":
        return f"{metrics.get('status', 'not evaluated')}: {metrics.get('reason')}"
    auc, se = metrics.get("auc", np.nan), metrics.get("auc_se", np.nan)
    if auc is None or se is None or not (np.isfinite(auc) and np.isfinite(se)):
        return "AUC or its standard error undefined"
    if auc <= 0.0 or auc >= 1.0 or se <= 0.0:
        return (
            f"AUC = {auc:g} with DeLong SE {se:g}: complete separation has no logit and "
            "no weight (left out of the summary; see its own metrics)"
        )
    return None


def _summary(re: inference.RandomEffects) -> dict[str, Any]:
    return {
        "auc": re.estimate,
        "ci": [re.ci_low, re.ci_upp],
        "prediction_interval": [re.pi_low, re.pi_upp],
        "tau2": re.tau2,
        "i2": re.i2,
        "q": re.q,
        "q_p": re.q_pvalue,
        "k": re.k,
        "method": f"{re.label}, logit AUC",
    }
