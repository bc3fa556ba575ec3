"""Federated LASSO logistic + K-fold CV equals the pooled fit (sklearn) and cv.glmnet's CV.

Anchor: glmnet's objective -(1/N) loglik + λ‖β‖₁ on standardised features equals
scikit-learn's L1 ``LogisticRegression`` with C = 1/(N λ) and an unpenalised intercept
(solver saga). The CV curve is recomputed from pooled rows, fold by fold, with
cv.glmnet's formulas written out here independently of the package.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit

from radfed.server.stats.lasso import (
    FederatedLassoCV,
    LassoCVResult,
    choose_lambdas,
    coordinate_descent,
    cv_curve,
    lambda_path,
    lasso_cv,
)
from radfed.shared.errors import PrivacyRefusal
from radfed.shared.privacy import PrivacyPolicy
from radfed.shared.selection_stats import answer, assign_folds
from radfed.tests.reference import glmnet_deviance, in_memory_ask, sklearn_l1

COLUMNS = [
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num",
]  # fmt: skip
# slope, ca, thal, chol (0 = not measured) and fbs are missing for most patients outside
# Cleveland; with them, dropping incomplete rows would leave one hospital.
HEART = ["age", "sex", "cp", "trestbps", "restecg", "thalach", "exang", "oldpeak"]

Site = tuple[str, np.ndarray, np.ndarray]


# --------------------------------------------------------------------------- data


def heart_sites(shared_data) -> list[Site]:
    """The four UCI hospitals as sites: outcome num > 0, incomplete rows dropped."""
    sites = []
    for name in ("cleveland", "hungarian", "switzerland", "va"):
        path = shared_data / "heart_disease" / f"processed.{name}.data"
        frame = pd.read_csv(path, header=None, names=COLUMNS, na_values=["NA", "?"])
        frame = frame[[*HEART, "num"]].dropna()
        sites.append((name, frame[HEART].to_numpy(float), (frame["num"] > 0).to_numpy(int)))
    return sites


def synthetic_sites(n: int = 520, p: int = 30, seed: int = 3) -> list[Site]:
    """Correlated features on different scales and offsets, split into 3 unequal sites."""
    rng = np.random.default_rng(seed)
    cov = 0.5 ** np.abs(np.subtract.outer(np.arange(p), np.arange(p)))
    X = rng.multivariate_normal(np.zeros(p), cov, size=n) * rng.uniform(0.5, 5, p)
    X += rng.normal(0, 10, p)
    beta = np.zeros(p)
    beta[:5] = [1.0, -0.8, 0.6, 0.5, -0.4]
    y = (rng.random(n) < expit(((X - X.mean(0)) / X.std(0)) @ beta - 0.3)).astype(int)
    cuts = np.split(np.arange(n), [90, 260])
    return [(f"site{i}", X[rows], y[rows]) for i, rows in enumerate(cuts)]


make_ask = in_memory_ask


def pooled(sites: list[Site]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    X = np.vstack([s[1] for s in sites])
    y = np.concatenate([s[2] for s in sites])
    return X, y, X.mean(axis=0), X.std(axis=0)


def run(sites: list[Site], **kw) -> LassoCVResult:
    X, _, center, scale = pooled(sites)
    names = [f"x{j}" for j in range(X.shape[1])]
    return lasso_cv(make_ask(sites), names, center, scale, **kw)


# --------------------------------------------------------------------------- oracle


def pooled_cv(sites: list[Site], lambdas: np.ndarray, k: int, seed: int):
    """cv.glmnet recomputed on the pooled rows, fold by fold, with sklearn fits."""
    X, y, center, scale = pooled(sites)
    Z = (X - center) / scale
    folds = np.concatenate([assign_folds(s[2], k, seed, s[0]) for s in sites])
    means = np.empty((k, len(lambdas)))
    coefs = np.empty((k, len(lambdas), X.shape[1] + 1))
    for f in range(k):
        train, test = folds != f, folds == f
        for i, lam in enumerate(lambdas):
            coefs[f, i] = sklearn_l1(Z[train], y[train], lam)
            eta = coefs[f, i, 0] + Z[test] @ coefs[f, i, 1:]
            means[f, i] = glmnet_deviance(eta, y[test]).mean()
    n_k = np.bincount(folds, minlength=k).astype(float)
    cvm = n_k @ means / n_k.sum()  # weighted.mean of the fold means
    cvsd = np.sqrt(n_k @ (means - cvm) ** 2 / n_k.sum() / (k - 1))
    return means, cvm, cvsd, coefs


# --------------------------------------------------------------------------- path


@pytest.fixture(scope="module")
def synth_fit() -> tuple[list[Site], LassoCVResult]:
    sites = synthetic_sites()
    return sites, run(sites, n_folds=5, n_lambdas=20, lambda_min_ratio=0.01, seed=11)


@pytest.fixture(scope="module")
def heart_fit(shared_data) -> tuple[list[Site], LassoCVResult]:
    sites = heart_sites(shared_data)
    return sites, run(sites, n_folds=5, n_lambdas=20, lambda_min_ratio=0.005, seed=7)


def kkt_residual(Z: np.ndarray, y: np.ndarray, beta: np.ndarray, lam: float) -> float:
    """Largest violation of the lasso optimality conditions on the pooled rows."""
    Zd = np.column_stack([np.ones(len(y)), Z])
    grad = Zd.T @ (expit(Zd @ beta) - y) / len(y)
    on = beta[1:] != 0
    return max(
        abs(grad[0]),
        np.abs(grad[1:][on] + lam * np.sign(beta[1:][on])).max(initial=0.0),
        (np.abs(grad[1:][~on]) - lam).max(initial=0.0),
    )


@pytest.mark.parametrize("which", ["synth_fit", "heart_fit"])
def test_path_equals_sklearn_at_every_lambda(which, request):
    sites, res = request.getfixturevalue(which)
    X, y, center, scale = pooled(sites)
    Z = (X - center) / scale
    worst = max(
        np.abs(sklearn_l1(Z, y, lam) - res.coef_path[i]).max() for i, lam in enumerate(res.lambdas)
    )
    assert worst < 1e-4, worst
    ybar = y.mean()
    expected = [np.log(ybar / (1 - ybar))] + [0] * X.shape[1]
    np.testing.assert_allclose(res.coef_path[0], expected, atol=1e-12)  # |x_jᵀr| = λ: ties
    # And the federated path satisfies the pooled optimality conditions to rounding.
    assert (
        max(kkt_residual(Z, y, b, lam) for b, lam in zip(res.coef_path, res.lambdas, strict=True))
        < 1e-9
    )
    assert res.n == len(y) and res.n_sites == len(sites)


def test_path_starts_at_lambda_max(synth_fit):
    sites, res = synth_fit
    X, y, center, scale = pooled(sites)
    Z = (X - center) / scale
    assert res.lambdas[0] == pytest.approx(np.abs(Z.T @ (y - y.mean())).max() / len(y))
    assert np.abs(res.coef_path[0, 1:]).max() < 1e-12  # nothing enters at λ_max
    assert np.count_nonzero(res.coef_path[1, 1:]) >= 1
    assert np.all(np.diff(res.lambdas) < 0)
    assert res.lambdas[-1] / res.lambdas[0] == pytest.approx(0.01)


@pytest.mark.parametrize("which", ["synth_fit", "heart_fit"])
def test_cv_curve_equals_pooled_recomputation(which, request):
    sites, res = request.getfixturevalue(which)
    seed = 11 if which == "synth_fit" else 7
    means, cvm, cvsd, coefs = pooled_cv(sites, res.lambdas, res.n_folds, seed)
    assert np.abs(res.fold_coef_path - coefs).max() < 1e-4
    X, y, center, scale = pooled(sites)
    Z = (X - center) / scale
    folds = np.concatenate([assign_folds(s[2], res.n_folds, seed, s[0]) for s in sites])
    np.testing.assert_array_equal(res.fold_n, np.bincount(folds))
    for f, path in enumerate(res.fold_coef_path):
        train = folds != f
        kkt = max(
            kkt_residual(Z[train], y[train], b, lam)
            for b, lam in zip(path, res.lambdas, strict=True)
        )
        assert kkt < 1e-9, (f, kkt)
    np.testing.assert_allclose(res.fold_deviance, means, atol=1e-4)
    np.testing.assert_allclose(res.cvm, cvm, atol=1e-4)
    np.testing.assert_allclose(res.cvsd, cvsd, atol=1e-4)
    # getOptcv.glmnet on the pooled curve picks the same λs.
    i_min = int(np.argmin(cvm))
    i_1se = int(np.flatnonzero(cvm <= cvm[i_min] + cvsd[i_min])[0])
    assert (res.index_min, res.index_1se) == (i_min, i_1se)
    assert res.lambda_min == res.lambdas[i_min] and res.lambda_1se >= res.lambda_min


def test_default_path_100_lambdas_10_folds_on_heart(shared_data):
    sites = heart_sites(shared_data)
    start = time.perf_counter()
    res = run(sites)  # glmnet defaults: 100 λ, ratio 1e-4 (N > p), 10 folds, early stop
    elapsed = time.perf_counter() - start
    assert res.n_folds == 10 and res.rounds <= 15 and elapsed < 30, (res.rounds, elapsed)
    X, y, center, scale = pooled(sites)
    Z = (X - center) / scale
    # glmnet's path stop: from the 5th λ, the fraction of deviance explained passed 0.999
    # or grew by less than 1e-5; it fires at the last λ kept and nowhere before.
    eta = res.coef_path[:, :1].T + Z @ res.coef_path[:, 1:].T
    dev = -2 * (y[:, None] * eta - np.logaddexp(0, eta)).sum(axis=0)
    null = -2 * len(y) * (y.mean() * np.log(y.mean()) + (1 - y.mean()) * np.log(1 - y.mean()))
    ratio = 1 - dev / null
    fires = (ratio[4:] > 0.999) | (np.diff(ratio)[3:] < 1e-5)
    assert 5 <= len(res.lambdas) < 100 and fires[-1] and not fires[:-1].any()
    full = lambda_path(res.lambdas[0], 100, 1e-4)
    np.testing.assert_allclose(res.lambdas, full[: len(res.lambdas)])
    for i in np.linspace(0, len(res.lambdas) - 1, 10).astype(int):  # a spread of 10 λ
        assert np.abs(sklearn_l1(Z, y, res.lambdas[i]) - res.coef_path[i]).max() < 1e-4
    assert res.cvm[res.index_min] == res.cvm.min()
    # Without the stop, all 100 λ are fitted and the kept ones are unchanged.
    whole = run(sites, path_stop=None)
    assert len(whole.lambdas) == 100
    np.testing.assert_allclose(whole.coef_path[: len(res.lambdas)], res.coef_path, atol=1e-9)


def test_sliding_window_gives_the_same_path(synth_fit):
    sites, res = synth_fit
    log: list = []
    X, _, center, scale = pooled(sites)
    names = [f"x{j}" for j in range(X.shape[1])]
    kw = {"n_folds": 5, "n_lambdas": 20, "lambda_min_ratio": 0.01, "seed": 11}
    small = lasso_cv(make_ask(sites, log), names, center, scale, max_fits_per_round=18, **kw)
    assert max(len(r["problem_folds"]) for r, _ in log) <= 18
    np.testing.assert_allclose(small.coef_path, res.coef_path, atol=1e-9)
    np.testing.assert_allclose(small.cvm, res.cvm, atol=1e-9)
    assert small.rounds > res.rounds


# --------------------------------------------------------------------------- pieces


def test_choose_lambdas_follows_getoptcv():
    lambdas = np.array([1.0, 0.5, 0.25, 0.125, 0.0625])
    cvm = np.array([1.30, 1.10, 1.00, 1.00, 1.05])  # tie at the minimum: larger λ wins
    cvsd = np.array([0.05, 0.05, 0.12, 0.02, 0.02])
    assert choose_lambdas(lambdas, cvm, cvsd) == (2, 1)  # 1.10 <= 1.00 + 0.12
    assert choose_lambdas(lambdas, cvm, np.zeros(5)) == (2, 2)


def test_cv_curve_weights_folds_by_size():
    dev = np.array([[2.0, 4.0], [9.0, 3.0]])  # summed deviance, fold x λ
    n_k = np.array([1.0, 3.0])
    means, cvm, cvsd = cv_curve(dev, n_k)
    np.testing.assert_allclose(means, [[2.0, 4.0], [3.0, 1.0]])
    np.testing.assert_allclose(cvm, [(2 + 9) / 4, (4 + 3) / 4])
    expected = np.sqrt((1 * (2 - 2.75) ** 2 + 3 * (3 - 2.75) ** 2) / 4 / 1)
    assert cvsd[0] == pytest.approx(expected)


def test_coordinate_descent_solves_the_penalised_quadratic():
    rng = np.random.default_rng(0)
    M = rng.normal(size=(40, 6))
    A = (M.T @ M / 40)[None]
    c = rng.normal(size=(1, 6))
    lam = np.array([0.3])
    beta = coordinate_descent(A, c, np.zeros((1, 6)), lam)[0]
    grad = A[0] @ beta - c[0]  # KKT: grad_0 = 0; |grad_j| <= λ, = -λ sign(β_j) if β_j != 0
    assert abs(grad[0]) < 1e-10
    on = beta[1:] != 0
    np.testing.assert_allclose(grad[1:][on], -lam[0] * np.sign(beta[1:][on]), atol=1e-10)
    assert np.all(np.abs(grad[1:][~on]) <= lam[0] + 1e-12)


def test_assign_folds_is_stratified_seeded_and_per_site():
    y = np.r_[np.zeros(47, int), np.ones(23, int)]
    folds = assign_folds(y, 10, seed=5, site_name="a")
    assert folds.shape == y.shape and set(folds) == set(range(10))
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 1
    for c in (0, 1):
        per = np.bincount(folds[y == c], minlength=10)
        assert per.max() - per.min() <= 1
    np.testing.assert_array_equal(folds, assign_folds(y, 10, seed=5, site_name="a"))
    assert not np.array_equal(folds, assign_folds(y, 10, seed=5, site_name="b"))
    assert not np.array_equal(folds, assign_folds(y, 10, seed=6, site_name="a"))


def test_replies_are_aggregates_whatever_the_site_size():
    sites = synthetic_sites(n=400, p=8)
    log: list = []
    _, _, center, scale = pooled(sites)
    res = lasso_cv(
        make_ask(sites, log), [f"x{j}" for j in range(8)], center, scale, n_folds=4, n_lambdas=7
    )
    assert res.rounds == len(log)
    for request, replies in log:
        B = len(request["problem_folds"])
        shapes = {tuple(np.shape(v)) for r in replies for v in r.values()}
        assert shapes <= {(B, 9, 9), (B, 9), (B,), (4,), ()}, shapes
    assert len(log[0][0]["problem_folds"]) == 5  # round 1: each fold once, at β = 0
    assert max(len(r["problem_folds"]) for r, _ in log) <= 5 * 7


def test_site_refuses_small_folds():
    X = np.random.default_rng(1).normal(size=(20, 3))
    y = np.r_[np.zeros(10, int), np.ones(10, int)]
    request = {
        "step": "lasso_irls",
        "center": np.zeros(3),
        "scale": np.ones(3),
        "n_folds": 10,
        "seed": 0,
        "problem_folds": np.array([10]),
        "beta": np.zeros((1, 4)),
    }
    folds = assign_folds(y, 10, 0, "tiny")
    with pytest.raises(PrivacyRefusal, match="LASSO CV folds: refused by the min-cell rule"):
        answer(request, X, y, folds, 10, policy=PrivacyPolicy(min_cell=3))
    assert answer(request, X, y, folds, 10, policy=PrivacyPolicy(min_cell=2))["n"] == 20


def test_result_prints_and_writes_the_radscore(synth_fit):
    sites, res = synth_fit
    text = res.summary()
    assert "lambda.min" in text and "lambda.1se" in text and "x0" in text
    assert str(res) == text
    names = [f"feature_{j}" for j in range(30)]
    formula = res.radscore_formula(names)
    beta = res.coef_min
    assert formula.startswith(f"Radscore = {beta[0]:.3f} ")
    kept = [names[j] for j in np.flatnonzero(beta[1:])]
    assert formula.count(" * ") == len(kept) == len(res.nonzero_features)
    assert f"{abs(beta[1]):.3f} * feature_0" in formula
    # The unstandardised model gives the same linear predictor as the per-SD one.
    X, _, center, scale = pooled(sites)
    raw = res.unstandardised()
    np.testing.assert_allclose(
        raw[0] + X @ raw[1:], beta[0] + ((X - center) / scale) @ beta[1:], atol=1e-10
    )


def test_estimator_interface(shared_data):
    sites = heart_sites(shared_data)
    _, _, center, scale = pooled(sites)
    est = FederatedLassoCV(n_folds=4, n_lambdas=10, seed=3).fit(
        make_ask(sites), HEART, center, scale
    )
    assert est.coef_.shape == (len(HEART),) and len(est.lambdas_) <= 10
    assert len(est.cvm_) == len(est.lambdas_) == len(est.coef_path_)
    assert est.lambda_min_ == est.result_.lambda_min
    assert est.intercept_ == est.result_.coef_min[0]
    assert est.n_rounds_ == est.result_.rounds


# --------------------------------------------------------------------------- refusals


def separable_sites(seed: int = 0, sizes=(60, 24), p: int = 4) -> list[Site]:
    """Two sites whose outcome x0 nearly decides: near separation at small λ, where the
    small site's linear predictor saturates or its weights rest on a few patients."""
    rng = np.random.default_rng(seed)
    sites = []
    for i, n in enumerate(sizes):
        X = rng.normal(size=(n, p))
        y = (rng.random(n) < expit(15.0 * X[:, 0] + 1.5 * X[:, 1])).astype(int)
        sites.append((f"site{i}", X, y))
    return sites


def guarded_ask(sites: list[Site], policy: PrivacyPolicy, log: list | None = None):
    """In-memory sites that answer behind their privacy rules (a refusal is raised as the
    site's PrivacyRefusal); ``log`` collects (request, refused rule or None)."""

    def one(request, name, X, y):
        k, seed = request["n_folds"], request["seed"]
        return answer(request, X, y, assign_folds(y, k, seed, name), k, policy)

    def ask(request):
        try:
            replies = [one(request, *site) for site in sites]
        except PrivacyRefusal as exc:
            if log is not None:
                log.append((request, exc.rule))
            raise
        if log is not None:
            log.append((request, None))
        return replies

    return ask


def refused_by(sites: list[Site], policy: PrivacyPolicy, res, fits) -> str | None:
    """The rule by which some site refuses the fits (K folds + full data) at one λ."""
    request = {
        "step": "lasso_irls",
        "center": res.center,
        "scale": res.scale,
        "n_folds": res.n_folds,
        "seed": 1,
        "problem_folds": np.arange(res.n_folds + 1),
        "beta": fits,
    }
    try:
        guarded_ask(sites, policy)(request)
    except PrivacyRefusal as exc:
        return exc.rule
    return None


def test_a_refused_lambda_ends_the_path_where_the_pooled_path_is_cut(caplog):
    sites = separable_sites()
    X, y, center, scale = pooled(sites)
    names = [f"x{j}" for j in range(X.shape[1])]
    policy = PrivacyPolicy()
    log: list = []
    with caplog.at_level("WARNING", logger="radfed.server.stats.lasso"):
        res = lasso_cv(guarded_ask(sites, policy, log), names, center, scale, n_folds=5, seed=1)
    end = res.path_end
    assert res.ended_early and end is not None and end.rule in ("saturation", "concentration")
    assert 5 < end.index == len(res.lambdas) < 100
    assert any(rule == end.rule for _, rule in log)  # the sites did refuse rounds
    assert f"refused it by the {end.rule} rule" in caplog.text
    assert end.describe() in res.summary()
    # The same sites without privacy rules fit the whole grid; its first λ are ours, and at
    # the refused λ its fits are ones the sites refuse: the old code stopped the study.
    free = lasso_cv(make_ask(sites), names, center, scale, n_folds=5, seed=1, path_stop=None)
    L = end.index
    assert len(free.lambdas) == 100 and end.lambda_refused == free.lambdas[L]
    np.testing.assert_allclose(res.lambdas, free.lambdas[:L], rtol=1e-15)
    np.testing.assert_allclose(res.coef_path, free.coef_path[:L], atol=1e-9)
    np.testing.assert_allclose(res.fold_coef_path, free.fold_coef_path[:, :L], atol=1e-9)
    np.testing.assert_allclose(res.cvm, free.cvm[:L], atol=1e-9)
    at = lambda i: np.vstack([free.fold_coef_path[:, i], free.coef_path[i][None]])  # noqa: E731
    assert refused_by(sites, policy, res, at(L)) is not None
    assert refused_by(sites, policy, res, at(L - 1)) is None
    # The pooled reference on the truncated grid: sklearn fits, cv.glmnet's curve.
    Z = (X - center) / scale
    for i in np.linspace(0, L - 1, 8).astype(int):
        assert np.abs(sklearn_l1(Z, y, res.lambdas[i]) - res.coef_path[i]).max() < 1e-4
    _, cvm, cvsd, coefs = pooled_cv(sites, res.lambdas, 5, 1)
    assert np.abs(res.fold_coef_path - coefs).max() < 1e-4
    np.testing.assert_allclose(res.cvm, cvm, atol=1e-4)
    np.testing.assert_allclose(res.cvsd, cvsd, atol=1e-4)
    assert (res.index_min, res.index_1se) == choose_lambdas(res.lambdas, cvm, cvsd)
    # A sliding window of λ meets the refusal elsewhere and ends at the same λ.
    small = lasso_cv(
        guarded_ask(sites, policy), names, center, scale, n_folds=5, seed=1, max_fits_per_round=30
    )
    assert small.path_end == end
    np.testing.assert_allclose(small.coef_path, res.coef_path, atol=1e-9)


def test_a_refusal_at_lambda_max_still_stops_the_fit():
    sites = separable_sites()
    _, _, center, scale = pooled(sites)
    # Every model but β = 0 "saturates": the fits at λ_max are refused too.
    policy = PrivacyPolicy(saturation_logit=1e-12)
    log: list = []
    with pytest.raises(PrivacyRefusal, match="LASSO: refused by the saturation rule"):
        lasso_cv(guarded_ask(sites, policy, log), ["a", "b", "c", "d"], center, scale, n_folds=5)
    assert log[0][1] is None and log[-1][1] == "saturation"
    assert len(log[-1][0]["problem_folds"]) == 6  # the last probe: λ_max's fits alone


@pytest.mark.parametrize(
    "error",
    [
        "site0: LASSO CV folds: refused by the min-cell rule: a count would be below 3",
        "site0: the site has no feature(s) ['x3']",
        "site0: LASSO: refused by the saturation rule: ...\n  site1: no reply",
    ],
)
def test_other_refusals_and_failures_stop_the_fit_at_once(error):
    from radfed.shared.errors import FederationError

    sites = synthetic_sites(n=300, p=6)
    _, _, center, scale = pooled(sites)
    inner, calls = make_ask(sites), []

    def ask(request):
        calls.append(request)
        if len(calls) == 3:
            lines = error.split("\n")
            raise FederationError(f"task 'select' failed at {len(lines)} site(s):\n  {error}")
        return inner(request)

    with pytest.raises(FederationError, match="failed at"):
        lasso_cv(ask, [f"x{j}" for j in range(6)], center, scale, n_folds=4, n_lambdas=10)
    assert len(calls) == 3  # no retry


def test_real_sites_end_the_path_and_equal_the_pooled_reference(tmp_path, caplog):
    """Two hospitals (features.csv) behind their own privacy rules, over the in-process
    transport: the small one refuses a λ near separation (FederationError, as any
    transport raises it); the path ends before it and equals statsmodels on the pooled
    rows, with the sites' own folds, on the kept λ."""
    import hashlib

    from radfed.client.site_state import default_state_dir, read_audit
    from radfed.server.federation.inprocess import InProcessTransport
    from radfed.server.stats.solvers import pooled_standardisation
    from radfed.server.study import pooled as reference
    from radfed.server.study.phases import select_asker
    from radfed.shared.config import load_study
    from radfed.shared.errors import FederationError

    names = ["x0", "x1", "x2"]
    rng = np.random.default_rng(0)
    for i, n in enumerate((80, 36)):
        folder = tmp_path / "sites" / f"site{i}"
        folder.mkdir(parents=True)
        X = rng.normal(size=(n, 3))
        y = (rng.random(n) < expit(15.0 * X[:, 0] + 1.5 * X[:, 1])).astype(int)
        frame = pd.DataFrame(X, columns=names)
        frame.insert(0, "patient_id", [f"s{i}-{k}" for k in range(n)])
        frame.assign(outcome=y).to_csv(folder / "features.csv", index=False)
        # Fixed secrets, so that the splits and folds (and the λ refused) are always the same.
        state = default_state_dir(f"site{i}", folder.resolve())
        state.mkdir(parents=True, exist_ok=True)
        (state / "secret.key").write_bytes(hashlib.sha256(f"separable-{i}".encode()).digest())
    (tmp_path / "study.toml").write_text(
        '[study]\nname = "separable"\noutcome = "outcome"\nfeatures = ["x0", "x1", "x2"]\n'
        'seed = 5\n\n[harmonization]\nmethod = "none"\n\n[selection]\nmrmr_k = 3\nfolds = 3\n\n'
        "[tracking]\nenabled = false\n\n"
        + "".join(f'[[sites]]\nname = "site{i}"\npath = "sites/site{i}"\n\n' for i in range(2))
    )
    config = load_study(tmp_path / "study.toml")
    transport = InProcessTransport.from_study(config)
    transport.protocol = config.protocol()
    transport.ask("describe")
    transport.ask("split")
    center, scale, _ = pooled_standardisation(transport, names)
    transport.step = "lasso"
    ask = select_asker(transport, names)
    with caplog.at_level("WARNING", logger="radfed.server.stats.lasso"):
        res = lasso_cv(ask, names, center, scale, n_folds=3, seed=config.seed)
    end = res.path_end
    assert end is not None and end.sites == ("site1",) and end.rule == "concentration"
    assert len(res.lambdas) == end.index < 100 and res.rounds == transport.rounds["lasso"]
    assert "site(s) site1 refused it by the concentration rule" in caplog.text
    audit = read_audit(default_state_dir("site1", (tmp_path / "sites" / "site1").resolve()))
    refusals = [e for e in audit if e["step"] == "lasso_irls" and e["outcome"] == "refused"]
    assert refusals and {e["rule"] for e in refusals} == {"concentration"}

    table = reference.pooled_table(config)
    train = table[table["split"] == "train"]
    Z = ((train[names] - train[names].mean()) / train[names].std(ddof=0)).to_numpy()
    y = train["outcome"].to_numpy(dtype=int)
    tolerance = reference.TOLERANCE["lasso"]
    coef = np.array([reference._l1_logistic(Z, y, lam) for lam in res.lambdas])
    assert np.abs(coef - res.coef_path).max() < tolerance
    cvm = reference._lasso(train, Z, y, res.lambdas, config)
    assert np.abs(cvm - res.cvm).max() < tolerance
    assert res.index_min == int(np.argmin(cvm))
    # At the refused λ the pooled fits are what the sites refuse: the whole grid of the
    # old code could not be fitted.
    lam = end.lambda_refused
    folds = train["fold"].to_numpy()
    fits = [reference._l1_logistic(Z[folds != k], y[folds != k], lam) for k in range(3)]
    beta = np.vstack([*fits, reference._l1_logistic(Z, y, lam)])
    request = {"step": "lasso_irls", "center": center, "scale": scale, "n_folds": 3,
               "seed": config.seed, "problem_folds": np.arange(4), "beta": beta}  # fmt: skip
    with pytest.raises(FederationError, match="site1: LASSO: refused by the concentration"):
        ask(request)


# --------------------------------------------------------------------------- collinear


def collinear_sites(seed: int = 0, n: int = 150) -> list[Site]:
    """Radiomics-like features with exact linear dependencies, as PyRadiomics gives:
    Range = Maximum - Minimum and TotalEnergy = 2.5 x Energy (a fixed voxel volume)."""
    rng = np.random.default_rng(seed)
    X = rng.lognormal(0, 0.5, size=(n, 6))
    X[:, 2] = X[:, 0] - X[:, 1]
    X[:, 3] = 2.5 * X[:, 4]
    Z = (X - X.mean(0)) / X.std(0)
    y = (rng.random(n) < expit(2.0 * (Z[:, 0] - Z[:, 1] + Z[:, 4]))).astype(int)
    cuts = np.split(rng.permutation(n), [n // 3, 2 * n // 3])
    return [(f"site{i}", X[rows], y[rows]) for i, rows in enumerate(cuts)]


def test_exactly_collinear_features_fit_the_pooled_optimum():
    """Regression: on a support holding Range, Maximum and Minimum the exact active-set
    solve met a singular system, returned a 1e15-1e31 non-solution that passed its sign
    checks, and every halving of that IRLS step still raised the objective: "LASSO IRLS
    step halving failed: the objective keeps rising" (31 halvings in a row)."""
    sites = collinear_sites()
    res = run(sites, n_folds=3, n_lambdas=10, seed=0)
    X, y, center, scale = pooled(sites)
    Z = (X - center) / scale
    assert len(res.lambdas) >= 8
    # The optimum is not unique along the collinear directions; the objective, the fitted
    # linear predictor and the optimality conditions are, so those are compared.
    for i, lam in enumerate(res.lambdas):
        ref = sklearn_l1(Z, y, lam)
        eta, eta_ref = res.coef_path[i, 0] + Z @ res.coef_path[i, 1:], ref[0] + Z @ ref[1:]
        assert np.abs(eta - eta_ref).max() < 1e-3, (i, np.abs(eta - eta_ref).max())
        assert kkt_residual(Z, y, res.coef_path[i], lam) < 1e-8
    assert np.abs(res.coef_path).max() < 100
