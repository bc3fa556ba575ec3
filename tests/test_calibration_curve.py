"""The smooth calibration curve equals statsmodels' spline recalibration on pooled rows.

The federated curve is a logistic regression of the outcome on a cubic polynomial of
logit p, fitted by Newton on the sites' summed aggregates. The oracle rebuilds it on the
pooled rows: the reference model's predictions (statsmodels Logit), then statsmodels'
Logit of the outcome on 1, lp, lp², lp³ with its covariance.
"""

from __future__ import annotations

import numpy as np
import statsmodels.api as sm
from scipy.special import expit, logit

from radfed.server.federation.inprocess import InProcessTransport
from radfed.server.study.driver import FederatedStudy
from radfed.tests.reference import feature_tables, pooled_logit, pooled_rows


def test_smooth_calibration_curve_equals_statsmodels(heart_study):
    result = FederatedStudy(heart_study, InProcessTransport.from_study(heart_study)).run()
    tables = feature_tables(heart_study)
    train = pooled_rows(heart_study, tables, "train")
    columns = result.models["clinical"].columns
    fit = pooled_logit(train, heart_study.outcome, columns)
    mean, sd = train[columns].mean(), train[columns].std(ddof=0)
    for split in ("train", "test"):
        rows = pooled_rows(heart_study, tables, split)
        lp = fit.params[0] + ((rows[columns] - mean) / sd).to_numpy() @ fit.params[1:]
        curve = result.performance["clinical"]["pooled"][split]["calibration"]["curve"]
        assert curve["status"] == "ok"
        X = np.vander(lp, 4, increasing=True)
        y = rows[heart_study.outcome].to_numpy(dtype=float)
        ref = sm.Logit(y, X).fit(method="newton", tol=1e-12, disp=0)
        at = logit(np.asarray(curve["predicted"]))
        Xg = np.vander(at, 4, increasing=True)
        eta = Xg @ ref.params
        se = np.sqrt(np.einsum("ij,jk,ik->i", Xg, ref.cov_params(), Xg))
        np.testing.assert_allclose(curve["observed"], expit(eta), atol=1e-6)
        np.testing.assert_allclose(curve["lower"], expit(eta - 1.959964 * se), atol=1e-6)
        np.testing.assert_allclose(curve["upper"], expit(eta + 1.959964 * se), atol=1e-6)
        # Drawn over the central predictions (2nd to 98th percentile, on the sites' grid).
        assert np.mean(lp < at[0]) <= 0.05 and np.mean(lp > at[-1]) <= 0.05
