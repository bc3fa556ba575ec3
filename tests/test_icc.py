"""Federated ICC from the sites' sums equals pingouin's on the pooled long table.

pingouin 0.7 names ICC(2,1) "ICC(A,1)" (two-way random, absolute agreement, single
rater) and ICC(3,1) "ICC(C,1)" (two-way mixed, consistency, single rater).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from radfed.server.stats.reproducibility import pooled_anova, reproducibility
from radfed.shared.errors import FederationError
from radfed.shared.reproducibility_stats import complete_ratings, site_icc_sums

pg = pytest.importorskip("pingouin")
PINGOUIN = {"ICC2": "ICC(A,1)", "ICC3": "ICC(C,1)"}


def cohort(
    seed: int, sizes: tuple[int, ...], k: int, p: int, max_offset: float = 3.0
) -> list[np.ndarray]:
    """Per site, ratings (subjects x raters x features) with site shifts, rater bias and
    features on very different scales (1e-3 to 1e3, as radiomics features), each offset
    by up to 10**max_offset of its own scale."""
    rng = np.random.default_rng(seed)
    scale = 10.0 ** rng.uniform(-3, 3, p)
    offset = scale * 10.0 ** rng.uniform(0, max_offset, p)
    reliability = rng.uniform(0.2, 3.0, p)  # subject SD / rater-noise SD
    bias = rng.normal(0, 0.3, (k, p))
    sites = []
    for s, n in enumerate(sizes):
        subject = rng.normal(0.5 * s, 1, (n, 1, p)) * reliability
        noise = rng.normal(0, 1, (n, k, p))
        sites.append(offset + scale * (subject + noise + bias))
    return sites


def pingouin_icc(pooled: np.ndarray, kind: str) -> np.ndarray:
    n, k, p = pooled.shape
    out = np.empty(p)
    for j in range(p):
        long = pd.DataFrame(
            {
                "subject": np.repeat(np.arange(n), k),
                "rater": np.tile(np.arange(k), n),
                "rating": pooled[:, :, j].ravel(),
            }
        )
        table = pg.intraclass_corr(long, targets="subject", raters="rater", ratings="rating")
        out[j] = table.set_index("Type").loc[PINGOUIN[kind], "ICC"]
    return out


def replies(sites: list[np.ndarray], name: str = "inter_reader") -> dict[str, dict]:
    return {
        f"site{i}": {f"{name}_{k}": v for k, v in site_icc_sums(x).items()}
        for i, x in enumerate(sites)
    }


@pytest.mark.parametrize(("k", "sizes"), [(2, (17, 9, 25)), (3, (6, 11))])
def test_federated_icc_equals_pingouin_pooled(k, sizes):
    sites = cohort(k, sizes, k, p=12)
    pooled = np.concatenate(sites)
    features = [f"f{j}" for j in range(pooled.shape[2])]
    result = reproducibility(features, replies(sites), ["inter_reader"], "ICC2", 0.75)
    table = result.comparisons["inter_reader"]
    assert table["n"] == sum(sizes) and table["raters"] == k
    for kind in ("ICC2", "ICC3"):
        mine = np.array([table[kind][f] for f in features])
        theirs = pingouin_icc(pooled, kind)
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-9)
    # The filtered list is the one pingouin's ICC(A,1) gives, in the input order.
    expected = [f for f, v in zip(features, pingouin_icc(pooled, "ICC2"), strict=True) if v >= 0.75]
    assert result.kept == expected
    assert 0 < len(expected) < len(features)  # the threshold really filters
    assert set(result.dropped) == set(features) - set(expected)


def test_centred_sums_keep_precision_where_raw_sums_would_not():
    """A feature whose mean is 1e7 times its SD: against exact rational arithmetic."""
    from fractions import Fraction

    sites = cohort(3, (6, 11), 3, p=1, max_offset=0)
    sites = [1e6 + 0.02 * x / np.abs(x).max() for x in sites]  # mean 1e6, SD ~0.01
    pooled = np.concatenate(sites)[:, :, 0]
    n, k = pooled.shape
    x = [[Fraction(float(v)) for v in row] for row in pooled]
    g = sum(sum(r) for r in x) / (n * k)
    ssr = k * sum((sum(r) / k - g) ** 2 for r in x)
    ssc = n * sum((sum(r[c] for r in x) / n - g) ** 2 for c in range(k))
    sse = sum((v - g) ** 2 for r in x for v in r) - ssr - ssc
    msr, msc, mse = ssr / (n - 1), ssc / (k - 1), sse / ((n - 1) * (k - 1))
    exact = {
        "ICC2": float((msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n)),
        "ICC3": float((msr - mse) / (msr + (k - 1) * mse)),
    }
    table = reproducibility(["f"], replies(sites), ["inter_reader"]).comparisons["inter_reader"]
    for kind, value in exact.items():
        assert abs(table[kind]["f"] - value) < 1e-9, kind


def test_icc3_threshold_and_several_comparisons_must_all_pass():
    inter = cohort(5, (15, 15), 2, p=10)
    intra = cohort(6, (12, 14), 2, p=10)
    features = [f"f{j}" for j in range(10)]
    merged = {
        site: replies(inter, "inter_reader")[site] | replies(intra, "intra_reader")[site]
        for site in ("site0", "site1")
    }
    result = reproducibility(features, merged, ["inter_reader", "intra_reader"], "ICC3", 0.6)
    ok_inter = pingouin_icc(np.concatenate(inter), "ICC3") >= 0.6
    ok_intra = pingouin_icc(np.concatenate(intra), "ICC3") >= 0.6
    assert result.kept == [
        f for f, a, b in zip(features, ok_inter, ok_intra, strict=True) if a and b
    ]
    assert ok_inter.sum() != (ok_inter & ok_intra).sum()  # the second comparison matters


def test_site_without_readers_counts_nothing():
    sites = cohort(7, (10, 12), 2, p=4)
    features = list("abcd")
    with_empty = replies([*sites, np.empty((0, 2, 4))])
    alone = reproducibility(features, replies(sites), ["inter_reader"])
    both = reproducibility(features, with_empty, ["inter_reader"])
    assert both.comparisons["inter_reader"]["ICC2"] == alone.comparisons["inter_reader"]["ICC2"]
    assert both.comparisons["inter_reader"]["n_per_site"]["site2"] == 0
    none = reproducibility(features, replies([np.empty((0, 2, 4))]), ["inter_reader"])
    assert none.kept == features and none.comparisons["inter_reader"]["n"] == 0


def test_constant_feature_is_dropped_with_its_reason():
    x = cohort(8, (9,), 2, p=2)[0]
    x[:, :, 1] = 5.0
    result = reproducibility(["a", "b"], replies([x]), ["inter_reader"])
    assert result.kept == ["a"] or result.kept == []
    assert "undefined (no variance)" in result.dropped["b"]
    assert result.comparisons["inter_reader"]["ICC2"]["b"] is None


def test_sums_are_aggregates_and_bad_inputs_are_refused():
    x = cohort(9, (8,), 2, p=3)[0]
    sums = site_icc_sums(x)
    assert sums["col_dev"].shape == (3, 2) and sums["ss"].shape == (3,)
    with pytest.raises(ValueError, match="finite"):
        site_icc_sums(np.where(np.arange(3) == 1, np.nan, x))
    kept = complete_ratings([x[:, 0], np.where(np.arange(8)[:, None] == 2, np.nan, x[:, 1])])
    assert kept.shape == (7, 2, 3)
    with pytest.raises(FederationError, match="at least two subjects"):
        pooled_anova([site_icc_sums(x[:1])])


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"icc_threshold": 1.5}, r"icc_threshold must be in \[0, 1\]"),
        ({"icc_threshold": True}, r"icc_threshold must be in \[0, 1\]"),
        ({"icc_type": "ICC1"}, r"icc_type must be 'ICC2' or 'ICC3'"),
    ],
)
def test_study_file_icc_settings_are_checked(tmp_path, table, message):
    from radfed.shared.config import parse_study
    from radfed.shared.errors import StudyConfigError

    data = {
        "study": {"name": "s", "outcome": "y", "features": ["f*"]},
        "selection": table,
        "sites": [{"name": "a", "path": "a"}],
    }
    with pytest.raises(StudyConfigError, match=message):
        parse_study(data, tmp_path)
    ok = parse_study({**data, "selection": {"icc_threshold": 0.9, "icc_type": "ICC3"}}, tmp_path)
    assert (ok.selection.icc_threshold, ok.selection.icc_type) == (0.9, "ICC3")


# ------------------------------------------------ large magnitudes (fuzzing, item 2)


@pytest.mark.parametrize("power", [500, 520, 600, 900, 1000, -1000])
def test_icc_of_huge_features_equals_pingouin_on_the_same_ratings(power):
    """Ratings of 1e150 and beyond: squares of 1e154 overflowed (ICC None for every
    feature). Scaling the ratings by a power of two is exact and leaves every ICC
    unchanged, so pingouin on the unscaled ratings is the reference; at 2**500 (3e150)
    pingouin also runs on the huge ratings themselves."""
    base = cohort(power % 7, (17, 9, 25), 2, p=8)
    sites = [np.ldexp(x, power) for x in base]
    assert all(np.isfinite(x).all() for x in sites)
    features = [f"f{j}" for j in range(8)]
    table = reproducibility(features, replies(sites), ["inter_reader"]).comparisons["inter_reader"]
    for kind in ("ICC2", "ICC3"):
        mine = np.array([table[kind][f] for f in features], dtype=float)
        theirs = pingouin_icc(np.concatenate(base), kind)
        np.testing.assert_allclose(mine, theirs, rtol=1e-9, atol=0)
        if power == 500:
            direct = pingouin_icc(np.concatenate(sites), kind)
            np.testing.assert_allclose(mine, direct, rtol=1e-9, atol=0)


def test_icc_with_site_means_of_opposite_signs_near_the_largest_double():
    """Ratings up to 5.6e307 and site means of ±1e307: the sites' own squares and the
    coordinator's between-site terms (m_s − M)² overflowed; with the common unit the
    ICCs are pingouin's on the same ratings scaled down by 2**1010 (exact)."""
    base = cohort(4, (12, 15, 9), 3, p=5, max_offset=1)
    base[1] = -base[1]  # a site whose means have the other sign
    sites = [np.ldexp(x, 1010) for x in base]
    assert max(np.abs(x).max() for x in sites) > 5e307
    features = [f"f{j}" for j in range(5)]
    table = reproducibility(features, replies(sites), ["inter_reader"]).comparisons["inter_reader"]
    for kind in ("ICC2", "ICC3"):
        mine = np.array([table[kind][f] for f in features], dtype=float)
        theirs = pingouin_icc(np.concatenate(base), kind)
        assert np.all((theirs > 0.85) & (theirs < 0.995))  # informative, not 1 - 1e-13
        np.testing.assert_allclose(mine, theirs, rtol=1e-9, atol=0)


def test_site_sums_are_the_unscaled_sums_times_a_power_of_two_exactly():
    """What a site sends: the centred sums of before, scaled by 2**-exponent exactly,
    with the exponent of the RMS deviation (an aggregate: n and ss give it anyway)."""
    x = cohort(10, (11,), 3, p=6)[0]
    x[:, :, 5] = 7.25  # a constant feature
    sums = site_icc_sums(x)
    mean = x.mean(axis=(0, 1))
    centred = x - mean
    e = sums["exponent"]
    assert np.array_equal(e, np.round(e)) and sums["exponent"].shape == (6,)
    np.testing.assert_array_equal(sums["mean"], mean)
    np.testing.assert_array_equal(
        np.ldexp(sums["col_dev"], e[:, None].astype(int)), centred.sum(0).T
    )
    np.testing.assert_array_equal(np.ldexp(sums["ss"], 2 * e.astype(int)), (centred**2).sum((0, 1)))
    rms = np.sqrt((centred**2).mean(axis=(0, 1)))[:5]
    assert np.all((2.0 ** (e[:5] - 1) <= rms) & (rms < 2.0 ** e[:5]))
    assert sums["ss"][5] == 0 and sums["row_ss"][5] == 0


def test_non_finite_or_malformed_site_sums_are_refused():
    sums = site_icc_sums(cohort(11, (8,), 2, p=3)[0])
    for key, bad in (("ss", np.array([1.0, np.inf, 2.0])), ("exponent", np.array([0.5, 0, 0]))):
        with pytest.raises(FederationError, match=key):
            pooled_anova([{**sums, key: bad}])
