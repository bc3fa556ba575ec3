"""Federated LASSO logistic regression with K-fold cross-validation (cv.glmnet, exact).

The objective is glmnet's, on features standardised with the pooled mean and SD
(1/n, as glmnet):

    minimise  -(1/N) loglik(β0, β) + λ ‖β‖₁        (intercept unpenalised)

Algorithm: glmnet's IRLS outer loop with coordinate descent inside. In each federated
round every site returns, for each fit (one fold's training rows at one λ), the
quadratic pieces of the log-likelihood at that fit's current coefficients: XᵀWX (the
Hessian) and Xᵀ(y - μ) (the score), so XᵀWz = XᵀWX β + Xᵀ(y - μ), and the deviance.
The coordinator adds them over sites and solves the penalised weighted least-squares
problem by cyclic coordinate descent (finished by an exact solve on the active set
once the support settles); the solution is the next point. A step that raises the
objective is halved (glmnet's safeguard). Because the summed pieces are the pooled
pieces, every iterate equals the pooled one; the answers satisfy the pooled KKT
conditions to ~1e-11.

Rounds. All K fold fits and the full-data fit, at every λ, iterate in the same rounds
(arrays with a leading fit axis), because a round trip costs far more than the
coordinator's arithmetic. Warm starts still happen, without rounds: a fit whose pieces
arrive moves to the best point already evaluated in its fold (its objective there
needs only that point's deviance and ‖β‖₁). Round 1 evaluates every fold at β = 0,
which also gives λ_max. A fit stops when its next step is below ``tol``; its answer is
the point at which its last pieces were computed, so its held-out deviance (sent in the
same reply) belongs to that very point. The path ends early by glmnet's rule
(:class:`PathStop`), or where a site refuses (:class:`PathEnd`). A typical run (p = 30,
100 λ, 10 folds) takes 6-7 rounds; the first rounds carry up to (K+1)·n_lambdas·(p+1)²
floats per site (8.5 MB for p = 30), fewer as fits converge. For larger p,
``max_fits_per_round`` (default: 32 MB of Hessians) slides a window of λ down the path
instead (p = 100: ~18 rounds).

Refusals. Near separation a small site may refuse a round because a fit at a small λ
saturates its linear predictor or rests its weights on a few patients (the saturation
and concentration rules of :mod:`radfed.shared.privacy`). A site's rules judge each fit of
a request on its own, so the coordinator asks the same round again for the fits of the
largest λ only, halving the refused range (about log2 of the λ in flight extra rounds),
until it finds the first λ a site refuses. The path then ends before that λ, in every
fold, as glmnet ends a path whose fit saturates: the CV curve, lambda.min, lambda.1se and
the coefficients come from the λ kept, which are fitted exactly as before. No site
answers a request holding a fit it refused. A refusal at λ_max, in round 1, or by any
other rule still stops the fit with the site's message.

CV as cv.glmnet (``type.measure="deviance"``, grouped): the held-out deviance of
each row uses probabilities clamped to [1e-5, 1 - 1e-5]; fold k's mean m_k over its
n_k rows; cvm = Σ n_k m_k / Σ n_k; cvsd = sqrt(Σ n_k (m_k - cvm)² / Σ n_k / (K - 1));
lambda.min = the largest λ reaching min cvm; lambda.1se = the largest λ with
cvm <= cvm[min] + cvsd[min]. The fold fits use the same λ sequence (from the full data)
and the full-data standardisation, i.e. this equals cv.glmnet run on the pre-standardised
matrix with ``standardize=FALSE``.

The site side is :func:`radfed.shared.selection_stats.answer` (step ``"lasso_irls"``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from radfed.shared.aggregate import sum_replies
from radfed.shared.errors import FederationError, PrivacyRefusal
from radfed.shared.selection_stats import PROB_CLIP

log = logging.getLogger(__name__)

Ask = Callable[[dict[str, Any]], list[dict[str, Any]]]

#: Relative objective increase tolerated before a step is halved (rounding noise).
_OBJ_RTOL = 1e-12
_MAX_HALVINGS = 30
#: The privacy rules whose refusal depends on a fit's coefficients, i.e. on its λ: the
#: path can end before the refused λ. Any other refusal stops the fit.
PATH_RULES = ("saturation", "concentration")
# A refusal's text (radfed.shared.privacy.refuse): "{context}: refused by the {rule} rule:
# {detail}"; Transport.ask joins the sites' errors under "failed at N site(s):".
_REFUSED = re.compile(r"refused by the ([\w-]+) rule")
_FAILED_AT = re.compile(r"failed at (\d+) site\(s\):")


# --------------------------------------------------------------------------- result


@dataclass(frozen=True)
class PathEnd:
    """Where a site's refusal ended the λ path, as glmnet ends a saturated path.

    Attributes
    ----------
    index : int
        Position, in the requested λ sequence, of the first λ not fitted: the λ a site
        refused (the path keeps ``lambdas[:index]``).
    lambda_refused : float
        That λ.
    rule : str
        The privacy rule(s) the refusal named (``"saturation"``, ``"concentration"``);
        never a count.
    sites : tuple of str
        The sites that refused, where the transport named them.
    """

    index: int
    lambda_refused: float
    rule: str
    sites: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for logs and summaries."""
        who = f"site(s) {', '.join(self.sites)}" if self.sites else "a site"
        return (
            f"path ended early before lambda #{self.index + 1} ({self.lambda_refused:.4g}): "
            f"{who} refused it by the {self.rule} rule"
        )


@dataclass(frozen=True)
class LassoCVResult:
    """A federated cv.glmnet fit: the λ path, the CV curve and the chosen models.

    Coefficients are on the standardised scale: ``coef[0]`` is the intercept and
    ``coef[j]`` the change in log-odds per pooled SD of feature j, i.e. the model is
    logit p = β0 + Σ β_j (x_j - mean_j) / sd_j. :meth:`unstandardised` gives the same
    model in the features' own units.

    Attributes
    ----------
    feature_names : list of str
    lambdas : ndarray of shape (n_lambdas,)
        Decreasing λ path (as many as were kept by glmnet's early stop).
    coef_path : ndarray of shape (n_lambdas, p+1)
        Full-data coefficients at each λ (intercept first).
    cvm, cvsd : ndarray of shape (n_lambdas,)
        CV mean binomial deviance and its standard error (cv.glmnet's cvm, cvsd).
    fold_deviance : ndarray of shape (n_folds, n_lambdas)
        Mean held-out deviance of each fold.
    fold_coef_path : ndarray of shape (n_folds, n_lambdas, p+1)
        Coefficients fitted without each fold.
    index_min, index_1se : int
        Positions of lambda.min and lambda.1se in ``lambdas``.
    center, scale : ndarray of shape (p,)
        The pooled mean and SD the features were standardised with.
    n, n_folds, n_sites, rounds : int
        Patients, folds, sites, federated rounds used.
    fold_n : ndarray of shape (n_folds,)
        Patients in each fold (over all sites).
    path_end : PathEnd or None
        Set when a site's refusal ended the path early (the λ kept are ``lambdas``);
        None when the path ran to its end or glmnet's own rule (:class:`PathStop`)
        ended it before the refused λ.
    """

    feature_names: list[str]
    lambdas: np.ndarray
    coef_path: np.ndarray
    cvm: np.ndarray
    cvsd: np.ndarray
    fold_deviance: np.ndarray = field(repr=False)
    fold_coef_path: np.ndarray = field(repr=False)
    index_min: int
    index_1se: int
    center: np.ndarray = field(repr=False)
    scale: np.ndarray = field(repr=False)
    n: int
    n_folds: int
    n_sites: int
    rounds: int
    fold_n: np.ndarray = field(repr=False)
    path_end: PathEnd | None = None

    @property
    def ended_early(self) -> bool:
        """Whether a site's refusal ended the λ path (see ``path_end``)."""
        return self.path_end is not None

    @property
    def lambda_min(self) -> float:
        """λ with the smallest CV deviance (the rule of seed 000)."""
        return float(self.lambdas[self.index_min])

    @property
    def lambda_1se(self) -> float:
        """The largest λ within one standard error of the minimum."""
        return float(self.lambdas[self.index_1se])

    @property
    def coef_min(self) -> np.ndarray:
        """Coefficients at lambda.min, shape (p+1,), intercept first, per SD."""
        return self.coef_path[self.index_min]

    @property
    def coef_1se(self) -> np.ndarray:
        """Coefficients at lambda.1se, shape (p+1,), intercept first, per SD."""
        return self.coef_path[self.index_1se]

    def coef(self, which: Literal["min", "1se"] = "min") -> np.ndarray:
        """Coefficients at lambda.min or lambda.1se."""
        return {"min": self.coef_min, "1se": self.coef_1se}[which]

    def nonzero(self, which: Literal["min", "1se"] = "min") -> list[str]:
        """Names of the features with a nonzero coefficient at the chosen λ."""
        beta = self.coef(which)[1:]
        return [n for n, b in zip(self.feature_names, beta, strict=True) if b != 0.0]

    @property
    def nonzero_features(self) -> list[str]:
        """Features kept at lambda.min."""
        return self.nonzero("min")

    def unstandardised(self, which: Literal["min", "1se"] = "min") -> np.ndarray:
        """The chosen model in the features' own units: (intercept, slopes), (p+1,)."""
        beta = self.coef(which)
        slopes = beta[1:] / self.scale
        return np.concatenate([[beta[0] - slopes @ self.center], slopes])

    def radscore_formula(
        self,
        names: Sequence[str] | None = None,
        which: Literal["min", "1se"] = "min",
        digits: int = 3,
    ) -> str:
        """The Radscore as seed 000 prints it, zero terms left out.

        Coefficients are per SD: each name stands for the standardised feature
        (x - pooled mean) / pooled SD, e.g.
        ``"Radscore = 0.069 + 0.088 * wavelet-HLH_glcm_ClusterShade - 0.419 * ..."``.
        """
        names = list(self.feature_names if names is None else names)
        if len(names) != len(self.feature_names):
            raise ValueError(f"{len(names)} names for {len(self.feature_names)} features")
        beta = self.coef(which)
        text = f"Radscore = {beta[0]:.{digits}f}"
        for name, b in zip(names, beta[1:], strict=True):
            if b != 0.0:
                text += f" {'-' if b < 0 else '+'} {abs(b):.{digits}f} * {name}"
        return text

    def summary(self) -> str:
        """A printable statsmodels-style report of the CV and the chosen models."""
        width = max([len("(Intercept)"), *(len(n) for n in self.feature_names)])
        title = f"Federated LASSO logistic, {self.n_folds}-fold CV (binomial deviance)"
        rule = "=" * max(width + 28, 66, len(title))
        head = [
            title.center(len(rule)),
            rule,
            f"Patients: {self.n}   Sites: {self.n_sites}   Features: {len(self.feature_names)}"
            f"   Rounds: {self.rounds}",
            f"lambda path: {len(self.lambdas)} values, {self.lambdas[0]:.4g} to "
            f"{self.lambdas[-1]:.4g}",
            *([self.path_end.describe()] if self.path_end is not None else []),
            "-" * len(rule),
            f"{'':<12}{'lambda':>10}{'log(lambda)':>13}{'CV deviance':>13}{'SE':>9}{'nonzero':>9}",
        ]
        for label, i in (("lambda.min", self.index_min), ("lambda.1se", self.index_1se)):
            k = int(np.count_nonzero(self.coef_path[i, 1:]))
            head.append(
                f"{label:<12}{self.lambdas[i]:>10.4g}{np.log(self.lambdas[i]):>13.3f}"
                f"{self.cvm[i]:>13.4f}{self.cvsd[i]:>9.4f}{k:>9d}"
            )
        head += [
            "-" * len(rule),
            "Coefficients per SD of the standardised features ('.' = dropped)",
            f"{'':<{width}}{'lambda.min':>14}{'lambda.1se':>14}",
        ]
        for name, a, b in zip(
            ["(Intercept)", *self.feature_names], self.coef_min, self.coef_1se, strict=True
        ):
            cells = "".join(f"{'.' if v == 0 else f'{v:.4f}':>14}" for v in (a, b))
            head.append(f"{name:<{width}}{cells}")
        head.append(rule)
        return "\n".join(head)

    def __str__(self) -> str:
        return self.summary()


# --------------------------------------------------------------------------- pure math


def default_lambda_min_ratio(n: int, p: int) -> float:
    """glmnet's default: 1e-4 when there are more patients than features, else 0.01."""
    return 1e-4 if n > p else 1e-2


def lambda_path(lambda_max: float, n_lambdas: int = 100, ratio: float = 1e-4) -> np.ndarray:
    """Decreasing log-spaced λ from ``lambda_max`` to ``lambda_max * ratio`` (as glmnet)."""
    if n_lambdas == 1:
        return np.array([lambda_max])
    return lambda_max * ratio ** (np.arange(n_lambdas) / (n_lambdas - 1))


def lambda_max_from_zero_pieces(
    hessian: np.ndarray, gradient: np.ndarray, include: np.ndarray | None = None
) -> float:
    """λ_max = max_j |x_jᵀ(y - ȳ)| / N from the full-data pieces at β = 0.

    At β = 0 every weight is 1/4, so Σx_j = 4·H[0, j], N = 4·H[0, 0], and the score is
    Xᵀ(y - 1/2), which gives Σy and x_jᵀy; no extra round is needed. ``include`` (p,)
    limits the maximum to the coefficients the fit may use (glmnet's ``exclude``).
    """
    n = 4.0 * hessian[0, 0]
    sum_x = 4.0 * hessian[0, 1:]
    sum_y = gradient[0] + n / 2.0
    xty = gradient[1:] + sum_x / 2.0
    score = np.abs(xty - sum_y / n * sum_x)
    if include is not None:
        score = score[np.asarray(include, dtype=bool)]
    return float(np.max(score) / n)


def coordinate_descent(
    A: np.ndarray,
    c: np.ndarray,
    beta: np.ndarray,
    lam: np.ndarray,
    tol: float = 1e-13,
    max_sweeps: int = 100_000,
) -> np.ndarray:
    """Solve many penalised least-squares problems by cyclic coordinate descent.

    For each b minimises ½ βᵀ A_b β - c_bᵀ β + λ_b Σ_{j>=1} |β_j| (coordinate 0, the
    intercept, is unpenalised): glmnet's inner loop on the summed IRLS quadratic, with
    A = XᵀWX / N and c = XᵀWz / N.

    When a sweep leaves the active set and signs of an iterate unchanged, they are tried
    as the solution's: the linear system on that set is solved directly and kept when it
    meets the optimality (KKT) conditions. This makes the answer exact to rounding
    instead of waiting for the slow last digits of coordinate descent on ill-conditioned
    problems (strongly correlated features, small λ).

    Parameters
    ----------
    A : ndarray of shape (B, P, P)
    c : ndarray of shape (B, P)
    beta : ndarray of shape (B, P)
        Warm start.
    lam : ndarray of shape (B,)
    tol : float
        Also stop when every coordinate moved by less than ``tol`` (in units of
        sqrt(A_jj)·|Δβ_j|, the scale of its effect on the fit) over a sweep.

    Returns
    -------
    ndarray of shape (B, P)
    """
    out = np.array(beta, dtype=float, copy=True)
    A = np.asarray(A, dtype=float)
    # Problem axis last, so every per-coordinate operation runs on contiguous memory.
    At = np.ascontiguousarray(A.transpose(2, 1, 0))  # At[j, k, b] = A[b, k, j]
    b_t = np.ascontiguousarray(out.T)
    q = np.einsum("jkb,kb->jb", At, b_t)  # (A β)ᵀ, kept up to date
    c_t = np.ascontiguousarray(np.asarray(c, dtype=float).T)
    diag = np.ascontiguousarray(np.diagonal(A, axis1=1, axis2=2).T)
    lam = np.asarray(lam, dtype=float)
    todo = np.arange(len(out))  # original indices of the problems still iterating
    signs = np.sign(b_t)
    tried = np.zeros(len(out), dtype=bool)  # this support was already tried exactly
    for sweep in range(max_sweeps):
        done = _cd_sweep(At, c_t, diag, lam, b_t, q) < tol
        # Try the exact solve where a sweep left the support and signs unchanged.
        new_signs = np.sign(b_t)
        stable = (new_signs == signs).all(axis=0)
        signs = new_signs
        tried &= stable & (sweep % 16 != 15)  # and retry now and then regardless
        attempt = np.flatnonzero(stable & ~tried & ~done)
        if len(attempt):
            exact, ok = _active_set_solution(
                At[:, :, attempt].transpose(2, 0, 1),
                c_t[:, attempt].T,
                lam[attempt],
                b_t[:, attempt].T,
            )
            b_t[:, attempt[ok]] = exact[ok].T
            done[attempt[ok]] = True
            tried[attempt] = True
        if done.any():
            out[todo[done]] = b_t[:, done].T
            if done.all():
                return out
            keep = ~done  # drop the finished problems from the working arrays
            todo, At, c_t, diag, lam = (
                todo[keep],
                At[:, :, keep],
                c_t[:, keep],
                diag[:, keep],
                lam[keep],
            )
            b_t, q, signs, tried = b_t[:, keep], q[:, keep], signs[:, keep], tried[keep]
    out[todo] = b_t.T
    log.warning("coordinate descent stopped after %d sweeps without converging", max_sweeps)
    return out


def _active_set_solution(
    A: np.ndarray, c: np.ndarray, lam: np.ndarray, beta: np.ndarray, refinements: int = 32
) -> tuple[np.ndarray, np.ndarray]:
    """Solve each problem on the support and signs of ``beta``; flag those meeting KKT.

    On the support S (with the intercept) the optimum solves A_SS β_S = c_S - λ sign(β_S);
    it is the lasso solution when the signs agree and |c_j - (A β)_j| <= λ off S. When a
    guess fails, coefficients whose sign flipped leave S and violators of the KKT bound
    join it with the sign of their gradient, and the system is solved again.
    """
    B, P = beta.shape
    active = beta != 0
    active[:, 0] = True
    sign = np.sign(beta)
    sign[:, 0] = 0.0
    sol = np.zeros((B, P))
    ok = np.zeros(B, dtype=bool)
    slack = 1e-9 * lam[:, None] + 1e-13
    todo = np.arange(B)
    for _ in range(refinements):
        act, sgn, lm, Ab, cb = active[todo], sign[todo], lam[todo, None], A[todo], c[todo]
        x = _masked_solve(Ab, np.where(act, cb - lm * sgn, 0.0), act)
        grad = cb - np.einsum("bjk,bk->bj", Ab, x)
        flipped = act & (np.sign(x) != sgn)
        flipped[:, 0] = False
        violates = ~act & (np.abs(grad) > lm + slack[todo])
        # x must solve its system (grad_S = λ sign_S): with exactly collinear features
        # (radiomics has them: Range = Maximum - Minimum, TotalEnergy ∝ Energy) A_SS is
        # singular to rounding and np.linalg.solve returns a huge non-solution (1e13 and
        # more) that can pass the two checks above; as an IRLS step it raised the
        # objective through every halving ("the objective keeps rising"). Such a
        # support is left to coordinate descent.
        unsolved = np.isfinite(x).all(axis=1) & (
            act & (np.abs(grad - lm * sgn) > 1e-9 * lm + 1e-10)
        ).any(axis=1)
        good = ~(flipped.any(axis=1) | violates.any(axis=1) | unsolved) & np.isfinite(x).all(axis=1)
        sol[todo] = x
        ok[todo] = good
        active[todo] = (act & ~flipped) | violates
        sign[todo] = np.where(violates, np.sign(grad), np.where(flipped, 0.0, sgn))
        todo = todo[~good & ~unsolved]
        if len(todo) == 0:
            break
    return np.where(ok[:, None], sol, 0.0), ok


def _masked_solve(A: np.ndarray, rhs: np.ndarray, active: np.ndarray) -> np.ndarray:
    """Solve A_SS x_S = rhs_S per problem (x = 0 off S); NaN where A_SS is singular.

    Problems are grouped by support size so each solve is only as large as its support.
    """
    out = np.zeros(rhs.shape)
    sizes = active.sum(axis=1)
    for size in np.unique(sizes):
        group = np.flatnonzero(sizes == size)
        cols = np.nonzero(active[group])[1].reshape(len(group), size)  # sorted per row
        M = A[group[:, None, None], cols[:, :, None], cols[:, None, :]]
        r = np.take_along_axis(rhs[group], cols, axis=1)
        try:
            x = np.linalg.solve(M, r[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:  # a collinear support: solve the others one by one
            x = np.full(r.shape, np.nan)
            for i in range(len(group)):
                try:
                    x[i] = np.linalg.solve(M[i], r[i])
                except np.linalg.LinAlgError:
                    pass
        out[group[:, None], cols] = x
    return out


def _cd_sweep(
    At: np.ndarray,
    c_t: np.ndarray,
    diag: np.ndarray,
    lam: np.ndarray,
    b_t: np.ndarray,
    q: np.ndarray,
) -> np.ndarray:
    """One cyclic sweep over the coordinates of every problem, in place.

    Returns the largest sqrt(A_jj)·|Δβ_j| of each problem during the sweep.
    """
    biggest = np.zeros(b_t.shape[1])
    for j in range(b_t.shape[0]):
        d = diag[j]
        r = c_t[j] - q[j] + d * b_t[j]
        if j > 0:  # the intercept is not penalised
            r = np.sign(r) * np.maximum(np.abs(r) - lam, 0.0) + 0.0  # + 0.0: no -0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            new = np.where(d > 0, r / d, 0.0)  # a column without variance stays at 0
        delta = new - b_t[j]
        if np.any(delta):
            q += At[j] * delta
            b_t[j] = new
            np.maximum(biggest, np.abs(delta) * np.sqrt(np.maximum(d, 0.0)), out=biggest)
    return biggest


def cv_curve(
    fold_deviance_sum: np.ndarray, fold_n: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cv.glmnet's cvm and cvsd from summed held-out deviances.

    Parameters
    ----------
    fold_deviance_sum : ndarray of shape (K, n_lambdas)
        Σ over the held-out rows of fold k (all sites) of the binomial deviance.
    fold_n : ndarray of shape (K,)
        Held-out rows per fold.

    Returns
    -------
    fold_mean : ndarray (K, n_lambdas)
    cvm, cvsd : ndarray (n_lambdas,)
    """
    fold_n = np.asarray(fold_n, dtype=float)
    used = fold_n > 0
    means = fold_deviance_sum[used] / fold_n[used, None]
    w = fold_n[used, None]
    cvm = (w * means).sum(axis=0) / w.sum()
    cvsd = np.sqrt((w * (means - cvm) ** 2).sum(axis=0) / w.sum() / (used.sum() - 1))
    full = np.full(fold_deviance_sum.shape, np.nan)
    full[used] = means
    return full, cvm, cvsd


def choose_lambdas(lambdas: np.ndarray, cvm: np.ndarray, cvsd: np.ndarray) -> tuple[int, int]:
    """Indices of lambda.min and lambda.1se (cv.glmnet's getOptcv.glmnet).

    lambda.min is the largest λ whose cvm equals the minimum; lambda.1se the largest λ
    with cvm <= cvm[min] + cvsd[min].
    """
    best = np.nanmin(cvm)
    i_min = int(np.flatnonzero(cvm <= best)[np.argmax(lambdas[cvm <= best])])
    within = np.flatnonzero(cvm <= cvm[i_min] + cvsd[i_min])
    i_1se = int(within[np.argmax(lambdas[within])])
    return i_min, i_1se


# --------------------------------------------------------------------------- solver

#: Default budget of Hessian floats in one site reply (2**22 floats = 32 MB).
_REPLY_FLOATS = 2**22


@dataclass(frozen=True)
class PathStop:
    """glmnet's rule for ending the λ path early (``glmnet.control``: fdev, devmax, mnlam).

    From the ``mnlam``-th λ on, the full-data path stops (that λ included) once the
    fraction of null deviance explained exceeds ``devmax`` or grows by less than ``fdev``
    from the previous λ. The fold fits then use the shortened sequence, as cv.glmnet.
    """

    fdev: float = 1e-5
    devmax: float = 0.999
    mnlam: int = 5

    def last_index(self, dev_ratio: np.ndarray) -> int | None:
        """Index of the last λ kept, given the dev ratios of a converged prefix; None if
        the rule has not fired within it."""
        for i in range(max(self.mnlam - 1, 1), len(dev_ratio)):
            if dev_ratio[i] > self.devmax or dev_ratio[i] - dev_ratio[i - 1] < self.fdev:
                return i
        return None


def lasso_cv(
    ask: Ask,
    feature_names: Sequence[str],
    center: np.ndarray,
    scale: np.ndarray,
    *,
    n_folds: int = 10,
    seed: int = 0,
    n_lambdas: int = 100,
    lambda_min_ratio: float | None = None,
    path_stop: PathStop | None = PathStop(),
    max_fits_per_round: int | None = None,
    tol: float = 1e-10,
    max_rounds: int = 100,
    prob_clip: float = PROB_CLIP,
    exclude: np.ndarray | None = None,
) -> LassoCVResult:
    """Fit the LASSO logistic path on all sites and choose λ by K-fold CV.

    Parameters
    ----------
    ask : callable
        ``ask(request) -> list of replies``: one federated round; each site answers with
        :func:`radfed.shared.selection_stats.answer` on its rows (raw features, in the
        order of ``feature_names``) and outcome 0/1.
    feature_names : sequence of str, length p
    center, scale : ndarray of shape (p,)
        The pooled mean and SD (1/n) of the features; sites standardise with them.
    n_folds : int
        K; every site splits its own rows into K folds, stratified by outcome and
        seeded by ``(seed, site name)`` (:func:`radfed.shared.selection_stats.assign_folds`).
    seed : int
    n_lambdas : int
        Length of the λ sequence (before any early stop).
    lambda_min_ratio : float, optional
        Default glmnet's: 1e-4 when N > p, else 0.01.
    path_stop : PathStop or None
        glmnet's early end of the path (default on, as glmnet); None fits every λ.
    max_fits_per_round : int, optional
        Most (fold, λ) fits in flight per round; bounds a site's reply to about
        ``max_fits_per_round·(p+1)²`` floats. Default: all (K+1)·n_lambdas fits when they
        fit in 2**22 floats (32 MB), else a window of λ per fold that slides down the
        path, each new fit warm-started from the nearest finished larger λ of its fold.
    tol : float
        A fit has converged when its next IRLS step moves no coefficient by more.
    max_rounds : int
    prob_clip : float
        Clamp of held-out probabilities (glmnet's 1e-5).
    exclude : ndarray of shape (n_folds + 1, p), bool, optional
        Per fit, the coefficients held at 0 (glmnet's ``exclude``): row k for the fit
        without fold k, the last row for the full-data fit. Their Hessian rows and score
        are zeroed at the coordinator, so coordinate descent, the active-set solve and
        the KKT checks see only the included coefficients; λ_max and the default
        ``lambda_min_ratio`` come from the full-data fit's included ones (cv.glmnet:
        the λ sequence of the full fit). Used to run each fold's LASSO on the features
        mRMR picked without that fold. Default: none excluded.

    Returns
    -------
    LassoCVResult

    Notes
    -----
    Every round sends ``{"step": "lasso_irls", "center", "scale", "n_folds", "seed",
    "prob_clip", "problem_folds": (B,) int, "beta": (B, p+1)}`` where fit b leaves out
    fold ``problem_folds[b]`` (``n_folds`` = none: the full data) and is evaluated at
    ``beta[b]``; each site replies ``hessian`` (B, p+1, p+1), ``gradient`` (B, p+1),
    ``deviance`` (B,), ``test_deviance`` (B,), ``fold_n`` (K,), ``n``. Round 1 has
    B = K + 1 (every fold at β = 0, which also gives λ_max); later rounds carry only the
    fits still iterating.

    When a site refuses a later round by the saturation or concentration rule, the round
    is asked again for the fits of the largest λ only (halving the refused range) to find
    the first λ refused; the path then ends before it (``result.path_end``, and a
    warning). A refusal at λ_max, in round 1 or by another rule is raised as it came.
    """
    names = list(feature_names)
    p, K = len(names), int(n_folds)
    center = np.asarray(center, dtype=float)
    scale = np.asarray(scale, dtype=float)
    if center.shape != (p,) or scale.shape != (p,):
        raise ValueError(f"center and scale must have shape ({p},)")
    base = {
        "step": "lasso_irls",
        "center": center,
        "scale": scale,
        "n_folds": K,
        "seed": int(seed),
        "prob_clip": float(prob_clip),
    }
    n_sites = 0

    def round_trip(folds_of: np.ndarray, beta: np.ndarray) -> dict[str, np.ndarray]:
        nonlocal n_sites
        replies = ask({**base, "problem_folds": folds_of, "beta": beta})
        n_sites = len(replies)
        return sum_replies(replies)

    # Round 1: every fold at β = 0; these pieces serve every λ of the fold as a start.
    first = round_trip(np.arange(K + 1), np.zeros((K + 1, p + 1)))
    n = float(first["n"])
    fold_n = np.asarray(first["fold_n"], dtype=float)
    events = first["gradient"][K][0] + n / 2.0  # Σy, from the score at β = 0
    if not 0.5 <= events <= n - 0.5:
        raise ValueError("the outcome has a single class over all sites: nothing to fit")
    include = None
    if exclude is not None:
        include = ~np.asarray(exclude, dtype=bool)
        if include.shape != (K + 1, p):
            raise ValueError(f"exclude must have shape ({K + 1}, {p}), got {include.shape}")
        if not include.any(axis=1).all():
            raise ValueError("exclude leaves a fit without any feature")
    full = None if include is None else include[K]
    lam_max = lambda_max_from_zero_pieces(first["hessian"][K], first["gradient"][K], full)
    p_full = p if full is None else int(full.sum())
    ratio = (
        default_lambda_min_ratio(int(n), p_full) if lambda_min_ratio is None else lambda_min_ratio
    )
    lambdas = lambda_path(lam_max, n_lambdas, ratio)
    if max_fits_per_round is None:
        max_fits_per_round = max(1, _REPLY_FLOATS // (p + 1) ** 2)
    window = max(1, max_fits_per_round // (K + 1))

    path = _PathSolver(
        first, lambdas, np.append(n - fold_n, n), window, tol, path_stop, include=include
    )
    rounds = 1
    while True:
        send_idx, send_beta = path.pending()
        if len(send_idx) == 0:
            break
        if rounds >= max_rounds:
            raise RuntimeError(
                f"LASSO path did not converge in {max_rounds} rounds "
                f"({len(send_idx)} fits still moving)"
            )
        try:
            reply = round_trip(path.fold_of[send_idx], send_beta)
            rounds += 1
        except (PrivacyRefusal, FederationError) as exc:
            rounds += 1
            if _path_refusal(exc) is None:
                raise
            end, kept, reply, probes = _first_refused_lambda(
                round_trip,
                lambdas,
                path.lam_index[send_idx],
                path.fold_of[send_idx],
                send_beta,
                exc,
            )
            rounds += probes
            path.end_at(end)
            send_idx, send_beta = send_idx[kept], send_beta[kept]
        log.debug("lasso round %d: %d fits in flight", rounds, len(send_idx))
        if len(send_idx):
            path.receive(send_idx, send_beta, reply)

    if path.refused is not None and path.refused.index > path.n_kept:
        log.info(
            "LASSO: a site refused lambda #%d, beyond where glmnet's path stop ended the "
            "path (%d lambda kept)",
            path.refused.index + 1,
            path.n_kept,
        )
    path_end = (
        path.refused if path.refused is not None and path.refused.index == path.n_kept else None
    )
    if path_end is not None:
        log.warning(
            "LASSO %s; cross-validation and the chosen lambda use the %d lambda before it "
            "(of %d requested)",
            path_end.describe(),
            path.n_kept,
            len(lambdas),
        )
    L = path.n_kept
    coefs = path.beta.reshape(K + 1, -1, p + 1)[:, :L]
    test_dev = path.test_deviance.reshape(K + 1, -1)[:, :L]
    fold_mean, cvm, cvsd = cv_curve(test_dev[:K], fold_n)
    i_min, i_1se = choose_lambdas(lambdas[:L], cvm, cvsd)
    return LassoCVResult(
        feature_names=names,
        lambdas=lambdas[:L],
        coef_path=coefs[K],
        cvm=cvm,
        cvsd=cvsd,
        fold_deviance=fold_mean,
        fold_coef_path=coefs[:K],
        index_min=i_min,
        index_1se=i_1se,
        center=center,
        scale=scale,
        n=round(n),
        n_folds=K,
        n_sites=n_sites,
        rounds=rounds,
        fold_n=fold_n,
        path_end=path_end,
    )


def _path_refusal(exc: Exception) -> tuple[str, tuple[str, ...]] | None:
    """(rules, sites) when every site that did not answer refused by a rule of
    :data:`PATH_RULES`; None when anything else went wrong (another rule, a data error,
    a site that stopped answering)."""
    if isinstance(exc, PrivacyRefusal):  # a site's own exception (in-memory sites)
        return (exc.rule, ()) if exc.rule in PATH_RULES else None
    text = str(exc)
    head = _FAILED_AT.search(text)
    lines = (
        [line.strip() for line in text[head.end() :].splitlines() if line.strip()] if head else []
    )
    if not head or len(lines) != int(head.group(1)):
        return None
    rules, sites = set(), []
    for line in lines:
        found = _REFUSED.findall(line)
        if len(found) != 1 or found[0] not in PATH_RULES:
            return None
        rules.add(found[0])
        sites.append(line.partition(": ")[0])
    return ", ".join(sorted(rules)), tuple(sites)


def _first_refused_lambda(
    round_trip: Callable[[np.ndarray, np.ndarray], dict[str, np.ndarray]],
    lambdas: np.ndarray,
    lam_index: np.ndarray,
    folds_of: np.ndarray,
    beta: np.ndarray,
    exc: Exception,
) -> tuple[PathEnd, np.ndarray, dict[str, np.ndarray] | None, int]:
    """After a refused round, the first λ refused and the answer for the larger ones.

    A site judges every fit of a request on its own (the saturation and concentration
    rules look at each fit's linear predictor), so a request of the fits of the ``m``
    largest λ of the round is answered when those ``m`` λ pass everywhere. Halving the
    range finds the largest answered ``m``; the (m+1)-th λ is the one refused.

    Returns
    -------
    end : the refused λ (its index in ``lambdas``), the rule(s), the refusing sites
    kept : boolean mask of the round's fits at larger λ
    reply : the summed answer for the kept fits (None when none was kept)
    probes : rounds spent
    """
    why = _path_refusal(exc)
    if why is None:
        raise exc
    levels = np.unique(lam_index)  # increasing index = decreasing λ
    answered, refused = 0, len(levels)  # prefixes of so many λ known answered / refused
    reply, probes = None, 0
    while refused - answered > 1:
        mid = (answered + refused) // 2
        keep = lam_index <= levels[mid - 1]
        probes += 1
        try:
            probe = round_trip(folds_of[keep], beta[keep])
        except (PrivacyRefusal, FederationError) as again:
            why = _path_refusal(again)
            if why is None:
                raise
            refused, exc = mid, again
        else:
            answered, reply = mid, probe
    index = int(levels[answered])
    if index == 0:  # the very first λ: nothing to keep
        raise exc
    end = PathEnd(index, float(lambdas[index]), *why)
    log.debug("LASSO: %s (%d probe rounds)", end.describe(), probes)
    return end, lam_index < index, reply, probes


_WAITING, _ACTIVE, _DONE, _DROPPED = 0, 1, 2, 3
_PIECES = ("hessian", "gradient", "deviance", "test_deviance")


class _PathSolver:
    """Schedules the (fold, λ) fits over rounds: IRLS state, warm starts, early stop.

    Fit ``b = fold * L + i`` leaves out ``fold`` (K: none) at ``lambdas[i]``. For each
    fit it keeps the point whose summed pieces are known (``beta``, ``hessian``, ...)
    and, while active, the trial point sent for evaluation (``trial``).
    """

    def __init__(
        self,
        first: dict[str, np.ndarray],
        lambdas: np.ndarray,
        n_train: np.ndarray,
        window: int,
        tol: float,
        path_stop: PathStop | None,
        include: np.ndarray | None = None,
    ) -> None:
        F, L, P = len(n_train), len(lambdas), first["gradient"].shape[1]
        self.L, self.F, self.tol, self.window, self.stop = L, F, tol, window, path_stop
        self.fold_of = np.repeat(np.arange(F), L)
        # Per fit, the coordinates it may move (intercept always); None: all of them.
        self.use = None if include is None else np.insert(include, 0, True, axis=1)[self.fold_of]
        self.lam_index = np.tile(np.arange(L), F)
        self.lam = lambdas[self.lam_index]
        self.n_train = n_train[self.fold_of]
        self.first = first  # pieces at β = 0, per fold
        self.beta = np.zeros((F * L, P))
        self.trial = np.zeros((F * L, P))
        self.hessian = np.zeros((F * L, P, P))
        self.gradient = np.zeros((F * L, P))
        self.deviance = np.zeros(F * L)
        self.test_deviance = np.zeros(F * L)
        self.status = np.full(F * L, _WAITING)
        self.halvings = np.zeros(F * L, dtype=int)
        self.n_kept = L
        self.stopped = False  # glmnet's rule has ended the path
        self.refused: PathEnd | None = None  # the last end by a site's refusal
        # Null deviance of the full data (for glmnet's fraction of deviance explained).
        sum_y = first["gradient"][F - 1, 0] + n_train[F - 1] / 2.0
        ybar = sum_y / n_train[F - 1]
        self.null_deviance = (
            -2.0 * n_train[F - 1] * (ybar * np.log(ybar) + (1 - ybar) * np.log1p(-ybar))
        )
        self._advance(self._activate(np.arange(F)))

    # -- the round trip -------------------------------------------------------------

    def pending(self) -> tuple[np.ndarray, np.ndarray]:
        """The active fits and the points at which they need the sites' pieces."""
        idx = np.flatnonzero(self.status == _ACTIVE)
        return idx, self.trial[idx]

    def receive(self, idx: np.ndarray, beta: np.ndarray, reply: dict[str, np.ndarray]) -> None:
        """Take the new points that lower the objective; halve the steps of the others."""
        old = self._objective(idx, self.beta[idx], self.deviance[idx])
        new = self._objective(idx, beta, reply["deviance"])
        worse = new > old + _OBJ_RTOL * (1.0 + np.abs(old))
        take = idx[~worse]
        self._store(take, beta[~worse], {k: np.asarray(reply[k])[~worse] for k in _PIECES})
        self.halvings[take] = 0  # the limit is on halvings in a row, not over the whole path
        back = idx[worse]
        self.halvings[back] += 1
        if np.any(self.halvings[back] > _MAX_HALVINGS):
            raise RuntimeError("LASSO IRLS step halving failed: the objective keeps rising")
        self.trial[back] = (self.beta[back] + beta[worse]) / 2.0
        self._advance(take)

    # -- internals ------------------------------------------------------------------

    def _objective(self, idx: np.ndarray, beta: np.ndarray, deviance: np.ndarray) -> np.ndarray:
        return deviance / (2.0 * self.n_train[idx]) + self.lam[idx] * np.abs(beta[:, 1:]).sum(1)

    def _store(self, idx: np.ndarray, beta: np.ndarray, pieces: dict[str, np.ndarray]) -> None:
        self.beta[idx] = beta
        self.hessian[idx] = pieces["hessian"]
        self.gradient[idx] = pieces["gradient"]
        self.deviance[idx] = pieces["deviance"]
        self.test_deviance[idx] = pieces["test_deviance"]

    def _advance(self, fresh: np.ndarray) -> None:
        """IRLS steps for fits with fresh pieces; start successors of the converged."""
        while len(fresh):
            self._adopt_better_points(fresh)
            nt = self.n_train[fresh, None]
            H = self.hessian[fresh]
            c = (np.einsum("bjk,bk->bj", H, self.beta[fresh]) + self.gradient[fresh]) / nt
            if self.use is not None:
                # glmnet's exclude: an excluded coefficient has no curvature and no score,
                # so it stays at 0 and never violates KKT; the fit's β is 0 there already.
                u = self.use[fresh]
                H = H * (u[:, :, None] & u[:, None, :])
                c = c * u
            new = coordinate_descent(H / nt[:, :, None], c, self.beta[fresh], self.lam[fresh])
            moving = np.abs(new - self.beta[fresh]).max(axis=1) >= self.tol
            self.trial[fresh[moving]] = new[moving]
            finished = fresh[~moving]
            self.status[finished] = _DONE
            self._check_path_stop()
            fresh = self._activate(np.unique(self.fold_of[finished]))

    def _adopt_better_points(self, fresh: np.ndarray) -> None:
        """Move each fit to the best point already evaluated in its fold, if better.

        Every fit of a fold has its pieces at some point; the objective of fit b at fit
        m's point needs only m's deviance and ‖β_m‖₁, so no round is spent. This is a
        warm start that works while the whole path iterates in parallel: the fits at
        small λ start from their neighbours' progress instead of from β = 0.
        """
        known_status = (self.status == _ACTIVE) | (self.status == _DONE)
        for f in np.unique(self.fold_of[fresh]):
            mine = fresh[self.fold_of[fresh] == f]
            known = np.flatnonzero(known_status & (self.fold_of == f))
            l1 = np.abs(self.beta[known, 1:]).sum(axis=1)
            obj = self.deviance[known][None, :] / (2.0 * self.n_train[mine, None]) + (
                self.lam[mine, None] * l1[None, :]
            )
            best = np.argmin(obj, axis=1)
            own = self._objective(mine, self.beta[mine], self.deviance[mine])
            better = obj[np.arange(len(mine)), best] < own - _OBJ_RTOL * (1.0 + np.abs(own))
            src, dst = known[best[better]], mine[better]
            self._store(dst, self.beta[src], {k: getattr(self, k)[src] for k in _PIECES})

    def _activate(self, folds: np.ndarray) -> np.ndarray:
        """Start waiting fits of these folds up to the window, warm-started."""
        started = []
        for f in folds:
            block = slice(f * self.L, f * self.L + self.n_kept)
            status = self.status[block]
            free = self.window - int(np.sum(status == _ACTIVE))
            waiting = np.flatnonzero(status == _WAITING)[: max(free, 0)]
            for i in waiting:
                b = f * self.L + i
                done = np.flatnonzero(status[:i] == _DONE)
                if len(done):  # the nearest finished larger λ: its point and pieces
                    donor = f * self.L + done[-1]
                    self._store(
                        np.array([b]),
                        self.beta[donor][None],
                        {k: getattr(self, k)[donor][None] for k in _PIECES},
                    )
                else:  # β = 0, from round 1
                    self._store(
                        np.array([b]),
                        np.zeros((1, self.beta.shape[1])),
                        {k: self.first[k][f][None] for k in _PIECES},
                    )
                self.status[b] = _ACTIVE
                started.append(b)
        return np.array(started, dtype=int)

    def end_at(self, end: PathEnd) -> None:
        """A site refused ``lambdas[end.index]``: drop it and every smaller λ, in every
        fold, and start waiting fits of the λ kept in the room this leaves."""
        if end.index >= self.n_kept:
            return
        self.refused = end
        self._drop_from(end.index)
        self._advance(self._activate(np.arange(self.F)))

    def _drop_from(self, index: int) -> None:
        self.n_kept = index
        self.status[self.lam_index >= index] = _DROPPED

    def _check_path_stop(self) -> None:
        if self.stop is None or self.stopped:
            return
        full = slice((self.F - 1) * self.L, (self.F - 1) * self.L + self.n_kept)
        done = self.status[full] == _DONE
        prefix = int(np.argmin(done)) if not done.all() else self.n_kept
        ratio = 1.0 - self.deviance[full][:prefix] / self.null_deviance
        last = self.stop.last_index(ratio)
        if last is not None:
            self.stopped = True
            self._drop_from(last + 1)


# --------------------------------------------------------------------------- estimator


class FederatedLassoCV:
    """scikit-learn-style wrapper of :func:`lasso_cv`.

    Parameters are those of :func:`lasso_cv`. After :meth:`fit`: ``result_``
    (:class:`LassoCVResult`), ``lambdas_``, ``coef_path_``, ``cvm_``, ``cvsd_``,
    ``lambda_min_``, ``lambda_1se_``, ``intercept_`` and ``coef_`` (at lambda.min, per
    SD), ``n_rounds_``.
    """

    def __init__(
        self,
        n_folds: int = 10,
        n_lambdas: int = 100,
        lambda_min_ratio: float | None = None,
        seed: int = 0,
        path_stop: PathStop | None = PathStop(),
        max_fits_per_round: int | None = None,
        tol: float = 1e-10,
        max_rounds: int = 100,
    ) -> None:
        self.n_folds = n_folds
        self.n_lambdas = n_lambdas
        self.lambda_min_ratio = lambda_min_ratio
        self.seed = seed
        self.path_stop = path_stop
        self.max_fits_per_round = max_fits_per_round
        self.tol = tol
        self.max_rounds = max_rounds

    def fit(
        self,
        ask: Ask,
        feature_names: Sequence[str],
        center: np.ndarray,
        scale: np.ndarray,
    ) -> FederatedLassoCV:
        """Run :func:`lasso_cv` with this estimator's settings; returns ``self``."""
        res = lasso_cv(
            ask,
            feature_names,
            center,
            scale,
            n_folds=self.n_folds,
            seed=self.seed,
            n_lambdas=self.n_lambdas,
            lambda_min_ratio=self.lambda_min_ratio,
            path_stop=self.path_stop,
            max_fits_per_round=self.max_fits_per_round,
            tol=self.tol,
            max_rounds=self.max_rounds,
        )
        self.result_ = res
        self.lambdas_ = res.lambdas
        self.coef_path_ = res.coef_path
        self.cvm_, self.cvsd_ = res.cvm, res.cvsd
        self.lambda_min_, self.lambda_1se_ = res.lambda_min, res.lambda_1se
        self.intercept_, self.coef_ = float(res.coef_min[0]), res.coef_min[1:]
        self.n_rounds_ = res.rounds
        return self
