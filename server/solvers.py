"""Coordinator solvers: from the sum of site aggregates to parameters.

Each solver drives its federated rounds through a transport; the math is in
:mod:`radfed.shared.logistic`, the rounds are the protocol runner's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

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


@dataclass(frozen=True)
class LogisticSpec:
    """A logistic model to fit: its predictors and their standardisation."""

    columns: list[str]
    center: np.ndarray
    scale: np.ndarray


def fit_logistic_many(
    transport: Transport,
    specs: dict[str, LogisticSpec],
    subset: str = "train",
    outcome: str = "outcome",
    max_iter: int = 50,
    tol: float = 1e-10,
) -> dict[str, LogisticFit]:
    """Federated logistic regressions by Newton-Raphson on summed Hessians and scores.

    Each round the coordinator sends every unconverged model's coefficients; each site
    returns X'WX, X'(y - p) and its deviance per model; the coordinator takes the Newton
    step on the sums. Several models share the rounds (univariable screening fits all
    its models at once). A model has converged when its largest step is below ``tol``;
    its Wald covariance is the inverse of the summed Hessian at the solution.

    Raises
    ------
    FederationError
        On a singular Hessian (collinear predictors) or divergence (separation).
    """
    beta = {name: np.zeros(len(spec.columns) + 1) for name, spec in specs.items()}
    fits: dict[str, LogisticFit] = {}
    for iteration in range(1, max_iter + 1):
        active = [name for name in specs if name not in fits]
        if not active:
            break
        request: dict = {"models": active, "subset": subset}
        for name in active:
            spec = specs[name]
            request.update(
                {
                    f"{name}_columns": spec.columns,
                    f"{name}_center": spec.center,
                    f"{name}_scale": spec.scale,
                    f"{name}_beta": beta[name],
                }
            )
        replies = list(transport.ask("logistic", request).values())
        for name in active:
            total = _sum_pieces(replies, name)
            step = _newton_step(total, specs[name].columns)
            beta[name] = beta[name] + step
            if np.abs(step).max() < tol:
                # The Hessian at the last iterate: beta moved by less than tol since.
                fits[name] = _fit(specs[name], beta[name], total, iteration, outcome, len(replies))
            elif np.abs(beta[name]).max() > 50:
                raise FederationError(
                    f"logistic fit on {specs[name].columns} diverges (|coef| > 50 per SD): "
                    "the outcome is (quasi-)perfectly separated by these predictors"
                )
    missing = [name for name in specs if name not in fits]
    if missing:
        raise FederationError(f"logistic fit(s) {missing} did not converge in {max_iter} rounds")
    log.debug("logistic fits converged in %d rounds", iteration - 1)
    return fits


def _newton_step(total: NewtonPieces, columns: list[str]) -> np.ndarray:
    try:
        return newton_step(total)
    except np.linalg.LinAlgError as exc:
        raise FederationError(
            f"logistic fit on {columns}: the summed Hessian is singular "
            "(collinear or constant predictors)"
        ) from exc


def _fit(
    spec: LogisticSpec, beta, total: NewtonPieces, iterations: int, outcome: str, n_sites: int
) -> LogisticFit:
    return LogisticFit(
        columns=list(spec.columns),
        coef=beta,
        cov=np.linalg.inv(total.hessian),
        center=np.asarray(spec.center, dtype=float),
        scale=np.asarray(spec.scale, dtype=float),
        n=total.n,
        deviance=total.deviance,
        iterations=iterations,
        converged=True,
        outcome=outcome,
        n_sites=n_sites,
    )


def _sum_pieces(replies, name: str) -> NewtonPieces:
    pieces = [
        NewtonPieces(
            np.asarray(r[f"{name}_hessian"], dtype=float),
            np.asarray(r[f"{name}_gradient"], dtype=float),
            float(r[f"{name}_deviance"]),
            int(r[f"{name}_n"]),
        )
        for r in replies
    ]
    total = pieces[0]
    for p in pieces[1:]:
        total = total + p
    return total
