"""ComBat's empirical Bayes step, written on each batch's sufficient statistics.

ComBat (Johnson et al. 2007, as implemented in neuroCombat 0.2.12) models the
standardised data ``z`` of feature ``g`` in batch ``b`` as ``N(γ_bg, δ_bg)``. Everything
the empirical Bayes step needs from the rows of a batch is, per feature, the Gaussian
sufficient statistics ``n_b``, ``Σz`` and ``Σz²``:

* ``γ̂ = Σz / n`` and ``δ̂ = (Σz² − (Σz)²/n) / (n − 1)`` (ddof=1, as ``np.var``);
* neuroCombat's ``it_sol`` needs ``Σ(z − γ)² = css + n(γ̂ − γ)²`` with the centred sum of
  squares ``css = Σz² − (Σz)²/n``;
* neuroCombat's ``int_eprior`` weighs feature ``j``'s ``(γ̂_j, δ̂_j)`` by the likelihood of
  feature ``g``'s rows, ``Π_rows N(z_rg; γ̂_j, δ̂_j)``, whose logarithm is
  ``−n/2·log(2πδ̂_j) − [css_g + n(γ̂_g − γ̂_j)²] / (2δ̂_j)``: again only ``n``, ``Σz``, ``Σz²``.

So the coordinator can finish both the parametric and the non-parametric adjustments
from the summed per-batch moments; no site ever sends a row or a p×p matrix.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

# neuroCombat's convergence threshold for the parametric iterations.
IT_SOL_CONV = 1e-4
# A batch variance this small relative to the batch's mean square is rounding residue
# of a feature that is constant within the batch.
ZERO_VARIANCE_RTOL = 1e-12


@dataclass(frozen=True)
class BatchMoments:
    """Sufficient statistics of the standardised data of one batch, per feature.

    Attributes
    ----------
    n : int
        Rows of the batch.
    gamma_hat : np.ndarray, shape (p,)
        Batch mean ``Σz / n``.
    css : np.ndarray, shape (p,)
        Centred sum of squares ``Σz² − (Σz)²/n`` (clipped at zero).
    constant : np.ndarray of bool, shape (p,)
        Features whose variance in this batch is zero up to rounding.
    """

    n: int
    gamma_hat: np.ndarray
    css: np.ndarray
    constant: np.ndarray

    @classmethod
    def from_sums(cls, n: int, sum_z: np.ndarray, sum_z2: np.ndarray) -> BatchMoments:
        """Build from ``n``, ``Σz`` and ``Σz²`` (summed over the sites holding the batch)."""
        n = int(n)
        sum_z = np.asarray(sum_z, dtype=float)
        sum_z2 = np.asarray(sum_z2, dtype=float)
        gamma_hat = sum_z / n
        # Σz² − (Σz)²/n can come out slightly negative by rounding; it is a sum of squares.
        css = np.maximum(sum_z2 - sum_z * gamma_hat, 0.0)
        constant = css <= ZERO_VARIANCE_RTOL * np.maximum(sum_z2, np.finfo(float).tiny)
        return cls(n=n, gamma_hat=gamma_hat, css=css, constant=constant)

    def delta_hat(self, mean_only: bool) -> np.ndarray:
        """Batch variance (ddof=1); 1 for mean-only mode and for constant features.

        neuroCombat replaces a zero variance by 1 (``convert_zeroes``) before the priors.
        """
        if mean_only:
            return np.ones_like(self.gamma_hat)
        if self.n < 2:
            raise ValueError("a batch needs at least 2 rows to estimate its variance")
        delta = self.css / (self.n - 1)
        return np.where(self.constant, 1.0, delta)


@dataclass(frozen=True)
class Priors:
    """Parametric empirical Bayes hyper-parameters of one batch (across features).

    ``γ ~ N(gamma_bar, tau2)`` and ``δ ~ InverseGamma(a, b)``; ``a`` and ``b`` are NaN in
    mean-only mode, where the variance is not modelled.
    """

    gamma_bar: float
    tau2: float
    a: float
    b: float


def aprior(delta_hat: np.ndarray) -> float:
    """Method-of-moments shape of the inverse-gamma prior (neuroCombat's ``aprior``)."""
    m, s2 = np.mean(delta_hat), np.var(delta_hat, ddof=1)
    return float((2 * s2 + m**2) / s2)


def bprior(delta_hat: np.ndarray) -> float:
    """Method-of-moments scale of the inverse-gamma prior (neuroCombat's ``bprior``)."""
    m, s2 = np.mean(delta_hat), np.var(delta_hat, ddof=1)
    return float((m * s2 + m**3) / s2)


def hyperpriors(gamma_hat: np.ndarray, delta_hat: np.ndarray, mean_only: bool) -> Priors:
    """Hyper-parameters of one batch from its per-feature ``γ̂`` and ``δ̂``.

    ``a`` and ``b`` are NaN in mean-only mode and when ``δ̂`` is identical across
    features (the inverse-gamma moments are then undefined).

    Raises
    ------
    ValueError
        With fewer than 2 features (τ² needs two).
    """
    if gamma_hat.size < 2:
        raise ValueError("empirical Bayes needs at least 2 harmonised features")
    gamma_bar = float(np.mean(gamma_hat))
    tau2 = float(np.var(gamma_hat, ddof=1))
    if mean_only or np.var(delta_hat, ddof=1) == 0:
        # No variance prior: not modelled, or undefined (δ̂ identical across features).
        return Priors(gamma_bar, tau2, np.nan, np.nan)
    return Priors(gamma_bar, tau2, aprior(delta_hat), bprior(delta_hat))


def postmean(g_hat, g_bar, n, d_star, t2):
    """Posterior mean of γ (neuroCombat's ``postmean``)."""
    return (t2 * n * g_hat + d_star * g_bar) / (t2 * n + d_star)


def postvar(sum2, n, a, b):
    """Posterior mode of δ (neuroCombat's ``postvar``)."""
    return (0.5 * sum2 + b) / (n / 2.0 + a - 1.0)


def parametric_posterior(
    moments: BatchMoments,
    delta_hat: np.ndarray,
    priors: Priors,
    conv: float = IT_SOL_CONV,
    max_iter: int = 10_000,
) -> tuple[np.ndarray, np.ndarray]:
    """γ*, δ* by neuroCombat's ``it_sol`` iterations, from the batch's moments.

    ``it_sol`` touches the rows only through ``n`` and ``sum2 = Σ(z − γ_new)²``, which is
    ``css + n(γ̂ − γ_new)²``. Its stopping rule is kept as it is, quirk included: the
    relative change is divided by the signed ``γ_old`` (as in R's sva), so features with
    a negative ``γ`` do not hold the iterations back.
    """
    n, g_hat = moments.n, moments.gamma_hat
    g_old, d_old = g_hat.copy(), delta_hat.copy()
    for _ in range(max_iter):
        g_new = postmean(g_hat, priors.gamma_bar, n, d_old, priors.tau2)
        sum2 = moments.css + n * (g_hat - g_new) ** 2
        d_new = postvar(sum2, n, priors.a, priors.b)
        with np.errstate(divide="ignore", invalid="ignore"):
            change = max(
                (np.abs(g_new - g_old) / g_old).max(), (np.abs(d_new - d_old) / d_old).max()
            )
        g_old, d_old = g_new, d_new
        if not change > conv:  # a NaN change (0/0) stops, as in neuroCombat
            return g_new, d_new
    warnings.warn(
        f"ComBat parametric iterations did not converge in {max_iter} steps",
        RuntimeWarning,
        stacklevel=2,
    )
    return g_new, d_new


def mean_only_posterior(gamma_hat: np.ndarray, priors: Priors) -> np.ndarray:
    """γ* in mean-only mode: neuroCombat's ``postmean(γ̂, γ̄, 1, 1, τ²)`` (n = δ = 1)."""
    return postmean(gamma_hat, priors.gamma_bar, 1, 1, priors.tau2)


def nonparametric_posterior(
    moments: BatchMoments, delta_hat: np.ndarray, chunk: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """γ*, δ* by neuroCombat's ``int_eprior``, from the batch's moments.

    For feature ``g`` the prior is the empirical distribution of the other features'
    ``(γ̂_j, δ̂_j)``, ``j ≠ g`` (only ``g`` itself is left out); each ``j`` is weighted by
    the Gaussian likelihood of feature ``g``'s rows under ``N(γ̂_j, δ̂_j)``, with ``δ̂``
    the variance (not the SD). The p×p log-likelihood matrix is built here from the
    moments, ``chunk`` rows at a time, and normalised in log space: neuroCombat's
    linear-space product underflows to 0/0 for large batches, where this does not.
    """
    n, g_hat, css = moments.n, moments.gamma_hat, moments.css
    p = g_hat.size
    log_norm = -0.5 * n * np.log(2 * np.pi * delta_hat)  # (p,) over j
    gamma_star, delta_star = np.empty(p), np.empty(p)
    for start in range(0, p, chunk):
        rows = np.arange(start, min(start + chunk, p))
        # sum2[g, j] = Σ_rows (z_g − γ̂_j)² = css_g + n (γ̂_g − γ̂_j)²
        sum2 = css[rows, None] + n * (g_hat[rows, None] - g_hat[None, :]) ** 2
        loglik = log_norm[None, :] - sum2 / (2 * delta_hat[None, :])
        loglik[np.arange(rows.size), rows] = -np.inf  # leave feature g out of its prior
        weights = np.exp(loglik - loglik.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        gamma_star[rows] = weights @ g_hat
        delta_star[rows] = weights @ delta_hat
    return gamma_star, delta_star


def posterior(
    moments: BatchMoments, parametric: bool, mean_only: bool
) -> tuple[np.ndarray, np.ndarray, Priors]:
    """γ*, δ* and the hyper-priors of one batch in the chosen ComBat mode."""
    delta_hat = moments.delta_hat(mean_only)
    priors = hyperpriors(moments.gamma_hat, delta_hat, mean_only)
    if not parametric:
        gamma_star, delta_star = nonparametric_posterior(moments, delta_hat)
        if mean_only:
            delta_star = np.ones_like(gamma_star)
        return gamma_star, delta_star, priors
    if mean_only:
        return mean_only_posterior(moments.gamma_hat, priors), np.ones_like(delta_hat), priors
    if not np.isfinite(priors.a):
        raise ValueError(
            "cannot fit the inverse-gamma prior: the batch variances are identical across "
            "features (use mean_only=True or parametric=False)"
        )
    gamma_star, delta_star = parametric_posterior(moments, delta_hat, priors)
    return gamma_star, delta_star, priors
