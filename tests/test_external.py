"""External validation: leave-one-site-out and validation-only sites, against pooled
references fitted without the held-out hospital (statsmodels), pROC's DeLong formulas
and statsmodels' DerSimonian-Laird meta-analysis."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy.special import expit, logit

from radfed.server.federation.inprocess import InProcessTransport
from radfed.server.study.driver import FederatedStudy
from radfed.shared.config import load_study
from radfed.tests.conftest import HEART_CLINICAL, heart_study_text
from radfed.tests.reference import delong_oracle, feature_tables, pooled_logit, pooled_rows

SITES = ["cleveland", "hungarian", "va"]


def _run(heart_dir, **kwargs):
    (heart_dir / "study.toml").write_text(heart_study_text(SITES, loso=True, **kwargs))
    config = load_study(heart_dir / "study.toml")
    return config, FederatedStudy(config, InProcessTransport.from_study(config)).run()


def _reference_fit(config, tables: dict[str, pd.DataFrame]):
    """Univariable screening (p < 0.05), then the multivariable model, on pooled
    training rows of ``tables`` with statsmodels; returns a predictor of the logit."""
    train = pooled_rows(config, tables, "train")
    y = train[config.outcome].to_numpy(dtype=float)
    retained = [
        c
        for c in config.clinical
        if sm.Logit(y, sm.add_constant(train[[c]].to_numpy(float))).fit(disp=0).pvalues[1] < 0.05
    ]
    fit = pooled_logit(train, config.outcome, retained)
    mean, sd = train[retained].mean(), train[retained].std(ddof=0)

    def predict(frame: pd.DataFrame) -> np.ndarray:
        return fit.params[0] + ((frame[retained] - mean) / sd).to_numpy() @ fit.params[1:]

    return predict


def _complete(config, table: pd.DataFrame) -> pd.DataFrame:
    return table.dropna(subset=[config.outcome, *config.clinical])


def test_each_held_out_site_gets_the_model_fitted_without_it(heart_dir):
    config, result = _run(heart_dir)
    external = result.details["external"]
    assert external["status"] == "ran"
    tables = feature_tables(config)
    aucs, variances = [], []
    for held in SITES:
        entry = external["held_out"][held]
        assert entry["status"] == "ok" and entry["training_sites"] == [
            s for s in SITES if s != held
        ]
        predict = _reference_fit(config, {s: t for s, t in tables.items() if s != held})
        rows = _complete(config, tables[held])
        y = rows[config.outcome].to_numpy()
        auc, cov = delong_oracle(y, predict(rows)[:, None])
        m = entry["metrics"]["clinical"]
        assert m["n"] == len(y) and m["events"] == y.sum()
        assert m["auc"] == pytest.approx(auc[0], abs=1e-9)
        assert m["auc_se"] == pytest.approx(np.sqrt(cov[0, 0]), abs=1e-9)
        cut = entry["cutoffs"]["clinical"]
        positive = expit(predict(rows)) >= cut
        grid = np.round(np.arange(1, 100) / 100, 2)
        if m["thresholds_exact"][int(np.flatnonzero(np.isclose(grid, cut))[0])]:
            assert m["sensitivity"] == pytest.approx(positive[y == 1].mean(), abs=1e-12)
        else:  # the site merged threshold cells around the cut-off (minimum cell size)
            assert "sensitivity" in m["approximate"]
            assert abs(m["sensitivity"] - positive[y == 1].mean()) < 0.2
        aucs.append(auc[0])
        variances.append(cov[0, 0])

    from statsmodels.stats.meta_analysis import combine_effects

    aucs, variances = np.array(aucs), np.array(variances)
    theta = logit(aucs)
    var = variances / (aucs * (1 - aucs)) ** 2
    ref = combine_effects(theta, var, method_re="dl")
    # DerSimonian-Laird is reported beside the default REML/HKSJ summary (test_numerics).
    meta = external["meta"]["clinical"]["dersimonian_laird"]
    assert meta["k"] == 3
    assert meta["auc"] == pytest.approx(expit(ref.mean_effect_re), abs=1e-9)
    assert meta["tau2"] == pytest.approx(max(ref.tau2, 0.0), abs=1e-9)
    q = float(ref.q)
    assert meta["i2"] == pytest.approx(max(0.0, (q - 2) / q), abs=1e-9)


def test_validation_only_site_is_scored_by_the_study_model(heart_dir):
    config, result = _run(heart_dir, validation=("switzerland",))
    assert result.federation["validation_sites"] == ["switzerland"]
    assert "switzerland" not in result.sites  # never used to fit
    tables = feature_tables(config)
    predict = _reference_fit(config, {s: tables[s] for s in SITES})
    rows = _complete(config, tables["switzerland"])
    y = rows[config.outcome].to_numpy()
    auc, _ = delong_oracle(y, predict(rows)[:, None])
    m = result.details["external"]["validation"]["switzerland"]["metrics"]["clinical"]
    assert m["auc"] == pytest.approx(auc[0], abs=1e-9)


def test_a_site_that_cannot_be_evaluated_says_why(heart_dir):
    """A validation site with patients of one class only: AUC undefined, reason given."""
    swiss = heart_dir / "sites" / "switzerland" / "features.csv"
    frame = pd.read_csv(swiss, na_values=["NA"])
    frame[frame["disease"] == 1].to_csv(swiss, index=False, na_rep="NA")
    _, result = _run(heart_dir, validation=("switzerland",))
    entry = result.details["external"]["validation"]["switzerland"]
    assert entry["status"] == "failed"
    assert "only one class" in entry["reason"] and "no non-events" in entry["reason"]
    assert entry["metrics"]["clinical"]["status"] == "undefined"
    assert "switzerland" in result.external_table() and "only one class" in (
        result.external_table()
    )


def test_auto_needs_three_training_sites(heart_dir):
    (heart_dir / "study.toml").write_text(
        heart_study_text(["cleveland", "hungarian"]).replace(
            "leave_one_site_out = false", 'leave_one_site_out = "auto"'
        )
    )
    config = load_study(heart_dir / "study.toml")
    result = FederatedStudy(config, InProcessTransport.from_study(config)).run()
    external = result.details["external"]
    assert external["status"] == "skipped" and "three or more" in external["reason"]
    assert HEART_CLINICAL == list(config.clinical)
