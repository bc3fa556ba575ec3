"""Evaluation of the fitted models: per site and split at the sites, pooled from sums.

One ``evaluate`` round: each site returns, per model and subset, its AUC and DeLong
covariance, counts of events and non-events at or above each threshold of a fixed
probability grid, per-risk-bin n / events / sum of predictions, its Brier score,
calibration intercept and slope and Hosmer-Lemeshow test (all computed at the site,
shapes fixed by the request). The coordinator turns them into the metrics of every
site (:func:`site_metrics`) and of all sites together (:func:`pooled_metrics`); pooled
calibration intercept and slope are a federated logistic fit of y on logit(p)
(:func:`pooled_calibration`, with the smooth calibration curve), exact like every
other federated fit.

The cut-off of each model is Youden's (sensitivity + specificity - 1 largest) on the
pooled training data, searched on the threshold grid; sensitivity, specificity and
accuracy at it follow from the threshold counts.

rms ``val.prob``'s other indices (:func:`val_prob_indices`), per site and split and
pooled, with no further request:

- **Dxy** = 2 (AUC - 1/2), its CI from the AUC's (DeLong at a site; the pooled AUC's
  Hanley-McNeil CI, and as approximate as the pooled AUC);
- **Nagelkerke R²** of the predictions as they are, from the summed log-likelihood
  ``Σ y log p + (1 - y) log(1 - p)`` (p clipped at the site's ``PROB_EPS``), n and
  events: exact, per site and pooled. (rms ``val.prob`` prints the R² of the
  *recalibrated* predictions, its logistic fit of y on logit p; the two agree when the
  calibration intercept is 0 and the slope 1.)
- **scaled Brier** = Brier / (ē (1 - ē)) and the **Brier skill** 1 - that: exact.
- **ICI, E50, E90, Emax** (Austin & Steyerberg, Stat Med 2019; val.prob's Eavg, E90,
  Emax) of ``|c(p) - p|``, ``c`` the smooth calibration curve (logistic on a cubic
  polynomial of logit p). At a site: its own curve, fitted at the site in the same
  request when its parameter limit allows (6 parameters per model with the
  calibration slope: 54 patients for three models); the site's ICI is exact (its mean
  over its patients); E50, E90 and Emax are single patients' values, so the site does
  not send them: the coordinator computes them from the site's threshold counts
  (patients per 0.01 risk cell, cells merged to the site's minimum cell size) with the
  site's curve coefficients. Pooled: the pooled curve over all sites' threshold counts,
  ICI included. These are **approximate**: each patient is known only by its risk
  cell, so the estimate spreads a cell's patients uniformly over it, and the bounds
  (``errors_bounds``) put every patient at the best and the worst point of its cell —
  the true value always lies within them
  (:func:`~radfed.server.stats.inference.calibration_errors_from_cells`). No request
  was added: beyond the existing evaluate reply a site sends its curve's four
  coefficients, its log-likelihood sum and its ICI per model. Accuracy measured on the
  heart-disease hospitals: docs/python-api.md, "val.prob's indices".
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from scipy.special import expit

from radfed.server.federation.shared_rounds import together
from radfed.server.federation.transport import Transport
from radfed.server.results import POOLED, LogisticFit
from radfed.server.stats import axis_ranges, inference
from radfed.server.stats.solvers import LogisticSpec, fit_logistic_many, spread
from radfed.shared.errors import FederationError
from radfed.shared.evaluation_stats import BIN_EDGES, CURVE_DEGREE, THRESHOLDS, curve_design
from radfed.shared.messages import LINEAR_PREDICTOR as LP
from radfed.shared.messages import Payload

log = logging.getLogger(__name__)

# The grids (THRESHOLDS, BIN_EDGES, HL_GROUPS) are the sites' own: shared.evaluation_stats.
CUTOFF_RULE = (
    "Youden (max sensitivity + specificity - 1) on the pooled training data, searched on "
    "the 0.01 grid of the sites' threshold counts (each site merges thresholds until "
    "every count passes its minimum cell size)"
)
CURVE_POINTS = 60
NAN = float("nan")


def model_payload(models: Mapping[str, LogisticFit]) -> Payload:
    """The fitted models' columns and coefficients, for sites to predict with."""
    payload: Payload = {}
    for name, fit in models.items():
        payload.update(
            {
                f"{name}_columns": fit.columns,
                f"{name}_center": fit.center,
                f"{name}_scale": fit.scale,
                f"{name}_beta": fit.coef,
            }
        )
    return payload


def evaluation_request(
    models: list[str], subsets: list[str], ranges: tuple[str, list[str]] | None = None
) -> Payload:
    """An ``evaluate`` request; the models' coefficients travel in the context. The
    grids of thresholds, bins and Hosmer-Lemeshow groups are the sites' own.
    ``ranges=(model, columns)`` also asks for the training patients' counts on the
    sites' value grid, for the nomogram's axes (:mod:`~radfed.server.stats.axis_ranges`)."""
    request: Payload = {"models": list(models), "subsets": list(subsets)}
    if ranges is not None and ranges[1]:
        request.update(ranges_model=ranges[0], ranges=list(ranges[1]))
    return request


def counts_at_thresholds(reply: Payload, subset: str, j: int, key: str) -> np.ndarray:
    """A site's events (``key="tp"``) or non-events (``"fp"``) at or above each
    threshold for model ``j``, interpolated linearly between the thresholds whose
    counts the site sent exactly (where it merged cells it sent the count of the
    merged cell's lower boundary). Used for pooled estimates, which are approximate
    where a site merged."""
    counts = np.asarray(reply[f"{subset}_{key}"][j], dtype=float)
    exact = _exact(reply, subset, j, key)
    total = float(reply[f"{subset}_events"])
    if key == "fp":
        total = float(reply[f"{subset}_n"]) - total
    x = np.concatenate([[0.0], THRESHOLDS[exact], [1.0]])
    y = np.concatenate([[total], counts[exact], [0.0]])
    # Above the last exact threshold the merged cell reaches p = 1, where nobody is
    # "at or above 1" only in the limit: interpolate to 0 there.
    return np.interp(THRESHOLDS, x, y)


def _exact(reply: Payload, subset: str, j: int, key: str | None = None) -> np.ndarray:
    """Where a site's threshold counts for model ``j`` are exact (not merged): of its
    events (``key="tp"``), non-events (``"fp"``), or both (``None``)."""
    keys = ("tp", "fp") if key is None else (key,)
    exact = np.ones(len(THRESHOLDS), dtype=bool)
    for k in keys:
        if f"{subset}_{k}_exact" in reply:
            exact &= np.asarray(reply[f"{subset}_{k}_exact"][j], dtype=float) > 0.5
    return exact


def youden_cutoffs(
    replies: Mapping[str, Payload], models: list[str], subset: str = "train"
) -> dict[str, int]:
    """Index into :data:`THRESHOLDS` of each model's Youden cut-off on pooled ``subset``."""
    ok = [r for r in replies.values() if r.get(f"{subset}_status") == "ok"]
    if not ok:
        return {}
    tp = [sum(counts_at_thresholds(r, subset, j, "tp") for r in ok) for j in range(len(models))]
    fp = [sum(counts_at_thresholds(r, subset, j, "fp") for r in ok) for j in range(len(models))]
    events = sum(int(r[f"{subset}_events"]) for r in ok)
    nonevents = sum(int(r[f"{subset}_n"]) - int(r[f"{subset}_events"]) for r in ok)
    cutoffs = {
        m: inference.youden_cutoff(tp[j], fp[j], events, nonevents, THRESHOLDS).index
        for j, m in enumerate(models)
    }
    return {m: c for m, c in cutoffs.items() if c is not None}


def _at_cutoff(tp: np.ndarray, fp: np.ndarray, n: int, events: int, c: int | None) -> dict:
    if c is None:
        return {"cutoff": NAN, "accuracy": NAN, "accuracy_ci": [NAN, NAN]} | dict.fromkeys(
            ("sensitivity", "specificity"), NAN
        )
    nonevents = n - events
    tn = nonevents - fp[c]
    correct = round(float(tp[c] + tn))
    return {
        "cutoff": float(THRESHOLDS[c]),
        "accuracy": correct / n,
        "accuracy_ci": list(inference.clopper_pearson(correct, n)),
        "sensitivity": float(tp[c] / events),
        "specificity": float(tn / nonevents),
    }


def _curves(tp: np.ndarray, fp: np.ndarray, n: int, events: int) -> dict[str, Any]:
    return {
        "roc": {"tpr": (tp / events).tolist(), "fpr": (fp / (n - events)).tolist()},
        "net_benefit": inference.net_benefit(tp, fp, n, THRESHOLDS).tolist(),
        "treat_all": inference.net_benefit_treat_all(events, n, THRESHOLDS).tolist(),
    }


def missing_metrics(n: int | None, events: int | None, status: str, reason: str) -> dict:
    """The metrics entry of a model that could not be evaluated, with the reason."""
    return {"n": n, "events": events, "status": status, "reason": reason, "auc": NAN}


ERRORS_METHOD = (
    "|c(p) - p| of the smooth calibration curve c over the patients, each known by its "
    "0.01 risk cell (cells merged to each site's minimum cell size): estimate with a "
    "cell's patients spread uniformly, bounds with each at its cell's best and worst point"
)


def risk_cells(reply: Payload, subset: str, j: int) -> tuple[np.ndarray, ...]:
    """Patients of one site's ``subset`` per risk cell, from its threshold counts.

    Returns ``(lo, hi, count)``: ``count`` patients have ``lo <= p < hi``. The cells are
    the 0.01 steps of :data:`THRESHOLDS` where the site sent exact counts, and the merged
    cells where it did not, for its events and non-events separately (each merged its
    own cells); every count is exact.
    """
    bounds = np.concatenate([[0.0], THRESHOLDS, [1.0]])
    lo, hi, count = [], [], []
    for key, total in (
        ("tp", int(reply[f"{subset}_events"])),
        ("fp", int(reply[f"{subset}_n"]) - int(reply[f"{subset}_events"])),
    ):
        cum = np.concatenate([[total], np.asarray(reply[f"{subset}_{key}"][j], float), [0]])
        exact = np.concatenate([[True], _exact(reply, subset, j, key), [True]])
        edges = np.flatnonzero(exact)
        lo.append(bounds[edges[:-1]])
        hi.append(bounds[edges[1:]])
        count.append(np.round(cum[edges[:-1]] - cum[edges[1:]]).astype(np.int64))
    return np.concatenate(lo), np.concatenate(hi), np.concatenate(count)


def val_prob_indices(
    n: int,
    events: int,
    auc: float,
    auc_ci: list[float],
    brier: float,
    loglik: float,
    curve: np.ndarray | None,
    cells: tuple[np.ndarray, ...],
    ici: float | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """rms ``val.prob``'s Dxy, R², scaled Brier and the calibration errors of one
    metrics entry. ``ici``: the exact ICI a site sent (else estimated from ``cells``).

    Returns the top-level entries and the calibration entries."""
    top = {
        "dxy": float(inference.somers_dxy(auc)),
        "dxy_ci": [float(inference.somers_dxy(c)) for c in auc_ci],
        "r2": inference.nagelkerke_r2(loglik, n, events),
        "brier_scaled": inference.scaled_brier(brier, n, events),
    }
    top["brier_skill"] = 1.0 - top["brier_scaled"]
    if curve is None or not np.all(np.isfinite(curve)):
        errors = dict.fromkeys(("ici", "e50", "e90", "emax"), NAN)
        return top, {**errors, "errors_bounds": None, "errors_method": None}
    e = inference.calibration_errors_from_cells(np.asarray(curve, float), *cells)
    bounds = {k: list(v) for k, v in e.bounds.items()}
    if ici is not None and math.isfinite(ici):
        bounds["ici"] = [ici, ici]
    else:
        ici = e.ici
    cal = {
        "ici": float(ici),
        "e50": e.e50,
        "e90": e.e90,
        "emax": e.emax,
        "errors_bounds": bounds,
        "errors_method": ERRORS_METHOD,
    }
    return top, cal


def _site_curve(reply: Payload, subset: str, j: int) -> np.ndarray | None:
    keys = [f"{subset}_curve_{k}" for k in range(CURVE_DEGREE + 1)]
    if not all(k in reply for k in keys):
        return None  # a site of an older radfed: no val.prob indices from it
    return np.array([float(reply[k][j]) for k in keys])


def _reply_val_prob(
    reply: Payload, subset: str, j: int, auc: float, auc_ci: list[float], brier: float
) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    n, events = int(reply[f"{subset}_n"]), int(reply[f"{subset}_events"])
    loglik = float(reply[f"{subset}_loglik"][j]) if f"{subset}_loglik" in reply else NAN
    ici = float(reply[f"{subset}_ici"][j]) if f"{subset}_ici" in reply else None
    curve = _site_curve(reply, subset, j)
    top, cal = val_prob_indices(
        n, events, auc, auc_ci, brier, loglik, curve, risk_cells(reply, subset, j), ici
    )
    approximate = {}
    if cal["errors_bounds"] is None:
        cal["errors_reason"] = (
            "the site's smooth calibration curve was not fitted (too few patients for its "
            "parameters, or no finite fit)"
        )
    else:
        approximate["calibration_errors"] = (
            "E50, E90 and Emax from the site's risk cells (0.01 wide, merged to its minimum "
            "cell size) with its own curve; bounds in errors_bounds"
        )
    return top, cal, approximate


def site_metrics(reply: Payload, subset: str, j: int, cutoff: int | None) -> dict[str, Any]:
    """Metrics of model ``j`` on one site's ``subset``, from its evaluate reply."""
    status = reply.get(f"{subset}_status", "refused")
    n, events = reply.get(f"{subset}_n"), reply.get(f"{subset}_events")
    if status != "ok":
        return missing_metrics(n, events, status, reply.get(f"{subset}_reason", ""))
    n, events = int(n), int(events)
    auc = float(reply[f"{subset}_auc"][j])
    var = float(reply[f"{subset}_auc_cov"][j, j])
    tp, fp = reply[f"{subset}_tp"][j], reply[f"{subset}_fp"][j]
    exact = _exact(reply, subset, j)
    # At a cut-off inside a cell the site merged, the counts there are interpolated.
    at_cutoff = _at_cutoff(
        counts_at_thresholds(reply, subset, j, "tp"),
        counts_at_thresholds(reply, subset, j, "fp"),
        n,
        events,
        cutoff,
    )
    approximate = {}
    if cutoff is not None and not exact[cutoff]:
        approximate["sensitivity"] = (
            "the site merged threshold cells around the cut-off (minimum cell size): "
            "sensitivity, specificity and accuracy interpolate its counts"
        )
    auc_ci = list(inference.auc_ci(auc, var))
    brier = float(reply[f"{subset}_brier"][j])
    indices, errors, approx_errors = _reply_val_prob(reply, subset, j, auc, auc_ci, brier)
    approximate.update(approx_errors)
    return {
        "n": n,
        "events": events,
        "status": "ok",
        "reason": None,
        "auc": auc,
        "auc_se": math.sqrt(var),
        "auc_ci": auc_ci,
        "brier": brier,
        **indices,
        **at_cutoff,
        "calibration": {
            "intercept": float(reply[f"{subset}_cal_intercept"][j]),
            "slope": float(reply[f"{subset}_cal_slope"][j]),
            "hl_statistic": float(reply[f"{subset}_hl_statistic"][j]),
            "hl_df": int(reply[f"{subset}_hl_df"][j]),
            "hl_p": float(reply[f"{subset}_hl_p"][j]),
            "bins": _bins(reply, subset, j),
            **errors,
        },
        **_curves(tp, fp, n, events),
        "thresholds_exact": exact.tolist(),
        "events_exact": _exact(reply, subset, j, "tp").tolist(),
        "nonevents_exact": _exact(reply, subset, j, "fp").tolist(),
        **({"approximate": approximate} if approximate else {}),
    }


def _bins(reply: Payload, subset: str, j: int) -> dict[str, list[float]]:
    return {
        "edges": BIN_EDGES.tolist(),
        "n": np.asarray(reply[f"{subset}_bin_n"][j]).tolist(),
        "observed": np.asarray(reply[f"{subset}_bin_observed"][j]).tolist(),
        "expected": np.asarray(reply[f"{subset}_bin_expected"][j]).tolist(),
    }


def pooled_auc(replies: list[Payload], subset: str, j: int) -> float:
    """AUC over all sites' patients: pairs within a site from the sites' exact AUCs,
    pairs across sites compared on the threshold grid (ties within a step count 1/2),
    from counts interpolated where a site merged threshold cells."""
    counts = [
        (
            int(r[f"{subset}_events"]),
            int(r[f"{subset}_n"]) - int(r[f"{subset}_events"]),
            counts_at_thresholds(r, subset, j, "tp"),
            counts_at_thresholds(r, subset, j, "fp"),
        )
        for r in replies
    ]
    concordant = sum(
        float(r[f"{subset}_auc"][j]) * events * nonevents
        for r, (events, nonevents, _, _) in zip(replies, counts, strict=True)
    )
    # Site a's events against site b's non-events: the grid AUC of their counts.
    for (e_a, _, tp_a, _), (_, ne_b, _, fp_b) in itertools.permutations(counts, 2):
        concordant += inference.auc_from_counts(tp_a, fp_b, e_a, ne_b) * e_a * ne_b
    events = sum(c[0] for c in counts)
    nonevents = sum(c[1] for c in counts)
    return concordant / (events * nonevents)


def pooled_metrics(
    replies: Mapping[str, Payload],
    subset: str,
    j: int,
    cutoff: int | None,
    calibration: tuple[float, float] | None = None,
    curve: np.ndarray | None = None,
    ici: float | None = None,
) -> dict[str, Any]:
    """Metrics of model ``j`` on all sites' ``subset`` together, from the summed replies.

    Sites whose subset could not be evaluated are left out and named in ``reason``.
    ``curve``: the pooled smooth calibration curve's coefficients (for the E50, E90 and
    Emax over all sites' risk cells, and the ICI unless ``ici``, the exact one from the
    sites' sums, is given).
    """
    ok = {s: r for s, r in replies.items() if r.get(f"{subset}_status") == "ok"}
    left_out = sorted(set(replies) - set(ok))
    note = f"without {', '.join(left_out)} (not evaluable there)" if left_out else None
    if not ok:
        return missing_metrics(None, None, "undefined", "no site could be evaluated")
    rows = list(ok.values())
    n = sum(int(r[f"{subset}_n"]) for r in rows)
    events = sum(int(r[f"{subset}_events"]) for r in rows)
    tp = sum(counts_at_thresholds(r, subset, j, "tp") for r in rows)
    fp = sum(counts_at_thresholds(r, subset, j, "fp") for r in rows)
    bins = {
        key: sum(np.asarray(r[f"{subset}_bin_{key}"][j], dtype=float) for r in rows)
        for key in ("n", "observed", "expected")
    }
    hl = inference.hosmer_lemeshow_from_bins(
        bins["n"], bins["observed"], bins["expected"], validation=subset != "train"
    )
    auc = pooled_auc(rows, subset, j)
    se = inference.hanley_mcneil_se(auc, events, n - events)
    intercept, slope = calibration if calibration else (NAN, NAN)
    auc_ci = list(inference.auc_ci(auc, se**2))
    brier = sum(float(r[f"{subset}_brier"][j]) * int(r[f"{subset}_n"]) for r in rows) / n
    loglik = (
        sum(float(r[f"{subset}_loglik"][j]) for r in rows)
        if all(f"{subset}_loglik" in r for r in rows)
        else NAN
    )
    cells = [risk_cells(r, subset, j) for r in rows]
    indices, errors = val_prob_indices(
        n,
        events,
        auc,
        auc_ci,
        brier,
        loglik,
        curve,
        tuple(np.concatenate(parts) for parts in zip(*cells, strict=True)),
        ici=ici,
    )
    if errors["errors_bounds"] is None:
        errors["errors_reason"] = "the pooled smooth calibration curve was not fitted"
    return {
        "n": n,
        "events": events,
        "status": "ok",
        "reason": note,
        "auc": auc,
        "auc_se": se,
        "auc_ci": auc_ci,
        "brier": brier,
        **indices,
        **_at_cutoff(tp, fp, n, events, cutoff),
        "calibration": {
            "intercept": intercept,
            "slope": slope,
            "hl_statistic": hl.statistic,
            "hl_df": hl.df,
            "hl_p": hl.pvalue,
            "bins": {"edges": BIN_EDGES.tolist(), **{k: v.tolist() for k, v in bins.items()}},
            **errors,
        },
        **_curves(tp, fp, n, events),
        "approximate": {
            "dxy": "2 (pooled AUC - 1/2): as approximate as the pooled AUC; its CI from the "
            "pooled AUC's Hanley-McNeil CI",
            "calibration_errors": (
                "E50, E90 and Emax of the pooled curve over the sites' risk cells (0.01 "
                "wide, merged to each site's minimum cell size); bounds in errors_bounds"
                + (
                    "; the ICI is exact (the sites' sums of |c(lp) - p|)"
                    if ici is not None
                    else "; so is the ICI"
                )
            ),
            "auc": "pairs within a site exact; pairs across sites compared on the sites' "
            "threshold counts (0.01 grid, merged to each site's minimum cell size)",
            "net_benefit": "summed threshold counts, interpolated where a site merged cells",
            "auc_ci": "Hanley-McNeil standard error of the pooled AUC",
            "hl": "the sites' risk bins (0.1 wide, merged to each site's minimum cell size), "
            "not deciles of risk",
        },
    }


def comparisons(reply: Payload, subset: str, models: list[str]) -> list[dict[str, Any]]:
    """DeLong's paired test of every pair of models on one site's subset."""
    if reply.get(f"{subset}_status") != "ok":
        return []
    auc, cov = np.asarray(reply[f"{subset}_auc"]), np.asarray(reply[f"{subset}_auc_cov"])
    out = []
    for i, k in itertools.combinations(range(len(models)), 2):
        diff, z, p = inference.delong_test(auc, cov, i, k)
        out.append({"models": [models[i], models[k]], "auc_diff": diff, "z": z, "p": p})
    return out


def _budget(replies: list[Payload], subset: str) -> float:
    """Parameters one request may fit at every site (the default third of the patients)."""
    return min(int(r[f"{subset}_n"]) for r in replies) / 3


def pooled_calibration(
    transport: Transport,
    replies: Mapping[str, Payload],
    models: list[str],
    subset: str,
    outcome: str,
    slopes: bool = True,
    curves: bool = True,
) -> dict[str, dict[str, Any]]:
    """Calibration of each model on the sites' ``subset`` together, by federated fits.

    ``slopes``: calibration intercept and slope, the logistic fit of y on the model's
    logit p (rms ``val.prob``). ``curves``: the smooth calibration curve, a logistic
    recalibration of y on a cubic polynomial of logit p (a flexible calibration curve
    in the sense of Van Calster et al., J Clin Epidemiol 2016), with its pointwise 95%
    band from the fit's covariance. (Not a restricted cubic spline: its hinge terms
    would let a crafted model select patients one at a time.) All fits share Newton
    rounds as far as every site's parameter limit allows; only sites whose subset could
    be evaluated take part.

    Returns ``{model: {"intercept", "slope", "curve"}}`` (entries present when fitted;
    a failed curve carries its reason).
    """
    ok = {s: r for s, r in replies.items() if r.get(f"{subset}_status") == "ok"}
    if not ok:
        return {}
    rows = list(ok.values())
    powers = [f"cal:{{m}}:{k}" for k in range(2, CURVE_DEGREE + 1)]
    specs: dict[str, LogisticSpec] = {}
    # Newton starts at perfect calibration (intercept 0, slope 1, no curvature): the
    # optimum on the training split for an unpenalised model, and near it elsewhere,
    # so the fits take a few rounds instead of a dozen from zero.
    for m in models:
        if slopes:
            specs[f"calibration_{m}"] = LogisticSpec(
                [f"{LP}{m}"], np.zeros(1), np.ones(1), start=np.array([0.0, 1.0])
            )
        if curves:
            columns = [f"{LP}{m}", *(p.format(m=m) for p in powers)]
            start = np.zeros(len(columns) + 1)
            start[1] = 1.0
            specs[f"calcurve_{m}"] = LogisticSpec(
                columns, np.zeros(len(columns)), np.ones(len(columns)), start=start, gap=True
            )
    out: dict[str, dict[str, Any]] = {m: {} for m in models}

    def fit_chunk(chunk: dict[str, LogisticSpec]) -> Callable[[Transport], Any]:
        def run(lane: Transport) -> Any:
            try:
                return fit_logistic_many(
                    lane, chunk, subset=subset, outcome=outcome, sites=list(ok)
                )
            except FederationError as exc:
                return exc

        return run

    # Chunks (several requests when the parameter limit is low) share their rounds.
    chunks = spread(specs, _budget(rows, subset))
    for chunk, fits in zip(
        chunks, together(transport, [fit_chunk(c) for c in chunks]), strict=True
    ):
        if isinstance(fits, FederationError):
            log.warning("calibration fits on %s not fitted: %s", subset, fits)
            for name in chunk:
                kind, _, m = name.partition("_")
                if kind == "calcurve":
                    out[m]["curve"] = {"status": "failed", "reason": str(fits)}
            continue
        for name, fit in fits.items():
            kind, _, m = name.partition("_")
            if kind == "calibration":
                out[m].update(intercept=float(fit.coef[0]), slope=float(fit.coef[1]))
            else:
                out[m]["curve"] = _curve(fit, rows, subset, models.index(m))
                if fit.gap is not None:  # the exact pooled ICI: mean |c(lp) - p|
                    out[m]["ici"] = fit.gap / sum(int(r[f"{subset}_n"]) for r in rows)
    return out


def _curve(fit: LogisticFit, rows: list[Payload], subset: str, j: int) -> dict[str, Any]:
    n = sum(int(r[f"{subset}_n"]) for r in rows)
    above = sum(
        counts_at_thresholds(r, subset, j, "tp") + counts_at_thresholds(r, subset, j, "fp")
        for r in rows
    )
    share_below = 1.0 - above / n
    # Draw over the thresholds holding the central 96% of the pooled predictions.
    lo = np.flatnonzero(share_below <= 0.02)
    hi = np.flatnonzero(share_below >= 0.98)
    a = THRESHOLDS[lo[-1]] if len(lo) else THRESHOLDS[0]
    b = THRESHOLDS[hi[0]] if len(hi) else THRESHOLDS[-1]
    lp = np.linspace(np.log(a / (1 - a)), np.log(b / (1 - b)), CURVE_POINTS)
    X = curve_design(lp)
    eta = X @ fit.coef
    se = np.sqrt(np.einsum("ij,jk,ik->i", X, fit.cov, X))

    return {
        "status": "ok",
        "method": f"logistic recalibration on a degree-{CURVE_DEGREE} polynomial of logit p",
        "coef": [float(c) for c in fit.coef],
        "predicted": expit(lp).tolist(),
        "observed": expit(eta).tolist(),
        "lower": expit(eta - 1.959964 * se).tolist(),
        "upper": expit(eta + 1.959964 * se).tolist(),
    }


def evaluate_models(
    transport: Transport,
    models: Mapping[str, LogisticFit],
    outcome: str,
    subsets: tuple[str, ...] = ("train", "test"),
    curves: bool = True,
    ranges_model: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    """Evaluate ``models`` at every site of ``transport``.

    With ``ranges_model`` (the model the nomogram draws), the same round asks for its
    numeric predictors' axis ranges (``evaluation["nomogram_ranges"]``, see
    :func:`~radfed.server.stats.axis_ranges.pooled_ranges`).

    Returns
    -------
    performance : dict
        ``performance[model][site or "pooled"][subset]`` metrics.
    evaluation : dict
        Threshold grid, cut-offs and the paired DeLong tests per site and subset.
    cutoffs : dict
        Each model's cut-off as an index into :data:`THRESHOLDS`.
    """
    names = list(models)
    transport.context.update(model_payload(models))
    ranges = None
    if ranges_model is not None and "train" in subsets:
        ranges = (ranges_model, axis_ranges.range_columns(models[ranges_model]))
    replies = transport.ask("evaluate", evaluation_request(names, list(subsets), ranges))
    cutoffs = youden_cutoffs(replies, names)
    # The splits' calibration fits are independent: they share rounds.
    fitted = together(
        transport,
        [
            lambda lane, s=s: pooled_calibration(lane, replies, names, s, outcome, curves=curves)
            for s in subsets
        ],
    )
    calibration = dict(zip(subsets, fitted, strict=True))
    performance: dict[str, Any] = {m: {} for m in names}
    for j, m in enumerate(names):
        for site, reply in replies.items():
            performance[m][site] = {s: site_metrics(reply, s, j, cutoffs.get(m)) for s in subsets}
        performance[m][POOLED] = {}
        for s in subsets:
            cal = calibration[s].get(m, {})
            slope = (cal["intercept"], cal["slope"]) if "slope" in cal else None
            coef = cal.get("curve", {}).get("coef")
            performance[m][POOLED][s] = pooled_metrics(
                replies,
                s,
                j,
                cutoffs.get(m),
                slope,
                None if coef is None else np.asarray(coef),
                ici=cal.get("ici"),
            )
            if "curve" in cal and "calibration" in performance[m][POOLED][s]:
                performance[m][POOLED][s]["calibration"]["curve"] = cal["curve"]
    evaluation = {
        "thresholds": THRESHOLDS.tolist(),
        "cutoffs": {m: float(THRESHOLDS[c]) for m, c in cutoffs.items()},
        "cutoff_rule": CUTOFF_RULE,
        "comparisons": {
            site: {s: comparisons(reply, s, names) for s in subsets}
            for site, reply in replies.items()
        },
    }
    if ranges is not None:
        evaluation["nomogram_ranges"] = axis_ranges.pooled_ranges(
            replies, ranges[1], models[ranges_model]
        )
    return performance, evaluation, cutoffs


def external_metrics(
    transport: Transport,
    models: Mapping[str, LogisticFit],
    sites: list[str],
    cutoffs: Mapping[str, int],
    outcome: str = "outcome",
) -> dict[str, dict[str, Any]]:
    """Metrics of ``models`` on all patients of each of ``sites`` (not used to fit them).

    Returns ``{site: {"status", "reason", "n", "events", "metrics": {model: ...},
    "comparisons": [...]}}``; a site that cannot answer is reported with its reason.
    """
    replies = external_replies(transport, models, sites, outcome)
    return external_entries(replies, list(models), cutoffs)


def external_replies(
    transport: Transport,
    models: Mapping[str, LogisticFit],
    sites: list[str],
    outcome: str = "outcome",
) -> dict[str, tuple[Any, dict[str, Any]]]:
    """What each of ``sites`` answered about ``models`` on all its patients, with the
    fits of its calibration curves: ``{site: (reply or the error, fits)}``. The cut-offs
    are not needed here (:func:`external_entries` applies them), so this can run beside
    the evaluation that chooses them."""
    names = list(models)
    transport.context.update(model_payload(models))

    def one(site: str) -> Callable[[Transport], tuple[Any, dict[str, Any]]]:
        def run(lane: Transport) -> tuple[Any, dict[str, Any]]:
            try:
                request = evaluation_request(names, ["all"])
                reply = lane.ask("evaluate", request, sites=[site])[site]
            except FederationError as exc:
                return exc, {}
            if reply.get("all_status") != "ok":
                return reply, {}
            return reply, pooled_calibration(
                lane, {site: reply}, names, "all", outcome, slopes=False
            )

        return run

    # Sites are evaluated independently: they share rounds.
    return dict(zip(sites, together(transport, [one(site) for site in sites]), strict=True))


def external_entries(
    replies: Mapping[str, tuple[Any, dict[str, Any]]],
    names: list[str],
    cutoffs: Mapping[str, int],
) -> dict[str, dict[str, Any]]:
    """The entries of :func:`external_metrics` from :func:`external_replies`."""
    out: dict[str, dict[str, Any]] = {}
    for site, (reply, fits) in replies.items():
        if isinstance(reply, FederationError):
            out[site] = {"status": "failed", "reason": str(reply), "metrics": {}}
            continue
        out[site] = _external_entry(reply, fits, cutoffs, names)
    return out


def _external_entry(
    reply: Payload, fits: dict[str, Any], cutoffs: Mapping[str, int], names: list[str]
) -> dict[str, Any]:
    """One site's entry of :func:`external_metrics`."""
    metrics = {m: site_metrics(reply, "all", j, cutoffs.get(m)) for j, m in enumerate(names)}
    status = reply.get("all_status")
    for m, cal in fits.items():
        if "curve" in cal:
            metrics[m]["calibration"]["curve"] = cal["curve"]
    return {
        "status": "ok" if status == "ok" else "failed",
        "reason": reply.get("all_reason") or None,
        "n": reply.get("all_n"),
        "events": reply.get("all_events"),
        "metrics": metrics,
        "comparisons": comparisons(reply, "all", names),
    }
