"""Federated mRMR selects exactly what ``mrmr.mrmr_classif`` selects on the pooled rows.

The oracle is the GPL ``mrmr-selection`` package (test-only): relevance = F-statistic,
redundancy = mean |Pearson r|, its defaults. Sites are in-memory arrays; ``ask`` runs one
federated round over them.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.feature_selection import f_classif

from radfed.server.stats.mrmr import MrmrResult, f_statistics, mrmr_federated, mrmr_select
from radfed.shared.aggregate import sum_replies
from radfed.shared.errors import PrivacyRefusal
from radfed.shared.privacy import PrivacyPolicy
from radfed.shared.selection_stats import answer, class_moments
from radfed.tests.reference import in_memory_ask

COLUMNS = [
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num",
]  # fmt: skip
# Mostly missing outside Cleveland (chol = 0 means not measured): left out so that
# dropping incomplete rows keeps all four hospitals.
UNUSED = ["chol", "fbs", "slope", "ca", "thal"]

Site = tuple[str, np.ndarray, np.ndarray]


def heart_sites(shared_data) -> tuple[list[Site], list[str]]:
    """The four UCI hospitals, chest-pain type and resting ECG one-hot encoded (p = 13)."""
    frames = []
    for name in ("cleveland", "hungarian", "switzerland", "va"):
        path = shared_data / "heart_disease" / f"processed.{name}.data"
        frame = pd.read_csv(path, header=None, names=COLUMNS, na_values=["NA", "?"])
        frames.append(frame.drop(columns=UNUSED).dropna().assign(site=name))
    pooled = pd.get_dummies(pd.concat(frames), columns=["cp", "restecg"], dtype=float)
    names = [c for c in pooled.columns if c not in ("num", "site")]
    sites = [
        (name, rows[names].to_numpy(float), (rows["num"] > 0).to_numpy(int))
        for name, rows in pooled.groupby("site", sort=False)
    ]
    return sites, names


def synthetic_sites(n: int = 450, p: int = 200, seed: int = 0) -> tuple[list[Site], list[str]]:
    """p correlated features (10 latent factors), large offsets, a constant and a copy."""
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 10))
    X = latent @ rng.normal(size=(10, p)) + 2.0 * rng.normal(size=(n, p))
    X = X * rng.uniform(0.1, 50, p) + rng.normal(0, 1e3, p)  # radiomics-like scales
    X[:, 7] = 2.5  # constant (exactly representable, so sklearn's F is NaN, not noise)
    X[:, 11] = X[:, 4]  # an exact copy of another feature
    y = (rng.random(n) < 1 / (1 + np.exp(-(latent[:, 0] - latent[:, 1])))).astype(int)
    cuts = np.split(np.arange(n), [60, 210])  # 3 sites: 60, 150, 240 patients
    names = [f"f{j:03d}" for j in range(p)]
    return [(f"site{i}", X[r], y[r]) for i, r in enumerate(cuts)], names


make_ask = in_memory_ask


def oracle(sites: list[Site], names: list[str], k: int) -> list[str]:
    """``mrmr_classif`` on the pooled rows. Imported here, under ``catch_warnings``: its
    module silences every warning of the process on import."""
    X = pd.DataFrame(np.vstack([s[1] for s in sites]), columns=names)
    y = pd.Series(np.concatenate([s[2] for s in sites]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn on constant features: warning, 0/0
        from mrmr import mrmr_classif

        return mrmr_classif(X, y, K=k, n_jobs=1, show_progress=False)


@pytest.fixture(scope="module")
def heart(shared_data):
    return heart_sites(shared_data)


@pytest.fixture(scope="module")
def synth():
    return synthetic_sites()


@pytest.mark.parametrize("k", [5, 10])
@pytest.mark.parametrize("mode", ["columns", "gram"])
def test_heart_selection_equals_mrmr_classif(heart, k, mode):
    sites, names = heart
    result = mrmr_federated(make_ask(sites), names, k=k, mode=mode)
    assert result.selected == oracle(sites, names, k)
    assert result.n == sum(len(s[2]) for s in sites) and result.n_sites == 4


@pytest.mark.parametrize("k", [5, 10, 30])
@pytest.mark.parametrize("mode", ["columns", "gram"])
def test_synthetic_selection_equals_mrmr_classif(synth, k, mode):
    sites, names = synth
    result = mrmr_federated(make_ask(sites), names, k=k, mode=mode)
    assert result.selected == oracle(sites, names, k)
    assert "f007" not in result.selected  # the constant feature


def test_radiomics_sized_selection_equals_mrmr_classif():
    # p = 1300 features as pyradiomics gives; 30 picks, as seed 000.
    sites, names = synthetic_sites(n=300, p=1300, seed=8)
    log: list = []
    result = mrmr_federated(make_ask(sites, log), names, k=30)
    assert result.selected == oracle(sites, names, 30)
    # Per site: 2 x 2 x 1300 moments, then per round the asked columns of 1300 (the 29
    # picks before the last, and up to 3 likely next ones with each) and the 1300 sums
    # of squares: at most ~1.2 MB, not 13.5 MB.
    sent = sum(np.size(v) for _, replies in log for v in replies[0].values())
    columns = [len(request["columns"]) for request, _ in log[1:]]
    assert sent == 2 + 4 * 1300 + sum(m * 1300 + 1300 + 1 for m in columns)
    assert sum(columns) >= 29 and max(columns) <= 4 and result.rounds == 1 + len(columns) < 30


def test_centering_with_pooled_moments_changes_nothing(synth):
    sites, names = synth
    X = np.vstack([s[1] for s in sites])
    center, scale = X.mean(axis=0), X.std(axis=0)
    plain = mrmr_federated(make_ask(sites), names, k=30)
    shifted = mrmr_federated(make_ask(sites), names, k=30, center=center, scale=scale)
    assert shifted.selected == plain.selected
    np.testing.assert_allclose(shifted.scores, plain.scores, rtol=1e-8)


def test_relevance_is_sklearn_f_classif(synth, heart):
    for sites, _ in (synth, heart):
        X = np.vstack([s[1] for s in sites])
        y = np.concatenate([s[2] for s in sites])
        total = sum_replies(class_moments(s[1], s[2], [0, 1]) for s in sites)
        ours = f_statistics(total["n"], total["sum"], total["sumsq"])
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # sklearn: "Features [7] are constant"
            ref = f_classif(X, y)[0]
        varying = np.ptp(X, axis=0) > 0
        # Both use one-pass sums; features with offsets 1e3 x their SD lose ~8 digits.
        np.testing.assert_allclose(ours[varying], ref[varying], rtol=1e-6, atol=1e-6)
        assert np.all(ours[~varying] == 0) and np.all(np.isnan(ref[~varying]))


def test_constant_feature_gets_zero_relevance_not_rounding_noise():
    y = np.random.default_rng(0).integers(0, 2, 100)
    X = np.full((100, 1), 3.7)
    total = class_moments(X, y, [0, 1])
    ours = f_statistics(total["n"], total["sum"], total["sumsq"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        noise = f_classif(X, y)[0][0]  # sklearn: Σx² - (Σx)²/n of 3.7s is not exactly 0
    assert ours[0] == 0.0 and noise != 0.0


def test_multiclass_relevance():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(300, 6)) + np.arange(6)
    y = rng.integers(0, 3, 300)
    X[:, 2] += y
    parts = np.array_split(np.arange(300), 3)
    total = sum_replies(class_moments(X[r], y[r], [0, 1, 2]) for r in parts)
    ours = f_statistics(total["n"], total["sum"], total["sumsq"])
    np.testing.assert_allclose(ours, f_classif(X, y)[0], rtol=1e-9)


def test_rounds_and_reply_shapes(synth):
    sites, names = synth
    p = len(names)
    log: list = []
    result = mrmr_federated(make_ask(sites, log), names, k=10, prefetch=0)
    assert result.rounds == len(log) == 10  # 1 round of moments + one per pick but the last
    first_request, first_replies = log[0]
    assert first_request["step"] == "mrmr_moments"
    for reply in first_replies:
        assert {k: np.shape(v) for k, v in reply.items()} == {
            "n": (2,),
            "sum": (2, p),
            "sumsq": (2, p),
        }
    for request, replies in log[1:]:
        assert request["step"] == "mrmr_cross" and len(request["columns"]) == 1
        for reply in replies:
            assert {k: np.shape(v) for k, v in reply.items()} == {
                "cross": (p, 1),
                "sumsq": (p,),
                "n": (),
            }
    # Round t asks for the column of the feature picked at t - 1.
    picked = [names.index(s) for s in result.selected]
    assert [r["columns"][0] for r, _ in log[1:]] == picked[:-1]

    log.clear()
    gram = mrmr_federated(make_ask(sites, log), names, k=10, mode="gram")
    assert gram.rounds == len(log) == 1
    assert np.shape(log[0][1][0]["xtx"]) == (p, p)


def test_prefetched_columns_save_rounds_and_change_no_pick(synth):
    """With each pick's column, the next-best candidates' columns come in the same
    round; a pick already fetched costs none. The picks equal mrmr-selection's."""
    sites, names = synth
    expected = oracle(sites, names, 10)
    log: list = []
    one = mrmr_federated(make_ask(sites, log), names, k=10, prefetch=0)
    assert one.rounds == 10 and one.selected == expected
    for prefetch in (1, 3, 8):
        log.clear()
        ahead = mrmr_federated(make_ask(sites, log), names, k=10, prefetch=prefetch)
        assert ahead.selected == expected
        np.testing.assert_allclose(ahead.scores, one.scores, rtol=1e-12)
        assert ahead.rounds == len(log) < one.rounds
        fetched: list[int] = []
        for request, replies in log[1:]:
            columns = request["columns"]
            assert 1 <= len(columns) <= 1 + prefetch
            assert not set(columns) & set(fetched)  # no column asked twice
            fetched += columns
            assert all(np.shape(r["cross"]) == (len(names), len(columns)) for r in replies)
        picked = [names.index(s) for s in ahead.selected]
        assert set(picked[:-1]) <= set(fetched)


def test_mrmr_select_from_summed_statistics(synth):
    sites, names = synth
    total = sum_replies(class_moments(s[1], s[2], [0, 1], gram=True) for s in sites)
    result = mrmr_select(total, names, k=12)
    assert isinstance(result, MrmrResult)
    assert result.selected == oracle(sites, names, 12)
    assert result.scores[0] == result.relevance[result.selected_index[0]]
    assert result.redundancy[0] == 1.0 and np.all(result.redundancy[1:] >= 0.001)
    np.testing.assert_allclose(
        result.scores, result.relevance[result.selected_index] / result.redundancy
    )


def test_k_larger_than_informative_features():
    rng = np.random.default_rng(2)
    X = np.column_stack([rng.normal(size=120), np.full(120, 2.0), rng.normal(size=120)])
    y = np.r_[np.zeros(60, int), np.ones(60, int)]
    X[:, 2] += y
    sites = [("a", X[:50], y[:50]), ("b", X[50:], y[50:])]
    names = ["x", "const", "z"]
    result = mrmr_federated(make_ask(sites), names, k=10)
    assert result.selected == oracle(sites, names, 10) == ["z", "x"]


def test_copy_of_the_selected_features_scores_zero():
    # mrmr-selection replaces a mean |r| of exactly 1 by +inf, so a copy of everything
    # selected so far scores 0 (it is picked only when nothing else is left).
    rng = np.random.default_rng(5)
    a = rng.normal(size=200)
    y = (a + rng.normal(size=200) > 0).astype(int)
    X = np.column_stack([a, a])
    sites = [("a", X[:80], y[:80]), ("b", X[80:], y[80:])]
    names = ["a", "a_copy"]
    result = mrmr_federated(make_ask(sites), names, k=2)
    assert result.selected == oracle(sites, names, 2) == ["a", "a_copy"]
    assert result.scores[-1] == 0.0
    # A linear copy too: the package's exact test of 1.0 depends on the last bit of
    # np.corrcoef there; radfed treats |mean r - 1| <= 1e-10 as 1.
    X[:, 1] = 2 * a + 1
    sites = [("a", X[:80], y[:80]), ("b", X[80:], y[80:])]
    assert mrmr_federated(make_ask(sites), names, k=2).scores[-1] == 0.0


def test_summary_is_printable(heart):
    sites, names = heart
    result = mrmr_federated(make_ask(sites), names, k=5)
    text = result.summary()
    assert str(result) == text
    for name in result.selected:
        assert name in text
    assert f"Rounds: {result.rounds} (columns)" in text and result.rounds < 5


def test_site_refuses_small_class_counts():
    X = np.random.default_rng(0).normal(size=(10, 3))
    y = np.r_[np.zeros(8, int), np.ones(2, int)]
    request = {"step": "mrmr_moments", "classes": [0, 1]}
    with pytest.raises(PrivacyRefusal, match="mRMR class moments: refused by the min-cell rule"):
        answer(request, X, y, policy=PrivacyPolicy(min_cell=3))
    assert answer(request, X, y, policy=PrivacyPolicy(min_cell=2))["n"].tolist() == [
        8,
        2,
    ]


def test_missing_values_are_refused():
    X = np.ones((5, 2))
    X[0, 0] = np.nan
    with pytest.raises(ValueError, match="missing"):
        class_moments(X, np.r_[0, 0, 1, 1, 1], [0, 1])
