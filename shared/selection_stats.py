"""Site-side statistics for federated feature selection (mRMR) and the LASSO path.

Every function here turns one site's own rows into a small dict of sums whose array
shapes depend only on the request (number of features, classes, folds, problems),
never on the site's number of patients; counts are the only per-site sizes sent. The
coordinator adds the dicts of all sites key by key
(:func:`radfed.shared.aggregate.sum_replies`) and solves (:mod:`radfed.server.stats.mrmr`,
:mod:`radfed.server.stats.lasso`).

A site answers every request of these solvers with :func:`answer`, which dispatches
on ``request["step"]``:

========================  ================================================================
step                      reply
========================  ================================================================
``"mrmr_moments"``        per class ``n`` (C,), ``sum`` (C, p), ``sumsq`` (C, p);
                          with ``gram=True`` also ``xtx`` (p, p)
``"mrmr_cross"``          ``cross`` (p, m): Σ (x - c)(x_j - c_j) for the requested columns j,
                          ``sumsq`` (p,): Σ (x - c)², ``n``
``"lasso_irls"``          per problem b: ``hessian`` (B, p+1, p+1), ``gradient`` (B, p+1),
                          ``deviance`` (B,), ``test_deviance`` (B,); ``fold_n`` (K,), ``n``
========================  ================================================================

All functions are pure: no file, network or global state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.special import expit

from radfed.shared.logistic import design
from radfed.shared.privacy import PrivacyPolicy, refuse

#: glmnet's clamp on held-out probabilities in cv.glmnet's binomial deviance.
PROB_CLIP = 1e-5
#: Largest number of (n_rows x (p+1)²) floats held at once while summing Hessians.
_CHUNK_FLOATS = 4_000_000

__all__ = [
    "PROB_CLIP",
    "answer",
    "assign_folds",
    "class_moments",
    "cross_products",
    "heldout_deviance",
    "lasso_pieces",
]


# --------------------------------------------------------------------------- helpers


def _shifted(
    X: np.ndarray, center: np.ndarray | None = None, scale: np.ndarray | None = None
) -> np.ndarray:
    """(X - center) / scale as float, refusing missing values.

    Shifting by a common (pooled) centre keeps the sums exact to combine across sites
    and avoids the cancellation of Σx² - (Σx)²/n on features with a large mean.
    """
    X = np.asarray(X, dtype=float)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (rows x features), got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("X holds missing or infinite values: drop incomplete rows first")
    if center is not None:
        X = X - np.asarray(center, dtype=float)
    if scale is not None:
        s = np.asarray(scale, dtype=float)
        X = X / np.where(s > 0, s, 1.0)  # a constant column stays constant, not NaN
    return X


# --------------------------------------------------------------------------- mRMR


def class_moments(
    X: np.ndarray,
    y: np.ndarray,
    classes: Sequence[Any],
    center: np.ndarray | None = None,
    scale: np.ndarray | None = None,
    gram: bool = False,
) -> dict[str, np.ndarray]:
    """Per-class count, sum and sum of squares of every feature (relevance, F-test).

    Parameters
    ----------
    X : ndarray of shape (n, p)
        The site's complete rows.
    y : ndarray of shape (n,)
        Class labels.
    classes : sequence of labels
        The classes of the whole federation, in the coordinator's order (a site may
        lack one: its count is then 0).
    center, scale : ndarray of shape (p,), optional
        A common shift and scale applied before summing (F and Pearson's r do not
        change under it).
    gram : bool
        Also return the cross-product matrix ``xtx`` = Xᵀ X (p, p), for the one-round
        redundancy variant.

    Returns
    -------
    dict
        ``n`` (C,), ``sum`` (C, p), ``sumsq`` (C, p) and, with ``gram``, ``xtx`` (p, p).
    """
    Z = _shifted(X, center, scale)
    y = np.asarray(y)
    masks = [y == c for c in classes]
    if sum(int(m.sum()) for m in masks) != len(y):
        raise ValueError(f"labels outside the requested classes {list(classes)}")
    out = {
        "n": np.array([m.sum() for m in masks], dtype=float),
        "sum": np.stack([Z[m].sum(axis=0) for m in masks]),
        "sumsq": np.stack([(Z[m] ** 2).sum(axis=0) for m in masks]),
    }
    if gram:
        out["xtx"] = Z.T @ Z
    return out


def cross_products(
    X: np.ndarray,
    columns: Sequence[int],
    center: np.ndarray,
    scale: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Centred cross-products of every feature with a few chosen columns (redundancy).

    Parameters
    ----------
    X : ndarray of shape (n, p)
    columns : sequence of int, length m
        Indices of the columns to correlate with (the features just selected).
    center : ndarray of shape (p,)
        The pooled mean (from the coordinator), so that the sums are centred moments.
    scale : ndarray of shape (p,), optional

    Returns
    -------
    dict
        ``cross`` (p, m) = Σ (x - c)(x_j - c_j), ``sumsq`` (p,) = Σ (x - c)², ``n``.
    """
    Z = _shifted(X, center, scale)
    cols = np.asarray(columns, dtype=int)
    return {
        # Column by column: the same BLAS call whatever the columns asked with it, so a
        # cross-product is bitwise the same when prefetched (mRMR's ties stay ties).
        "cross": np.stack([Z.T @ Z[:, c] for c in cols], axis=1).reshape(Z.shape[1], len(cols)),
        "sumsq": (Z**2).sum(axis=0),
        "n": np.asarray(float(len(Z))),
    }


# --------------------------------------------------------------------------- LASSO


def _site_seed(seed: int, site_name: str, secret: bytes = b"") -> list[int]:
    # A stable hash (not Python's salted hash()) so a site draws the same folds every
    # run; the site's secret keeps the draw out of the coordinator's reach.
    digest = hashlib.sha256(site_name.encode("utf-8") + secret).digest()
    return [int(seed), int.from_bytes(digest[:8], "little")]


def assign_folds(
    y: np.ndarray, k: int, seed: int, site_name: str, secret: bytes = b""
) -> np.ndarray:
    """Stratified, seeded K-fold assignment of a site's rows.

    Within each outcome class the rows are shuffled and dealt to the folds in turn, the
    dealing continuing across classes from a random start, so every fold gets each class
    in proportion (to within one row) and fold sizes differ by at most one. The draw
    depends only on ``(seed, site_name, secret)``, so a site reproduces its folds every
    round, and without the site's secret nobody else can.

    Parameters
    ----------
    y : ndarray of shape (n,)
        Outcome labels of the site's rows.
    k : int
        Number of folds.
    seed : int
        The study's seed.
    site_name : str
        The site's name; different sites draw independent folds.
    secret : bytes, optional
        The site's own secret (:class:`radfed.client.site_state.SiteState`).

    Returns
    -------
    ndarray of shape (n,), int
        Fold index 0..k-1 of each row.
    """
    if k < 2:
        raise ValueError(f"need at least 2 folds, got {k}")
    y = np.asarray(y)
    rng = np.random.default_rng(_site_seed(seed, site_name, secret))
    folds = np.empty(len(y), dtype=int)
    start = int(rng.integers(k))
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        folds[rows] = (start + np.arange(len(rows))) % k
        start = (start + len(rows)) % k
    return folds


def heldout_deviance(eta: np.ndarray, y: np.ndarray, prob_clip: float = PROB_CLIP) -> np.ndarray:
    """Binomial deviance of each row as cv.glmnet's ``type.measure="deviance"``.

    Probabilities are clamped to [prob_clip, 1 - prob_clip] first, as glmnet does, so
    one confidently wrong held-out prediction cannot make the CV curve infinite.
    ``eta`` may have trailing problem axes: shape (n, ...) with ``y`` of shape (n,).
    """
    p = np.clip(expit(eta), prob_clip, 1.0 - prob_clip)
    yy = np.asarray(y, dtype=float).reshape((-1,) + (1,) * (np.ndim(eta) - 1))
    return -2.0 * (yy * np.log(p) + (1.0 - yy) * np.log1p(-p))


def lasso_pieces(
    X: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    problem_folds: np.ndarray,
    betas: np.ndarray,
    center: np.ndarray,
    scale: np.ndarray,
    n_folds: int,
    prob_clip: float = PROB_CLIP,
) -> dict[str, np.ndarray]:
    """One IRLS round of many penalised logistic fits at once (all folds, all lambdas).

    Problem ``b`` is a fit on the rows whose fold differs from ``problem_folds[b]``
    (``problem_folds[b] == n_folds`` means all rows: the full-data fit) at the
    coefficients ``betas[b]``. For each problem the site returns the logistic Hessian and
    score of its training rows (the quadratic pieces of glmnet's IRLS: XᵀWz = XᵀWX β +
    Xᵀ(y - μ)), their deviance, and the held-out binomial deviance of the fold's rows.

    Parameters
    ----------
    X : ndarray of shape (n, p)
        Raw features; standardised here with the pooled ``center`` and ``scale``.
    y : ndarray of shape (n,)
        Outcome 0/1.
    folds : ndarray of shape (n,)
        Fold of each row (:func:`assign_folds`).
    problem_folds : ndarray of shape (B,), int
        Held-out fold of each problem, ``n_folds`` for the full data.
    betas : ndarray of shape (B, p+1)
        Intercept first, then the coefficients per SD.
    center, scale : ndarray of shape (p,)
    n_folds : int

    Returns
    -------
    dict
        ``hessian`` (B, p+1, p+1): Σ_train w x xᵀ; ``gradient`` (B, p+1): Σ_train (y - μ) x;
        ``deviance`` (B,): training -2 loglik; ``test_deviance`` (B,): Σ_heldout of the
        clamped deviance (0 for the full-data problem); ``fold_n`` (K,); ``n``.
    """
    Xd = design(X, center, scale)
    if not np.isfinite(Xd).all():
        raise ValueError("X holds missing or infinite values: drop incomplete rows first")
    y = np.asarray(y, dtype=float)
    folds = np.asarray(folds, dtype=int)
    problem_folds = np.asarray(problem_folds, dtype=int)
    betas = np.atleast_2d(np.asarray(betas, dtype=float))
    n, P = Xd.shape
    if betas.shape != (len(problem_folds), P):
        raise ValueError(f"betas must have shape ({len(problem_folds)}, {P}), got {betas.shape}")

    eta = Xd @ betas.T  # (n, B)
    mu = expit(eta)
    train = folds[:, None] != problem_folds[None, :]  # (n, B); the full problem trains on all
    w = np.where(train, mu * (1.0 - mu), 0.0)
    resid = np.where(train, y[:, None] - mu, 0.0)
    dev_rows = -2.0 * (y[:, None] * eta - np.logaddexp(0.0, eta))

    # Σ_i w_ib x_i x_iᵀ for all b as one matrix product over row blocks.
    hessian = np.zeros((len(problem_folds), P * P))
    step = max(1, _CHUNK_FLOATS // (P * P))
    for lo in range(0, n, step):
        outer = (Xd[lo : lo + step, :, None] * Xd[lo : lo + step, None, :]).reshape(-1, P * P)
        hessian += w[lo : lo + step].T @ outer

    return {
        "hessian": hessian.reshape(-1, P, P),
        "gradient": resid.T @ Xd,
        "deviance": np.where(train, dev_rows, 0.0).sum(axis=0),
        "test_deviance": np.where(~train, heldout_deviance(eta, y, prob_clip), 0.0).sum(axis=0),
        "fold_n": np.bincount(folds, minlength=n_folds)[:n_folds].astype(float),
        "n": np.asarray(float(n)),
    }


# --------------------------------------------------------------------------- dispatch


def answer(
    request: Mapping[str, Any],
    X: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray | None = None,
    n_folds: int | None = None,
    policy: PrivacyPolicy | None = None,
) -> dict[str, np.ndarray]:
    """A site's reply to one request of the mRMR or LASSO solvers.

    Parameters
    ----------
    request : mapping
        Sent by the coordinator; ``request["step"]`` names the statistic (see the module
        docstring for the keys of each step).
    X, y : ndarray
        The site's complete rows (features as the request's columns) and outcome.
    folds : ndarray of shape (n,), optional
        The site's own CV fold of each row (:func:`assign_folds`, drawn by the site with
        its secret), needed for ``"lasso_irls"``; the request's seed is never used.
    n_folds : int, optional
        The number of folds (default ``folds.max() + 1``).
    policy : PrivacyPolicy, optional
        When given, the site refuses (``PrivacyRefusal``) replies with a count below
        ``min_cell`` (class sizes, fold sizes), a fit with too many parameters for its
        training rows, or coefficients it judges crafted (a standardisation unlike its
        data, a saturated or concentrated linear predictor).
    """
    step = str(request.get("step"))[:40]  # hostile: any type
    y = np.asarray(y)
    if isinstance(step, str) and step in STEPS:
        k = 0 if folds is None else int(np.max(folds, initial=0)) + 1
        k = int(n_folds) if n_folds is not None else k
        request = _checked_request(request, step, np.shape(X)[1], k)
    if step == "mrmr_moments":
        reply = class_moments(
            X,
            y,
            request["classes"],
            request.get("center"),
            request.get("scale"),
            gram=bool(request.get("gram", False)),
        )
        if policy is not None:
            counts = {f"class {c}": n for c, n in zip(request["classes"], reply["n"], strict=True)}
            policy.check_counts(counts, "mRMR class moments")
        return reply
    if step == "mrmr_cross":
        if policy is not None:
            policy.check_counts({"rows": len(y)}, "mRMR cross-products")
        return cross_products(X, request["columns"], request["center"], request.get("scale"))
    if step == "lasso_irls":
        if folds is None:
            raise ValueError("the LASSO needs the site's folds")
        folds = np.asarray(folds, dtype=int)
        k = int(n_folds if n_folds is not None else folds.max() + 1)
        problem_folds = np.asarray(request["problem_folds"], dtype=int)
        if problem_folds.ndim != 1 or np.any((problem_folds < 0) | (problem_folds > k)):
            raise ValueError(f"problem_folds must name folds 0..{k - 1} or {k} (all rows)")
        if policy is not None:
            _check_folds(policy, folds, k, np.shape(X)[1] + 1)
            _check_coefficients(policy, X, request, folds != problem_folds[None, :].T)
        return lasso_pieces(
            X,
            y,
            folds,
            problem_folds,
            request["beta"],
            request["center"],
            request["scale"],
            k,
        )
    raise ValueError(f"unknown selection step {str(step)[:40]!r}")


STEPS = ("mrmr_moments", "mrmr_cross", "lasso_irls")
#: Each numeric field of a request: its rank, and whether it is required, per step.
_FIELDS = {
    "mrmr_moments": {"classes": (1, True), "center": (1, False), "scale": (1, False)},
    "mrmr_cross": {"columns": (1, True), "center": (1, True), "scale": (1, False)},
    "lasso_irls": {
        "problem_folds": (1, True),
        "beta": (2, True),
        "center": (1, True),
        "scale": (1, True),
    },
}


def _checked_request(request: Mapping[str, Any], step: str, p: int, k: int) -> dict[str, Any]:
    """The request's fields for ``step`` as finite numbers of the right shape: a hostile
    field (text, nested junk, NaN or inf, a column or fold the site lacks) is refused."""
    out = dict(request)
    context = f"selection step {step}"
    for key, (ndim, required) in _FIELDS[step].items():
        if key not in request:
            if required:
                raise refuse("shape", context, f"the request lacks field {key!r}")
            continue
        value = request[key]
        try:
            array = np.asarray(value, dtype=float)
        except (TypeError, ValueError):
            array = np.empty(0)
            ndim = -1  # refused below
        if key == "beta":
            array = np.atleast_2d(array)
        sizes = {"center": p, "scale": p, "beta": p + 1}
        if (
            isinstance(value, (str, bytes, dict))
            or array.ndim != ndim
            or (key in sizes and array.shape[-1] != sizes[key])
        ):
            raise refuse("shape", context, f"request field {key!r} is not a vector of numbers")
        if not np.all(np.isfinite(array)):
            raise refuse("standardisation", context, f"request field {key!r} must be finite")
        limit = {"columns": p - 1, "problem_folds": k}.get(key)
        if limit is not None:
            if np.any((array < 0) | (array > limit) | (array != np.round(array))):
                raise refuse("shape", context, f"request field {key!r} names no column or fold")
            array = array.astype(int)
        out[key] = array if key != "classes" else list(array)
    if not isinstance(request.get("gram", False), (bool, np.bool_)):
        raise refuse("shape", context, "request field 'gram' must be true or false")
    return out


def _check_folds(policy: PrivacyPolicy, folds: np.ndarray, k: int, n_params: int) -> None:
    # Only the fold sizes are sent as counts; a held-out deviance summed over one or two
    # rows would be nearly a row-level value, so small folds are refused like small cells.
    sizes = np.bincount(folds, minlength=k)[:k]
    policy.check_counts({f"fold {f}": int(c) for f, c in enumerate(sizes)}, "LASSO CV folds")
    policy.check_parameters(n_params, int(len(folds) - sizes.max()), "LASSO fold fit")


def _check_coefficients(
    policy: PrivacyPolicy, X: np.ndarray, request: Mapping[str, Any], train: np.ndarray
) -> None:
    """The standardisation and linear-predictor rules for every problem of a request;
    the weights' concentration over each problem's own training rows (``train``: B x n).
    """
    X = np.asarray(X, dtype=float)
    center = np.asarray(request["center"], dtype=float)
    scale = np.asarray(request["scale"], dtype=float)
    if center.shape != (X.shape[1],) or scale.shape != (X.shape[1],):
        raise ValueError(f"center and scale must have {X.shape[1]} values")
    policy.check_standardisation(X, center, scale, "LASSO")
    betas = np.atleast_2d(np.asarray(request["beta"], dtype=float))
    if betas.shape[1] != X.shape[1] + 1:
        raise ValueError(f"beta must have {X.shape[1] + 1} columns")
    if betas.shape[0] != train.shape[0]:
        raise ValueError("beta must have one row per problem")
    eta = design(X, center, scale) @ betas.T
    mu = expit(eta)
    policy.check_linear_predictor(eta, "LASSO", mu * (1.0 - mu) * train.T)
