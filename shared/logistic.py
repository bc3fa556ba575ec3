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


def newton_pieces(X: np.ndarray, y: np.ndarray, beta: np.ndarray) -> NewtonPieces:
    """Hessian, score and deviance of the logistic log-likelihood at ``beta``.

    Parameters
    ----------
    X : ndarray of shape (n, p+1)
        Design matrix with the intercept column.
    y : ndarray of shape (n,)
        Outcome, 0/1.
    beta : ndarray of shape (p+1,)
    """
    eta = X @ beta
    mu = expit(eta)
    w = mu * (1.0 - mu)
    # log(1 + exp(eta)) computed stably; deviance = -2 * sum(y*eta - log(1+exp(eta)))
    deviance = -2.0 * float(np.sum(y * eta - np.logaddexp(0.0, eta)))
    return NewtonPieces(X.T @ (X * w[:, None]), X.T @ (y - mu), deviance, len(y))


def newton_step(total: NewtonPieces) -> np.ndarray:
    """The Newton-Raphson step from summed pieces: (X'WX)^-1 X'(y - mu)."""
    return np.linalg.solve(total.hessian, total.gradient)
