"""Distributed ComBat (Chen et al., NeuroImage 2022), exact against pooled neuroCombat.

The federation runs three site rounds, each a pair of pure functions (a **site
statistic** over the site's own rows and a **coordinator solver** over the list of
site replies), then every site adjusts its own rows:

1. :func:`site_design_moments` (site): XᵀX, XᵀY -> :func:`solve_location`
   (coordinator): B̂ = (ΣXᵀX)⁻¹ΣXᵀY and the grand mean.
2. :func:`site_residual_moments` (site): Σ(Y − XB̂)², ΣY² per feature ->
   :func:`solve_pooled_variance` (coordinator): var_pooled, features left unadjusted.
3. :func:`site_batch_moments` (site): per batch n, Σz, Σz² -> :func:`solve_batch_effects`
   (coordinator): γ̂, δ̂, priors, γ*, δ* as a :class:`ComBatEstimates`.
4. :func:`apply_combat` (site): harmonise the site's own rows; nothing is sent.

Every site reply has shapes fixed by the request (B batch levels, c covariate columns,
p features), never by the site's number of rows.

X is the design ``[batch one-hot over the federation's batch levels, covariates]``;
``z = (Y − grand mean − covariate effects) / sqrt(var_pooled)``. A batch may span
several sites and a site may hold several batches: every statistic is a sum over rows,
so the coordinator just adds the replies. :func:`combat_in_memory` runs the rounds over
in-memory sites and documents the call order; :class:`ComBat` does the same on one
pooled data set. A site whose batch the federation never saw calls
:func:`estimate_new_batch` before :func:`apply_combat`. Binary features (and those a
study excludes) are chosen out beforehand (:mod:`radfed.harmonization.binary`): the
estimates name only the features harmonised, and :func:`apply_combat` sees no other.

The math is pure numpy; no transport is imported here.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from radfed.harmonization import eb
from radfed.harmonization.design import (
    ArrayLike,
    Reply,
    batch_onehot,
    coefficients,
    covariate_effects,
    default_names,
    design_matrix,
    encode_covariates,
    site_data,
    standardize,
)
from radfed.harmonization.estimates import ComBatEstimates
from radfed.shared.aggregate import sum_replies

__all__ = [
    "ComBat",
    "ComBatEstimates",
    "ComBatWarning",
    "apply_combat",
    "combat_in_memory",
    "encode_covariates",
    "estimate_new_batch",
    "site_batch_moments",
    "site_design_moments",
    "site_residual_moments",
    "solve_batch_effects",
    "solve_location",
    "solve_pooled_variance",
]

# A feature whose pooled residual SD is below this fraction of its root mean square is
# constant (or fully explained by batch and covariates): ComBat cannot standardise it.
DEGENERATE_RTOL = 1e-10
# Smallest eigenvalue of the scaled XᵀX, relative to the largest, of a usable design.
SINGULAR_RTOL = 1e-11


class ComBatWarning(UserWarning):
    """A feature ComBat handles specially (constant overall or within a batch)."""


def _finite(reply: dict[str, Any], context: str) -> dict[str, Any]:
    """``reply`` if every number in it is finite; else a clear error (a sum of squares
    beyond the largest double: values of about 1e154 and more), never an inf or NaN
    sent on."""
    for key, value in reply.items():
        array = np.asarray(value)
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            raise ValueError(
                f"ComBat {context}: {key} overflows double precision (feature or covariate "
                "values too large, or a pooled variance too small); rescale the features"
            )
    return reply


def _check_estimates(estimates: ComBatEstimates) -> None:
    """Refuse estimates a site cannot apply: non-finite values or variances <= 0 (of
    the adjusted features; a hostile or corrupted payload, never a fit)."""
    adj = estimates.adjusted
    ok = (
        np.isfinite(estimates.grand_mean)
        & np.isfinite(estimates.beta_covariates).all(axis=0)
        & np.isfinite(estimates.var_pooled)
        & (estimates.var_pooled > 0)
        & np.isfinite(estimates.gamma_star).all(axis=0)
        & np.isfinite(estimates.delta_star).all(axis=0)
        & (estimates.delta_star > 0).all(axis=0)
    )
    if not ok[adj].all():
        names = np.array(estimates.feature_names)[adj & ~ok][:5].tolist()
        raise ValueError(
            f"ComBat estimates of feature(s) {names} hold NaN, infinite values or a "
            "variance <= 0: they cannot be applied"
        )


# -- round 1: pooled regression ----------------------------------------------------------


def site_design_moments(
    Y: ArrayLike, batch: ArrayLike, covariates: ArrayLike | None, batch_levels: Sequence[str]
) -> dict[str, Any]:
    """**Site, round 1.** Cross-products of the design ``X = [batch one-hot, covariates]``.

    Returns
    -------
    dict
        ``xtx`` (B+c, B+c), ``xty`` (B+c, p) and the row count ``n``. The batch block of
        ``xtx``'s diagonal holds the site's rows per batch (0 for batches it lacks).
    """
    Y, batch, cov = site_data(Y, batch, covariates)
    X = design_matrix(batch, cov, batch_levels)
    with np.errstate(over="ignore", invalid="ignore"):  # _finite refuses an overflow
        reply = {"xtx": X.T @ X, "xty": X.T @ Y, "n": int(Y.shape[0])}
    return _finite(reply, "design moments")


def _check_design(xtx: np.ndarray, names: list[str]) -> None:
    """Refuse a singular pooled design, naming the columns involved."""
    diag = np.diag(xtx)
    empty = [names[i] for i in np.flatnonzero(diag <= 0)]
    if empty:
        raise ValueError(
            f"design column(s) {empty} are zero in every row: a batch level without rows, "
            "or a covariate that is always 0"
        )
    scale = 1 / np.sqrt(diag)
    eigval, eigvec = np.linalg.eigh(xtx * scale[:, None] * scale[None, :])
    if eigval[0] <= SINGULAR_RTOL * eigval[-1]:
        null = eigvec[:, 0]
        involved = [names[i] for i in np.flatnonzero(np.abs(null) > 0.05 * np.abs(null).max())]
        raise ValueError(
            f"singular design: columns {involved} are linearly dependent (a covariate "
            "constant, or confounded with batch); drop or recode that covariate"
        )


def solve_location(
    replies: Sequence[Reply],
    batch_levels: Sequence[str],
    covariate_names: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """**Coordinator, round 1.** Pooled coefficients and grand mean, as neuroCombat.

    ``B̂ = (ΣXᵀX)⁻¹ ΣXᵀY`` and ``grand_mean = Σ_b (n_b / n) B̂_b``.

    Returns
    -------
    dict
        ``beta`` (B+c, p): send with ``batch_levels`` for round 2; ``beta_covariates``
        (c, p) and ``grand_mean`` (p,): send for round 3; ``n_per_batch`` (B,).

    Raises
    ------
    ValueError
        On a singular design (a batch without rows, a covariate confounded with batch).
    """
    n_batch = len(batch_levels)
    total = sum_replies(replies, ["xtx", "xty"])
    xtx, xty = total["xtx"], total["xty"]
    if xtx.shape != (xtx.shape[0],) * 2 or xtx.shape[0] < n_batch:
        raise ValueError(f"xtx of shape {xtx.shape} does not fit {n_batch} batch levels")
    cov_names = default_names(covariate_names, xtx.shape[0] - n_batch, "covariate")
    _check_design(xtx, [f"batch={b}" for b in batch_levels] + cov_names)
    beta = np.linalg.solve(xtx, xty)
    n_per_batch = np.diag(xtx)[:n_batch]
    grand_mean = (n_per_batch / n_per_batch.sum()) @ beta[:n_batch]
    return {
        "beta": beta,
        "beta_covariates": beta[n_batch:],
        "grand_mean": grand_mean,
        "n_per_batch": np.rint(n_per_batch).astype(np.int64),
    }


# -- round 2: pooled variance ------------------------------------------------------------


def site_residual_moments(
    Y: ArrayLike,
    batch: ArrayLike,
    covariates: ArrayLike | None,
    batch_levels: Sequence[str],
    beta: np.ndarray,
) -> dict[str, Any]:
    """**Site, round 2.** Per-feature residual sum of squares ``Σ(Y − XB̂)²``.

    Returns
    -------
    dict
        ``rss`` (p,), ``sumsq`` (p,) = ΣY² (to tell constant features from the others)
        and the row count ``n``.
    """
    beta = coefficients(beta, "beta", ndim=2)
    Y, batch, cov = site_data(Y, batch, covariates, n_features=beta.shape[1])
    X = design_matrix(batch, cov, batch_levels)
    if X.shape[1] != beta.shape[0]:
        raise ValueError(f"beta has {beta.shape[0]} rows, the design {X.shape[1]} columns")
    with np.errstate(over="ignore", invalid="ignore"):  # _finite refuses an overflow
        resid = Y - X @ beta
        reply = {"rss": (resid**2).sum(axis=0), "sumsq": (Y**2).sum(axis=0), "n": int(Y.shape[0])}
    return _finite(reply, "residual moments")


def solve_pooled_variance(
    replies: Sequence[Reply], feature_names: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """**Coordinator, round 2.** neuroCombat's ``var_pooled``: mean over all rows (1/n).

    Features with zero residual variance (constant over all data, or fully explained by
    batch and covariates) cannot be standardised: they are left unadjusted, with a
    :class:`ComBatWarning`, and kept out of every later estimate (priors included), so
    the other features come out as neuroCombat run without them.

    Returns
    -------
    dict
        ``var_pooled`` (p,), 1.0 for unadjusted features (a harmless placeholder), and
        ``adjusted`` (p,) bool; send both for round 3.
    """
    n = sum(int(r["n"]) for r in replies)
    total = sum_replies(replies, ["rss", "sumsq"])
    rss, sumsq = total["rss"], total["sumsq"]
    var_pooled = rss / n
    adjusted = np.sqrt(var_pooled) > DEGENERATE_RTOL * np.sqrt(sumsq / n)
    if not adjusted.all():
        names = default_names(feature_names, rss.size, "feature")
        dropped = [names[i] for i in np.flatnonzero(~adjusted)]
        warnings.warn(
            f"ComBat: feature(s) {dropped} have zero residual variance over all sites "
            "(constant, or fully explained by batch and covariates); they are left "
            "unadjusted and excluded from the priors",
            ComBatWarning,
            stacklevel=2,
        )
    return {"var_pooled": np.where(adjusted, var_pooled, 1.0), "adjusted": adjusted}


# -- round 3: batch effects --------------------------------------------------------------


def site_batch_moments(
    Y: ArrayLike,
    batch: ArrayLike,
    covariates: ArrayLike | None,
    batch_levels: Sequence[str],
    beta_covariates: np.ndarray,
    grand_mean: np.ndarray,
    var_pooled: np.ndarray,
) -> dict[str, np.ndarray]:
    """**Site, round 3.** Per batch: rows, Σz and Σz² of the standardised data.

    These are the Gaussian sufficient statistics of each batch: with them the
    coordinator finishes both the parametric (``it_sol``) and the non-parametric
    (``int_eprior``) empirical Bayes exactly (see :mod:`radfed.harmonization.eb`).

    Returns
    -------
    dict
        ``n`` (B,) rows per batch (0 for batches the site does not hold: a structural
        zero, not a small cell), ``sum_z`` (B, p) and ``sum_z2`` (B, p).
    """
    grand_mean = coefficients(grand_mean, "grand_mean", ndim=1)
    Y, batch, cov = site_data(Y, batch, covariates, n_features=grand_mean.size)
    p = grand_mean.size
    var_pooled = coefficients(var_pooled, "var_pooled", ndim=1, columns=p, positive=True)
    beta_covariates = coefficients(beta_covariates, "beta_covariates", ndim=2, columns=p)
    onehot = batch_onehot(batch, batch_levels)
    with np.errstate(over="ignore", invalid="ignore"):  # _finite refuses an overflow
        z = standardize(Y, cov, beta_covariates, grand_mean, var_pooled)
        reply = {
            "n": onehot.sum(axis=0).astype(np.int64),
            "sum_z": onehot.T @ z,
            "sum_z2": onehot.T @ z**2,
        }
    return _finite(reply, "batch moments")


def _warn_constant_in_batch(level: str, constant: np.ndarray, names: np.ndarray) -> None:
    if constant.any():
        warnings.warn(
            f"ComBat: feature(s) {list(names[constant])} are constant within batch "
            f"{level!r}; their batch variance estimate is set to 1 (as neuroCombat does) "
            "and the empirical Bayes prior sets their scale",
            ComBatWarning,
            stacklevel=3,
        )


def _batch_posterior(
    level: str,
    n: int,
    sum_z: np.ndarray,
    sum_z2: np.ndarray,
    names: np.ndarray,
    parametric: bool,
    mean_only: bool,
) -> tuple[np.ndarray, np.ndarray, eb.Priors]:
    """γ*, δ* and priors of one batch over the harmonised features."""
    if n < 1 or (n < 2 and not mean_only):
        raise ValueError(f"batch {level!r} has {n} row(s); ComBat needs at least 2 per batch")
    moments = eb.BatchMoments.from_sums(n, sum_z, sum_z2)
    if not mean_only:
        _warn_constant_in_batch(level, moments.constant, names)
    try:
        return eb.posterior(moments, parametric, mean_only)
    except ValueError as exc:
        raise ValueError(f"batch {level!r}: {exc}") from exc


def solve_batch_effects(
    replies: Sequence[Reply],
    *,
    batch_levels: Sequence[str],
    beta: np.ndarray,
    grand_mean: np.ndarray,
    var_pooled: np.ndarray,
    adjusted: np.ndarray,
    feature_names: Sequence[str] | None = None,
    covariate_names: Sequence[str] | None = None,
    parametric: bool = True,
    mean_only: bool = False,
    **_: Any,
) -> ComBatEstimates:
    """**Coordinator, round 3.** Empirical Bayes batch effects -> the fitted model.

    Per batch, from the summed ``n``, ``Σz``, ``Σz²``: ``γ̂`` (mean), ``δ̂`` (variance,
    ddof=1), the parametric priors ``γ̄, τ², a, b`` across features, and ``γ*, δ*`` by
    neuroCombat's ``it_sol`` (parametric), ``int_eprior`` (non-parametric) or
    ``postmean(γ̂, γ̄, 1, 1, τ²)`` with ``δ* = 1`` (mean-only). Extra keyword arguments
    are ignored so that ``**solve_location(...)`` and ``**solve_pooled_variance(...)``
    can be passed as they are.

    Returns
    -------
    ComBatEstimates
        Send :meth:`ComBatEstimates.to_payload` to every site for :func:`apply_combat`.
    """
    levels = [str(b) for b in batch_levels]
    beta = np.asarray(beta, dtype=float)
    adjusted = np.asarray(adjusted, dtype=bool)
    names = np.array(default_names(feature_names, beta.shape[1], "feature"))
    total = sum_replies(replies, ["n", "sum_z", "sum_z2"])
    n = np.rint(total["n"]).astype(np.int64)
    sum_z, sum_z2 = total["sum_z"], total["sum_z2"]
    if sum_z.shape != (len(levels), names.size):
        raise ValueError(f"sum_z of shape {sum_z.shape}, expected {(len(levels), names.size)}")
    gamma_star = np.zeros((len(levels), names.size))
    delta_star = np.ones((len(levels), names.size))
    priors = []
    for b, level in enumerate(levels):
        g, d, prior = _batch_posterior(
            level,
            int(n[b]),
            sum_z[b, adjusted],
            sum_z2[b, adjusted],
            names[adjusted],
            parametric,
            mean_only,
        )
        gamma_star[b, adjusted], delta_star[b, adjusted] = g, d
        priors.append((prior.gamma_bar, prior.tau2, prior.a, prior.b))
    priors_arr = np.array(priors, dtype=float).reshape(len(levels), 4)
    return ComBatEstimates(
        batch_levels=tuple(levels),
        feature_names=tuple(names),
        covariate_names=tuple(
            default_names(covariate_names, beta.shape[0] - len(levels), "covariate")
        ),
        beta_covariates=beta[len(levels) :],
        grand_mean=grand_mean,
        var_pooled=var_pooled,
        gamma_star=gamma_star,
        delta_star=delta_star,
        gamma_bar=priors_arr[:, 0],
        tau2=priors_arr[:, 1],
        a_prior=priors_arr[:, 2],
        b_prior=priors_arr[:, 3],
        n_per_batch=n,
        adjusted=adjusted,
        parametric=parametric,
        mean_only=mean_only,
    )


# -- round 4: local adjustment -----------------------------------------------------------


def apply_combat(
    estimates: ComBatEstimates, Y: ArrayLike, batch: ArrayLike, covariates: ArrayLike | None
) -> np.ndarray:
    """**Site, after round 3.** Harmonise the site's rows (training or validation).

    ``Y* = (z − γ*_b) / sqrt(δ*_b) · sqrt(var_pooled) + grand mean + covariate effects``.
    Needs the biological covariates, never the outcome. Unadjusted features are returned
    as they are.

    Raises
    ------
    ValueError
        On a shape mismatch or a batch the fit does not know (call
        :func:`estimate_new_batch` first).
    """
    Y, batch, cov = site_data(
        Y, batch, covariates, estimates.n_features, len(estimates.covariate_names)
    )
    idx = estimates.batch_index(batch)
    _check_estimates(estimates)
    with np.errstate(over="ignore", invalid="ignore"):  # refused below
        mean = estimates.grand_mean + covariate_effects(cov, estimates.beta_covariates)
        scale = np.sqrt(estimates.var_pooled)
        z = (Y - mean) / scale
        out = (z - estimates.gamma_star[idx]) / np.sqrt(estimates.delta_star[idx]) * scale + mean
    out[:, ~estimates.adjusted] = Y[:, ~estimates.adjusted]
    if not np.isfinite(out).all():
        names = np.array(estimates.feature_names)[~np.isfinite(out).all(axis=0)][:5].tolist()
        raise ValueError(
            f"ComBat adjustment of feature(s) {names} overflows double precision (values "
            "too large for the fit's scale); rescale the features"
        )
    return out


def estimate_new_batch(
    estimates: ComBatEstimates,
    Y: ArrayLike,
    batch: ArrayLike,
    covariates: ArrayLike | None,
    prior: Literal["own", "training"] = "own",
) -> ComBatEstimates:
    """**Site, no round.** Batch effects of batches the federation never saw.

    A held-out or new site standardises its rows with the federation's B̂ covariate
    rows, grand mean and pooled variance (which stay fixed: nothing is refitted and no
    outcome is used), then estimates ``γ*, δ*`` of each of its new batches locally in
    the federation's mode (parametric, non-parametric, mean-only).

    Prior used for a new batch:

    * ``"own"`` (default): the batch's own hyper-priors ``γ̄, τ², a, b`` across its
      features, i.e. exactly what ComBat computes for each training batch. ComBat's
      priors are per batch by construction (a batch's shifts across features are one
      draw of its own distribution), and a new scanner's shift is not a draw from the
      training batches' shifts; with tens of features or more these are well
      estimated. In non-parametric mode the prior is the batch's own other features, as
      in ``int_eprior``.
    * ``"training"``: the mean of the training batches' hyper-priors (parametric only),
      for a new batch with too few features to estimate its own.

    Returns
    -------
    ComBatEstimates
        The federation's estimates with the new batches appended; batches already
        known keep the federation's parameters. Pass to :func:`apply_combat`.
    """
    if prior not in ("own", "training"):
        raise ValueError(f"prior must be 'own' or 'training', got {prior!r}")
    if prior == "training" and not estimates.parametric:
        raise ValueError("prior='training' needs parametric ComBat")
    Y, batch, cov = site_data(
        Y, batch, covariates, estimates.n_features, len(estimates.covariate_names)
    )
    new_levels = sorted({str(b) for b in set(batch)} - set(estimates.batch_levels))
    if not new_levels:
        return estimates
    _check_estimates(estimates)
    adj = estimates.adjusted
    with np.errstate(over="ignore", invalid="ignore"):  # refused below
        z = standardize(
            Y[:, adj],
            cov,
            estimates.beta_covariates[:, adj],
            estimates.grand_mean[adj],
            estimates.var_pooled[adj],
        )
        finite_squares = np.isfinite((z**2).sum(axis=0)).all()
    if not finite_squares:
        raise ValueError(
            "ComBat new batch: the standardised values overflow double precision (values "
            "too large for the fit's scale); rescale the features"
        )
    names = np.array(estimates.feature_names)[adj]
    gammas, deltas, priors, counts = [], [], [], []
    for level in new_levels:
        rows = z[batch == level]
        if prior == "own":
            g, d, pr = _batch_posterior(
                level,
                len(rows),
                rows.sum(axis=0),
                (rows**2).sum(axis=0),
                names,
                parametric=estimates.parametric,
                mean_only=estimates.mean_only,
            )
        else:
            g, d, pr = _training_prior_posterior(estimates, level, rows, names)
        if not (np.isfinite(g).all() and np.isfinite(d).all() and (d > 0).all()):
            raise ValueError(
                f"ComBat new batch {level!r}: its batch effects are not finite (values too "
                "large or too far from the fit's scale); rescale the features"
            )
        gamma, delta = np.zeros(estimates.n_features), np.ones(estimates.n_features)
        gamma[adj], delta[adj] = g, d
        gammas.append(gamma)
        deltas.append(delta)
        priors.append((pr.gamma_bar, pr.tau2, pr.a, pr.b))
        counts.append(len(rows))
    return estimates.with_batches(new_levels, np.array(gammas), np.array(deltas), priors, counts)


def _training_prior_posterior(
    estimates: ComBatEstimates, level: str, rows: np.ndarray, names: np.ndarray
) -> tuple[np.ndarray, np.ndarray, eb.Priors]:
    """Parametric γ*, δ* of a new batch under the training batches' mean hyper-priors."""
    if len(rows) < 1 or (len(rows) < 2 and not estimates.mean_only):
        raise ValueError(f"batch {level!r} has {len(rows)} row(s); ComBat needs at least 2")
    moments = eb.BatchMoments.from_sums(len(rows), rows.sum(axis=0), (rows**2).sum(axis=0))
    pr = eb.Priors(*estimates.training_priors())
    if estimates.mean_only:
        return eb.mean_only_posterior(moments.gamma_hat, pr), np.ones(names.size), pr
    _warn_constant_in_batch(level, moments.constant, names)
    g, d = eb.parametric_posterior(moments, moments.delta_hat(False), pr)
    return g, d, pr


# -- drivers -----------------------------------------------------------------------------


def combat_in_memory(
    sites: Sequence[tuple[ArrayLike, ArrayLike, ArrayLike | None]],
    batch_levels: Sequence[str] | None = None,
    *,
    feature_names: Sequence[str] | None = None,
    covariate_names: Sequence[str] | None = None,
    parametric: bool = True,
    mean_only: bool = False,
) -> tuple[ComBatEstimates, list[np.ndarray]]:
    """Run the distributed protocol over in-memory sites (the reference call order).

    Parameters
    ----------
    sites : sequence of (Y, batch, covariates)
        Each site's rows; ``covariates`` may be None (no covariates) at every site.
    batch_levels : sequence of str, optional
        The federation's batch levels (default: the sorted labels seen).

    Returns
    -------
    estimates : ComBatEstimates
    adjusted : list of np.ndarray
        Each site's harmonised rows, in the order given.
    """
    if not sites:
        raise ValueError("no sites")
    levels = (
        sorted({str(b) for _, batch, _ in sites for b in np.asarray(batch).astype(str)})
        if batch_levels is None
        else [str(b) for b in batch_levels]
    )
    replies = [site_design_moments(Y, b, c, levels) for Y, b, c in sites]
    location = solve_location(replies, levels, covariate_names)
    replies = [site_residual_moments(Y, b, c, levels, location["beta"]) for Y, b, c in sites]
    variance = solve_pooled_variance(replies, feature_names)
    replies = [
        site_batch_moments(
            Y,
            b,
            c,
            levels,
            location["beta_covariates"],
            location["grand_mean"],
            variance["var_pooled"],
        )
        for Y, b, c in sites
    ]
    estimates = solve_batch_effects(
        replies,
        batch_levels=levels,
        feature_names=feature_names,
        covariate_names=covariate_names,
        parametric=parametric,
        mean_only=mean_only,
        **location,
        **variance,
    )
    return estimates, [apply_combat(estimates, Y, b, c) for Y, b, c in sites]


class ComBat:
    """ComBat on one pooled data set, sklearn-style (the ``--pooled`` reference run).

    Runs the same functions as the federation, with the whole data set as one site.

    Parameters
    ----------
    parametric : bool
        Parametric (True) or non-parametric empirical Bayes priors.
    mean_only : bool
        Adjust batch means only (δ* = 1).

    Attributes
    ----------
    estimates_ : ComBatEstimates
    batch_levels_ : list of str
    n_features_in_ : int
    feature_names_in_ : np.ndarray of str
        Only when ``fit`` was given a DataFrame.
    """

    def __init__(self, parametric: bool = True, mean_only: bool = False) -> None:
        self.parametric = parametric
        self.mean_only = mean_only

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"parametric": self.parametric, "mean_only": self.mean_only}

    def set_params(self, **params: Any) -> ComBat:
        for key, value in params.items():
            if key not in self.get_params():
                raise ValueError(f"invalid parameter {key!r} for ComBat")
            setattr(self, key, value)
        return self

    def fit(self, Y: ArrayLike, batch: ArrayLike, covariates: ArrayLike | None = None) -> ComBat:
        """Fit on the training rows (no outcome needed)."""
        names = None
        if isinstance(Y, pd.DataFrame):
            names = [str(c) for c in Y.columns]
            self.feature_names_in_ = np.array(names, dtype=object)
        estimates, _ = combat_in_memory(
            [(Y, batch, covariates)],
            feature_names=names,
            parametric=self.parametric,
            mean_only=self.mean_only,
        )
        self.estimates_ = estimates
        self.batch_levels_ = list(estimates.batch_levels)
        self.n_features_in_ = estimates.n_features
        return self

    def transform(
        self, Y: ArrayLike, batch: ArrayLike, covariates: ArrayLike | None = None
    ) -> np.ndarray | pd.DataFrame:
        """Harmonise rows of known batches (a DataFrame in gives a DataFrame out)."""
        if not hasattr(self, "estimates_"):
            raise ValueError("this ComBat is not fitted yet; call fit first")
        out = apply_combat(self.estimates_, Y, batch, covariates)
        if isinstance(Y, pd.DataFrame):
            return pd.DataFrame(out, index=Y.index, columns=Y.columns)
        return out

    def fit_transform(
        self, Y: ArrayLike, batch: ArrayLike, covariates: ArrayLike | None = None
    ) -> np.ndarray | pd.DataFrame:
        return self.fit(Y, batch, covariates).transform(Y, batch, covariates)
