"""Evaluation statistics against independent oracles.

Every expected value comes from somewhere other than the code under test: pROC's own
test suite (aSAH), ResourceSelection's published example (R's random numbers emulated
below), the dcurves, statsmodels, scipy and scikit-learn packages, or a direct
transcription of the published formula written here (brute-force DeLong placements,
ResourceSelection's hoslem.test with numpy and pandas).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, stats
from scipy.special import expit, logit

from radfed.server.stats import inference as inf
from radfed.shared import evaluation_stats as es
from radfed.tests.reference import delong_oracle, hoslem_oracle

ASAH = Path(__file__).parent / "data" / "asah.csv"
GRID = np.round(np.arange(1, 100) / 100, 2)  # decision curves' 0.01..0.99


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _risks(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Outcomes drawn from a logistic model and a somewhat miscalibrated risk."""
    rng = _rng(seed)
    x = rng.normal(size=n)
    y = (rng.random(n) < expit(-0.4 + 1.2 * x)).astype(int)
    p = expit(-0.2 + 0.9 * x + rng.normal(0, 0.3, n))
    return y, p


# --------------------------------------------------------------------------- DeLong


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_equals_the_pairwise_formulas_with_ties(seed):
    rng = _rng(seed)
    n = 150
    y = (rng.random(n) < 0.35).astype(int)
    # Rounded scores: ties within and across classes; one coarse 4-level score.
    a = np.round(y + rng.normal(0, 1, n), 1)
    b = np.round(0.6 * a + rng.normal(0, 0.8, n), 1)
    c = rng.integers(0, 4, n).astype(float)
    S = np.column_stack([a, b, c])
    result = es.delong(y, S)
    auc, cov = delong_oracle(y, S)
    np.testing.assert_allclose(result.auc, auc, rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.cov, cov, rtol=0, atol=1e-12)
    assert result.cov.shape == (3, 3) and result.defined
    assert (result.n_events, result.n_nonevents) == (int(y.sum()), int(n - y.sum()))


def _asah() -> tuple[np.ndarray, np.ndarray]:
    df = pd.read_csv(ASAH, comment="#")
    y = (df["outcome"] == "Poor").to_numpy().astype(int)
    return y, df[["s100b", "wfns", "ndka"]].to_numpy(dtype=float)


# pROC's expected DeLong placements of the 41 cases, in order, for roc(outcome, ndka)
# and roc(outcome, s100b): tests/testthat/helper-deLongPlacementsCpp-expected.R.
PROC_PLACEMENTS_X = {
    "ndka": [
        0.805555555555556, 0.625, 0.680555555555556, 0.763888888888889, 0.0416666666666667,
        0.277777777777778, 0.513888888888889, 0.930555555555556, 0.972222222222222,
        0.930555555555556, 0.930555555555556, 0.402777777777778, 0.722222222222222,
        0.861111111111111, 0.166666666666667, 0.25, 0.708333333333333, 0.0138888888888889,
        1, 0.861111111111111, 0.430555555555556, 0.513888888888889, 0.555555555555556,
        0.708333333333333, 0.888888888888889, 0.645833333333333, 0.861111111111111, 0.25,
        0.986111111111111, 0.756944444444444, 0.0416666666666667, 0.340277777777778,
        0.861111111111111, 0.0416666666666667, 0.333333333333333, 0.930555555555556,
        0.527777777777778, 0.722222222222222, 0.958333333333333, 0.513888888888889,
        0.763888888888889,
    ],
    "s100b": [
        0.5625, 0.4375, 0.715277777777778, 0.541666666666667, 0.902777777777778, 1,
        0.972222222222222, 0.180555555555556, 0.854166666666667, 0.347222222222222,
        0.180555555555556, 0.888888888888889, 0.875, 0.965277777777778, 1,
        0.819444444444444, 1, 1, 1, 0.180555555555556, 1, 0.833333333333333, 0,
        0.347222222222222, 0.805555555555556, 1, 0.819444444444444, 1, 0.263888888888889,
        0.819444444444444, 0.5625, 0.4375, 0.513888888888889, 0.805555555555556, 1,
        0.611111111111111, 1, 0.840277777777778, 1, 1, 0.902777777777778,
    ],
}  # fmt: skip


def test_asah_fixture_is_procs_asah():
    """The fixture reproduces pROC's own expected placements, value by value in order."""
    y, S = _asah()
    assert (len(y), int(y.sum())) == (113, 41)
    for col, name in ((2, "ndka"), (0, "s100b")):
        cases, controls = S[y == 1, col], S[y == 0, col]
        psi = (cases[:, None] > controls[None, :]) + 0.5 * (cases[:, None] == controls[None, :])
        np.testing.assert_allclose(psi.mean(axis=1), PROC_PLACEMENTS_X[name], atol=1e-14)


def test_delong_reproduces_procs_test_suite_on_asah():
    """pROC tests/testthat: test-var.R, test-cov.R, test-ci.auc.R, test-roc.test.R."""
    y, S = _asah()
    r = es.delong(y, S)  # s100b, wfns, ndka
    auc = [0.731368563685637, 0.823678861788618, 0.611957994579946]
    var = [0.00266868245717244, 0.00146991470882363, 0.0031908105493913]
    np.testing.assert_allclose(r.auc, auc, rtol=1e-13)
    np.testing.assert_allclose(r.var, var, rtol=1e-12)
    assert r.cov[2, 1] == pytest.approx(-0.000532967856762438, rel=1e-12)  # wfns, ndka
    assert r.cov[2, 0] == pytest.approx(-0.000756164938056579, rel=1e-12)  # ndka, s100b
    assert r.cov[0, 1] == pytest.approx(0.00119615567376754, rel=1e-12)  # s100b, wfns
    # ci.auc(r.ndka) (DeLong): 0.5012 - 0.6120 - 0.7227
    lo, hi = inf.auc_ci(r.auc[2], r.var[2])
    assert (lo, hi) == pytest.approx((0.501244999271703, 0.722670989888189), rel=1e-12)
    # roc.test(r.wfns, r.s100b), roc.test(r.wfns, r.ndka), roc.test(r.ndka, r.s100b)
    for i, j, z, p in [
        (1, 0, 2.20898359144091, 0.0271757822291882),
        (1, 2, 2.79777591868904, 0.00514557970691098),
        (2, 0, -1.39077002573558, 0.164295175223054),
    ]:
        test = inf.delong_test(r.auc, r.cov, i, j)
        assert test.diff == pytest.approx(r.auc[i] - r.auc[j], abs=1e-15)
        assert test.z == pytest.approx(z, rel=1e-12)
        assert test.pvalue == pytest.approx(p, rel=1e-11)
    # pROC's documentation example, roc.test(s100b, wfns): Z = -2.209, p-value = 0.02718
    _, z, p = inf.delong_test(r.auc, r.cov, 0, 1)
    assert (round(z, 3), round(p, 5)) == (-2.209, 0.02718)


def test_delong_test_of_identical_curves_is_z0_p1():
    y, S = _asah()
    r = es.delong(y, S[:, [1, 1]])
    assert tuple(inf.delong_test(r.auc, r.cov, 0, 1)) == (0.0, 0.0, 1.0)
    # The same curves as two fits round them: a difference and a variance of rounding
    # size (the variance even negative) are still identical curves, not z = nan.
    noisy = r.cov + np.array([[0.0, 1e-19], [1e-19, 3e-19]])
    auc = r.auc + np.array([0.0, 1e-16])
    assert tuple(inf.delong_test(auc, noisy, 0, 1))[1:] == (0.0, 1.0)


def test_auc_ci_is_normal_on_the_auc_scale_truncated_to_0_1():
    z = stats.norm.ppf(0.975)
    lo, hi = inf.auc_ci(np.array([0.7, 0.99]), np.array([0.0025, 0.0004]))
    np.testing.assert_allclose(lo, [0.7 - z * 0.05, 0.99 - z * 0.02], rtol=1e-14)
    np.testing.assert_allclose(hi, [0.7 + z * 0.05, 1.0], rtol=1e-14)
    lo90, hi90 = inf.auc_ci(0.7, 0.0025, level=0.9)
    z90 = 1.6448536269514722
    assert (lo90, hi90) == pytest.approx((0.7 - z90 * 0.05, 0.7 + z90 * 0.05), rel=1e-14)


def test_hanley_mcneil_se_is_the_exact_variance_under_the_exponential_model():
    """Var(AUC) = [A(1-A) + (m-1)(Q1-A²) + (n-1)(Q2-A²)]/(mn) with Q1, Q2 integrated for
    exponential scores (non-events rate 1, events rate 1/theta), where Hanley-McNeil's
    Q1 = A/(2-A) and Q2 = 2A²/(1+A) are exact."""
    m, n = 41, 72
    for theta in (1.0, 2.5, 7.0):

        def f_y(t):  # non-event density, Exp(1)
            return np.exp(-t)

        def s_x(t, theta=theta):  # event survival, Exp(rate 1/theta)
            return np.exp(-t / theta)

        def f_x(t, theta=theta):
            return np.exp(-t / theta) / theta

        a = integrate.quad(lambda t: f_y(t) * s_x(t), 0, np.inf)[0]  # P(X > Y)
        q1 = integrate.quad(lambda t: f_y(t) * s_x(t) ** 2, 0, np.inf)[0]  # P(X1, X2 > Y)
        q2 = integrate.quad(lambda t: f_x(t) * (1 - f_y(t)) ** 2, 0, np.inf)[0]  # P(X > Y1, Y2)
        var = (a * (1 - a) + (m - 1) * (q1 - a * a) + (n - 1) * (q2 - a * a)) / (m * n)
        assert inf.hanley_mcneil_se(a, m, n) == pytest.approx(np.sqrt(var), rel=1e-9)


# ------------------------------------------------------------------ threshold counts


def test_threshold_counts_count_p_at_or_above_each_threshold():
    y, p = _risks(300)
    P = np.column_stack([p, np.round(p, 2)])  # the rounded model puts scores on the grid
    tp, fp = es.threshold_counts(y, P, GRID)
    assert tp.shape == fp.shape == (2, len(GRID))
    for j in range(2):
        for i, t in enumerate(GRID):
            assert tp[j, i] == np.sum((P[:, j] >= t) & (y == 1))
            assert fp[j, i] == np.sum((P[:, j] >= t) & (y == 0))


def test_net_benefit_equals_dcurves():
    from dcurves import dca

    data = pd.read_csv(Path(dca.__code__.co_filename).parent / "data" / "df_binary.csv")
    models = ["cancerpredmarker", "famhistory", "marker"]
    data["marker"] = expit(data["marker"] - 1)  # a third, continuous risk
    thresholds = [i / 100 for i in range(1, 100)]
    ref = dca(data=data, outcome="cancer", modelnames=models, thresholds=thresholds)
    y = data["cancer"].to_numpy().astype(int)
    tp, fp = es.threshold_counts(y, data[models].to_numpy(), thresholds)
    nb = inf.net_benefit(tp, fp, len(y), thresholds)
    for j, model in enumerate(models):
        expected = ref.loc[ref["model"] == model, "net_benefit"].to_numpy()
        np.testing.assert_allclose(nb[j], expected, rtol=0, atol=1e-12)
    all_ = ref.loc[ref["model"] == "all", "net_benefit"].to_numpy()
    treat_all = inf.net_benefit_treat_all(int(y.sum()), len(y), thresholds)
    np.testing.assert_allclose(treat_all, all_, rtol=0, atol=1e-12)


def test_youden_cutoff_is_the_first_maximum_of_j_on_the_grid():
    y, p = _risks(400, seed=3)
    tp, fp = es.threshold_counts(y, p, GRID)
    m, n = int(y.sum()), int(len(y) - y.sum())
    cut = inf.youden_cutoff(tp[0], fp[0], m, n, GRID)
    sens = np.array([np.mean(p[y == 1] >= t) for t in GRID])
    spec = np.array([np.mean(p[y == 0] < t) for t in GRID])
    j = sens + spec - 1
    best = np.flatnonzero(j == j.max())[0]
    assert (cut.index, cut.threshold) == (best, GRID[best])
    assert (cut.sensitivity, cut.specificity) == pytest.approx((sens[best], spec[best]))
    # A tie between thresholds 0.2 and 0.4 goes to the lower one.
    grid = np.array([0.1, 0.2, 0.3, 0.4])
    tied = inf.youden_cutoff(np.array([10, 8, 7, 6]), np.array([10, 4, 4, 2]), 10, 10, grid)
    assert (tied.index, tied.threshold, tied.youden) == (1, 0.2, pytest.approx(0.4))


def test_clopper_pearson_equals_scipy_exact_binomial_interval():
    for n in (1, 7, 41, 113):
        for x in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            for level in (0.95, 0.9):
                ref = stats.binomtest(x, n).proportion_ci(confidence_level=level, method="exact")
                lo, hi = inf.clopper_pearson(x, n, level)
                # scipy finds the limits by brentq (xtol 2e-12)...
                assert (lo, hi) == pytest.approx((ref.low, ref.high), rel=0, abs=1e-11)
                # ...so also check the defining tail equations, to rounding.
                tail = (1 - level) / 2
                if x > 0:
                    assert stats.binom.sf(x - 1, n, lo) == pytest.approx(tail, rel=1e-12)
                if x < n:
                    assert stats.binom.cdf(x, n, hi) == pytest.approx(tail, rel=1e-12)
    lo, hi = inf.clopper_pearson(np.array([0, 3, 5]), np.array([5, 5, 5]))
    assert lo.shape == hi.shape == (3,)


# ---------------------------------------------------------------- auc_from_counts


def test_auc_from_counts_is_exact_when_scores_lie_on_the_grid():
    rng = _rng(4)
    grid = np.round(np.arange(0, 101) / 100, 2)
    y, p = _risks(500, seed=4)
    P = np.column_stack([np.round(p, 2), grid[rng.integers(0, 101, len(y))]])
    tp, fp = es.threshold_counts(y, P, grid)
    m, n = int(y.sum()), int(len(y) - y.sum())
    got = inf.auc_from_counts(tp, fp, m, n)
    for j in range(2):
        mwu = stats.mannwhitneyu(P[y == 1, j], P[y == 0, j]).statistic / (m * n)
        assert got[j] == pytest.approx(mwu, abs=1e-12)
        assert inf.auc_from_counts(tp[j], fp[j], m, n) == pytest.approx(mwu, abs=1e-12)


def test_auc_from_counts_is_within_its_bound_off_the_grid():
    from sklearn.metrics import roc_auc_score

    for seed in range(3):
        y, p = _risks(400, seed=seed)
        tp, fp = es.threshold_counts(y, p, GRID)
        m, n = int(y.sum()), int(len(y) - y.sum())
        approx = inf.auc_from_counts(tp[0], fp[0], m, n)
        bound = inf.auc_grid_error_bound(tp[0], fp[0], m, n)
        exact = roc_auc_score(y, p)
        assert abs(approx - exact) <= bound + 1e-15
        assert 0 < bound < 0.01
    # A coarse grid: the bound is looser, and still holds.
    coarse = np.array([0.25, 0.5, 0.75])
    tp, fp = es.threshold_counts(y, p, coarse)
    approx = inf.auc_from_counts(tp[0], fp[0], m, n)
    assert abs(approx - exact) <= inf.auc_grid_error_bound(tp[0], fp[0], m, n)


# ----------------------------------------------------------------------- calibration


def test_calibration_bins_match_numpy_histogram():
    y, p = _risks(300, seed=5)
    p[:4] = [0.0, 0.1, 0.5, 1.0]  # values on edges: [a, b) bins, the last one closed
    edges = np.round(np.linspace(0, 1, 11), 2)
    n, observed, expected = es.calibration_bins(y, np.column_stack([p, p**2]), edges)
    for j, q in enumerate((p, p**2)):
        np.testing.assert_array_equal(n[j], np.histogram(q, edges)[0])
        np.testing.assert_array_equal(observed[j], np.histogram(q[y == 1], edges)[0])
        np.testing.assert_allclose(expected[j], np.histogram(q, edges, weights=q)[0], rtol=1e-13)


def test_hosmer_lemeshow_equals_resourceselection_transcribed():
    y, p = _risks(503, seed=6)
    for g in (10, 8):
        hl = es.hosmer_lemeshow(y, p, g)
        chisq, df = hoslem_oracle(y, p, g)
        assert hl.statistic == pytest.approx(chisq, rel=1e-12)
        assert (hl.df, hl.groups) == (df, g)
        assert hl.pvalue == pytest.approx(stats.chi2.sf(chisq, df), rel=1e-10)
        assert hl.n.sum() == len(y) and hl.observed.sum() == y.sum()


def test_hosmer_lemeshow_merges_non_unique_breaks():
    y, p = _risks(400, seed=7)
    p = np.round(p, 1)  # about ten distinct values: tied quantiles
    hl = es.hosmer_lemeshow(y, p)
    chisq, df = hoslem_oracle(y, p)
    assert hl.groups < 10 and hl.df == hl.groups - 2 == df
    assert hl.statistic == pytest.approx(chisq, rel=1e-12)
    # Fewer patients than groups: some merged intervals hold nobody and are dropped.
    few_y, few_p = np.array([0, 1, 0, 1, 1, 0, 0]), np.array([0.1, 0.9, 0.1, 0.7, 0.4, 0.2, 0.1])
    few = es.hosmer_lemeshow(few_y, few_p)
    chisq, df = hoslem_oracle(few_y, few_p)
    assert (few.statistic, few.df) == (pytest.approx(chisq, rel=1e-12), df)
    assert np.all(few.n > 0)


class _RMersenneTwister:
    """R's default generator (Mersenne-Twister, Inversion) after ``set.seed(seed)``:
    R_RNG.c's initial scrambling, MT19937, and rnorm's 2^27 two-draw inversion."""

    def __init__(self, seed: int) -> None:
        s = seed & 0xFFFFFFFF
        for _ in range(50):
            s = (69069 * s + 1) & 0xFFFFFFFF
        state = []
        for _ in range(625):
            s = (69069 * s + 1) & 0xFFFFFFFF
            state.append(s)
        self.mt, self.mti = state[1:], 624  # dummy[0] is mti, reset to N

    def unif(self) -> float:
        mt = self.mt
        if self.mti >= 624:
            for kk in range(624):
                y = (mt[kk] & 0x80000000) | (mt[(kk + 1) % 624] & 0x7FFFFFFF)
                mt[kk] = mt[(kk + 397) % 624] ^ (y >> 1) ^ (0x9908B0DF if y & 1 else 0)
            self.mti = 0
        y = mt[self.mti]
        self.mti += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        y ^= y >> 18
        u = y * 2.3283064365386963e-10
        return u if u > 0 else 0.5 * 2.328306437080797e-10  # R's fixup: never 0

    def rnorm(self) -> float:
        big = 134217728
        u = int(big * self.unif()) + self.unif()
        return float(stats.norm.ppf(u / big))

    def rbinom1(self, prob: float) -> int:
        """rbinom(1, 1, prob): inversion with p = min(prob, 1 - prob)."""
        q = 1.0 - min(prob, 1.0 - prob)
        ix = int(self.unif() >= q)
        return 1 - ix if prob > 0.5 else ix


def test_hosmer_lemeshow_reproduces_resourceselections_published_example():
    """ResourceSelection's hoslem.test example (reference/hoslem.test.md):

    set.seed(123); n <- 500; x <- rnorm(n); y <- rbinom(n, 1, plogis(0.1 + 0.5*x))
    m <- glm(y ~ x, family=binomial); hoslem.test(m$y, fitted(m))
    #> X-squared = 4.5227, df = 8, p-value = 0.8072
    """
    import statsmodels.api as sm

    rng = _RMersenneTwister(123)
    assert [round(rng.rnorm(), 7) for _ in range(3)] == [-0.5604756, -0.2301775, 1.5587083]
    rng = _RMersenneTwister(123)
    x = np.array([rng.rnorm() for _ in range(500)])
    y = np.array([rng.rbinom1(pr) for pr in expit(0.1 + 0.5 * x)])
    fitted = sm.Logit(y, sm.add_constant(x)).fit(disp=0, tol=1e-12, maxiter=100).predict()
    hl = es.hosmer_lemeshow(y, fitted)
    assert (round(hl.statistic, 4), hl.df, round(hl.pvalue, 4)) == (4.5227, 8, 0.8072)


def test_hosmer_lemeshow_from_bins_drops_empty_bins():
    n = np.array([0, 12, 30, 25, 0, 8])
    observed = np.array([0, 1, 6, 10, 0, 6])
    expected = np.array([0.0, 1.5, 5.2, 11.0, 0.0, 5.1])
    hl = inf.hosmer_lemeshow_from_bins(n, observed, expected)
    keep = n > 0
    o, e, nn = observed[keep], expected[keep], n[keep]
    chisq = np.sum((o - e) ** 2 / e + ((nn - o) - (nn - e)) ** 2 / (nn - e))
    assert hl.statistic == pytest.approx(chisq, rel=1e-13)
    assert (hl.df, hl.groups) == (2, 4)
    assert hl.pvalue == pytest.approx(stats.chi2.sf(chisq, 2), rel=1e-12)


def test_calibration_fit_equals_statsmodels_logit_on_logit_p():
    import statsmodels.api as sm

    for seed in range(3):
        y, p = _risks(400, seed=seed)
        fit = es.calibration_fit(y, p)
        ref = sm.Logit(y, sm.add_constant(logit(p))).fit(disp=0, tol=1e-12, maxiter=100)
        assert (fit.intercept, fit.slope) == pytest.approx(tuple(ref.params), rel=1e-8)
        citl = es.calibration_in_the_large(y, p)
        glm = sm.GLM(y, np.ones((len(y), 1)), family=sm.families.Binomial(), offset=logit(p))
        ref_citl = glm.fit(tol=1e-12).params[0]
        assert citl == pytest.approx(ref_citl, rel=1e-8, abs=1e-12)


def test_brier_is_the_mean_squared_error():
    y, p = _risks(200, seed=8)
    from sklearn.metrics import brier_score_loss

    assert es.brier(y, p) == pytest.approx(brier_score_loss(y, p), rel=1e-14)
    ones = np.ones(5, dtype=int)  # one class only: still defined
    assert es.brier(ones, np.full(5, 0.8)) == pytest.approx(0.04)


# --------------------------------------------------------------------- meta-analysis


def test_random_effects_equals_statsmodels_dersimonian_laird():
    from statsmodels.stats.meta_analysis import combine_effects

    eff = np.array([0.2, 0.5, 0.9, 0.4, 0.75, 0.3])
    var = np.array([0.01, 0.02, 0.015, 0.03, 0.01, 0.04])
    res = inf.random_effects(eff, var, names=list("ABCDEF"))
    ref = combine_effects(eff, var, method_re="dl")
    assert ref.tau2 > 0  # heterogeneous: statsmodels does not truncate tau² at 0
    assert res.estimate == pytest.approx(ref.mean_effect_re, rel=1e-13)
    assert res.se == pytest.approx(ref.sd_eff_w_re, rel=1e-13)
    assert (res.ci_low, res.ci_upp) == pytest.approx(tuple(ref.conf_int()[1]), rel=1e-13)
    assert res.tau2 == pytest.approx(ref.tau2, rel=1e-13)
    assert res.i2 == pytest.approx(ref.i2, rel=1e-13)
    assert res.q == pytest.approx(ref.q, rel=1e-13)
    assert res.q_pvalue == pytest.approx(ref.test_homogeneity().pvalue, rel=1e-12)
    np.testing.assert_allclose(res.weights, ref.weights_rel_re, rtol=1e-13)
    # Prediction interval, Higgins et al. (2009): mu ± t_{k-2} sqrt(tau² + se²).
    half = stats.t.ppf(0.975, len(eff) - 2) * np.sqrt(ref.tau2 + ref.sd_eff_w_re**2)
    assert (res.pi_low, res.pi_upp) == pytest.approx(
        (ref.mean_effect_re - half, ref.mean_effect_re + half), rel=1e-12
    )
    text = str(res)
    assert "DerSimonian-Laird" in text and f"{res.estimate:.4f}" in text and "F" in text
    assert res.to_dict()["weights"] == pytest.approx(list(res.weights))


def test_random_effects_truncates_tau2_at_zero_to_the_fixed_effect_result():
    from statsmodels.stats.meta_analysis import combine_effects

    eff = np.array([0.50, 0.52, 0.49, 0.51])
    var = np.array([0.01, 0.02, 0.015, 0.01])
    with np.errstate(invalid="ignore"):  # statsmodels takes sqrt of its negative tau²
        ref = combine_effects(eff, var, method_re="dl")
    assert ref.q < len(eff) - 1  # homogeneous
    res = inf.random_effects(eff, var)
    assert (res.tau2, res.i2) == (0.0, 0.0)
    assert res.estimate == pytest.approx(ref.mean_effect_fe, rel=1e-13)
    assert res.se == pytest.approx(ref.sd_eff_w_fe, rel=1e-13)


def test_random_effects_auc_pools_logit_auc_and_back_transforms():
    from statsmodels.stats.meta_analysis import combine_effects

    auc = np.array([0.72, 0.81, 0.65, 0.77, 0.88])
    var = np.array([0.0020, 0.0015, 0.0030, 0.0012, 0.0009])
    res = inf.random_effects_auc(auc, var)
    ref = combine_effects(np.log(auc / (1 - auc)), var / (auc * (1 - auc)) ** 2, method_re="dl")
    lo, hi = ref.conf_int()[1]
    assert res.estimate == pytest.approx(1 / (1 + np.exp(-ref.mean_effect_re)), rel=1e-13)
    assert (res.ci_low, res.ci_upp) == pytest.approx(
        (1 / (1 + np.exp(-lo)), 1 / (1 + np.exp(-hi))), rel=1e-13
    )
    assert res.tau2 == pytest.approx(ref.tau2, rel=1e-12) and res.scale == "logit"
    assert res.pi_low < res.ci_low < res.estimate < res.ci_upp < res.pi_upp < 1
    assert "logit" in res.summary()
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        inf.random_effects_auc(np.array([0.7, 1.0]), np.array([0.01, 0.0]))


def _tied_extreme_group(risk: float, outcome: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """60 patients whose lowest (or highest) decile of risk is 6 patients tied at
    ``risk``: 5 with the expected outcome and 1 with the other."""
    y, p = _risks(60, seed=seed)
    k = np.argsort(p)[:6] if risk < 0.5 else np.argsort(p)[-6:]
    p[k], y[k] = risk, 1 - outcome
    y[k[0]] = outcome
    return y, p


@pytest.mark.parametrize(
    ("risk", "outcome"),
    [(0.0, 1), (1.0, 0), (5e-324, 1), (1e-310, 1)],
    ids=["zero-event", "one-nonevent", "subnormal-event", "underflow-event"],
)
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_hosmer_lemeshow_with_an_expected_count_that_underflows(risk, outcome):
    """A group where the model gave an event no representable chance. ResourceSelection
    (transcribed, with IEEE division as R's) gives X-squared = Inf, and R's
    ``1 - pchisq(Inf, df)`` is 0. The fuzzing found statistic inf with p-value NaN and
    an overflow warning. Now the statistic stays infinite (its true value exceeds the
    largest double), the p-value is 0 and a note says why: for the site's deciles, for
    validation degrees of freedom and for the coordinator's pooled bins alike."""
    y, p = _tied_extreme_group(risk, outcome, seed=11)
    if risk in (0.0, 1.0):
        with np.errstate(divide="ignore"):
            chisq, df = hoslem_oracle(y, p)
        assert chisq == np.inf
    else:  # pandas' cut cannot take subnormal breaks: R's term for the group, by hand
        with np.errstate(over="ignore"):
            assert (1 - 6 * risk) ** 2 / (6 * risk) == np.inf
        df = 8
    for hl, dof in (
        (es.hosmer_lemeshow(y, p), df),
        (es.hosmer_lemeshow(y, p, validation=True), df + 2),
    ):
        assert hl.statistic == np.inf and hl.df == dof
        assert hl.pvalue == 0.0 == stats.chi2.sf(np.inf, dof)
        assert "expected count is zero or underflows" in hl.note
    n, observed, expected = es.calibration_bins(y, p, es.BIN_EDGES)
    pooled = inf.hosmer_lemeshow_from_bins(n[0], observed[0], expected[0], validation=True)
    assert (pooled.statistic, pooled.pvalue) == (np.inf, 0.0) and pooled.note


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_hosmer_lemeshow_tiny_but_representable_expected_counts_stay_finite():
    """Risks of 1e-300 for a group with an event: a huge but finite statistic, as the
    transcription; a subnormal risk for a group without event adds nothing."""
    y, p = _tied_extreme_group(1e-300, 1, seed=12)
    hl = es.hosmer_lemeshow(y, p)
    chisq, df = hoslem_oracle(y, p)
    assert 1e299 < hl.statistic < np.inf and hl.statistic == pytest.approx(chisq, rel=1e-12)
    assert hl.df == df and hl.pvalue == stats.chi2.sf(chisq, df) == 0.0 and hl.note is None
    y[p == 1e-300] = 0
    finite = hoslem_oracle(y, p)
    p[p == 1e-300] = 5e-324
    hl = es.hosmer_lemeshow(y, p)
    assert hl.statistic == pytest.approx(finite[0], rel=1e-12) and hl.note is None
    assert hl.pvalue == pytest.approx(stats.chi2.sf(finite[0], finite[1]), rel=1e-10)


# ------------------------------------------------------------------ undefined cases


def test_one_class_gives_nan_not_an_error():
    y0 = np.zeros(20, dtype=int)
    p = np.linspace(0.05, 0.95, 20)
    r = es.delong(y0, np.column_stack([p, p]))
    assert np.isnan(r.auc).all() and np.isnan(r.cov).all() and not r.defined
    assert np.isnan(es.calibration_fit(y0, p)).all()
    assert np.isnan(es.calibration_in_the_large(y0, p))
    tp, fp = es.threshold_counts(y0, p, GRID)
    assert np.isnan(inf.auc_from_counts(tp[0], fp[0], 0, 20))
    assert np.isnan(inf.auc_grid_error_bound(tp[0], fp[0], 0, 20))
    cut = inf.youden_cutoff(tp[0], fp[0], 0, 20, GRID)
    assert cut.index is None and np.isnan(cut.threshold)
    assert np.isnan(inf.hanley_mcneil_se(0.7, 0, 20))
    assert np.isnan(inf.auc_ci(np.nan, np.nan)).all()
    assert np.isnan(inf.delong_test(r.auc, r.cov, 0, 1)).all()


def test_other_undefined_cases_give_nan():
    y = np.array([1, 0, 0, 0, 0, 1])
    p = np.array([0.9, 0.1, 0.2, 0.3, 0.4, 0.8])
    one_event = es.delong(np.array([1, 0, 0, 0]), np.array([0.9, 0.1, 0.2, 0.3]))
    assert one_event.auc[0] == 1.0 and np.isnan(one_event.cov).all()
    assert np.isnan(es.calibration_fit(y, p)).all()  # complete separation: slope infinite
    one_group = es.hosmer_lemeshow(y, np.full(6, 0.3))
    assert np.isnan(one_group.statistic) and np.isnan(one_group.pvalue)
    assert "fewer than two groups" in one_group.note  # undefined, with the reason
    assert np.isnan(inf.clopper_pearson(0, 0)).all()
    assert np.isnan(inf.net_benefit(np.zeros(3), np.zeros(3), 0, [0.1, 0.2, 0.3])).all()
    assert np.isnan(inf.net_benefit_treat_all(0, 0, [0.1, 0.2])).all()
    assert np.isnan(es.brier(np.array([], dtype=int), np.array([])))


def test_site_replies_have_shapes_independent_of_the_number_of_patients():
    shapes = []
    for n in (40, 400):
        y, p = _risks(n, seed=n)
        P = np.column_stack([p, p**0.5, 1 - p])
        edges = np.linspace(0, 1, 11)
        tp, fp = es.threshold_counts(y, P, GRID)
        r = es.delong(y, P)
        bins = es.calibration_bins(y, P, edges)
        shapes.append((r.auc.shape, r.cov.shape, tp.shape, fp.shape, *(b.shape for b in bins)))
    assert shapes[0] == shapes[1] == ((3,), (3, 3), (3, 99), (3, 99), (3, 10), (3, 10), (3, 10))


def test_malformed_input_raises():
    with pytest.raises(ValueError, match="only 0 and 1"):
        es.delong(np.array([0, 2, 1]), np.array([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="finite"):
        es.delong(np.array([0, 1, 1]), np.array([0.1, np.nan, 0.3]))
    with pytest.raises(ValueError, match="shape"):
        es.threshold_counts(np.array([0, 1]), np.array([0.1, 0.2, 0.3]), GRID)
    with pytest.raises(ValueError, match="increasing"):
        es.calibration_bins(np.array([0, 1]), np.array([0.1, 0.2]), [0.5, 0.2])
    with pytest.raises(ValueError, match="probabilities"):
        es.calibration_fit(np.array([0, 1]), np.array([0.1, 1.2]))
    with pytest.raises(ValueError, match="non-increasing"):
        inf.auc_from_counts(np.array([1, 2, 3]), np.array([3, 2, 1]), 5, 5)
