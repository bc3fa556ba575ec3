"""Coordinator solvers: from the sum of site aggregates to parameters.

Each solver drives its federated rounds through a transport; the math is in
:mod:`radfed.shared.logistic`, the rounds are the protocol runner's.
"""

from __future__ import annotations

import logging

import numpy as np

from radfed.server.protocol import Transport
from radfed.server.results import LogisticFit
from radfed.shared.errors import FederationError
from radfed.shared.logistic import NewtonPieces, newton_step

log = logging.getLogger(__name__)


def pooled_standardisation(
    transport: Transport, columns: list[str], subset: str = "train"
) -> tuple[np.ndarray, np.ndarray, int]:
    """Pooled mean and SD (1/n, as glmnet) of each column from n, Σx, Σx² per site.

    Raises
    ------
    FederationError
        When a column is constant over the federation (its SD is zero).
    """
    replies = transport.ask("moments", {"columns": columns, "subset": subset})
    n = sum(int(r["n"]) for r in replies.values())
    total = sum(np.asarray(r["sum"], dtype=float) for r in replies.values())
    total_sq = sum(np.asarray(r["sumsq"], dtype=float) for r in replies.values())
    mean = total / n
    # Σx²/n - mean² loses digits when |mean| >> SD; clip the rounding residue at zero.
    var = np.maximum(total_sq / n - mean**2, 0.0)
    sd = np.sqrt(var)
    constant = [
        c for c, s, m in zip(columns, sd, mean, strict=True) if s <= 1e-12 * max(1.0, abs(m))
    ]
    if constant:
        raise FederationError(f"column(s) constant over all sites, cannot standardise: {constant}")
    return mean, sd, n


def fit_logistic(
    transport: Transport,
    columns: list[str],
    center: np.ndarray,
    scale: np.ndarray,
    subset: str = "train",
    outcome: str = "outcome",
    max_iter: int = 50,
    tol: float = 1e-10,
) -> LogisticFit:
    """Federated logistic regression by Newton-Raphson on summed Hessians and scores.

    Each round the coordinator sends the current coefficients; each site returns
    X'WX, X'(y - p) and its deviance; the coordinator takes the Newton step on the sums.
    Converged when the largest step is below ``tol``; the Wald covariance is the inverse
    of the summed Hessian at the solution.

    Raises
    ------
    FederationError
        On a singular Hessian (collinear predictors) or divergence (separation).
    """
    beta = np.zeros(len(columns) + 1)
    payload = {"columns": columns, "center": center, "scale": scale, "subset": subset}
    converged = False
    for iteration in range(1, max_iter + 1):
        replies = transport.ask("logistic", {**payload, "beta": beta})
        total = _sum_pieces(replies.values())
        try:
            step = newton_step(total)
        except np.linalg.LinAlgError as exc:
            raise FederationError(
                f"logistic fit on {columns}: the summed Hessian is singular "
                "(collinear or constant predictors)"
            ) from exc
        log.debug(
            "newton iteration %d: deviance %.6f, max step %.3g",
            iteration,
            total.deviance,
            np.abs(step).max(),
        )
        beta = beta + step
        if np.abs(step).max() < tol:
            converged = True
            break
        if np.abs(beta).max() > 50:
            raise FederationError(
                f"logistic fit on {columns} diverges (|coef| > 50 per SD): the outcome is "
                "(quasi-)perfectly separated by these predictors"
            )
    # The Hessian at the last iterate: beta moved by less than tol since it was computed.
    cov = np.linalg.inv(total.hessian)
    return LogisticFit(
        columns=list(columns),
        coef=beta,
        cov=cov,
        center=np.asarray(center, dtype=float),
        scale=np.asarray(scale, dtype=float),
        n=total.n,
        deviance=total.deviance,
        iterations=iteration,
        converged=converged,
        outcome=outcome,
        n_sites=len(replies),
    )


def _sum_pieces(replies) -> NewtonPieces:
    pieces = [
        NewtonPieces(
            np.asarray(r["hessian"], dtype=float),
            np.asarray(r["gradient"], dtype=float),
            float(r["deviance"]),
            int(r["n"]),
        )
        for r in replies
    ]
    total = pieces[0]
    for p in pieces[1:]:
        total = total + p
    return total
