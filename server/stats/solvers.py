"""Coordinator solvers: from the sum of site aggregates to parameters.

Each solver drives its federated rounds through a transport; the math is in
:mod:`radfed.shared.logistic`, the rounds are the protocol runner's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from radfed.server.federation.transport import SiteRefusal, Transport
from radfed.server.results import LogisticFit
from radfed.shared.aggregate import sum_replies
from radfed.shared.errors import FederationError
from radfed.shared.logistic import NewtonPieces, newton_step

log = logging.getLogger(__name__)

#: Times a Newton step may be halved in a row before a fit gives up.
MAX_HALVINGS = 8


def combine_moments(
    n: list[int] | np.ndarray, mean: list[np.ndarray], m2: list[np.ndarray]
) -> tuple[int, np.ndarray, np.ndarray]:
    """Pooled count, mean and sum of squared deviations from per-site ones (Chan et al.).

    Sites are merged one at a time with Chan, Golub and LeVeque's parallel update: for
    groups ``a`` and ``b`` with ``δ = mean_b - mean_a``,
    ``mean = mean_a + δ n_b / n`` and ``M2 = M2_a + M2_b + δ² n_a n_b / n``. Only
    deviations are ever squared, so a column whose mean dwarfs its spread (an
    energy-like feature with mean 1e9 and SD 30) keeps all its digits, where
    ``Σx²/n - mean²`` cancels them away. Sites with no rows are skipped.

    Parameters
    ----------
    n : sequence of int
        Rows per site.
    mean, m2 : sequence of ndarray of shape (p,)
        Each site's column means and sums of squared deviations from them.

    Returns
    -------
    n : int
    mean, m2 : ndarray of shape (p,)

    References
    ----------
    Chan TF, Golub GH, LeVeque RJ (1979). Updating formulae and a pairwise algorithm for
    computing sample variances. Stanford CS report STAN-CS-79-773.
    """
    total, mu, ss = 0, None, None
    for n_b, mean_b, m2_b in zip(n, mean, m2, strict=True):
        n_b = int(n_b)
        if n_b == 0:
            continue
        mean_b = np.asarray(mean_b, dtype=float)
        m2_b = np.asarray(m2_b, dtype=float)
        if mu is None:
            total, mu, ss = n_b, mean_b.copy(), m2_b.copy()
            continue
        new = total + n_b
        delta = mean_b - mu
        mu = mu + delta * (n_b / new)
        ss = ss + m2_b + delta**2 * (total * n_b / new)
        total = new
    if mu is None:
        raise FederationError("no site has rows to standardise")
    return total, mu, ss


def pooled_standardisation(
    transport: Transport, columns: list[str], subset: str = "train"
) -> tuple[np.ndarray, np.ndarray, int]:
    """Pooled mean and SD (1/n, as glmnet) of each column from each site's n, mean and
    sum of squared deviations, combined exactly (:func:`combine_moments`).

    Raises
    ------
    FederationError
        When a column is constant over the federation (its SD is zero).
    """
    replies = list(transport.ask("moments", {"columns": columns, "subset": subset}).values())
    n, mean, m2 = combine_moments(
        [r["n"] for r in replies], [r["mean"] for r in replies], [r["m2"] for r in replies]
    )
    sd = np.sqrt(m2 / n)
    constant = [
        c for c, s, m in zip(columns, sd, mean, strict=True) if s <= 1e-12 * max(1.0, abs(m))
    ]
    if constant:
        raise FederationError(f"column(s) constant over all sites, cannot standardise: {constant}")
    return mean, sd, n


@dataclass(frozen=True)
class LogisticSpec:
    """A logistic model to fit: its predictors and their standardisation.

    ``start``: Newton's first iterate (intercept first, per SD of each column); zeros
    when None. A good start changes the rounds, not the optimum. ``gap``: for a
    calibration curve (first column a model's ``lp``), also ask each site for
    ``sum |c(lp) - expit(lp)|`` at every iterate; the fit keeps the last round's sum.
    """

    columns: list[str]
    center: np.ndarray
    scale: np.ndarray
    start: np.ndarray | None = None
    gap: bool = False


def fit_logistic_many(
    transport: Transport,
    specs: dict[str, LogisticSpec],
    subset: str = "train",
    outcome: str = "outcome",
    max_iter: int = 50,
    tol: float = 1e-10,
    sites: list[str] | None = None,
    extra: dict | None = None,
) -> dict[str, LogisticFit]:
    """Federated logistic regressions by Newton-Raphson on summed Hessians and scores.

    ``sites`` restricts the fit to some of the transport's sites; ``extra`` is added to
    every request. Models whose parameters together exceed the transport's
    ``param_budget`` for ``subset`` are fitted in several groups, one after another.

    Each round the coordinator sends every unconverged model's coefficients; each site
    returns X'WX, X'(y - p) and its deviance per model; the coordinator takes the Newton
    step on the sums. Several models share the rounds (univariable screening fits all
    its models at once). A model has converged when its largest step is below ``tol``;
    its Wald covariance is the inverse of the summed Hessian at the solution.

    The steps are damped: an iterate whose summed deviance exceeds the last accepted
    one's is pulled back along its step by quadratic interpolation, one that the sites
    refuse by a privacy rule to the midpoint (at most :data:`MAX_HALVINGS` times in a
    row). The optimum is the same; only a full step that overshoots costs rounds. The
    sites' refusals are stepped back from once: a fit refused again after recovering
    has its optimum where the sites refuse (a curve too steep for a site), and stops
    instead of crawling along the rule's boundary for the rest of its rounds.

    Raises
    ------
    FederationError
        On a singular Hessian (collinear predictors), divergence (separation), or a
        step the deviance or the sites reject after every halving.
    """
    budget = transport.param_budget.get(subset)
    groups = spread(specs, budget) if budget else [specs]
    if len(groups) > 1:
        fits: dict[str, LogisticFit] = {}
        for group in groups:
            fits.update(
                fit_logistic_many(transport, group, subset, outcome, max_iter, tol, sites, extra)
            )
        return fits
    # Damped Newton (as glm2 damps R's glm.fit): an iterate is accepted when its summed
    # deviance is finite and no larger than the last accepted one's; otherwise, or when
    # the sites refuse it (a full step overshooting into the saturation or
    # concentration rule), the step is shortened back towards the accepted iterate.
    beta = {name: _start(spec) for name, spec in specs.items()}
    accepted: dict[str, _Accepted] = {}
    stepping_back = recovered = False
    fits = {}

    def shorten(name: str, why: str, deviance: float | None = None) -> None:
        acc = accepted[name]
        if acc.shortened >= MAX_HALVINGS:
            raise FederationError(
                f"logistic fit on {specs[name].columns}: {why} after {MAX_HALVINGS} step halvings"
            )
        alpha = acc.alpha / 2
        if deviance is not None and np.isfinite(deviance):
            # Backtracking by quadratic interpolation (Nocedal & Wright, sec. 3.5): the
            # minimum of the parabola through the deviance and its slope at the accepted
            # iterate and the deviance here, kept within [0.1, 0.5] of this step. One
            # round instead of several halvings after a large overshoot.
            curv = deviance - acc.deviance - acc.slope * acc.alpha
            if curv > 0:
                best = -acc.slope * acc.alpha**2 / (2 * curv)
                alpha = float(np.clip(best, 0.1 * acc.alpha, 0.5 * acc.alpha))
        log.debug("logistic fit %s: step shortened to %.3g (%s)", name, alpha, why[:80])
        accepted[name] = replace(acc, alpha=alpha, shortened=acc.shortened + 1)
        beta[name] = acc.beta + alpha * acc.step

    for iteration in range(1, max_iter + 1):
        active = [name for name in specs if name not in fits]
        if not active:
            break
        request: dict = {"models": active, "subset": subset, **(extra or {})}
        for name in active:
            spec = specs[name]
            request.update(
                {
                    f"{name}_columns": spec.columns,
                    f"{name}_center": spec.center,
                    f"{name}_scale": spec.scale,
                    f"{name}_beta": beta[name],
                    **({f"{name}_gap": True} if spec.gap else {}),
                }
            )
        try:
            replies = list(transport.ask("logistic", request, sites=sites).values())
        except SiteRefusal as exc:
            # Only an iterate can be stepped back from: the start's refusal stands. The
            # refusal does not say which model's iterate a site refused, so all step back.
            if not exc.privacy_only or any(name not in accepted for name in active):
                raise
            if recovered:
                raise SiteRefusal(
                    f"{exc}\n(refused again after the fit stepped back from an earlier "
                    "refusal: its optimum lies where the sites refuse)",
                    exc.kinds,
                ) from exc
            stepping_back = True
            for name in active:
                shorten(name, f"the sites refused every shorter step ({exc})")
            continue
        recovered, stepping_back = recovered or stepping_back, False
        for name in active:
            total = _sum_pieces(replies, name)
            if name in accepted and not (
                np.isfinite(total.deviance)
                and total.deviance
                <= accepted[name].deviance + 1e-9 * max(1.0, accepted[name].deviance)
            ):
                shorten(name, "the deviance did not decrease", total.deviance)
                continue
            if np.abs(beta[name]).max() > 50:
                raise FederationError(
                    f"logistic fit on {specs[name].columns} diverges (|coef| > 50 per SD): "
                    "the outcome is (quasi-)perfectly separated by these predictors"
                )
            step = _newton_step(total, specs[name].columns)
            # The deviance's slope along the step: -2 × the score · step (< 0 for Newton).
            slope = -2.0 * float(np.dot(total.gradient, step))
            accepted[name] = _Accepted(beta[name], total.deviance, step, slope)
            beta[name] = beta[name] + step
            if np.abs(step).max() < tol:
                # The Hessian at the last iterate: beta moved by less than tol since.
                fit = _fit(specs[name], beta[name], total, iteration, outcome, len(replies))
                if specs[name].gap:
                    # At the iterate the sites saw, within tol of the solution.
                    fit = replace(fit, gap=float(sum(float(r[f"{name}_gap"]) for r in replies)))
                fits[name] = fit
    missing = [name for name in specs if name not in fits]
    if missing:
        largest = max(
            (float(np.abs(accepted[m].beta).max()) for m in missing if m in accepted),
            default=0.0,
        )
        raise FederationError(
            f"logistic fit(s) {missing} did not converge in {max_iter} rounds (largest "
            f"coefficient {largest:.3g} per SD; a large one means the outcome is "
            "(quasi-)separated by the predictors)"
        )
    log.debug("logistic fits converged in %d rounds", iteration - 1)
    return fits


@dataclass(frozen=True)
class _Accepted:
    """A fit's last accepted iterate, its deviance, the Newton step taken from it, the
    deviance's slope along that step, the fraction of the step now tried and how many
    times it was shortened."""

    beta: np.ndarray
    deviance: float
    step: np.ndarray
    slope: float
    alpha: float = 1.0
    shortened: int = 0


def _start(spec: LogisticSpec) -> np.ndarray:
    if spec.start is None:
        return np.zeros(len(spec.columns) + 1)
    start = np.array(spec.start, dtype=float)
    if start.shape != (len(spec.columns) + 1,):
        raise ValueError(f"start {start.shape} for {len(spec.columns)} column(s) and intercept")
    return start


def spread(specs: dict[str, LogisticSpec], budget: float) -> list[dict[str, LogisticSpec]]:
    """Fits grouped so that each request's parameters, all models together, stay within
    ``budget`` (a site's parameter rule); a model larger than the budget goes alone."""
    groups: list[dict[str, LogisticSpec]] = [{}]
    used = 0
    for name, spec in specs.items():
        size = len(spec.columns) + 1
        if groups[-1] and used + size > budget:
            groups.append({})
            used = 0
        groups[-1][name] = spec
        used += size
    return [g for g in groups if g]


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
    keys = [f"{name}_{piece}" for piece in ("hessian", "gradient", "deviance", "n")]
    total = sum_replies(replies, keys)
    return NewtonPieces(total[keys[0]], total[keys[1]], float(total[keys[2]]), int(total[keys[3]]))
