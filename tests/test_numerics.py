"""Numerics of issue 14, each against an independent reference written here.

* ties: patients with identical covariates whose scores differ by rounding count 1/2,
  as pROC counts exact ties (an O(m n) pairwise oracle of pROC's DeLong formulas);
* pooled standardisation by Chan's parallel moments, against numpy's variance of the
  pooled rows, for a feature with mean 1e9 and SD 30;
* Hosmer-Lemeshow degrees of freedom: ResourceSelection's ``hoslem.test`` (g - 2) on
  the fitting data, g on validation data;
* random-effects meta-analysis by REML with the Hartung-Knapp-Sidik-Jonkman interval,
  against a direct maximisation of the restricted likelihood, statsmodels'
  ``combine_effects`` (``use_t=True``) and metafor's published BCG example; a held-out
  site with AUC 1 is left out of the summary with its reason.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, stats
from scipy.special import expit, logit

from radfed.server.federation.inprocess import InProcessTransport
from radfed.server.stats import inference as inf
from radfed.server.stats.solvers import combine_moments, pooled_standardisation
from radfed.server.study.external import meta_analysis
from radfed.shared import evaluation_stats as es
from radfed.shared.config import load_study

# ------------------------------------------------------------------------------ ties


def _proc_pairwise(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pROC's AUC and DeLong covariance from every event/non-event pair, exact ties 1/2.

    Written from pROC's delongPlacements: V10 of a case is the mean over controls of
    psi(case, control), V01 of a control the mean over cases; S10, S01 their sample
    covariances; var = S10 / m + S01 / n."""
    cases = [i for i in range(len(y)) if y[i] == 1]
    controls = [i for i in range(len(y)) if y[i] == 0]
    k = scores.shape[1]
    v10 = np.zeros((len(cases), k))
    v01 = np.zeros((len(controls), k))
    for r in range(k):
        for a, i in enumerate(cases):
            for b, j in enumerate(controls):
                x, z = scores[i, r], scores[j, r]
                psi = 1.0 if x > z else (0.5 if x == z else 0.0)
                v10[a, r] += psi / len(controls)
                v01[b, r] += psi / len(cases)
    auc = v10.mean(axis=0)
    cov = np.cov(v10, rowvar=False, ddof=1).reshape(k, k) / len(cases)
    cov += np.cov(v01, rowvar=False, ddof=1).reshape(k, k) / len(controls)
    return auc, cov


def _duplicated_patients(seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Outcomes, exact scores and the same scores with each copy of a duplicated patient
    a few ulps apart (as ``X @ beta`` rounds identical rows differently)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(40, 2)) @ np.array([[1.2, 0.3], [-0.7, 0.9]])
    copies = rng.integers(1, 4, size=40)  # 1-3 copies: identical covariates
    exact = np.repeat(base, copies, axis=0)
    y = (rng.random(len(exact)) < expit(exact[:, 0])).astype(int)
    for start in np.cumsum(copies)[copies > 1] - copies[copies > 1]:
        y[start], y[start + 1] = 0, 1  # mixed outcomes within each duplicated patient
    ulps = rng.integers(0, 4, size=exact.shape)
    noisy = exact.copy()
    for _ in range(3):
        step = ulps > 0
        noisy[step] = np.nextafter(noisy[step], np.inf)
        ulps -= 1
    assert np.any(noisy != exact)
    return y, exact, noisy


def test_tied_scores_with_rounding_noise_count_half_as_proc():
    y, exact, noisy = _duplicated_patients()
    auc, cov = _proc_pairwise(y, exact)
    ours = es.delong(y, noisy)
    np.testing.assert_allclose(ours.auc, auc, rtol=0, atol=1e-13)
    np.testing.assert_allclose(ours.cov, cov, rtol=0, atol=1e-13)
    # Comparing the rounded scores exactly gets the ties wrong: the test can fail.
    naive = es.delong(y, noisy, rtol=0)
    assert np.max(np.abs(naive.auc - auc)) > 1e-3


def test_distinct_close_scores_are_not_merged():
    """Scores 1e-6 apart (relative) are different patients' and stay ordered."""
    y = np.array([0, 1, 0, 1, 1, 0])
    s = np.array([1.0, 1.0 + 1e-6, 2.0, 2.0 + 1e-6, 3.0, 3.0 - 1e-6])
    auc, _ = _proc_pairwise(y, s[:, None])
    assert es.delong(y, s).auc[0] == pytest.approx(auc[0], abs=1e-15)


def _hoslem_resourceselection(y, p, g=10, validation=False):
    """ResourceSelection::hoslem.test, read from its R source:
    qq <- unique(quantile(yhat, probs = seq(0, 1, 1/g)))   # type 7
    cutyhat <- cut(yhat, breaks = qq, include.lowest = TRUE)
    observed <- xtabs(cbind(y0 = 1 - y, y1 = y) ~ cutyhat)
    expected <- xtabs(cbind(yhat0 = 1 - yhat, yhat1 = yhat) ~ cutyhat)
    chisq <- sum((observed - expected)^2 / expected)
    PVAL = 1 - pchisq(chisq, g - 2)
    with g the groups formed; on validation data Hosmer, Lemeshow & Sturdivant (2013)
    refer the statistic to chi-square on g df."""
    breaks = np.unique(np.percentile(p, np.linspace(0, 100, g + 1)))
    groups = pd.cut(p, breaks, include_lowest=True)
    table = pd.DataFrame({"g": groups, "o1": y, "o0": 1 - y, "e1": p, "e0": 1 - p})
    table = table.groupby("g", observed=True).sum()
    chisq = float(
        ((table.o1 - table.e1) ** 2 / table.e1).sum()
        + ((table.o0 - table.e0) ** 2 / table.e0).sum()
    )
    df = len(table) if validation else len(table) - 2
    return chisq, df, stats.chi2.sf(chisq, df)


@pytest.mark.parametrize("validation", [False, True])
def test_hosmer_lemeshow_df_rule(validation):
    rng = np.random.default_rng(4)
    p = expit(rng.normal(-0.3, 1.2, size=257))
    y = (rng.random(257) < p).astype(int)
    for g in (10, 6):
        hl = es.hosmer_lemeshow(y, p, g, validation=validation)
        chisq, df, pvalue = _hoslem_resourceselection(y, p, g, validation)
        assert hl.statistic == pytest.approx(chisq, rel=1e-12)
        assert hl.df == df == (g if validation else g - 2)
        assert hl.pvalue == pytest.approx(pvalue, rel=1e-10)
        pooled = inf.hosmer_lemeshow_from_bins(hl.n, hl.observed, hl.expected, validation)
        assert pooled.df == df


def test_hosmer_lemeshow_groups_near_tied_predictions_together():
    y, exact, noisy = _duplicated_patients(seed=3)
    p_exact, p_noisy = expit(exact[:, 0]), expit(noisy[:, 0])
    chisq, df, _ = _hoslem_resourceselection(y, p_exact, validation=True)
    hl = es.hosmer_lemeshow(y, p_noisy, validation=True)
    assert hl.statistic == pytest.approx(chisq, rel=1e-9) and hl.df == df


# ----------------------------------------------------------------- standardisation


def test_chan_moments_equal_numpy_on_pooled_data():
    rng = np.random.default_rng(5)
    x = 1e9 + 30.0 * rng.normal(size=(500, 1))
    x = np.hstack([x, rng.normal(3.0, 2.0, size=(500, 1))])
    parts = np.split(x, [37, 200, 201, 420])  # unequal sites, one with a single row
    n, mean, m2 = combine_moments(
        [len(b) for b in parts],
        [b.mean(axis=0) for b in parts],
        [((b - b.mean(axis=0)) ** 2).sum(axis=0) for b in parts],
    )
    assert n == 500
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-14)
    # numpy on the data shifted by 1e9 (exact for these values), as the issue asks;
    # a site's mean is a float64 (ulp 1.2e-7 at 1e9), which bounds the agreement.
    shifted = x - np.array([1e9, 0.0])
    np.testing.assert_allclose(m2 / n, np.var(shifted, axis=0), rtol=1e-8)
    naive = np.sqrt((x**2).mean(axis=0) - x.mean(axis=0) ** 2)  # Σx²/n - mean²
    assert abs(naive[0] - np.std(shifted[:, 0])) > 1.0


def _energy_sites(root, seed=6):
    """Three sites whose feature ``energy`` has mean 1e9 and SD 30."""
    rng = np.random.default_rng(seed)
    sites = []
    for name, size in (("a", 60), ("b", 45), ("c", 80)):
        folder = root / "sites" / name
        folder.mkdir(parents=True)
        frame = pd.DataFrame(
            {
                "patient_id": [f"{name}{i}" for i in range(size)],
                "y": rng.integers(0, 2, size),
                "energy": 1e9 + 30.0 * rng.normal(size=size) + (5.0 if name == "b" else 0.0),
                "age": rng.normal(60, 10, size),
            }
        )
        frame.to_csv(folder / "features.csv", index=False)
        sites.append(frame)
    tables = "\n".join(f'[[sites]]\nname = "{s}"\npath = "sites/{s}"\n' for s in "abc")
    (root / "study.toml").write_text(
        f'[study]\nname = "energy"\noutcome = "y"\nclinical = ["energy", "age"]\nseed = 1\n'
        f"[tracking]\nenabled = false\n\n{tables}"
    )
    return load_study(root / "study.toml"), pd.concat(sites)


def test_pooled_standardisation_keeps_the_sd_of_a_huge_mean_feature(tmp_path):
    config, pooled = _energy_sites(tmp_path)
    transport = InProcessTransport.from_study(config)
    transport.protocol = config.protocol()
    mean, sd, n = pooled_standardisation(transport, ["energy", "age"], subset="all")
    x = pooled[["energy", "age"]].to_numpy()
    assert n == len(x)
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-14)
    # Σx²/n - mean² gave 22.6 for an SD near 29: now numpy's on the shifted data.
    shifted = x - np.array([1e9, 0.0])
    np.testing.assert_allclose(sd, np.std(shifted, axis=0), rtol=1e-8)


# --------------------------------------------------------------------- meta-analysis

# BCG vaccine trials (Colditz et al. 1994; metafor's dat.bcg): tpos, tneg, cpos, cneg.
BCG = np.array(
    [
        [4, 119, 11, 128],
        [6, 300, 29, 274],
        [3, 228, 11, 209],
        [62, 13536, 248, 12619],
        [33, 5036, 47, 5761],
        [180, 1361, 372, 1079],
        [8, 2537, 10, 619],
        [505, 87886, 499, 87892],
        [29, 7470, 45, 7232],
        [17, 1699, 65, 1600],
        [186, 50448, 141, 27197],
        [5, 2493, 3, 2338],
        [27, 16886, 29, 17825],
    ],
    dtype=float,
)


def _bcg_log_rr() -> tuple[np.ndarray, np.ndarray]:
    tpos, tneg, cpos, cneg = BCG.T
    yi = np.log(tpos / (tpos + tneg)) - np.log(cpos / (cpos + cneg))
    vi = 1 / tpos - 1 / (tpos + tneg) + 1 / cpos - 1 / (cpos + cneg)
    return yi, vi


def _reml_oracle(y: np.ndarray, v: np.ndarray) -> float:
    """τ² maximising the restricted log-likelihood, found by a bounded scalar search:
    -½ Σ log(v + τ²) - ½ log Σ w - ½ Σ w (y - μ̂)², w = 1 / (v + τ²)."""

    def negative(tau2: float) -> float:
        w = 1 / (v + tau2)
        mu = np.sum(w * y) / np.sum(w)
        return 0.5 * (np.sum(np.log(v + tau2)) + np.log(np.sum(w)) + np.sum(w * (y - mu) ** 2))

    upper = 10 * np.var(y) + 1e-3
    fit = optimize.minimize_scalar(negative, bounds=(0, upper), method="bounded",
                                   options={"xatol": 1e-14})  # fmt: skip
    return float(fit.x) if negative(fit.x) < negative(0.0) else 0.0


def _statsmodels_hksj(y, v, tau2, level=0.95):
    """statsmodels' random-effects results at a given τ²: its Paule-Mandel solver run
    for zero iterations from that τ² (combine_effects has no REML), with use_t=True."""
    from statsmodels.stats.meta_analysis import combine_effects

    return combine_effects(
        y, v, method_re="iterated", use_t=True, alpha=1 - level, tau2_start=tau2, maxiter=0
    )


EFFECTS = [
    (np.array([0.2, 0.5, 0.9, 0.4, 0.75, 0.3]), np.array([0.01, 0.02, 0.015, 0.03, 0.01, 0.04])),
    (logit(np.array([0.72, 0.81, 0.65])), np.array([0.09, 0.12, 0.05])),
    _bcg_log_rr(),
]


@pytest.mark.parametrize("y, v", EFFECTS)
def test_reml_with_hksj_equals_restricted_likelihood_and_statsmodels(y, v):
    res = inf.random_effects(y, v, method="reml", ci="hksj")
    tau2 = _reml_oracle(y, v)
    assert res.tau2 == pytest.approx(tau2, rel=1e-7, abs=1e-10)
    ref = _statsmodels_hksj(y, v, res.tau2)
    assert res.estimate == pytest.approx(ref.mean_effect_re, rel=1e-12)
    assert res.se == pytest.approx(ref.sd_eff_w_re_hksj, rel=1e-12)
    lo, hi = ref.conf_int()[3]  # the random-effects interval with the WLS (HKSJ) scale
    assert (res.ci_low, res.ci_upp) == pytest.approx((lo, hi), rel=1e-12)
    k = len(y)
    assert res.pvalue == pytest.approx(2 * stats.t.sf(abs(res.estimate / res.se), k - 1))
    np.testing.assert_allclose(res.weights, ref.weights_rel_re, rtol=1e-12)
    assert "REML" in res.summary() and "Hartung-Knapp" in res.summary()


def test_dersimonian_laird_with_hksj_equals_statsmodels():
    from statsmodels.stats.meta_analysis import combine_effects

    y, v = EFFECTS[0]
    res = inf.random_effects(y, v, method="dl", ci="hksj")
    ref = combine_effects(y, v, method_re="dl", use_t=True)
    assert res.tau2 == pytest.approx(ref.tau2, rel=1e-12)
    assert (res.ci_low, res.ci_upp) == pytest.approx(tuple(ref.conf_int()[3]), rel=1e-12)


def test_reml_reproduces_metafors_bcg_example():
    """metafor: rma(yi, vi, data = escalc("RR", ...dat.bcg)) gives tau² = 0.3132,
    estimate -0.7145, se 0.1798 (Viechtbauer 2010, J Stat Softw 36(3)); DL 0.3088."""
    y, v = _bcg_log_rr()
    reml = inf.random_effects(y, v, method="reml", ci="wald")
    assert reml.tau2 == pytest.approx(0.3132, abs=5e-5)
    assert reml.estimate == pytest.approx(-0.7145, abs=5e-5)
    assert reml.se == pytest.approx(0.1798, abs=5e-5)
    assert inf.random_effects(y, v, method="dl").tau2 == pytest.approx(0.3088, abs=5e-5)


def test_hksj_is_wider_than_wald_with_three_heterogeneous_sites():
    auc = np.array([0.84, 0.87, 0.74])
    var = np.array([0.022, 0.025, 0.057]) ** 2
    wald = inf.random_effects_auc(auc, var, method="dl", ci="wald")
    hksj = inf.random_effects_auc(auc, var, method="reml", ci="hksj")
    assert hksj.ci_upp - hksj.ci_low > 2 * (wald.ci_upp - wald.ci_low)


def _held_out(aucs: dict[str, tuple[float, float]]) -> dict:
    return {
        site: {
            "status": "ok",
            "metrics": {"nomogram": {"status": "ok", "auc": auc, "auc_se": se, "n": 50}},
        }
        for site, (auc, se) in aucs.items()
    }


def test_meta_analysis_defaults_to_reml_hksj_on_logit_auc():
    sites = {"a": (0.84, 0.022), "b": (0.87, 0.025), "c": (0.74, 0.057), "d": (0.79, 0.04)}
    meta = meta_analysis(_held_out(sites), ["nomogram"])["nomogram"]
    auc = np.array([a for a, _ in sites.values()])
    se = np.array([s for _, s in sites.values()])
    y, v = logit(auc), se**2 / (auc * (1 - auc)) ** 2
    tau2 = _reml_oracle(y, v)
    ref = _statsmodels_hksj(y, v, tau2)
    assert meta["tau2"] == pytest.approx(tau2, rel=1e-7, abs=1e-10)
    assert meta["auc"] == pytest.approx(expit(ref.mean_effect_re), rel=1e-7)
    np.testing.assert_allclose(meta["ci"], expit(ref.conf_int()[3]), rtol=1e-7)
    assert meta["k"] == 4 and meta["tau2_method"] == "reml" and meta["ci_method"] == "hksj"
    assert "REML" in meta["method"] and "HKSJ" in meta["method"]
    dl = meta["dersimonian_laird"]
    assert "DL" in dl["method"] and dl["ci"][1] - dl["ci"][0] < meta["ci"][1] - meta["ci"][0]


def test_held_out_site_with_auc_one_is_left_out_with_its_reason():
    sites = {"a": (0.84, 0.022), "b": (1.0, 0.0), "c": (0.74, 0.057), "d": (0.79, 0.04)}
    meta = meta_analysis(_held_out(sites), ["nomogram"])["nomogram"]
    assert meta["k"] == 3 and meta["sites"] == ["a", "c", "d"]
    assert "complete separation" in meta["excluded"]["b"]
    three = meta_analysis(_held_out({s: sites[s] for s in "acd"}), ["nomogram"])["nomogram"]
    assert meta["auc"] == three["auc"]
    # With only one site left the summary is not estimated, and says why.
    lonely = meta_analysis(_held_out({s: sites[s] for s in "ab"}), ["nomogram"])["nomogram"]
    assert lonely["k"] == 1 and "two" in lonely["reason"] and "b" in lonely["excluded"]


def test_validation_site_auc_counts_identical_patients_as_ties(tmp_path, monkeypatch, shared_data):
    """VA validates the clinical model on its 97 complete patients, two groups of whom
    share age, sex and blood pressure with different outcomes: the AUC is pROC's on
    exact values (one linear predictor per covariate pattern).

    Whether BLAS splits such ties by an ulp depends on the memory alignment of the
    design matrix (it did in the heart-disease study: AUC off by 6.5e-4), so this check
    cannot force the rounding; :func:`test_tied_scores_with_rounding_noise_count_half_as_proc`
    does, with explicit ulps."""
    from radfed.api import Federation, LogisticRegression, validate
    from radfed.experiments.heart_disease import read_hospital

    monkeypatch.setenv("RADFED_SITE_STATE", str(tmp_path / "state"))
    columns = ["age", "sex", "trestbps"]
    used = ["disease", *columns, "cp", "chol", "fbs", "restecg", "thalach", "exang", "oldpeak"]
    frames = {
        s: read_hospital(s, shared_data / "heart_disease").dropna(subset=used)
        for s in ("cleveland", "hungarian", "va")
    }
    fed = Federation.from_frames(
        frames, outcome="disease", clinical=columns, seed=3, validation=["va"]
    )
    model = LogisticRegression(columns).fit(fed)
    metrics = validate(fed, {"clinical": model})["va"]["metrics"]["clinical"]
    rows = frames["va"]
    assert metrics["n"] == len(rows) == 97
    assert rows.groupby(columns)["disease"].nunique().gt(1).sum() == 2
    patterns = rows[columns].drop_duplicates()
    z = (patterns.to_numpy(float) - model.center_) / model.scale_
    lp = rows.merge(patterns.assign(lp=model.intercept_ + z @ model.coef_), on=columns)["lp"]
    auc, cov = _proc_pairwise(rows["disease"].to_numpy(), lp.to_numpy()[:, None])
    assert metrics["auc"] == pytest.approx(auc[0], abs=1e-12)
    assert metrics["auc_se"] == pytest.approx(np.sqrt(cov[0, 0]), abs=1e-12)


@pytest.mark.parametrize(
    "y, v", [*EFFECTS, (np.array([0.8, 0.8, 0.8]), np.array([0.01, 0.02, 0.03]))]
)
def test_reml_that_does_not_settle_falls_back_to_the_bounded_maximum(y, v):
    """Fisher scoring stopped after one step (as a run once hit at 200): the bounded
    search of the restricted likelihood gives the same τ² (0 on the boundary), not an
    error that stops the study."""
    tau2 = inf.tau2_reml(y, v, max_iter=1)
    assert tau2 == pytest.approx(_reml_oracle(y, v), rel=1e-5, abs=1e-9)
