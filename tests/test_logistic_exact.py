"""Federated logistic regression equals the pooled statsmodels fit (in-process)."""

from __future__ import annotations

import numpy as np
import pytest

from radfed.server.federation.inprocess import InProcessTransport
from radfed.server.stats.solvers import pooled_standardisation
from radfed.server.study.driver import FederatedStudy
from radfed.tests.reference import (
    assert_matches_logit,
    feature_tables,
    pooled_logit,
    pooled_training_rows,
    site_test_mask,
)


@pytest.fixture
def heart_result(heart_study):
    return FederatedStudy(heart_study, InProcessTransport.from_study(heart_study)).run()


def test_coefficients_and_standard_errors_equal_statsmodels(heart_study, heart_result):
    rows = pooled_training_rows(heart_study, feature_tables(heart_study))
    model = heart_result.to_dict()["models"]["clinical"]
    reference = pooled_logit(rows, heart_study.outcome, model["columns"])
    assert model["n"] == len(rows)
    assert_matches_logit(model, reference, tol=1e-6)
    assert model["deviance"] == pytest.approx(-2 * reference.llf, abs=1e-6)


def test_per_unit_coefficients_equal_unstandardised_fit(heart_study, heart_result):
    import statsmodels.api as sm

    rows = pooled_training_rows(heart_study, feature_tables(heart_study))
    fit = heart_result.models["clinical"]
    X = sm.add_constant(rows[fit.columns].to_numpy(dtype=float))
    raw = sm.Logit(rows["disease"].to_numpy(dtype=float), X).fit(method="newton", tol=1e-12, disp=0)
    np.testing.assert_allclose(fit.coef_per_unit, raw.params, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(fit.se_per_unit, raw.bse, rtol=1e-6, atol=1e-8)


def test_pooled_standardisation_equals_numpy(heart_study):
    transport = InProcessTransport.from_study(heart_study)
    transport.protocol = heart_study.protocol()
    columns = list(heart_study.clinical)
    mean, sd, n = pooled_standardisation(transport, columns)
    rows = pooled_training_rows(heart_study, feature_tables(heart_study))
    assert n == len(rows)
    np.testing.assert_allclose(mean, rows[columns].mean().to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(sd, rows[columns].std(ddof=0).to_numpy(), rtol=1e-10)


def test_rounds_are_recorded(heart_result):
    rounds = heart_result.rounds
    assert rounds["consistency"] == 1 and rounds["split"] == 1
    assert 1 < rounds["evaluate"] < 30  # one evaluate round, then pooled calibration fits
    # One standardisation round, then Newton rounds shared by all univariable models.
    univariable = heart_result.details["clinical_screening"]["univariable"]
    assert rounds["screening"] == 1 + max(u["iterations"] for u in univariable.values())
    assert rounds["models"] == 1 + heart_result.models["clinical"].iterations
    assert 3 <= heart_result.models["clinical"].iterations < 20


def test_per_site_auc_equals_sklearn_on_the_site_rows(heart_study, heart_result):
    from sklearn.metrics import roc_auc_score

    fit = heart_result.models["clinical"]
    for name, table in feature_tables(heart_study).items():
        cols = [heart_study.outcome, *heart_study.clinical]
        complete = table[cols].dropna()
        y = complete[heart_study.outcome].to_numpy()
        test = site_test_mask(heart_study, name, table.loc[complete.index])
        z = (complete[fit.columns].to_numpy() - fit.center) / fit.scale
        eta = fit.coef[0] + z @ fit.coef[1:]
        perf = heart_result.performance["clinical"][name]
        assert perf["test"]["auc"] == pytest.approx(roc_auc_score(y[test], eta[test]), abs=1e-12)
        assert perf["train"]["auc"] == pytest.approx(roc_auc_score(y[~test], eta[~test]), abs=1e-12)
        assert perf["test"]["n"] == test.sum()
