"""Coordinator-side inference on evaluation aggregates.

The sites send small, fixed-shape summaries of their own predictions
(:mod:`radfed.shared.evaluation_stats`): AUCs with their DeLong covariance, counts of
events and non-events at or above each threshold of a grid, and per-risk-bin counts.
The functions here turn those numbers, or their sums over sites, into confidence
intervals, tests, decision curves and a random-effects meta-analysis. None of them
sees a patient row.

==================================  ==================================================
function                            reference
==================================  ==================================================
:func:`auc_ci`                      pROC ``ci.auc(method = "delong")``
:func:`delong_test`                 pROC ``roc.test(method = "delong", paired = TRUE)``
:func:`hanley_mcneil_se`            Hanley & McNeil (1982)
:func:`clopper_pearson`             exact binomial interval
:func:`youden_cutoff`               Youden's J on the threshold grid
:func:`net_benefit`                 dcurves ``dca`` (binary outcome)
:func:`auc_from_counts`             trapezoidal ROC area over the threshold grid
:func:`hosmer_lemeshow_from_bins`   Hosmer-Lemeshow chi-square on fixed risk bins
:func:`somers_dxy`                  rms ``val.prob``'s Dxy, 2 (AUC - 1/2)
:func:`nagelkerke_r2`               rms ``val.prob``'s R² formula, on the predictions
:func:`scaled_brier`                Brier / (ē (1 - ē)); 1 minus it the Brier skill
:func:`calibration_errors_from_cells`  ICI, E50, E90, Emax (Austin & Steyerberg 2019)
                                    with bounds, from patients counted in risk cells
:func:`random_effects`              random-effects meta-analysis: DerSimonian-Laird or
                                    REML τ², Wald or Hartung-Knapp-Sidik-Jonkman CI
:func:`random_effects_auc`          the same on the logit-AUC scale (Debray et al.)
==================================  ==================================================

Undefined quantities (no events, no non-events, no patients) come out as NaN rather
than raising, so one empty site does not stop a report; malformed arguments raise
:class:`ValueError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from scipy import stats
from scipy.special import expit, logit

from radfed.shared.evaluation_stats import HosmerLemeshow, with_validation_df

__all__ = [
    "CalibrationErrors",
    "Cutoff",
    "DeLongTest",
    "HosmerLemeshow",
    "RandomEffects",
    "auc_ci",
    "auc_from_counts",
    "auc_grid_error_bound",
    "calibration_errors_from_cells",
    "clopper_pearson",
    "delong_test",
    "hanley_mcneil_se",
    "hosmer_lemeshow_from_bins",
    "nagelkerke_r2",
    "net_benefit",
    "net_benefit_treat_all",
    "random_effects",
    "random_effects_auc",
    "scaled_brier",
    "somers_dxy",
    "tau2_reml",
    "youden_cutoff",
]

Number = float | np.ndarray


def _level(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return float(level)


def _scalar_or_array(x: np.ndarray) -> Number:
    return float(x) if np.ndim(x) == 0 else x


def _per_model(x: Any) -> np.ndarray:
    """A per-model count as a column, to broadcast against (k, T) arrays."""
    x = np.asarray(x, dtype=float)
    return x[..., None] if x.ndim else x


# ---------------------------------------------------------------------- AUC and DeLong


def auc_ci(auc: Number, var: Number, level: float = 0.95) -> tuple[Number, Number]:
    """Confidence interval of an AUC from its DeLong variance, as pROC's ``ci.auc``.

    ``qnorm(c(α/2, 1 - α/2), mean = auc, sd = sqrt(var))``, i.e. normal on the AUC
    scale, with the limits then truncated to [0, 1].

    Parameters
    ----------
    auc, var : float or ndarray
        AUC(s) and their variance(s), e.g. :attr:`DeLong.auc` and :attr:`DeLong.var`.
    level : float, default 0.95
        Confidence level.

    Returns
    -------
    lo, hi : float or ndarray
        NaN where ``auc`` or ``var`` is NaN.
    """
    alpha = 1.0 - _level(level)
    auc = np.asarray(auc, dtype=float)
    sd = np.sqrt(np.asarray(var, dtype=float))
    # R's qnorm(p, mean, sd) is mean + sd * qnorm(p): the same operations, same rounding.
    lo = np.clip(auc + sd * stats.norm.ppf(alpha / 2), 0.0, 1.0)
    hi = np.clip(auc + sd * stats.norm.ppf(1.0 - alpha / 2), 0.0, 1.0)
    return _scalar_or_array(lo), _scalar_or_array(hi)


class DeLongTest(NamedTuple):
    """DeLong's test of two correlated AUCs."""

    diff: float  # auc[i] - auc[j]
    z: float
    pvalue: float  # two-sided


def delong_test(auc: np.ndarray, cov: np.ndarray, i: int, j: int) -> DeLongTest:
    """DeLong's paired test of ``auc[i] == auc[j]``, as pROC's ``roc.test``.

    ``z = (auc_i - auc_j) / sqrt(L S Lᵀ)`` with ``L = (1, -1)`` on the 2 x 2 block of the
    DeLong covariance; two-sided p-value ``2 Φ(-|z|)``. Identical curves (difference
    and variance both zero) give ``z = 0``, ``p = 1``, as in pROC.

    Parameters
    ----------
    auc : ndarray of shape (k,)
        AUCs of ``k`` models on the same patients.
    cov : ndarray of shape (k, k)
        Their DeLong covariance (:func:`radfed.shared.evaluation_stats.delong`).
    i, j : int
        The two models compared.
    """
    auc = np.asarray(auc, dtype=float)
    cov = np.asarray(cov, dtype=float)
    diff = float(auc[i] - auc[j])
    var = float((cov[i, i] - cov[j, i]) - (cov[i, j] - cov[j, j]))
    with np.errstate(divide="ignore", invalid="ignore"):
        z = diff / np.sqrt(var)
    if abs(diff) <= 1e-12 and var <= 1e-12 * (abs(cov[i, i]) + abs(cov[j, j])):
        # Identical curves up to rounding: 0/0, reported as pROC does.
        z = 0.0
    return DeLongTest(diff, float(z), float(2.0 * stats.norm.sf(abs(z))))


def hanley_mcneil_se(auc: float, n_events: int, n_nonevents: int) -> float:
    """Standard error of an AUC by Hanley & McNeil (1982).

    ``var = [A(1-A) + (m-1)(Q1 - A²) + (n-1)(Q2 - A²)] / (m n)`` with
    ``Q1 = A / (2 - A)`` and ``Q2 = 2A² / (1 + A)`` (exact when both classes' scores
    are exponentially distributed), for ``m`` events and ``n`` non-events. Needs only
    the AUC and the counts, so it serves where the DeLong placements are not available
    (an AUC of patients pooled over sites). NaN when a class is empty.

    References
    ----------
    Hanley JA, McNeil BJ (1982). Radiology 143(1), 29-36.
    """
    m, n = float(n_events), float(n_nonevents)
    if m < 1 or n < 1 or not np.isfinite(auc):
        return float("nan")
    a = float(auc)
    q1 = a / (2.0 - a)
    q2 = 2.0 * a * a / (1.0 + a)
    var = (a * (1.0 - a) + (m - 1.0) * (q1 - a * a) + (n - 1.0) * (q2 - a * a)) / (m * n)
    return float(np.sqrt(max(var, 0.0)))


# ----------------------------------------------------------------- proportions, cuts


def clopper_pearson(successes: Number, n: Number, level: float = 0.95) -> tuple[Number, Number]:
    """Exact (Clopper-Pearson) confidence interval of a binomial proportion.

    ``lo = Beta⁻¹(α/2; x, n - x + 1)`` (0 when ``x = 0``) and
    ``hi = Beta⁻¹(1 - α/2; x + 1, n - x)`` (1 when ``x = n``). NaN when ``n = 0``.
    """
    alpha = 1.0 - _level(level)
    x = np.asarray(successes, dtype=float)
    n = np.asarray(n, dtype=float)
    if np.any(x < 0) or np.any(x > n) or np.any(x != np.round(x)) or np.any(n != np.round(n)):
        raise ValueError("successes and n must be integers with 0 <= successes <= n")
    # Safe shape parameters where the closed-form limit applies; masked out below.
    lo = stats.beta.ppf(alpha / 2, np.maximum(x, 1), n - x + 1)
    hi = stats.beta.ppf(1 - alpha / 2, x + 1, np.maximum(n - x, 1))
    lo = np.where(x == 0, 0.0, lo)
    hi = np.where(x == n, 1.0, hi)
    empty = n == 0
    lo, hi = np.where(empty, np.nan, lo), np.where(empty, np.nan, hi)
    return _scalar_or_array(lo), _scalar_or_array(hi)


class Cutoff(NamedTuple):
    """The threshold of a grid with the largest Youden index."""

    index: int | None  # into the threshold grid; None when undefined
    threshold: float
    sensitivity: float
    specificity: float
    youden: float  # sensitivity + specificity - 1


def _increasing(thresholds: np.ndarray) -> np.ndarray:
    t = np.asarray(thresholds, dtype=float)
    if t.ndim != 1 or len(t) == 0 or np.any(np.diff(t) <= 0):
        raise ValueError("thresholds must be a non-empty, strictly increasing vector")
    return t


def youden_cutoff(
    tp: np.ndarray, fp: np.ndarray, events: int, nonevents: int, thresholds: np.ndarray
) -> Cutoff:
    """The grid threshold maximising sensitivity + specificity - 1 (Youden's J).

    Sensitivity at ``t`` is ``tp / events`` and specificity ``1 - fp / nonevents``
    (positives are ``p >= t``). Ties go to the lowest threshold, the one with the
    highest sensitivity among the equally good: on an ascending grid, the first
    maximum. pROC's ``coords(x = "best")`` returns every tied threshold instead.

    Parameters
    ----------
    tp, fp : ndarray of shape (T,)
        Events and non-events at or above each threshold (one model, e.g. summed over
        sites).
    events, nonevents : int
        Totals of each class.
    thresholds : ndarray of shape (T,)
        The strictly increasing grid the counts were taken on.

    Returns
    -------
    Cutoff
        ``index`` None and the rest NaN when either class is empty.
    """
    t = _increasing(thresholds)
    tp = np.asarray(tp, dtype=float)
    fp = np.asarray(fp, dtype=float)
    if tp.shape != t.shape or fp.shape != t.shape:
        raise ValueError(f"tp and fp must have shape {t.shape}, got {tp.shape} and {fp.shape}")
    if events <= 0 or nonevents <= 0:
        nan = float("nan")
        return Cutoff(None, nan, nan, nan, nan)
    sens = tp / events
    spec = 1.0 - fp / nonevents
    j = sens + spec - 1.0
    c = int(np.argmax(j))  # first maximum: the lowest tied threshold
    return Cutoff(c, float(t[c]), float(sens[c]), float(spec[c]), float(j[c]))


# ------------------------------------------------------------------ decision curves


def _nb_thresholds(thresholds: np.ndarray) -> np.ndarray:
    t = np.asarray(thresholds, dtype=float)
    if np.any(t < 0) or np.any(t >= 1):
        raise ValueError("net benefit needs thresholds in [0, 1)")
    return t


def net_benefit(tp: np.ndarray, fp: np.ndarray, n: Number, thresholds: np.ndarray) -> np.ndarray:
    """Net benefit of treating patients with ``p >= t``, as dcurves.

    ``NB(t) = tp / n - fp / n · t / (1 - t)``: dcurves' ``tp_rate - t/(1-t) fp_rate``,
    whose rates are ``count / n`` (its ``count / n_events · prevalence`` in exact
    arithmetic).

    Parameters
    ----------
    tp, fp : ndarray of shape (T,) or (k, T)
        Events and non-events with ``p >= t``
        (:func:`radfed.shared.evaluation_stats.threshold_counts`).
    n : int or ndarray of shape (k,)
        Patients.
    thresholds : ndarray of shape (T,)
        Threshold probabilities in [0, 1).

    Returns
    -------
    ndarray, the shape of ``tp``; NaN where ``n = 0``.
    """
    t = _nb_thresholds(thresholds)
    n = _per_model(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        nb = np.asarray(tp, float) / n - np.asarray(fp, float) / n * (t / (1.0 - t))
    return np.where(n > 0, nb, np.nan)


def net_benefit_treat_all(events: Number, n: Number, thresholds: np.ndarray) -> np.ndarray:
    """Net benefit of treating everyone: ``π - (1 - π) t / (1 - t)`` with ``π = events / n``.

    dcurves' "all" strategy (every patient positive at every threshold).
    """
    t = _nb_thresholds(thresholds)
    events = _per_model(events)
    n = _per_model(n)
    with np.errstate(divide="ignore", invalid="ignore"):
        nb = events / n - (n - events) / n * (t / (1.0 - t))
    return np.where(n > 0, nb, np.nan)


# --------------------------------------------------------------- ROC from grid counts


def _roc_points(
    tp: np.ndarray, fp: np.ndarray, events: Number, nonevents: Number
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Counts with the two ends of the ROC curve added: every patient at or above
    the threshold -inf, none above +inf. Shapes (..., T + 2)."""
    tp = np.asarray(tp, dtype=float)
    fp = np.asarray(fp, dtype=float)
    if tp.shape != fp.shape:
        raise ValueError(f"tp and fp must have the same shape, got {tp.shape} and {fp.shape}")
    column = (*tp.shape[:-1], 1)
    e = np.broadcast_to(_per_model(events), column)
    ne = np.broadcast_to(_per_model(nonevents), column)
    zeros = np.zeros(column)
    tp_ext = np.concatenate([e, tp, zeros], axis=-1)
    fp_ext = np.concatenate([ne, fp, zeros], axis=-1)
    if np.any(np.diff(tp_ext, axis=-1) > 0) or np.any(np.diff(fp_ext, axis=-1) > 0):
        raise ValueError(
            "tp and fp must be counts at or above increasing thresholds: non-increasing, "
            "and at most events / nonevents"
        )
    return tp_ext, fp_ext, e[..., 0], ne[..., 0]


def auc_from_counts(tp: np.ndarray, fp: np.ndarray, events: Number, nonevents: Number) -> Number:
    """ROC area by the trapezoid rule over a threshold grid: the AUC of pooled counts.

    The ROC points are ``(fp / nonevents, tp / events)`` at each threshold, plus (1, 1)
    and (0, 0). The trapezoid area is the Mann-Whitney AUC of the scores rounded down to
    the grid: a pair of an event and a non-event in different grid cells
    (``[t_i, t_{i+1})``, and below the first and from the last threshold) is ordered
    exactly, and a pair in the same cell counts 1/2, as a tie. So the area equals the
    exact AUC when every score lies on the grid, and differs from it by at most
    :func:`auc_grid_error_bound` otherwise.

    Parameters
    ----------
    tp, fp : ndarray of shape (T,) or (k, T)
        Events and non-events with ``p >= t``, for thresholds in increasing order.
    events, nonevents : int or ndarray of shape (k,)
        Totals of each class.

    Returns
    -------
    float or ndarray of shape (k,); NaN where a class is empty.
    """
    tp_ext, fp_ext, e, ne = _roc_points(tp, fp, events, nonevents)
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr = tp_ext / e[..., None]
        fpr = fp_ext / ne[..., None]
        area = np.sum(-np.diff(fpr, axis=-1) * (tpr[..., 1:] + tpr[..., :-1]) / 2.0, axis=-1)
    area = np.where((e > 0) & (ne > 0), area, np.nan)
    return _scalar_or_array(area)


def auc_grid_error_bound(
    tp: np.ndarray, fp: np.ndarray, events: Number, nonevents: Number
) -> Number:
    """Largest possible gap between :func:`auc_from_counts` and the exact AUC.

    Only event/non-event pairs in the same grid cell can be misjudged, and each by 1/2,
    so ``|AUC_grid - AUC| <= ½ Σ_cells e_c ne_c / (events · nonevents)`` with ``e_c``,
    ``ne_c`` the events and non-events in cell ``c``. Computed from the counts alone;
    NaN where a class is empty.
    """
    tp_ext, fp_ext, e, ne = _roc_points(tp, fp, events, nonevents)
    e_cell = -np.diff(tp_ext, axis=-1)
    ne_cell = -np.diff(fp_ext, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = 0.5 * np.sum(e_cell * ne_cell, axis=-1) / (e * ne)
    return _scalar_or_array(np.where((e > 0) & (ne > 0), bound, np.nan))


# ------------------------------------------------------------- pooled calibration test


def hosmer_lemeshow_from_bins(
    n: np.ndarray, observed: np.ndarray, expected: np.ndarray, validation: bool = False
) -> HosmerLemeshow:
    """Hosmer-Lemeshow chi-square on fixed risk bins, e.g. counts summed over sites.

    ``Σ (O - E)² / E + ((n - O) - (n - E))² / (n - E)`` over the bins with at least one
    patient; ``df`` = non-empty bins - 2, or non-empty bins with ``validation=True``
    (patients the model was not fitted on, as
    :func:`radfed.shared.evaluation_stats.hosmer_lemeshow`). Deciles of risk cannot be
    formed without the pooled rows, so the pooled test uses fixed-width bins; the
    chi-square reference distribution is then an approximation, as it is for deciles.

    Parameters
    ----------
    n, observed, expected : ndarray of shape (B,)
        Patients, events and summed predicted risk per bin
        (:func:`radfed.shared.evaluation_stats.calibration_bins`).
    """
    n = np.asarray(n, dtype=float)
    observed = np.asarray(observed, dtype=float)
    expected = np.asarray(expected, dtype=float)
    if not (n.shape == observed.shape == expected.shape) or n.ndim != 1:
        raise ValueError("n, observed and expected must be vectors of the same length")
    hl = HosmerLemeshow.from_groups(n, observed, expected)
    return with_validation_df(hl) if validation else hl


# ------------------------------------------------------------- val.prob's indices


def somers_dxy(auc: Number) -> Number:
    """Somers' rank correlation Dxy between predictions and a binary outcome,
    ``2 (AUC - 1/2)`` (rms ``val.prob``'s Dxy); applied to an AUC's CI limits it gives
    the Dxy's CI."""
    return 2.0 * (np.asarray(auc, dtype=float) - 0.5) if np.ndim(auc) else 2.0 * (auc - 0.5)


def nagelkerke_r2(loglik: float, n: int, events: int) -> float:
    """Nagelkerke's R² of predicted risks from their log-likelihood.

    ``LR = 2 (L - L0)`` with ``L = Σ y log p + (1 - y) log(1 - p)`` (the predictions as
    they are, not refitted) and ``L0`` the log-likelihood of the event rate ē for
    everyone, ``n (ē log ē + (1 - ē) log(1 - ē))``; then
    ``R² = (1 - exp(-LR / n)) / (1 - exp(2 L0 / n))`` — rms's formula (``lrm``'s
    "R2", which ``val.prob`` reports). Negative when the predictions fit worse than the
    event rate alone. NaN for one class only or no patient.
    """
    n, events = float(n), float(events)
    if n <= 0 or events <= 0 or events >= n or not np.isfinite(loglik):
        return float("nan")
    rate = events / n
    l0 = events * np.log(rate) + (n - events) * np.log1p(-rate)
    lr = 2.0 * (float(loglik) - l0)
    return float(-np.expm1(-lr / n) / -np.expm1(2.0 * l0 / n))


def scaled_brier(brier: float, n: int, events: int) -> float:
    """The Brier score over its value for a model predicting the event rate ē to
    everyone, ``Brier / (ē (1 - ē))``; ``1 -`` it is the Brier skill (scaled Brier of
    Steyerberg). NaN for one class only or no patient."""
    n, events = float(n), float(events)
    if n <= 0 or events <= 0 or events >= n or not np.isfinite(brier):
        return float("nan")
    rate = events / n
    return float(brier) / (rate * (1.0 - rate))


class CalibrationErrors(NamedTuple):
    """Austin & Steyerberg's summaries of ``|c(p) - p|`` over the patients, each with
    bounds ``(low, high)`` that hold whatever the patients' positions in their cells."""

    ici: float
    e50: float
    e90: float
    emax: float
    bounds: dict[str, tuple[float, float]]


#: Predicted risks are never nearer 0 or 1 than this in the cells' evaluation (the
#: sites' clipping, :data:`radfed.shared.evaluation_stats.PROB_EPS`).
_CELL_EPS = 1e-8
#: Spacing in p of the points where |c(p) - p| is evaluated inside a cell.
CELL_STEP = 5e-4


def _curve_error(coef: np.ndarray, p: np.ndarray) -> np.ndarray:
    lp = logit(p)
    eta = np.polyval(np.asarray(coef, dtype=float)[::-1], lp)
    return np.abs(expit(eta) - p)


def calibration_errors_from_cells(
    coef: np.ndarray, lo: np.ndarray, hi: np.ndarray, count: np.ndarray
) -> CalibrationErrors:
    """ICI, E50, E90 and Emax of a calibration curve over patients known only by the
    risk cell ``[lo, hi)`` each lies in (``count`` patients per cell).

    ``c(p) = expit(coef · (1, l, l², l³))`` with ``l = logit p`` (the smooth calibration
    curve) and ``e(p) = |c(p) - p|``. Estimates spread each cell's patients uniformly over
    it: the ICI is the mean of ``e`` over the cells' points (spaced :data:`CELL_STEP`
    apart), E50 and E90 quantiles of that mixture, Emax the largest ``e`` at the centre
    of a cell that holds patients (a merged cell in the tails can hide the true maximum:
    the cubic curve may turn where no patient lies). Bounds: each patient's ``e`` lies
    between the
    smallest and the largest ``e`` of its cell (searched on points spaced
    :data:`CELL_STEP` in p and 200 steps in logit p), and the mean, R's type-7 quantiles
    (rms ``val.prob``'s) and the maximum are monotone in every patient's ``e``, so the
    summaries of the cells' minima and maxima bound the summaries of the patients.
    NaN when there is no patient or ``coef`` is not finite.
    """
    coef = np.asarray(coef, dtype=float)
    lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    count = np.asarray(count, dtype=np.int64)
    keep = count > 0
    lo, hi, count = lo[keep], hi[keep], count[keep]
    n = int(count.sum())
    nan = float("nan")
    if n == 0 or not np.all(np.isfinite(coef)):
        return CalibrationErrors(nan, nan, nan, nan, {k: (nan, nan) for k in _ERRORS})
    lo = np.clip(lo, _CELL_EPS, 1.0 - _CELL_EPS)
    hi = np.clip(hi, _CELL_EPS, 1.0 - _CELL_EPS)
    means, mins, maxs, values, weights = [], [], [], [], []
    centres = _curve_error(coef, (lo + hi) / 2)
    for a, b, c in zip(lo, hi, count, strict=True):
        steps = max(int(np.ceil((b - a) / CELL_STEP)), 1)
        mid = a + (np.arange(steps) + 0.5) * (b - a) / steps
        e_mid = _curve_error(coef, mid)
        ends = np.concatenate(
            [np.linspace(a, b, steps + 1), expit(np.linspace(logit(a), logit(b), 201))]
        )
        e_all = np.concatenate([e_mid, _curve_error(coef, ends)])
        means.append(e_mid.mean())
        mins.append(e_all.min())
        maxs.append(e_all.max())
        values.append(e_mid)
        weights.append(np.full(steps, c / steps))
    means, mins, maxs = np.array(means), np.array(mins), np.array(maxs)
    v, w = np.concatenate(values), np.concatenate(weights)
    order = np.argsort(v, kind="stable")
    v, cdf = v[order], np.cumsum(w[order]) / n

    def mixture_quantile(q: float) -> float:
        return float(v[min(np.searchsorted(cdf, q - 1e-12), len(v) - 1)])

    low, high = np.repeat(mins, count), np.repeat(maxs, count)
    bounds = {
        "ici": (float(count @ mins / n), float(count @ maxs / n)),
        "e50": (float(np.quantile(low, 0.5)), float(np.quantile(high, 0.5))),
        "e90": (float(np.quantile(low, 0.9)), float(np.quantile(high, 0.9))),
        "emax": (float(mins.max()), float(maxs.max())),
    }
    return CalibrationErrors(
        ici=float(count @ means / n),
        e50=mixture_quantile(0.5),
        e90=mixture_quantile(0.9),
        emax=float(centres.max()),
        bounds=bounds,
    )


_ERRORS = ("ici", "e50", "e90", "emax")


# --------------------------------------------------------------------- meta-analysis

#: Between-study variance estimators of :func:`random_effects`.
TAU2_METHODS = {"reml": "REML", "dl": "DerSimonian-Laird"}
#: Confidence intervals of the pooled estimate.
CI_METHODS = {"hksj": "Hartung-Knapp-Sidik-Jonkman", "wald": "Wald"}


@dataclass(frozen=True)
class RandomEffects:
    """Result of a random-effects meta-analysis (REML or DerSimonian-Laird τ²).

    Estimates and intervals are on the reporting scale (the AUC scale for
    :func:`random_effects_auc`); ``se``, ``z``, ``pvalue``, ``tau2`` and ``weights``
    are on the ``scale`` the pooling was done on.

    Attributes
    ----------
    estimate : float
        Pooled estimate ``μ = Σ w* y / Σ w*`` with ``w* = 1 / (v + τ²)``.
    se : float
        Its standard error: ``sqrt(1 / Σ w*)`` (Wald), or the Hartung-Knapp-Sidik-Jonkman
        ``sqrt(Σ w* (y - μ)² / ((k - 1) Σ w*))`` (HKSJ).
    ci_low, ci_upp : float
        Confidence interval of the pooled estimate: ``μ ± z se`` (Wald) or
        ``μ ± t_{k-1} se`` (HKSJ; NaN when ``k < 2``).
    pi_low, pi_upp : float
        Prediction interval for the effect in a new study,
        ``μ ± t_{k-2} sqrt(τ² + se²)`` (Higgins et al. 2009); NaN when ``k < 3``.
    z, pvalue : float
        Test of a pooled effect of 0 on the pooling scale (AUC 0.5 on the logit
        scale): ``μ / se`` against the normal (Wald) or ``t_{k-1}`` (HKSJ).
    tau2 : float
        Between-study variance (``method``), truncated at 0.
    i2 : float
        Share of variability due to heterogeneity: ``max(0, (Q - (k - 1)) / Q)`` for
        DerSimonian-Laird; ``τ² / (τ² + s²)`` with the typical within-study variance
        ``s² = (k - 1) Σw / ((Σw)² - Σw²)`` for REML (as metafor); NaN when ``k < 2``.
    q, q_pvalue : float
        Cochran's Q (fixed-effect weights) and its chi-square p-value on ``k - 1`` df.
    k : int
        Studies.
    weights : ndarray of shape (k,)
        Relative random-effects weights ``w* / Σ w*``.
    level : float
        Confidence level of the intervals.
    scale : str
        ``"identity"`` or ``"logit"``.
    names : tuple of str or None
        Study names, for the summary.
    method : str
        τ² estimator, ``"reml"`` or ``"dl"``.
    ci_method : str
        ``"hksj"`` or ``"wald"``.
    """

    estimate: float
    se: float
    ci_low: float
    ci_upp: float
    pi_low: float
    pi_upp: float
    z: float
    pvalue: float
    tau2: float
    i2: float
    q: float
    q_pvalue: float
    k: int
    weights: np.ndarray
    level: float = 0.95
    scale: str = "identity"
    names: tuple[str, ...] | None = None
    method: str = "dl"
    ci_method: str = "wald"

    @property
    def label(self) -> str:
        """Short method label, e.g. ``"REML, HKSJ CI"``."""
        ci = "HKSJ" if self.ci_method == "hksj" else "Wald"
        return f"{TAU2_METHODS[self.method].replace('DerSimonian-Laird', 'DL')}, {ci} CI"

    def to_dict(self) -> dict[str, Any]:
        """Plain floats and lists, for JSON and MLflow."""
        out: dict[str, Any] = {}
        for key in self.__dataclass_fields__:
            value = getattr(self, key)
            if isinstance(value, np.ndarray):
                value = value.tolist()
            elif isinstance(value, tuple):
                value = list(value)
            out[key] = value
        return out

    def summary(self) -> str:
        """A text table in the manner of statsmodels' summaries."""
        width = 78
        lo, hi = (1 - self.level) / 2, 1 - (1 - self.level) / 2
        logit_scale = self.scale == "logit"
        head = f"Random-effects meta-analysis ({TAU2_METHODS[self.method]})"
        if logit_scale:
            head += " of logit(AUC)"
        stat = "t" if self.ci_method == "hksj" else "z"

        def pair(left: tuple[str, str], right: tuple[str, str]) -> str:
            return f"{left[0]:<18}{left[1]:>19}   {right[0]:<18}{right[1]:>19}"

        def row(name: str, est: float, se: str, z: str, p: str, ci: tuple[float, float]) -> str:
            est_text = "" if np.isnan(est) else f"{est:.4f}"
            return f"{name:<14}{est_text:>10}{se:>10}{z:>9}{p:>9}{ci[0]:>13.4f}{ci[1]:>13.4f}"

        stats_ = (f"{self.se:.4f}", f"{self.z:.3f}", f"{self.pvalue:.3f}")
        lines = [
            head.center(width).rstrip(),
            "=" * width,
            pair(("Studies (k):", f"{self.k}"), ("Q:", f"{self.q:.4f}")),
            pair(
                ("tau²:", f"{self.tau2:.6g}"),
                ("Q df, p-value:", f"{self.k - 1}, {self.q_pvalue:.4f}"),
            ),
            pair(("tau:", f"{np.sqrt(self.tau2):.6g}"), ("I²:", f"{100 * self.i2:.1f}%")),
            pair(("CI:", CI_METHODS[self.ci_method]), ("", "")),
            "-" * width,
            f"{'':<14}{'estimate':>10}{'std err':>10}{stat:>9}{f'P>|{stat}|':>9}"
            f"{f'[{lo:.3f}':>13}{f'{hi:.3f}]':>13}",
        ]
        if logit_scale:
            to_logit = logit(np.array([self.estimate, self.ci_low, self.ci_upp]))
            lines += [
                row("AUC", self.estimate, "", "", "", (self.ci_low, self.ci_upp)),
                row("logit(AUC)", to_logit[0], *stats_, (to_logit[1], to_logit[2])),
                row("prediction", np.nan, "", "", "", (self.pi_low, self.pi_upp)),
            ]
        else:
            lines += [
                row("pooled", self.estimate, *stats_, (self.ci_low, self.ci_upp)),
                row("prediction", np.nan, "", "", "", (self.pi_low, self.pi_upp)),
            ]
        if self.names is not None:
            lines += ["-" * width, f"{'study':<24}{'weight':>10}"]
            lines += [
                f"{name:<24}{w:>10.1%}" for name, w in zip(self.names, self.weights, strict=True)
            ]
        lines.append("=" * width)
        if logit_scale:
            lines += [
                "AUC and its intervals are back-transformed from logit(AUC) (Debray et al.",
                f"2017); {stat} tests AUC = 0.5; tau² and I² refer to logit(AUC).",
            ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def tau2_reml(
    estimates: np.ndarray,
    variances: np.ndarray,
    start: float = 0.0,
    tol: float = 1e-12,
    max_iter: int = 200,
) -> float:
    """Restricted maximum-likelihood estimate of the between-study variance τ².

    Fisher scoring on the restricted log-likelihood of ``y_i ~ N(μ, v_i + τ²)`` (as
    metafor's ``rma(method = "REML")``): with ``w = 1 / (v + τ²)`` and
    ``P = W - w wᵀ / Σw``, the step is ``(yᵀP²y - tr P) / tr P²``, halved while it would
    make τ² negative; τ² = 0 when the maximum is on the boundary.

    When the iterations do not settle within ``max_iter`` (seen once in a few hundred
    heart-disease runs), the restricted log-likelihood is maximised over
    ``[0, 10 (var y + max v)]`` by a bounded scalar search instead (τ² = 0 when that is
    no better than the boundary): a study never stops on its meta-analysis.
    """
    y = np.asarray(estimates, dtype=float)
    v = np.asarray(variances, dtype=float)
    tau2 = max(float(start), 0.0)
    for _ in range(max_iter):
        w = 1.0 / (v + tau2)
        sw = w.sum()
        r = y - np.sum(w * y) / sw
        tr_p = sw - np.sum(w**2) / sw
        tr_pp = np.sum(w**2) - 2.0 * np.sum(w**3) / sw + (np.sum(w**2) / sw) ** 2
        step = (np.sum((w * r) ** 2) - tr_p) / tr_pp
        while tau2 + step < 0.0 and abs(step) > tol:
            step /= 2.0
        new = max(tau2 + step, 0.0)
        if abs(new - tau2) <= tol * (1.0 + tau2):
            return float(new)
        tau2 = new
    return _tau2_reml_bounded(y, v)


def _tau2_reml_bounded(y: np.ndarray, v: np.ndarray) -> float:
    """τ² maximising the restricted log-likelihood, by a bounded scalar search."""
    from scipy.optimize import minimize_scalar

    def minus_loglik(tau2: float) -> float:
        w = 1.0 / (v + tau2)
        mu = np.sum(w * y) / w.sum()
        return 0.5 * float(np.sum(np.log(v + tau2)) + np.log(w.sum()) + np.sum(w * (y - mu) ** 2))

    upper = max(10.0 * (float(np.var(y)) + float(np.max(v))), 1e-12)
    found = minimize_scalar(
        minus_loglik, bounds=(0.0, upper), method="bounded", options={"xatol": 1e-14 * upper}
    )
    return float(found.x) if minus_loglik(found.x) < minus_loglik(0.0) else 0.0


def random_effects(
    estimates: np.ndarray,
    variances: np.ndarray,
    level: float = 0.95,
    names: list[str] | None = None,
    method: str = "dl",
    ci: str = "wald",
) -> RandomEffects:
    """Random-effects meta-analysis of ``k`` study estimates.

    Fixed-effect weights ``w = 1/v`` give Cochran's ``Q = Σ w (y - ȳ_w)²``. τ² is
    estimated by DerSimonian-Laird's moments, ``max(0, (Q - (k-1)) / (Σw - Σw²/Σw))``
    (``method="dl"``), or by REML (``"reml"``, :func:`tau2_reml`, started at the DL
    value). The pooled estimate uses ``w* = 1 / (v + τ²)``; its interval is normal
    (``ci="wald"``) or Hartung-Knapp-Sidik-Jonkman (``"hksj"``: the weighted residual
    variance rescales the standard error, with ``t_{k-1}`` quantiles; not truncated, as
    metafor's ``test = "knha"`` and statsmodels' ``conf_int(use_t=True)``). HKSJ keeps
    its nominal coverage with few studies, where the Wald interval is too narrow. With
    one study, τ² = 0 and the heterogeneity statistics (and an HKSJ interval) are NaN.

    The defaults (DL, Wald) are the classical ones; the study's summary of external AUCs
    (:func:`radfed.server.study.external.meta_analysis`) uses REML with HKSJ.

    Parameters
    ----------
    estimates : ndarray of shape (k,)
        Study estimates.
    variances : ndarray of shape (k,)
        Their (within-study) variances, positive.
    level : float, default 0.95
        Confidence level of the intervals.
    names : list of str, optional
        Study names, for the summary.
    method : {"dl", "reml"}, default "dl"
        Estimator of τ².
    ci : {"wald", "hksj"}, default "wald"
        Confidence interval and test of the pooled estimate.

    References
    ----------
    DerSimonian R, Laird N (1986). Controlled Clinical Trials 7(3), 177-188.
    Viechtbauer W (2005). Journal of Educational and Behavioral Statistics 30(3), 261-293.
    Hartung J, Knapp G (2001). Statistics in Medicine 20(24), 3875-3889.
    Sidik K, Jonkman JN (2002). Statistics in Medicine 21(21), 3153-3159.
    Higgins JPT, Thompson SG, Spiegelhalter DJ (2009). JRSS A 172(1), 137-159.
    """
    level = _level(level)
    if method not in TAU2_METHODS:
        raise ValueError(f"method must be one of {sorted(TAU2_METHODS)}, got {method!r}")
    if ci not in CI_METHODS:
        raise ValueError(f"ci must be one of {sorted(CI_METHODS)}, got {ci!r}")
    y = np.asarray(estimates, dtype=float)
    v = np.asarray(variances, dtype=float)
    if y.ndim != 1 or y.shape != v.shape or len(y) == 0:
        raise ValueError("estimates and variances must be non-empty vectors of one length")
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(v)) and np.all(v > 0)):
        raise ValueError("estimates must be finite and variances finite and positive")
    if names is not None and len(names) != len(y):
        raise ValueError("names must name every study")
    k = len(y)
    w = 1.0 / v
    fixed = np.sum(w * y) / np.sum(w)
    q = float(np.sum(w * (y - fixed) ** 2))
    df = k - 1
    if k > 1:
        c = np.sum(w) - np.sum(w**2) / np.sum(w)
        tau2 = max(0.0, (q - df) / c)
        i2 = max(0.0, (q - df) / q) if q > 0 else 0.0
        q_pvalue = float(stats.chi2.sf(q, df))
        if method == "reml":
            tau2 = tau2_reml(y, v, start=tau2)
            typical = df * np.sum(w) / (np.sum(w) ** 2 - np.sum(w**2))
            i2 = tau2 / (tau2 + typical)
    else:
        tau2, i2, q, q_pvalue = 0.0, float("nan"), float("nan"), float("nan")
    w_re = 1.0 / (v + tau2)
    mu = float(np.sum(w_re * y) / np.sum(w_re))
    if ci == "hksj":
        se = float(np.sqrt(np.sum(w_re * (y - mu) ** 2) / (df * np.sum(w_re)))) if k > 1 else np.nan
        reference = stats.t(df) if k > 1 else None
    else:
        se = float(np.sqrt(1.0 / np.sum(w_re)))
        reference = stats.norm()
    alpha = 1.0 - level
    if reference is not None and se > 0:
        crit = reference.ppf(1.0 - alpha / 2)
        ci_pair = (mu - crit * se, mu + crit * se)
        z = mu / se
        pvalue = float(2.0 * reference.sf(abs(z)))
    else:
        # HKSJ with one study, or every study exactly at the pooled value.
        ci_pair = (mu, mu) if reference is not None else (float("nan"), float("nan"))
        z, pvalue = float("nan"), float("nan")
    if k >= 3 and np.isfinite(se):
        half = stats.t.ppf(1.0 - alpha / 2, k - 2) * np.sqrt(tau2 + se**2)
        pi = (mu - half, mu + half)
    else:
        pi = (float("nan"), float("nan"))
    return RandomEffects(
        estimate=mu,
        se=float(se),
        ci_low=float(ci_pair[0]),
        ci_upp=float(ci_pair[1]),
        pi_low=float(pi[0]),
        pi_upp=float(pi[1]),
        z=float(z),
        pvalue=pvalue,
        tau2=float(tau2),
        i2=float(i2),
        q=q,
        q_pvalue=q_pvalue,
        k=k,
        weights=w_re / np.sum(w_re),
        level=level,
        names=tuple(names) if names is not None else None,
        method=method,
        ci_method=ci,
    )


def random_effects_auc(
    auc: np.ndarray,
    var: np.ndarray,
    level: float = 0.95,
    names: list[str] | None = None,
    method: str = "dl",
    ci: str = "wald",
) -> RandomEffects:
    """Random-effects meta-analysis of AUCs on the logit scale, back-transformed.

    AUCs are bounded and their sampling distribution skewed near 1, so they are pooled
    as ``logit(AUC)`` with the delta-method variance ``var / (AUC (1 - AUC))²`` and the
    pooled estimate, confidence and prediction limits are mapped back with the
    logistic function (Debray et al. 2017; Snell et al. 2018). ``se``, ``z`` and
    ``tau2`` of the result stay on the logit scale.

    Parameters
    ----------
    auc : ndarray of shape (k,)
        Study AUCs, strictly between 0 and 1 (an AUC of 0 or 1 has no logit, and its
        DeLong variance is 0: such a study must be left out or corrected by the caller,
        as :func:`radfed.server.study.external.meta_analysis` does).
    var : ndarray of shape (k,)
        Their variances (e.g. DeLong), positive.
    level : float, default 0.95
    names : list of str, optional
    method, ci : str
        As :func:`random_effects`.

    References
    ----------
    Debray TPA et al. (2017). BMJ 356, i6460.
    Snell KIE et al. (2018). Statistical Methods in Medical Research 27(11), 3505-3522.
    """
    auc = np.asarray(auc, dtype=float)
    var = np.asarray(var, dtype=float)
    if np.any(~np.isfinite(auc)) or np.any((auc <= 0) | (auc >= 1)):
        raise ValueError("AUCs must lie strictly between 0 and 1 to be pooled on the logit scale")
    res = random_effects(logit(auc), var / (auc * (1.0 - auc)) ** 2, level, names, method, ci)
    return RandomEffects(
        estimate=float(expit(res.estimate)),
        se=res.se,
        ci_low=float(expit(res.ci_low)),
        ci_upp=float(expit(res.ci_upp)),
        pi_low=float(expit(res.pi_low)),
        pi_upp=float(expit(res.pi_upp)),
        z=res.z,
        pvalue=res.pvalue,
        tau2=res.tau2,
        i2=res.i2,
        q=res.q,
        q_pvalue=res.q_pvalue,
        k=res.k,
        weights=res.weights,
        level=res.level,
        scale="logit",
        names=res.names,
        method=res.method,
        ci_method=res.ci_method,
    )
