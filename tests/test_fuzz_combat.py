"""Property-based tests (hypothesis) of ComBat's site halves under hostile and degenerate
input: the site's own rows (constant features, one patient per batch, NaN, infinities,
huge or subnormal magnitudes, no row, no feature) and the coordinator's arrays (beta,
grand mean, pooled variance, covariate effects, the fitted estimates), which a site does
not trust.

The properties: each site function gives radfed's own one-line error (a ``ValueError``
raised by a ``raise`` of radfed's code, see ``outcome_of``) or a reply of finite
numbers, of the shapes the request fixes, equal to the sums written out here with
``math.fsum`` over the rows; sane input (finite numbers of moderate size, labels among
the levels) is always answered. Never a numpy traceback, a ``TypeError``/``IndexError``,
an overflow warning or an inf or NaN sent on.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from radfed.harmonization.combat import (
    ComBatEstimates,
    ComBatWarning,
    apply_combat,
    combat_in_memory,
    estimate_new_batch,
    site_batch_moments,
    site_design_moments,
    site_residual_moments,
)
from radfed.tests.test_fuzz_inputs import FUZZ
from radfed.tests.test_fuzz_site import field, hostile, outcome_of

pytestmark = [
    pytest.mark.filterwarnings("error::RuntimeWarning"),  # no overflow let through
    pytest.mark.filterwarnings("ignore::radfed.harmonization.combat.ComBatWarning"),
]

LEVELS = ["a", "b", "c"]
MODERATE_LIMIT = 1e50  # products of two such values square to 1e200: no overflow
moderate = st.floats(-1e3, 1e3)
extreme = st.sampled_from(
    [0.0, -0.0, 5e-324, -1e-310, 1e-300, 1e50, -1e120, 1e155, -1e200, 1.7e308, -1.7e308]
) | st.sampled_from([math.nan, math.inf, -math.inf])


@st.composite
def site_rows(
    draw, p: int | None = None, c: int | None = None, labels: list[str] = LEVELS
) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """A site's rows: moderate, or mixed with extreme values; now and then a constant
    feature, a label outside the levels, no covariates (None)."""
    n = draw(st.integers(0, 7))
    p = draw(st.integers(0, 3)) if p is None else p
    c = draw(st.integers(0, 2)) if c is None else c
    elements = draw(st.sampled_from([moderate, moderate, st.one_of(moderate, extreme)]))
    Y = draw(hnp.arrays(np.float64, (n, p), elements=elements))
    if n and p and draw(st.booleans()):
        Y[:, -1] = Y[0, -1]  # a constant feature
    pool = [*labels, "zz"] if draw(st.integers(0, 9)) == 0 else labels
    batch = draw(st.lists(st.sampled_from(pool), min_size=n, max_size=n))
    cov = (
        None
        if c == 0 and draw(st.booleans())
        else draw(hnp.arrays(np.float64, (n, c), elements=elements))
    )
    return Y, batch, cov


def sane(*arrays: Any) -> bool:
    """Finite float arrays of moderate size."""
    for a in arrays:
        if a is None:
            continue
        if not isinstance(a, np.ndarray) or a.dtype != np.float64:
            return False
        if not (np.isfinite(a).all() and (np.abs(a) <= MODERATE_LIMIT).all()):
            return False
    return True


def design(batch: list[str], cov: np.ndarray | None, n: int) -> np.ndarray:
    """The design written out: one-hot of the levels, then the covariates."""
    X = np.zeros((n, len(LEVELS)))
    for r, label in enumerate(batch):
        X[r, LEVELS.index(label)] = 1.0
    return X if cov is None else np.hstack([X, cov])


def fsum_close(actual: np.ndarray, terms: np.ndarray) -> None:
    """``actual`` equals the sum of ``terms`` over axis 0 (math.fsum, exact rounding),
    up to rounding relative to the sum of their magnitudes."""
    terms = np.asarray(terms, dtype=float)
    flat = terms.reshape(terms.shape[0], int(np.prod(terms.shape[1:])))
    expected = np.array([math.fsum(column) for column in flat.T]).reshape(terms.shape[1:])
    scale = np.abs(terms).sum(axis=0)
    assert np.all(np.abs(actual - expected) <= 1e-12 * scale + 1e-300), (actual, expected)


def finite_reply(reply: dict[str, Any]) -> None:
    for key, value in reply.items():
        assert np.isfinite(np.asarray(value, dtype=float)).all(), f"{key} holds NaN or inf"


def shape_of(value: Any) -> tuple[int, ...] | None:
    """The shape of an array; None for anything else (hostile lists may be ragged)."""
    return value.shape if isinstance(value, np.ndarray) else None


def is_levels(levels: Any) -> bool:
    return isinstance(levels, list) and levels == LEVELS


# ------------------------------------------------------------------- round 1: XᵀX, XᵀY


@FUZZ
@given(rows=site_rows(), levels=field(st.just(LEVELS)))
def test_design_moments_are_exact_sums_or_a_clear_error(rows, levels):
    Y, batch, cov = rows
    reply = outcome_of(lambda: site_design_moments(Y, batch, cov, levels))
    ok = is_levels(levels) and set(batch) <= set(LEVELS) and sane(Y, cov)
    if isinstance(reply, Exception):
        assert not ok, f"sane rows refused: {reply}"
        return
    finite_reply(reply)
    n, p = Y.shape
    width = len(list(levels)) + (0 if cov is None else cov.shape[1])
    assert reply["xtx"].shape == (width, width) and reply["xty"].shape == (width, p)
    assert reply["n"] == n
    if is_levels(levels):
        X = design(batch, cov, n)
        fsum_close(reply["xtx"], X[:, :, None] * X[:, None, :])
        fsum_close(reply["xty"], X[:, :, None] * Y[:, None, :])


# --------------------------------------------------------------- round 2: residual sums


@st.composite
def residual_requests(draw):
    Y, batch, cov = draw(site_rows())
    c = 0 if cov is None else cov.shape[1]
    valid = hnp.arrays(np.float64, (len(LEVELS) + c, Y.shape[1]), elements=moderate)
    return Y, batch, cov, draw(field(valid))


@FUZZ
@given(request=residual_requests())
def test_residual_moments_are_exact_sums_or_a_clear_error(request):
    Y, batch, cov, beta = request
    reply = outcome_of(lambda: site_residual_moments(Y, batch, cov, LEVELS, beta))
    c = 0 if cov is None else cov.shape[1]
    ok = (
        set(batch) <= set(LEVELS)
        and sane(Y, cov, beta)
        and shape_of(beta) == (len(LEVELS) + c, Y.shape[1])
    )
    if isinstance(reply, Exception):
        assert not ok, f"sane request refused: {reply}"
        if isinstance(beta, np.ndarray) and beta.dtype.kind == "f" and not np.isfinite(beta).all():
            assert "beta" in str(reply)
        return
    finite_reply(reply)
    assert reply["rss"].shape == reply["sumsq"].shape == (Y.shape[1],)
    assert np.asarray(beta, dtype=float).shape == (len(LEVELS) + c, Y.shape[1])
    if ok:
        resid = Y - np.array(
            [
                [math.fsum(x * b for x, b in zip(row, col, strict=True)) for col in beta.T]
                for row in design(batch, cov, len(Y))
            ]
        ).reshape(Y.shape)
        fsum_close(reply["rss"], resid**2)
        fsum_close(reply["sumsq"], Y**2)


# ------------------------------------------------------------ round 3: per-batch moments


@st.composite
def batch_requests(draw):
    Y, batch, cov = draw(site_rows())
    p, c = Y.shape[1], 0 if cov is None else cov.shape[1]
    grand_mean = draw(field(hnp.arrays(np.float64, p, elements=moderate)))
    var_pooled = draw(field(hnp.arrays(np.float64, p, elements=st.floats(1e-3, 1e3))))
    beta_cov = draw(field(hnp.arrays(np.float64, (c, p), elements=moderate)))
    return Y, batch, cov, beta_cov, grand_mean, var_pooled


@FUZZ
@given(request=batch_requests())
def test_batch_moments_are_exact_sums_or_a_clear_error(request):
    Y, batch, cov, beta_cov, grand_mean, var_pooled = request
    reply = outcome_of(
        lambda: site_batch_moments(Y, batch, cov, LEVELS, beta_cov, grand_mean, var_pooled)
    )
    n, p = Y.shape
    c = 0 if cov is None else cov.shape[1]
    shapes_ok = (
        shape_of(grand_mean) == (p,)
        and shape_of(var_pooled) == (p,)
        and shape_of(beta_cov) in ((c, p), (0,) if c == 0 else (c, p))
    )
    ok = (
        set(batch) <= set(LEVELS)
        and sane(Y, cov, beta_cov, grand_mean, var_pooled)
        and shapes_ok
        and bool(np.all(np.asarray(var_pooled) >= 1e-3))
    )
    if isinstance(reply, Exception):
        assert not ok, f"sane request refused: {reply}"
        return
    finite_reply(reply)
    assert reply["n"].shape == (len(LEVELS),) and reply["sum_z"].shape == (len(LEVELS), p)
    assert reply["n"].sum() == n
    if ok:
        effects = np.zeros((n, p)) if c == 0 else cov @ np.asarray(beta_cov).reshape(c, p)
        z = (Y - grand_mean - effects) / np.sqrt(var_pooled)
        for b, level in enumerate(LEVELS):
            rows = np.array([label == level for label in batch], dtype=bool)
            assert reply["n"][b] == rows.sum()
            fsum_close(reply["sum_z"][b], z[rows] if n else np.zeros((0, p)))
            fsum_close(reply["sum_z2"][b], z[rows] ** 2 if n else np.zeros((0, p)))


# ---------------------------------------------------------- round 4: applying the fit


def _fit(mode: dict[str, bool]) -> ComBatEstimates:
    rng = np.random.default_rng(3)
    batch = np.repeat(LEVELS, 8)
    cov = rng.normal(size=(24, 1))
    Y = rng.normal(size=(24, 4)) * [1, 2, 3, 4] + np.repeat([0.0, 1.0, -1.0], 8)[:, None]
    Y = Y + cov
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ComBatWarning)
        return combat_in_memory([(Y, batch, cov)], **mode)[0]


FITS = [
    _fit({"parametric": True, "mean_only": False}),
    _fit({"parametric": False, "mean_only": False}),
    _fit({"parametric": True, "mean_only": True}),
]


@FUZZ
@given(fit=st.sampled_from(FITS), rows=site_rows(p=4, c=1))
def test_apply_combat_is_the_formula_or_a_clear_error(fit, rows):
    Y, batch, cov = rows
    out = outcome_of(lambda: apply_combat(fit, Y, batch, cov))
    ok = set(batch) <= set(LEVELS) and cov is not None and sane(Y, cov)
    if isinstance(out, Exception):
        assert not ok, f"sane rows refused: {out}"
        return
    assert out.shape == Y.shape and np.isfinite(out).all()
    if ok:
        idx = [LEVELS.index(label) for label in batch]
        mean = fit.grand_mean + cov @ fit.beta_covariates
        s = np.sqrt(fit.var_pooled)
        expected = ((Y - mean) / s - fit.gamma_star[idx]) / np.sqrt(fit.delta_star[idx]) * s + mean
        np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-9)


@FUZZ
@given(
    fit=st.sampled_from(FITS),
    rows=site_rows(p=4, c=1, labels=["new", "a"]),
    prior=st.sampled_from(["own", "own", "training"]),
)
def test_new_batches_are_estimated_finite_or_refused_clearly(fit, rows, prior):
    Y, batch, cov = rows
    est = outcome_of(lambda: estimate_new_batch(fit, Y, batch, cov, prior=prior))
    if isinstance(est, Exception):
        return
    for name in ("gamma_star", "delta_star"):
        assert np.isfinite(getattr(est, name)).all(), name
    assert (est.delta_star > 0).all()
    assert est.gamma_star[: fit.n_batches].tolist() == fit.gamma_star.tolist()
    out = outcome_of(lambda: apply_combat(est, Y, batch, cov))
    assert isinstance(out, Exception) or np.isfinite(out).all()


KEYS = [
    "beta_covariates",
    "grand_mean",
    "var_pooled",
    "gamma_star",
    "delta_star",
    "adjusted",
    "batch_levels",
    "feature_names",
    "parametric",
    "n_per_batch",
]


@FUZZ
@given(
    fit=st.sampled_from(FITS),
    key=st.sampled_from(KEYS),
    value=hostile | st.sampled_from([0.0, -1.0, 1e-320, 1e300]),
    rows=site_rows(p=4, c=1),
)
def test_a_corrupted_fit_is_refused_or_applied_finitely(fit, key, value, rows):
    """The estimates come from the coordinator: a field replaced by junk, NaN, a zero
    or negative variance, a wrong shape."""
    payload = fit.to_payload()
    original = payload["combat_" + key]
    if isinstance(original, np.ndarray) and original.dtype.kind == "f" and type(value) is float:
        value = np.full(original.shape, value)  # the same number in every cell
    payload["combat_" + key] = value
    est = outcome_of(lambda: ComBatEstimates.from_payload(payload))
    if isinstance(est, Exception):
        return
    Y, batch, cov = rows
    out = outcome_of(lambda: apply_combat(est, Y, batch, cov))
    assert isinstance(out, Exception) or (out.shape == Y.shape and np.isfinite(out).all())


# ------------------------------------------------------ the whole protocol, degenerate


@FUZZ
@given(
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    p=st.integers(1, 4),
    constant=st.lists(st.integers(0, 3), max_size=3),
    magnitude=st.sampled_from([1.0, 1e-300, 1e100, 1e160]),
    mode=st.sampled_from([(True, False), (False, False), (True, True)]),
)
def test_degenerate_federations_harmonise_finitely_or_refuse_clearly(
    sizes, p, constant, magnitude, mode
):
    """Tiny batches (one patient each), constant features, tiny or huge magnitudes."""
    rng = np.random.default_rng(len(sizes) * 10 + p)
    sites = []
    for s, n in enumerate(sizes):
        Y = rng.normal(size=(n, p)) * magnitude
        for j in constant:
            if j < p:
                Y[:, j] = 3.0 * magnitude
        sites.append((Y, [LEVELS[s]] * n, None))
    result = outcome_of(lambda: combat_in_memory(sites, parametric=mode[0], mean_only=mode[1]))
    if isinstance(result, Exception):
        return
    est, harmonised = result
    for (Y, _, _), out in zip(sites, harmonised, strict=True):
        assert np.isfinite(out).all()
        np.testing.assert_array_equal(out[:, ~est.adjusted], Y[:, ~est.adjusted])
