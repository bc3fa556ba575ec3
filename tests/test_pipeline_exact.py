"""The whole federated pipeline equals the pooled analysis on three real hospitals.

ComBat (neuroCombat), mRMR (mrmr-selection), LASSO (scikit-learn, C = 1/(N lambda)),
univariable screening and the clinical and nomogram models (statsmodels), each on the
pooled training rows, each to the tolerance of DESIGN.md.
"""

from __future__ import annotations

import numpy as np
import pytest
import statsmodels.api as sm

from radfed.server.federation.inprocess import InProcessTransport
from radfed.server.study.driver import FederatedStudy
from radfed.shared.messages import RADSCORE
from radfed.tests.reference import (
    assert_matches_logit,
    expand_features,
    feature_tables,
    pooled_combat,
    pooled_logit,
    pooled_training_rows,
    site_test_mask,
    standardise,
)


@pytest.fixture(params=["heart_disease", "synthetic"])
def pipeline_study(request):
    """Real tabular hospitals, and synthetic MR hospitals extracted with pyradiomics."""
    name = "heart_pipeline_study" if request.param == "heart_disease" else "synthetic_study"
    return request.getfixturevalue(name)


class CountingTransport(InProcessTransport):
    """Counts the rounds it really sends (one exchange with the sites each)."""

    sent = 0

    def _exchange(self, requests):
        self.sent += 1
        return super()._exchange(requests)


@pytest.fixture
def federated(pipeline_study):
    transport = CountingTransport.from_study(pipeline_study)
    result = FederatedStudy(pipeline_study, transport).run()
    return result, transport


@pytest.fixture
def pooled(pipeline_study):
    tables = feature_tables(pipeline_study)
    config = expand_features(pipeline_study, tables)
    rows = pooled_training_rows(config, tables)
    harmonised = pooled_combat(rows, config)
    return rows, harmonised


def test_sites_harmonise_as_neurocombat_on_pooled_data(pipeline_study, federated, pooled):
    result, transport = federated
    rows, harmonised = pooled
    features = list(harmonised.columns)
    request = {"protocol": pipeline_study.protocol(), **transport.context}
    for name, worker in transport.workers.items():
        site = worker.site(pipeline_study.protocol())
        mine = site.view(request, "train")[features].to_numpy()
        theirs = harmonised.loc[rows["site"] == name, features].to_numpy()
        assert mine.shape == theirs.shape
        # 1e-6 in units of each feature's SD: radiomics features span 1e-3 to 1e10.
        scale = harmonised[features].std(ddof=0).to_numpy()
        np.testing.assert_allclose((mine - theirs) / scale, 0, atol=1e-6)
    assert result.details["harmonization"]["batch_levels"] == sorted(transport.workers)


def test_mrmr_picks_what_mrmr_selection_picks(pipeline_study, federated, pooled):
    from mrmr import mrmr_classif

    result, _ = federated
    rows, harmonised = pooled
    k = pipeline_study.selection.mrmr_k
    expected = mrmr_classif(
        X=harmonised, y=rows[pipeline_study.outcome], K=k, show_progress=False, n_jobs=1
    )
    assert result.details["selection"]["mrmr"]["selected"] == expected


def test_lasso_path_equals_sklearn_l1_logistic(pipeline_study, federated, pooled):
    from sklearn.linear_model import LogisticRegression

    result, _ = federated
    rows, harmonised = pooled
    lasso = result.details["selection"]["lasso"]
    X = standardise(harmonised[lasso["features"]]).to_numpy()
    y = rows[pipeline_study.outcome].to_numpy()
    n = len(y)
    chosen = lasso[lasso["rule"].replace(".", "_")]
    reference = LogisticRegression(
        C=1 / (n * chosen), l1_ratio=1.0, solver="saga", tol=1e-12, max_iter=200_000, random_state=0
    ).fit(X, y)
    mine = np.array(list(lasso["coef"].values()))
    np.testing.assert_allclose(mine[0], reference.intercept_[0], atol=1e-4)
    np.testing.assert_allclose(mine[1:], reference.coef_[0], atol=1e-4)
    assert result.rounds["lasso"] < 30  # the path and all folds share rounds


def test_clinical_screening_and_models_equal_statsmodels(pipeline_study, federated, pooled):
    result, _ = federated
    rows, harmonised = pooled
    outcome = pipeline_study.outcome
    screening = result.details["clinical_screening"]
    for name, uni in screening["univariable"].items():
        X = sm.add_constant(rows[[name]].to_numpy(dtype=float))
        fit = sm.Logit(rows[outcome].to_numpy(dtype=float), X).fit(disp=0, tol=1e-12)
        assert uni["p"] == pytest.approx(fit.pvalues[1], rel=1e-6, abs=1e-12)
        assert uni["coef_per_unit"] == pytest.approx(fit.params[1], abs=1e-6)
    retained = screening["retained"]
    assert retained == [n for n, u in screening["univariable"].items() if u["p"] < 0.05]

    models = result.to_dict()["models"]
    assert_matches_logit(models["clinical"], pooled_logit(rows, outcome, retained))

    # The nomogram: the retained clinical variables plus the Radscore of the LASSO fit,
    # recomputed here from neuroCombat's harmonised features.
    lasso = result.details["selection"]["lasso"]
    beta = np.array(list(lasso["coef"].values()))
    z = standardise(harmonised[lasso["features"]]).to_numpy()
    with_score = rows.assign(**{RADSCORE: beta[0] + z @ beta[1:]})
    assert_matches_logit(
        models["nomogram"], pooled_logit(with_score, outcome, [*retained, RADSCORE])
    )
    assert_matches_logit(models["radiomics"], pooled_logit(with_score, outcome, [RADSCORE]))


def test_rounds_are_recorded_per_phase(federated):
    result, transport = federated
    rounds = result.rounds
    assert rounds["combat"] == 3
    assert rounds["consistency"] == rounds["split"] == 1
    # One evaluate round, then the pooled calibration fits and curves (Newton rounds,
    # spread over requests where a small site's parameter limit requires it).
    assert 1 < rounds["evaluate"] < 60
    assert {"standardise", "mrmr", "lasso", "models"} <= set(rounds)
    # Each round sent is counted once, under its leading phase; the leave-one-site-out
    # refits, the screening and the calibration fits share the main fit's rounds
    # (sequentially the heart-disease study took 188).
    assert sum(rounds.values()) == transport.sent <= 50


def test_clinical_auc_per_site_equals_sklearn(pipeline_study, federated):
    """Clinical variables are not harmonised, so the clinical model can be scored here
    on each site's own test rows."""
    from sklearn.metrics import roc_auc_score

    result, _ = federated
    fit = result.models["clinical"]
    tables = feature_tables(pipeline_study)
    config = expand_features(pipeline_study, tables)
    for name, table in tables.items():
        cols = [config.outcome, *config.clinical, *config.features]
        complete = table[cols].dropna()
        y = complete[pipeline_study.outcome].to_numpy()
        test = site_test_mask(pipeline_study, name, table.loc[complete.index])
        z = (complete[fit.columns].to_numpy() - fit.center) / fit.scale
        eta = fit.coef[0] + z @ fit.coef[1:]
        perf = result.performance["clinical"][name]
        assert perf["test"]["auc"] == pytest.approx(roc_auc_score(y[test], eta[test]), abs=1e-12)
        assert perf["test"]["n"] == test.sum()


def test_paired_delong_tests_equal_procs_formulas_on_the_study_data(
    pipeline_study, federated, pooled
):
    """Each site's training rows scored by the three pooled reference models (neuroCombat,
    scikit-learn LASSO, statsmodels): AUCs, DeLong CIs and paired tests as pROC."""
    from scipy import stats

    from radfed.tests.reference import delong_oracle

    result, _ = federated
    rows, harmonised = pooled
    outcome = pipeline_study.outcome
    lasso = result.details["selection"]["lasso"]
    beta = np.array(list(lasso["coef"].values()))
    z = standardise(harmonised[lasso["features"]]).to_numpy()
    with_score = rows.assign(**{RADSCORE: beta[0] + z @ beta[1:]})
    names = list(result.models)
    columns = {name: result.models[name].columns for name in names}
    fits = {name: pooled_logit(with_score, outcome, cols) for name, cols in columns.items()}
    lp = np.column_stack(
        [
            fits[name].params[0]
            + standardise(with_score[columns[name]]).to_numpy() @ fits[name].params[1:]
            for name in names
        ]
    )
    for site in result.sites:
        mine = rows["site"].to_numpy() == site
        y = rows.loc[mine, outcome].to_numpy()
        auc, cov = delong_oracle(y, lp[mine])
        for j, name in enumerate(names):
            m = result.performance[name][site]["train"]
            assert m["auc"] == pytest.approx(auc[j], abs=1e-7)
            assert m["auc_se"] == pytest.approx(np.sqrt(cov[j, j]), abs=1e-7)
        for test in result.details["evaluation"]["comparisons"][site]["train"]:
            i, k = (names.index(m) for m in test["models"])
            diff = auc[i] - auc[k]
            var = cov[i, i] + cov[k, k] - 2 * cov[i, k]
            assert test["auc_diff"] == pytest.approx(diff, abs=1e-7)
            if abs(diff) < 1e-12 and abs(var) < 1e-12:
                # Identical curves (a nomogram that kept the Radscore alone): 0/0, which
                # pROC reports as z = 0 and p = 1. Judged on the oracle's own AUCs and
                # covariance, not on sort orders, which rounding can break among ties.
                assert (test["z"], test["p"]) == (0.0, 1.0)
                continue
            zval = diff / np.sqrt(var)
            assert test["z"] == pytest.approx(zval, rel=1e-5)
            assert test["p"] == pytest.approx(2 * stats.norm.sf(abs(zval)), rel=1e-5, abs=1e-12)
