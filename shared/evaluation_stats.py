"""Site-side statistics for evaluating predicted risks: discrimination, decision
thresholds and calibration.

Every function takes one site's own rows, ``y`` (0/1 outcomes, shape ``(n,)``) and the
predictions of ``k`` models (``P``, shape ``(n, k)``, or ``(n,)`` for one model), and
returns numbers whose shapes depend only on the request, never on the number of
patients: ``(k,)``, ``(k, k)``, ``(k, T)`` for ``T`` thresholds, ``(k, B)`` for ``B``
bins. Counts are the only per-site sizes in a reply. The coordinator turns these into
confidence intervals, tests, pooled curves and meta-analyses
(:mod:`radfed.server.stats.inference`).

========================  ==========================================================
function                  returns
========================  ==========================================================
:func:`delong`            AUCs (k,) and their DeLong covariance (k, k), as pROC
:func:`threshold_counts`  events and non-events with ``p >= t``, each (k, T)
:func:`calibration_bins`  patients, events and Σp per risk bin, each (k, B)
:func:`hosmer_lemeshow`   ResourceSelection's ``hoslem.test`` on decile-of-risk groups
:func:`calibration_fit`   calibration intercept and slope (rms ``val.prob``)
:func:`calibration_in_the_large`  intercept of ``y ~ offset(logit p)``
:func:`brier`             mean squared error of the predicted risks
:func:`log_likelihood`    Σ y log p + (1 - y) log(1 - p), p clipped (Nagelkerke R²)
:func:`calibration_curve_fit`  the site's own smooth calibration curve (cubic in logit p)
:func:`calibration_errors`     ``|c(p) - p|`` of each patient for a calibration curve
========================  ==========================================================

Undefined results are NaN, never an exception: an AUC, its covariance and the
calibration fits need both outcome classes (and the DeLong covariance at least two
patients in each), so a site whose split holds one class answers NaN, which the
caller detects with :func:`numpy.isnan` or :attr:`DeLong.defined`. Malformed input
(outcomes other than 0/1, non-finite predictions, mismatched lengths) raises
:class:`ValueError`.

Only numpy is imported at module level: these functions run in short-lived Flower
client processes, where importing scipy.stats alone costs about a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.special import expit

from radfed.shared.logistic import fit_newton

#: Predicted probabilities are clipped to [PROB_EPS, 1 - PROB_EPS] before taking logits
#: in the calibration fits. Exact 0 or 1 (a hard classifier, or a saturated model) would
#: otherwise give infinite logits; 1e-8 (logit ±18.4) changes no clinically meaningful
#: risk and keeps the Newton weights p(1-p) away from zero.
PROB_EPS = 1e-8


# --------------------------------------------------------------------------- inputs


def _outcome(y: np.ndarray) -> np.ndarray:
    """``y`` as a boolean vector; raise unless it holds only 0 and 1."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be one-dimensional, got shape {y.shape}")
    if y.dtype != bool:
        if not np.all(np.isin(y, (0, 1))):
            raise ValueError("y must hold only 0 and 1")
        y = y.astype(bool)
    return y


def _predictions(y: np.ndarray, P: np.ndarray, name: str = "P") -> np.ndarray:
    """``P`` as a finite float array of shape (n, k); a vector is one model."""
    P = np.asarray(P, dtype=float)
    if P.ndim == 1:
        P = P[:, None]
    if P.ndim != 2 or P.shape[0] != len(y):
        raise ValueError(f"{name} must have shape (n,) or (n, k) with n = {len(y)}, got {P.shape}")
    if not np.all(np.isfinite(P)):
        raise ValueError(f"{name} must be finite")
    return P


def _probabilities(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """One model's predicted probabilities as a finite vector in [0, 1]."""
    p = np.asarray(p, dtype=float)
    if p.ndim != 1 or len(p) != len(y):
        raise ValueError(f"p must have shape ({len(y)},), got {p.shape}")
    if not np.all(np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise ValueError("p must hold probabilities in [0, 1]")
    return p


def _grid(values: np.ndarray, name: str) -> np.ndarray:
    """A strictly increasing, finite 1-D grid (thresholds or bin edges)."""
    values = np.asarray(values, dtype=float)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty vector")
    if not np.all(np.isfinite(values)) or np.any(np.diff(values) <= 0):
        raise ValueError(f"{name} must be finite and strictly increasing")
    return values


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, PROB_EPS, 1.0 - PROB_EPS)
    return np.log(p) - np.log1p(-p)


# --------------------------------------------------------------------------- DeLong


@dataclass(frozen=True)
class DeLong:
    """AUCs of ``k`` models on the same patients and their DeLong covariance.

    Attributes
    ----------
    auc : ndarray of shape (k,)
        Area under the ROC curve of each model, ties counted one half.
    cov : ndarray of shape (k, k)
        DeLong covariance of the AUCs, ``S10 / n_events + S01 / n_nonevents``.
    n_events, n_nonevents : int
        Patients with ``y = 1`` and ``y = 0``.
    """

    auc: np.ndarray
    cov: np.ndarray
    n_events: int
    n_nonevents: int

    @property
    def var(self) -> np.ndarray:
        """DeLong variance of each AUC, shape (k,)."""
        return np.diag(self.cov).copy()

    @property
    def defined(self) -> bool:
        """Whether the AUCs and their covariance are all defined (not NaN)."""
        return bool(np.all(np.isfinite(self.auc)) and np.all(np.isfinite(self.cov)))


#: Scores of one model closer than ``TIE_RTOL`` times its largest absolute score are one
#: tie. Patients with identical covariates get linear predictors that differ by a few
#: ulps (BLAS rounds each row of ``X @ beta`` its own way), which would turn a tie that
#: pROC counts 1/2 into a 0 or a 1; 1e-9 is far above such rounding (~1e-15 relative)
#: and far below any difference a model's coefficients can make between patients.
TIE_RTOL = 1e-9


def merge_near_ties(scores: np.ndarray, rtol: float = TIE_RTOL) -> np.ndarray:
    """Scores with near-equal values made equal, column by column.

    Sorted values closer than ``rtol * max|s|`` to their predecessor join its run, and
    every value of a run is replaced by the run's smallest. (A run could in principle
    chain values further apart than the tolerance; that needs thousands of distinct
    scores inside ``1e-6`` of the range and does not happen with fitted models.)

    Parameters
    ----------
    scores : ndarray of shape (n,) or (n, k)
    rtol : float, default TIE_RTOL
        Tolerance relative to the column's largest absolute score.

    Returns
    -------
    ndarray of the same shape as ``scores`` (a copy).
    """
    S = np.array(scores, dtype=float)
    flat = S.ndim == 1
    if flat:
        S = S[:, None]
    for j in range(S.shape[1]):
        s = S[:, j]
        if len(s) < 2:
            continue
        order = np.argsort(s, kind="stable")
        ordered = s[order]
        tol = rtol * float(np.max(np.abs(ordered)))
        starts = np.concatenate([[True], np.diff(ordered) > tol])
        first = np.maximum.accumulate(np.where(starts, np.arange(len(s)), 0))
        S[order, j] = ordered[first]
    return S[:, 0] if flat else S


def delong(y: np.ndarray, scores: np.ndarray, rtol: float = TIE_RTOL) -> DeLong:
    """AUCs and their DeLong covariance, exactly as R's pROC computes them.

    Higher scores mean an event (pROC's ``direction = "<"``, with ``y = 1`` the cases).
    The placement values follow pROC's ``delongPlacements``, computed with midranks as
    in Sun & Xu (2014): for event ``i``, ``V10_i`` is the fraction of non-events scored
    below it, and for non-event ``j``, ``V01_j`` the fraction of events scored above it,
    ties counting one half. Then ``auc = mean(V10)`` and

    ``cov = S10 / m + S01 / n``, with ``S10 = Σ_i (V10_i - auc)(V10_i - auc)ᵀ / (m - 1)``
    and ``S01`` likewise over the ``n`` non-events (pROC's ``ci_auc_delong`` and
    ``delong.paired.calculations``).

    Ties: scores of a model within ``rtol`` times its largest absolute score are equal
    (:func:`merge_near_ties`), so patients with identical covariates, whose linear
    predictors differ only by rounding, are tied and count 1/2 as in pROC on exact
    values. Pass ``rtol=0`` for exact comparisons.

    Parameters
    ----------
    y : ndarray of shape (n,)
        Outcome, 0/1.
    scores : ndarray of shape (n,) or (n, k)
        Scores of ``k`` models (any scale; only their order matters).
    rtol : float, default TIE_RTOL (1e-9)
        Relative tolerance under which two scores are a tie.

    Returns
    -------
    DeLong
        ``auc`` is NaN when a class is absent; ``cov`` is NaN unless there are at least
        two events and two non-events (pROC returns NA there too).

    References
    ----------
    DeLong ER, DeLong DM, Clarke-Pearson DL (1988). Biometrics 44(3), 837-845.
    Sun X, Xu W (2014). IEEE Signal Processing Letters 21(11), 1389-1393.
    Robin X et al. (2011). pROC. BMC Bioinformatics 12, 77.
    """
    y = _outcome(y)
    S = _predictions(y, scores, "scores")
    k = S.shape[1]
    m = int(y.sum())
    n = len(y) - m
    if m == 0 or n == 0:
        nan = np.full(k, np.nan)
        return DeLong(nan, np.full((k, k), np.nan), m, n)

    from scipy.stats import rankdata

    if rtol > 0:
        S = merge_near_ties(S, rtol)
    # Midranks among all patients minus midranks within a class count the patients of
    # the other class below (ties one half): the O(n log n) form of the psi kernel.
    ranks_all = rankdata(S, axis=0)
    ranks_events = rankdata(S[y], axis=0)
    ranks_nonevents = rankdata(S[~y], axis=0)
    v10 = (ranks_all[y] - ranks_events) / n
    v01 = 1.0 - (ranks_all[~y] - ranks_nonevents) / m
    auc = v10.mean(axis=0)
    if m < 2 or n < 2:
        return DeLong(auc, np.full((k, k), np.nan), m, n)
    d10 = v10 - auc
    d01 = v01 - auc
    cov = (d10.T @ d10) / ((m - 1) * m) + (d01.T @ d01) / ((n - 1) * n)
    return DeLong(auc, cov, m, n)


# ----------------------------------------------------------------- threshold counts


def threshold_counts(
    y: np.ndarray, P: np.ndarray, thresholds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Events and non-events classified positive at each threshold.

    A patient is positive at threshold ``t`` when ``p >= t``: the comparison of the
    ``dcurves`` package (``risks >= threshold`` in its true- and false-positive rates),
    and of pROC's thresholds with ``direction = "<"``. (dcurves also nudges predictions
    of exactly 0 and 1 by machine epsilon, which changes its counts only at ``t = 0``
    and ``t = 1``; net benefit is not defined at ``t = 1`` anyway.)

    Parameters
    ----------
    y : ndarray of shape (n,)
        Outcome, 0/1.
    P : ndarray of shape (n,) or (n, k)
        Predicted risks of ``k`` models.
    thresholds : ndarray of shape (T,)
        Strictly increasing thresholds.

    Returns
    -------
    tp, fp : ndarray of int, shape (k, T)
        Events (true positives) and non-events (false positives) with ``p >= t``.
    """
    y = _outcome(y)
    P = _predictions(y, P)
    t = _grid(thresholds, "thresholds")
    tp = np.empty((P.shape[1], len(t)), dtype=np.int64)
    fp = np.empty_like(tp)
    for j in range(P.shape[1]):
        for out, mask in ((tp, y), (fp, ~y)):
            s = np.sort(P[mask, j])
            # side="left": the first index with s >= t, so len - index counts s >= t.
            out[j] = len(s) - np.searchsorted(s, t, side="left")
    return tp, fp


# ----------------------------------------------------------------------- calibration


def calibration_bins(
    y: np.ndarray, P: np.ndarray, edges: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patients, events and summed predicted risk in each risk bin.

    Bins are ``[e_i, e_{i+1})``, the last one closed, as :func:`numpy.histogram`;
    predictions outside ``[e_0, e_B]`` are in no bin (the sum of ``n`` shows it).

    Parameters
    ----------
    y : ndarray of shape (n,)
        Outcome, 0/1.
    P : ndarray of shape (n,) or (n, k)
        Predicted risks of ``k`` models.
    edges : ndarray of shape (B + 1,)
        Strictly increasing bin edges, e.g. ``np.linspace(0, 1, 11)``.

    Returns
    -------
    n : ndarray of int, shape (k, B)
        Patients per bin.
    observed : ndarray of int, shape (k, B)
        Events per bin.
    expected : ndarray of float, shape (k, B)
        Sum of the predicted risks per bin (the expected number of events).
    """
    y = _outcome(y)
    P = _predictions(y, P)
    e = _grid(edges, "edges")
    if len(e) < 2:
        raise ValueError("edges must hold at least two values (one bin)")
    n_bins = len(e) - 1
    k = P.shape[1]
    n = np.zeros((k, n_bins), dtype=np.int64)
    observed = np.zeros((k, n_bins), dtype=np.int64)
    expected = np.zeros((k, n_bins))
    for j in range(k):
        p = P[:, j]
        idx = np.searchsorted(e, p, side="right") - 1
        idx[p == e[-1]] = n_bins - 1  # the last bin is closed on the right
        inside = (idx >= 0) & (idx < n_bins)
        idx, yy, pp = idx[inside], y[inside], p[inside]
        n[j] = np.bincount(idx, minlength=n_bins)
        observed[j] = np.bincount(idx[yy], minlength=n_bins)
        expected[j] = np.bincount(idx, weights=pp, minlength=n_bins)
    return n, observed, expected


@dataclass(frozen=True)
class HosmerLemeshow:
    """Hosmer-Lemeshow goodness-of-fit test on groups of patients.

    Attributes
    ----------
    statistic : float
        ``Σ_g (O1 - E1)² / E1 + (O0 - E0)² / E0`` over the groups, for events (1) and
        non-events (0).
    df : int
        Degrees of freedom: groups - 2 on the patients the model was fitted on, groups
        on validation patients (:func:`hosmer_lemeshow`'s ``validation``).
    pvalue : float
        Upper tail of the chi-square distribution with ``df`` degrees of freedom;
        NaN when ``df < 1``.
    groups : int
        Number of (non-empty) groups used.
    n, observed, expected : ndarray of shape (groups,)
        Patients, events and summed predicted risk per group.
    note : str or None
        Why the statistic is not an ordinary finite number: NaN (undefined: no patient,
        or fewer than two groups) or infinite (events, or non-events, observed in a
        group whose expected count is zero or so small that the term exceeds the
        largest double; the p-value is then 0). None otherwise.
    """

    statistic: float
    df: int
    pvalue: float
    groups: int
    n: np.ndarray
    observed: np.ndarray
    expected: np.ndarray
    note: str | None = None

    @classmethod
    def from_groups(
        cls,
        n: np.ndarray,
        observed: np.ndarray,
        expected: np.ndarray,
        expected_nonevents: np.ndarray | None = None,
    ) -> HosmerLemeshow:
        """The test from per-group counts; groups with no patient are dropped.

        ``expected_nonevents`` defaults to ``n - expected``; a site passes Σ(1 - p),
        which is what ResourceSelection sums. A term whose expected count is zero adds
        nothing when its observed count is zero too (R would give NaN for 0/0). A group
        with events (or non-events) whose expected count is zero, or so small (risks
        that underflowed, e.g. 5e-324) that its term exceeds the largest double, makes
        the statistic infinite, as R's ``hoslem.test`` gives ``Inf``; the p-value is
        then 0, as R's ``1 - pchisq(Inf, df)``, and exact: any statistic beyond the
        largest double has a chi-square tail far below the smallest one.
        :attr:`HosmerLemeshow.note` says so.
        """
        n = np.asarray(n, dtype=float)
        o1 = np.asarray(observed, dtype=float)
        e1 = np.asarray(expected, dtype=float)
        e0 = n - e1 if expected_nonevents is None else np.asarray(expected_nonevents, float)
        keep = n > 0
        n, o1, e1, e0 = n[keep], o1[keep], e1[keep], e0[keep]
        o0 = n - o1
        with np.errstate(over="ignore"):  # an overflow is reported below, with a note
            statistic = float(_chisq_terms(o1, e1).sum() + _chisq_terms(o0, e0).sum())
        groups = len(n)
        note = None
        if groups < 2:
            statistic = float("nan")
            note = (
                "no patient"
                if groups == 0
                else "fewer than two groups (all predictions tied): the test is undefined"
            )
        elif statistic == np.inf:
            note = (
                "events or non-events observed in a group whose expected count is zero "
                "or underflows (predicted risks of exactly 0 or 1, or subnormal): the "
                "statistic exceeds the largest double and the p-value is 0"
            )
        df = groups - 2
        return cls(statistic, df, _hl_pvalue(statistic, df), groups, n, o1, e1, note)


def _hl_pvalue(statistic: float, df: int) -> float:
    """Upper chi-square tail; 0 for an infinite statistic, NaN when undefined."""
    if df < 1 or np.isnan(statistic):
        return float("nan")
    if statistic == np.inf:
        return 0.0
    from scipy.stats import chi2

    # chi2.sf, not R's 1 - pchisq: equal where R's is accurate, and exact in the far
    # tail where 1 - pchisq rounds to 0.
    return float(chi2.sf(statistic, df))


def _chisq_terms(observed: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """(O - E)² / E, with 0/0 read as 0 (an empty expectation that came true)."""
    num = (observed - expected) ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = num / expected
    return np.where((expected == 0) & (num == 0), 0.0, terms)


def _r_quantile7(x: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """R's ``quantile(x, probs, type = 7)``, operation for operation.

    Transcribed rather than delegated to :func:`numpy.quantile` so that breaks that
    fall on a data point land on exactly the same side of it as in R.
    """
    x = np.sort(x)
    index = 1.0 + (len(x) - 1) * probs  # R's 1-based index
    lo = np.floor(index).astype(np.int64)
    hi = np.ceil(index).astype(np.int64)
    qs = x[lo - 1]
    x_hi = x[hi - 1]
    interpolate = (index > lo) & (x_hi != qs)
    h = index - lo
    return np.where(interpolate, (1.0 - h) * qs + h * x_hi, qs)


def hosmer_lemeshow(
    y: np.ndarray, p: np.ndarray, g: int = 10, validation: bool = False
) -> HosmerLemeshow:
    """Hosmer-Lemeshow test on ``g`` quantile groups, as ResourceSelection's ``hoslem.test``.

    Breaks are ``unique(quantile(p, seq(0, 1, 1/g)))`` with R's default quantile type 7;
    patients are grouped by ``cut(p, breaks, include.lowest = TRUE)``, i.e. intervals
    ``(b_i, b_{i+1}]`` with the first one closed; the statistic is the chi-square over
    both the event and the non-event columns of observed versus expected counts.

    Non-unique breaks (many tied predictions) are merged, and the degrees of freedom are
    the number of groups actually formed minus 2 — what current ResourceSelection does
    (it warns; older versions kept ``g - 2``, and R's ``cut`` errors on duplicated
    breaks without ``unique``). Where merged breaks still leave an interval with no
    patient, R's table keeps the empty row and its statistic is NaN (0/0); here empty
    groups are dropped and not counted in the degrees of freedom. When fewer than two
    groups remain (all predictions equal) the statistic and p-value are NaN, where R
    stops with an error.

    Degrees of freedom: groups - 2 on the data the model was fitted on (``hoslem.test``'s
    rule: two parameters were estimated from these patients), groups on validation data
    (``validation=True``: test splits, held-out and validation-only sites), where no
    parameter was estimated from the patients tested (Hosmer, Lemeshow & Sturdivant 2013,
    section 5.2.2).

    Predictions within :data:`TIE_RTOL` of each other are grouped as ties (see
    :func:`merge_near_ties`); the expected counts sum the predictions themselves.

    The break values themselves are not returned: the outer ones are individual
    patients' predictions.

    Parameters
    ----------
    y : ndarray of shape (n,)
        Outcome, 0/1.
    p : ndarray of shape (n,)
        Predicted probabilities of one model.
    g : int, default 10
        Number of quantile groups requested, at least 2.
    validation : bool, default False
        Whether ``p`` comes from a model fitted on other patients (df = groups) rather
        than on these (df = groups - 2).

    Returns
    -------
    HosmerLemeshow
    """
    y = _outcome(y)
    p = _probabilities(y, p)
    if int(g) != g or g < 2:
        raise ValueError(f"g must be an integer of at least 2, got {g}")
    if len(y) == 0:
        empty = np.zeros(0)
        return HosmerLemeshow(float("nan"), -2, float("nan"), 0, empty, empty, empty, "no patient")
    # seq(0, 1, 1/g) computes from + (0:n) * by, capped at `to`.
    probs = np.minimum(np.arange(g + 1) * (1.0 / g), 1.0)
    tied = merge_near_ties(p)
    breaks = np.unique(_r_quantile7(tied, probs))
    n_groups = max(len(breaks) - 1, 1)
    # Right-closed intervals (b_i, b_{i+1}]: side="left" finds the first break >= p;
    # include.lowest puts p == b_0 in the first group.
    group = np.clip(np.searchsorted(breaks, tied, side="left") - 1, 0, n_groups - 1)
    n = np.bincount(group, minlength=n_groups)
    observed = np.bincount(group[y], minlength=n_groups)
    expected = np.bincount(group, weights=p, minlength=n_groups)
    expected0 = np.bincount(group, weights=1.0 - p, minlength=n_groups)
    hl = HosmerLemeshow.from_groups(n, observed, expected, expected0)
    return with_validation_df(hl) if validation else hl


def with_validation_df(hl: HosmerLemeshow) -> HosmerLemeshow:
    """The same test with ``df`` = groups (validation data) and its p-value."""
    import dataclasses

    return dataclasses.replace(hl, df=hl.groups, pvalue=_hl_pvalue(hl.statistic, hl.groups))


class CalibrationFit(NamedTuple):
    """Calibration intercept and slope of ``logit P(y = 1) = a + b logit(p)``."""

    intercept: float
    slope: float


def calibration_fit(y: np.ndarray, p: np.ndarray) -> CalibrationFit:
    """Calibration intercept and slope: logistic regression of ``y`` on ``logit(p)``.

    These are rms ``val.prob``'s "Intercept" and "Slope" (both estimated together);
    a perfectly calibrated model has intercept 0 and slope 1. ``p`` is clipped to
    ``[PROB_EPS, 1 - PROB_EPS]`` before the logit.

    Parameters
    ----------
    y : ndarray of shape (n,)
        Outcome, 0/1.
    p : ndarray of shape (n,)
        Predicted probabilities of one model.

    Returns
    -------
    CalibrationFit
        NaN for both when the fit does not exist: one outcome class only, all
        predictions equal (slope not identifiable), or complete separation by the
        predictions (slope infinite).
    """
    y = _outcome(y)
    p = _probabilities(y, p)
    nan = CalibrationFit(float("nan"), float("nan"))
    if y.all() or not y.any():
        return nan
    lp = _logit(p)
    X = np.column_stack([np.ones(len(lp)), lp])
    beta = fit_newton(X, y, np.array([0.0, 1.0]))
    if beta is None:
        return nan
    return CalibrationFit(float(beta[0]), float(beta[1]))


def calibration_in_the_large(y: np.ndarray, p: np.ndarray) -> float:
    """Calibration-in-the-large: the intercept of ``y ~ offset(logit p)``.

    The slope is fixed at 1, so the intercept measures only whether the model predicts
    too many (negative) or too few (positive) events on average. ``p`` is clipped as in
    :func:`calibration_fit`. NaN when one outcome class is absent.
    """
    y = _outcome(y)
    p = _probabilities(y, p)
    if y.all() or not y.any():
        return float("nan")
    lp = _logit(p)
    beta = fit_newton(np.ones((len(lp), 1)), y, np.zeros(1), offset=lp)
    return float("nan") if beta is None else float(beta[0])


def brier(y: np.ndarray, p: np.ndarray) -> float:
    """Brier score, the mean of ``(p - y)²``.

    Defined with one outcome class too; NaN only when there is no patient.
    """
    y = _outcome(y)
    p = _probabilities(y, p)
    if len(y) == 0:
        return float("nan")
    return float(np.mean((p - y) ** 2))


def log_likelihood(y: np.ndarray, p: np.ndarray) -> float:
    """Log-likelihood of the outcomes under the predicted risks, as they are.

    ``Σ y log p + (1 - y) log(1 - p)`` with ``p`` clipped to ``[PROB_EPS, 1 - PROB_EPS]``
    like the calibration fits (a prediction of exactly 0 or 1 would make it infinite).
    Summed over sites with ``n`` and events it gives the pooled Nagelkerke R²
    (:func:`radfed.server.stats.inference.nagelkerke_r2`). 0.0 when there is no patient.
    """
    y = _outcome(y)
    p = np.clip(_probabilities(y, p), PROB_EPS, 1.0 - PROB_EPS)
    return float(np.sum(np.where(y, np.log(p), np.log1p(-p))))


#: Degree of the smooth calibration curve's polynomial in the linear predictor (logit p):
#: the sites' own curves and the coordinator's pooled one.
CURVE_DEGREE = 3


def curve_design(lp: np.ndarray, degree: int = CURVE_DEGREE) -> np.ndarray:
    """Columns ``1, lp, lp², ..., lp^degree`` of the calibration curve's logistic fit."""
    lp = np.asarray(lp, dtype=float)
    return np.column_stack([lp**k for k in range(degree + 1)])


def calibration_curve_fit(y: np.ndarray, lp: np.ndarray, degree: int = CURVE_DEGREE) -> np.ndarray:
    """The smooth calibration curve on this site's rows: logistic regression of ``y`` on
    ``1, lp, lp², lp³`` (``lp`` the model's linear predictor, logit p).

    The same fit the coordinator makes federatedly over several sites' rows (and over one
    external site's); here one site's own, so that its ICI, E50, E90 and Emax use its own
    curve, as rms ``val.prob`` on its data would.

    Returns
    -------
    ndarray of shape (degree + 1,)
        Coefficients; NaN when the fit does not exist (one class only, separation,
        a singular design such as all predictions equal).
    """
    y = _outcome(y)
    lp = np.asarray(lp, dtype=float)
    nan = np.full(degree + 1, np.nan)
    if len(y) <= degree + 1 or y.all() or not y.any() or not np.all(np.isfinite(lp)):
        return nan
    start = np.zeros(degree + 1)
    start[1] = 1.0
    beta = fit_newton(curve_design(lp, degree), y, start)
    return nan if beta is None else beta


def calibration_errors(lp: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """``|c(p_i) - p_i|`` of each patient, ``c = expit(coef · (1, lp, lp², ...))`` the
    calibration curve and ``p = expit(lp)``: Austin & Steyerberg's (2019) absolute
    calibration errors, whose mean is the ICI (rms ``val.prob``'s Eavg), median E50,
    90th percentile E90 and maximum Emax. NaN where ``coef`` is NaN."""
    lp = np.asarray(lp, dtype=float)
    coef = np.asarray(coef, dtype=float)
    eta = curve_design(lp, len(coef) - 1) @ coef
    return np.abs(expit(eta) - expit(lp))


# ----------------------------------------------------------- the site's disclosure grids

#: The site's probability thresholds for counts at and between thresholds (decision
#: curves' 0.01-0.99 grid). The site's own, never taken from a request.
THRESHOLDS = np.round(np.arange(1, 100) / 100, 2)
#: The site's risk bins for binned calibration points (and the pooled Hosmer-Lemeshow).
BIN_EDGES = np.round(np.linspace(0.0, 1.0, 11), 2)
#: The site's Hosmer-Lemeshow groups (deciles of risk).
HL_GROUPS = 10
#: The site's grid of predictor values for the nomogram's axis ranges
#: (:func:`value_counts_at_grid`): 0 and ±m·10^e, m below (steps of at most 12.5%), e
#: from -3 to 6 (|v| from 0.001 to 9.5e6). Fixed here, never taken from a request:
#: thresholds a request chose could be placed around one patient's value.
VALUE_MANTISSAS = (
    *np.round(np.arange(1.0, 2.0, 0.1), 1),
    *np.round(np.arange(2.0, 4.0, 0.2), 1),
    *np.arange(4.0, 10.0, 0.5),
)
_POSITIVE = np.array([round(m * 10.0**e, 6) for e in range(-3, 7) for m in VALUE_MANTISSAS])
VALUE_GRID = np.concatenate([-_POSITIVE[::-1], [0.0], _POSITIVE])


def merge_cells(events: np.ndarray, nonevents: np.ndarray, min_cell: int) -> np.ndarray:
    """Group adjacent cells until each group's events and non-events are 0 or at least
    ``min_cell``.

    Cells are closed greedily from the left as soon as their group passes; a failing
    last group is merged into the one before until it passes (the whole passes when its
    totals do). Returns a boolean vector, True where a group starts (cell 0 always).
    """
    events = np.asarray(events, dtype=np.int64)
    nonevents = np.asarray(nonevents, dtype=np.int64)

    def ok(e: int, ne: int) -> bool:
        return (e == 0 or e >= min_cell) and (ne == 0 or ne >= min_cell)

    starts: list[int] = []
    open_start, e, ne = 0, 0, 0
    for i, (ce, cne) in enumerate(zip(events, nonevents, strict=True)):
        if i > 0 and (e or ne) and ok(e, ne):
            starts.append(open_start)
            open_start, e, ne = i, 0, 0
        e, ne = e + int(ce), ne + int(cne)
    groups = [*starts, open_start]
    bounds = [*groups, len(events)]
    # Merge the failing tail backwards.
    while len(groups) > 1:
        lo = groups[-1]
        if ok(int(events[lo:].sum()), int(nonevents[lo:].sum())):
            break
        groups.pop()
    del bounds
    mask = np.zeros(len(events), dtype=bool)
    mask[groups] = True
    return mask


def coarsen_threshold_counts(
    tp: np.ndarray, fp: np.ndarray, events: int, nonevents: int, min_cell: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Counts at thresholds that respect ``min_cell`` at and between thresholds.

    Events and non-events are merged separately (each is its own count vector): the
    cells between adjacent thresholds (below the first, between each pair, above the
    last) are merged by :func:`merge_cells` until each holds 0 or at least ``min_cell``
    events (respectively non-events); at a threshold inside a merged cell the count of
    the cell's lower boundary is reported, so every count sent, and every difference
    of two counts sent, is 0 or at least ``min_cell``.

    Parameters
    ----------
    tp, fp : ndarray of int, shape (k, T)
        Exact events and non-events with ``p >= t`` (:func:`threshold_counts`).
    events, nonevents : int
        Totals of the subset.

    Returns
    -------
    tp, fp : ndarray of int, shape (k, T)
        Reported counts.
    tp_exact, fp_exact : ndarray of bool, shape (k, T)
        Where each reported count is the exact count at that threshold.
    """
    out = []
    for counts, total in ((np.atleast_2d(tp), events), (np.atleast_2d(fp), nonevents)):
        k, T = counts.shape
        reported, exact = np.empty_like(counts), np.zeros((k, T), dtype=bool)
        for j in range(k):
            # Cumulative counts at the cell boundaries 0, t_1, ..., t_T, and past 1.
            cum = np.concatenate([[total], counts[j], [0]])
            cells = -np.diff(cum)  # T + 1 cells
            starts = merge_cells(cells, np.zeros_like(cells), min_cell)
            group_start = np.maximum.accumulate(np.where(starts, np.arange(T + 1), 0))
            # Threshold t_i is the lower boundary of cell i + 1.
            reported[j] = cum[group_start[1:]]
            exact[j] = starts[1:]
        out.append((reported, exact))
    (tp_r, tp_exact), (fp_r, fp_exact) = out
    return tp_r, fp_r, tp_exact, fp_exact


def discrimination(
    y: np.ndarray, scores: np.ndarray, P: np.ndarray, min_cell: int
) -> dict[str, np.ndarray]:
    """What a site sends about the discrimination of k models (or classifiers): DeLong
    AUCs and covariance of ``scores`` (n, k), and events and non-events at or above each
    of the site's :data:`THRESHOLDS` of the risks ``P`` (n, k), merged until every cell
    passes ``min_cell``."""
    y = np.asarray(y, dtype=float)
    roc = delong(y, scores)
    tp, fp = threshold_counts(y, P, THRESHOLDS)
    events = int(y.sum())
    tp, fp, tp_exact, fp_exact = coarsen_threshold_counts(tp, fp, events, len(y) - events, min_cell)
    return {
        "auc": np.atleast_1d(roc.auc),
        "auc_cov": np.atleast_2d(roc.cov),
        "tp": tp,
        "fp": fp,
        "tp_exact": tp_exact.astype(float),
        "fp_exact": fp_exact.astype(float),
    }


def coarsen_bins(
    n: np.ndarray, observed: np.ndarray, expected: np.ndarray, min_cell: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Risk bins merged until each bin's events and non-events are 0 or at least
    ``min_cell``; a merged bin's totals stand at its first bin, zeros in the rest.

    Shapes (k, B) in and out, so the reply's shape stays the site's grid.
    """
    n, observed, expected = np.atleast_2d(n), np.atleast_2d(observed), np.atleast_2d(expected)
    out = [np.zeros_like(n), np.zeros_like(observed), np.zeros_like(expected)]
    for j in range(n.shape[0]):
        starts = np.flatnonzero(merge_cells(observed[j], n[j] - observed[j], min_cell))
        for arr, res in zip((n, observed, expected), out, strict=True):
            res[j, starts] = np.add.reduceat(arr[j], starts)
    return out[0], out[1], out[2]


def value_counts_at_grid(
    x: np.ndarray, min_cell: int, grid: np.ndarray = VALUE_GRID
) -> tuple[np.ndarray, np.ndarray]:
    """Patients with a value at or below each point of the site's value grid, merged.

    The cells of the grid (at or below the first point, between each pair, above the
    last) are merged as :func:`coarsen_threshold_counts` merges threshold cells, until
    each holds 0 or at least ``min_cell`` patients. At a point inside a merged cell the
    count of the cell's lower boundary is reported, so every count sent, every
    difference of two counts sent and both tails (below the first exact point, above
    the last) are 0 or at least ``min_cell``.

    Parameters
    ----------
    x : ndarray, shape (n, c)
        The values of ``c`` columns (finite).
    min_cell : int
    grid : ndarray, shape (G,)
        Ascending; :data:`VALUE_GRID`, the site's own.

    Returns
    -------
    at_or_below : ndarray of int, shape (c, G)
        Reported counts.
    exact : ndarray of bool, shape (c, G)
        Where each reported count is the exact count at that point.
    """
    x = np.asarray(x, dtype=float).reshape(len(x), -1)
    if not np.isfinite(x).all():
        raise ValueError("values must be finite")
    n = x.shape[0]
    below = np.stack([np.searchsorted(np.sort(col), grid, side="right") for col in x.T])
    # Counts above each point are "at or above a threshold" counts: the same merging.
    above, _, exact, _ = coarsen_threshold_counts(n - below, np.zeros_like(below), n, 0, min_cell)
    return n - above, exact
