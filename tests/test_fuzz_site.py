"""Property-based tests (hypothesis) of the statistics a site sends, under hostile
requests (issue 12, item 6).

A coordinator is not trusted: any request field may be of the wrong type, a string
where a number goes, nested junk, a huge array, NaN or inf, a negative or huge fold.
The properties: the site refuses (``PrivacyRefusal``) or raises its own error (a
``RadfedError``, or a ``ValueError`` its code raises on purpose, one line), never a raw
``TypeError``/``IndexError``/numpy error; NaN or inf coefficients are refused; and a
reply never carries a count between 1 and ``min_cell - 1`` nor a NaN or inf the
documentation does not promise. The real-site tests reuse the hostile coordinator of
tests/test_privacy_attacks.py (its worker, protocol and request helpers).
"""

from __future__ import annotations

import linecache
import math
import os
import traceback
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from radfed.shared import evaluation_stats as es
from radfed.shared.errors import PrivacyRefusal, RadfedError
from radfed.shared.privacy import PrivacyPolicy
from radfed.shared.selection_stats import answer, assign_folds
from radfed.tests.test_fuzz_inputs import FUZZ
from radfed.tests.test_privacy_attacks import (
    _cells_ok,
)

MIN_CELLS = [3, 5, 10]


def outcome_of(call: Callable[[], Any]) -> Any:
    """``call()``'s value, or the error it raised when that error is radfed's own: a
    ``RadfedError`` (``PrivacyRefusal`` included), or a ``ValueError`` raised by a
    ``raise`` statement of radfed's code (the statistics modules' documented error).
    Any other exception fails the test (the property); every message is one line."""
    try:
        return call()
    except RadfedError as exc:
        own = exc
    except ValueError as exc:
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        line = linecache.getline(frame.filename, frame.lineno).strip()
        if "/radfed/" not in frame.filename.replace(os.sep, "/") and not _in_package(
            frame.filename
        ):
            raise
        if not line.startswith("raise "):
            raise
        own = exc
    message = str(own).strip()
    assert message and "\n" not in message, f"{type(own).__name__}: {message!r}"
    return own


def _in_package(filename: str) -> bool:
    import radfed.shared

    root = os.path.dirname(os.path.dirname(os.path.abspath(radfed.shared.__file__)))
    path = os.path.abspath(filename)
    return path.startswith(root + os.sep) and f"{os.sep}.venv{os.sep}" not in path


def no_small_counts(counts: Any, m: int, what: str) -> None:
    values = np.atleast_1d(np.asarray(counts, dtype=float))
    assert np.all((values == 0) | (values >= m)), f"{what}: a count below {m}: {values}"


def all_finite(reply: Mapping[str, Any], where: str) -> None:
    for key, value in reply.items():
        array = np.asarray(value, dtype=float)
        assert np.all(np.isfinite(array)), f"{where}: {key} holds NaN or inf"


# ------------------------------------------------------------------------ hostile values

huge = st.sampled_from([10**6, 2**31, 2**63 - 1, -(2**63), 10**30, 1e308, -1e308])
non_finite = st.sampled_from([float("nan"), float("inf"), float("-inf")])
junk_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    huge,
    non_finite,
    st.floats(),
    st.text(max_size=5),
    st.sampled_from(["", "0", "1", "nan", "lambda.min", "all", "train"]),
)
junk = st.recursive(
    junk_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)
junk_arrays = st.one_of(
    hnp.arrays(
        st.sampled_from([np.float64, np.int64, np.bool_, np.float32]),
        hnp.array_shapes(min_dims=0, max_dims=3, max_side=6),
    ),
    hnp.arrays(np.float64, st.integers(0, 8), elements=non_finite | st.floats(-3, 3)),
    hnp.arrays(np.dtype("U3"), st.integers(0, 4)),
    st.sampled_from([np.zeros(300_000), np.ones((2, 200_000)), np.full(4, np.nan)]),
)
hostile = st.one_of(junk, junk_arrays)


def field(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a valid value, often a hostile one."""
    return st.one_of(valid, valid, hostile)


# ----------------------------------------------------------- (d) selection statistics


def site_rows(seed: int, n: int = 60, p: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(50.0, 10.0, size=(n, p))
    y = (rng.random(n) < 0.45).astype(float)
    y[:15], y[15:30] = 0.0, 1.0  # both classes, at least 15 of each
    return x, y


@st.composite
def selection_requests(draw, p: int, k: int) -> dict[str, Any]:
    vector = hnp.arrays(np.float64, p, elements=st.floats(-2, 2))
    center = hnp.arrays(np.float64, p, elements=st.floats(45, 55))
    scale = hnp.arrays(np.float64, p, elements=st.floats(8, 12))
    step = draw(field(st.sampled_from(["mrmr_moments", "mrmr_cross", "lasso_irls"])))
    n_problems = draw(st.integers(1, k + 1))
    request: dict[str, Any] = {"step": step}
    fields = {
        "classes": field(st.just([0.0, 1.0])),
        "center": field(center),
        "scale": field(scale),
        "gram": field(st.booleans()),
        "columns": field(st.lists(st.integers(0, p - 1), min_size=1, max_size=p)),
        "problem_folds": field(hnp.arrays(np.int64, n_problems, elements=st.integers(0, k))),
        "beta": field(hnp.arrays(np.float64, (n_problems, p + 1), elements=st.floats(-0.5, 0.5))),
        "extra": vector,
    }
    for key, strategy in fields.items():
        if draw(st.integers(0, 7)):  # now and then a field is missing
            request[key] = draw(strategy)
    return request


@FUZZ
@given(
    seed=st.integers(0, 3),
    min_cell=st.sampled_from(MIN_CELLS),
    data=st.data(),
)
def test_hostile_selection_requests_are_refused_or_answered_without_small_counts(
    seed, min_cell, data
):
    x, y = site_rows(seed)
    k = 3
    folds = assign_folds(y, k, seed, "site", b"secret")
    request = data.draw(selection_requests(x.shape[1], k))
    policy = PrivacyPolicy(min_cell=min_cell)
    reply = outcome_of(lambda: answer(request, x, y, folds, k, policy))
    coefficients = [request.get(key) for key in ("center", "scale", "beta")]
    if str(request.get("step")) == "lasso_irls" and any(
        isinstance(c, np.ndarray) and c.dtype.kind == "f" and not np.isfinite(c).all()
        for c in coefficients
    ):
        assert isinstance(reply, Exception), "NaN or inf coefficients were answered"
    if isinstance(reply, Exception):
        return
    all_finite(reply, str(request.get("step")))
    for key in ("n", "fold_n"):
        if key in reply:
            no_small_counts(reply[key], min_cell, key)


@FUZZ
@given(
    min_cell=st.sampled_from(MIN_CELLS),
    bad=st.sampled_from(["center", "scale", "beta"]),
    value=non_finite,
    where=st.integers(0, 2),
)
def test_non_finite_lasso_coefficients_are_refused(min_cell, bad, value, where):
    x, y = site_rows(0)
    folds = assign_folds(y, 3, 0, "site")
    request = {
        "step": "lasso_irls",
        "problem_folds": np.array([0, 3]),
        "center": x.mean(axis=0),
        "scale": x.std(axis=0),
        "beta": np.zeros((2, 4)),
    }
    request[bad] = request[bad].astype(float).copy()
    request[bad].flat[where] = value
    with pytest.raises(PrivacyRefusal):
        answer(request, x, y, folds, 3, PrivacyPolicy(min_cell=min_cell))


# ---------------------------------------------------------- (d) evaluation statistics


@st.composite
def outcomes_and_risks(draw, min_n: int = 0) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(min_n, 60))
    y = draw(hnp.arrays(np.int64, n, elements=st.integers(0, 1)))
    risks = st.one_of(st.floats(0, 1), st.sampled_from([0.0, 1.0, 0.5, 1e-300, 1 - 1e-16]))
    P = draw(hnp.arrays(np.float64, (n, draw(st.integers(1, 3))), elements=risks))
    return y, P


@FUZZ
@given(data=outcomes_and_risks(), min_cell=st.sampled_from(MIN_CELLS))
def test_threshold_counts_and_bins_sent_hold_no_small_cell(data, min_cell):
    y, P = data
    events, nonevents = int(y.sum()), int(len(y) - y.sum())
    tp, fp = es.threshold_counts(y, P, es.THRESHOLDS)
    tp, fp, _, _ = es.coarsen_threshold_counts(tp, fp, events, nonevents, min_cell)
    for j in range(P.shape[1]):
        # The totals themselves pass the site's min-cell check before any of this.
        if not (0 < events < min_cell or 0 < nonevents < min_cell):
            _cells_ok(tp[j], events, min_cell)
            _cells_ok(fp[j], nonevents, min_cell)
    n, observed, expected = es.coarsen_bins(*es.calibration_bins(y, P, es.BIN_EDGES), min_cell)
    if not (0 < events < min_cell or 0 < nonevents < min_cell):
        no_small_counts(n, min_cell, "bin n")
        no_small_counts(observed, min_cell, "bin events")
        no_small_counts(n - observed, min_cell, "bin non-events")
    assert n.sum(axis=1).tolist() == [len(y)] * P.shape[1]
    assert np.isfinite(expected).all()


@FUZZ
@given(data=outcomes_and_risks(min_n=4))
def test_evaluation_statistics_are_numbers_when_both_classes_are_there(data):
    y, P = data
    assume(0 < y.sum() < len(y))
    roc = es.delong(y, P)
    assert np.all((roc.auc >= 0) & (roc.auc <= 1))
    for j in range(P.shape[1]):
        assert np.isfinite(es.brier(y, P[:, j]))
        # A risk of 5e-324 (or 0) in a group with an event gave statistic inf with p NaN
        # and an overflow warning: now inf with p = 0 and a note, as R's hoslem.test.
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            for validation in (False, True):
                hl = es.hosmer_lemeshow(y, P[:, j], validation=validation)
                if np.isfinite(hl.statistic):
                    assert hl.note is None and (0 <= hl.pvalue <= 1 or hl.df < 1)
                elif hl.statistic == np.inf:
                    assert "underflows" in hl.note
                    assert hl.pvalue == 0.0 if hl.df >= 1 else np.isnan(hl.pvalue)
                else:  # undefined, never silently
                    assert np.isnan(hl.statistic) and np.isnan(hl.pvalue) and hl.note
        fit = es.calibration_fit(y, P[:, j])
        # NaN is the documented "undefined"; inf never is.
        assert not np.any(np.isinf(np.asarray(fit, dtype=float))), fit


# ----------------------------------------------------------- (d) privacy checks alone


LIMITS = {
    "min_cell": (1, None),
    "max_param_fraction": (0, 1),
    "saturation_logit": (0, None),
    "max_saturated_share": (0, 1),
    "max_scale_ratio": (1, None),
}


@FUZZ
@given(name=st.sampled_from(sorted(LIMITS)), value=hostile | st.sampled_from([None, "3"]))
def test_a_policy_refuses_a_limit_that_is_not_a_finite_number_in_one_line(name, value):
    """``PrivacyPolicy(min_cell=None)`` raised TypeError once, NaN or inf raised numpy's
    ``cannot convert float NaN to integer`` or an OverflowError, None for the other
    limits a TypeError; and a NaN ``saturation_logit`` or ``max_scale_ratio`` was
    accepted, switching its rule off (every comparison with NaN is false)."""
    policy = outcome_of(lambda: PrivacyPolicy(**{name: value}))
    if isinstance(policy, Exception):
        assert isinstance(policy, ValueError) and name in str(policy)
        return
    limit = getattr(policy, name)
    low, high = LIMITS[name]
    assert not isinstance(limit, bool) and math.isfinite(limit) and limit >= low
    assert high is None or limit <= high


@FUZZ
@given(
    counts=st.dictionaries(st.text(max_size=3), st.integers(0, 30), max_size=6),
    min_cell=st.integers(1, 20),
    allow_zero=st.booleans(),
)
def test_check_counts_refuses_exactly_the_small_counts(counts, min_cell, allow_zero):
    policy = PrivacyPolicy(min_cell=min_cell)
    bad = any(0 < c < min_cell or (c == 0 and not allow_zero) for c in counts.values())
    result = outcome_of(lambda: policy.check_counts(counts, "test", allow_zero=allow_zero))
    assert isinstance(result, PrivacyRefusal) == bad
    if bad:
        assert result.rule == "min-cell"
        assert not any(f" {c} " in str(result) for c in counts.values() if 0 < c < min_cell)
