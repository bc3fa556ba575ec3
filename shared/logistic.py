"""Logistic regression pieces shared by sites and coordinator.

A site turns its rows into sums (:func:`newton_pieces`); the coordinator adds the sums
over sites and takes a Newton step (:func:`newton_step`). Because the log-likelihood of
the pooled data is the sum of the sites' log-likelihoods, the federated fit is the
pooled maximum-likelihood fit, not an approximation of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import expit


def design(x: np.ndarray, center: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Standardise columns and prepend the intercept column."""
    z = (np.asarray(x, dtype=float) - center) / scale
    return np.column_stack([np.ones(len(z)), z])


@dataclass(frozen=True)
class NewtonPieces:
    """One site's (or the sum of all sites') contribution to a Newton step at ``beta``."""

    hessian: np.ndarray  # X'WX, (p+1, p+1)
    gradient: np.ndarray  # X'(y - mu), (p+1,)
    deviance: float  # -2 log-likelihood
    n: int

    def __add__(self, other: NewtonPieces) -> NewtonPieces:
        return NewtonPieces(
            self.hessian + other.hessian,
            self.gradient + other.gradient,
            self.deviance + other.deviance,
            self.n + other.n,
        )


def newton_pieces(
    X: np.ndarray, y: np.ndarray, beta: np.ndarray, offset: np.ndarray | None = None
) -> NewtonPieces:
    """Hessian, score and deviance of the logistic log-likelihood at ``beta``.

    Parameters
    ----------
    X : ndarray of shape (n, p+1)
        Design matrix with the intercept column.
    y : ndarray of shape (n,)
        Outcome, 0/1.
    beta : ndarray of shape (p+1,)
    offset : ndarray of shape (n,), optional
        A fixed part of the linear predictor (a calibration-in-the-large fit).
    """
    eta = X @ beta if offset is None else offset + X @ beta
    mu = expit(eta)
    w = mu * (1.0 - mu)
    # log(1 + exp(eta)) computed stably; deviance = -2 * sum(y*eta - log(1+exp(eta)))
    deviance = -2.0 * float(np.sum(y * eta - np.logaddexp(0.0, eta)))
    return NewtonPieces(X.T @ (X * w[:, None]), X.T @ (y - mu), deviance, len(y))


def newton_step(total: NewtonPieces) -> np.ndarray:
    """The Newton-Raphson step from summed pieces: (X'WX)^-1 X'(y - mu)."""
    return np.linalg.solve(total.hessian, total.gradient)


def fit_newton(
    X: np.ndarray,
    y: np.ndarray,
    beta: np.ndarray,
    offset: np.ndarray | None = None,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> np.ndarray | None:
    """Maximum-likelihood coefficients on rows held in one place: :func:`newton_step` on
    this data's :func:`newton_pieces`, with step halving (glmnet's safeguard).

    The coordinator takes the same step on the sites' summed pieces, one round per
    iteration (:func:`radfed.server.stats.solvers.fit_logistic_many`); this loop serves
    fits a site makes on its own rows (its calibration intercept and slope).

    Returns None when the likelihood has no finite maximum (separation: the iterations
    do not settle) or the information matrix is singular.
    """
    y = np.asarray(y, dtype=float)
    beta = np.asarray(beta, dtype=float)
    pieces = newton_pieces(X, y, beta, offset)
    for _ in range(max_iter):
        try:
            step = newton_step(pieces)
        except np.linalg.LinAlgError:
            return None
        if not np.all(np.isfinite(step)):
            return None
        # Halve the step until the deviance does not increase: Newton from a sensible
        # start is well behaved, but a badly miscalibrated model can overshoot.
        for _ in range(30):
            new = newton_pieces(X, y, beta + step, offset)
            if new.deviance <= pieces.deviance + 1e-12 * abs(pieces.deviance):
                break
            step = step / 2.0
        beta, pieces = beta + step, new
        if np.max(np.abs(step)) < tol * (1.0 + np.max(np.abs(beta))):
            return beta
    return None
