"""The Python API (radfed.api): the docs walkthrough reproduces `radfed run`, and the
estimators equal independent pooled fits (statsmodels, numpy) and follow scikit-learn's
contract."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm

from radfed.api import Federation, LogisticRegression, Standardiser
from radfed.experiments.heart_disease import read_hospital

DOCS = Path(__file__).resolve().parents[1] / "docs" / "python-api.md"
SITES = ("cleveland", "hungarian", "va")


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


@pytest.fixture
def isolated(tmp_path, monkeypatch, shared_data):
    """A working folder with its own site state (secrets, pinned studies)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RADFED_SITE_STATE", str(tmp_path / "state"))
    return tmp_path


def test_docs_walkthrough_reproduces_the_cli_results(isolated):
    import json

    from radfed.cli import main

    assert main(["-q", "heart-disease", "--out", "heart-disease"]) == 0
    main(["-q", "run", "heart-disease/study.toml", "--out", "out", "--no-track"])
    (path,) = [p for p in isolated.glob("out/*/results.json") if p.parent.name != "latest"]
    cli = json.loads(path.read_text())

    blocks = _python_blocks(DOCS.read_text())
    assert len(blocks) >= 6
    ns: dict = {}
    for block in blocks:
        exec(compile(block, str(DOCS), "exec"), ns)

    for name, model in ns["models"].items():
        ref = cli["models"][name]
        assert list(model.params_.index[1:]) == ref["columns"]
        for term in model.params_.index:
            assert model.params_[term] == pytest.approx(ref["coefficients"][term]["coef"], abs=1e-9)
            assert model.bse_[term] == pytest.approx(ref["coefficients"][term]["se"], abs=1e-9)
            assert model.results_.params_per_unit[term] == pytest.approx(
                ref["coefficients"][term]["coef_per_unit"], abs=1e-9
            )
    selection = cli["selection"]
    assert ns["mrmr"].selected_ == selection["mrmr"]["selected"]
    lasso = ns["lasso"]
    assert lasso.lambda_min_ == pytest.approx(selection["lasso"]["lambda_min"], rel=1e-12)
    np.testing.assert_allclose(lasso.cvm_, selection["lasso"]["cvm"], atol=1e-9)
    np.testing.assert_allclose(
        [lasso.intercept_, *lasso.coef_], list(selection["lasso"]["coef"].values()), atol=1e-9
    )
    assert lasso.formula_ == selection["radscore_formula"]
    screening = cli["clinical_screening"]
    assert ns["screening"].retained_ == screening["retained"]
    for var, entry in screening["univariable"].items():
        assert ns["screening"].pvalues_[var] == pytest.approx(entry["p"], abs=1e-9)
    np.testing.assert_allclose(
        ns["combat"].gamma_star_, cli["harmonization"]["gamma_star"], atol=1e-9
    )
    compared = 0
    for model, per_site in cli["performance"].items():
        for site, splits in per_site.items():
            for split, metrics in splits.items():
                if metrics.get("auc") is not None:
                    ours = ns["performance"][model][site][split]["auc"]
                    assert ours == pytest.approx(metrics["auc"], abs=1e-9), (model, site, split)
                    compared += 1
    assert compared >= 24  # 3 models x (3 sites + pooled) x 2 splits
    _held_out_aucs_count_ties_half(cli, isolated / "heart-disease")
    swiss = cli["external"]["validation"]["switzerland"]
    assert ns["external"]["switzerland"]["status"] == swiss["status"]
    assert ns["external"]["switzerland"]["reason"] == swiss["reason"]
    assert len(ns["risk"]) == len(ns["cleveland_test"]) and np.all(
        (ns["risk"] > 0) & (ns["risk"] < 1)
    )


def _held_out_aucs_count_ties_half(cli: dict, root: Path) -> None:
    """Each held-out hospital's external AUC of the clinical model equals pROC's rule on
    exact linear predictors: patients with the same age, sex and blood pressure get one
    number, so their pairs of mixed outcome count 1/2 (VA's was off by 6.5e-4)."""
    from radfed.tests.test_numerics import _proc_pairwise

    used = ["disease", *cli["federation"]["clinical"], *cli["federation"]["features"]]
    screening = cli["clinical_screening"]
    for site, entry in cli["external"]["held_out"].items():
        model = entry["models"]["clinical"]
        columns = model["columns"]
        rows = pd.read_csv(root / "sites" / site / "features.csv", na_values=["NA"])
        rows = rows.dropna(subset=used)
        # Categorical clinical variables: pandas' dummies of the (merged) levels.
        for name, levels in screening.get("levels", {}).items():
            groups = screening.get("merge_levels", {}).get(name, {})
            merged = {old: new for new, olds in groups.items() for old in olds}
            code = rows[name].map(lambda v: f"{v:g}").replace(merged)
            for level in levels[1:]:
                rows[f"{name}={level}"] = (code == level).astype(float)
        beta = np.array([model["coefficients"][t]["coef"] for t in ["(Intercept)", *columns]])
        patterns = rows[columns].drop_duplicates()
        z = (patterns.to_numpy(float) - np.array(model["center"])) / np.array(model["scale"])
        lp = rows.merge(patterns.assign(lp=beta[0] + z @ beta[1:]), on=columns)["lp"]
        auc, cov = _proc_pairwise(rows["disease"].to_numpy(), lp.to_numpy()[:, None])
        metrics = entry["metrics"]["clinical"]
        assert metrics["n"] == len(rows)
        assert metrics["auc"] == pytest.approx(auc[0], abs=1e-12), site
        assert metrics["auc_se"] == pytest.approx(np.sqrt(cov[0, 0]), abs=1e-12), site


@pytest.fixture
def frames(shared_data):
    return {name: read_hospital(name, shared_data / "heart_disease") for name in SITES}


COLUMNS = ["age", "sex", "trestbps", "thalach", "oldpeak"]


def test_in_memory_logistic_regression_equals_statsmodels(isolated, frames):
    fed = Federation.from_frames(frames, outcome="disease", clinical=COLUMNS, seed=11)
    model = LogisticRegression(COLUMNS).fit(fed)
    assert model is not None and model.results_.nobs == sum(
        len(fed.rows(s, "train")) for s in SITES
    )
    # Independent pooled reference: statsmodels on the stacked training rows.
    train = pd.concat([fed.rows(s, "train") for s in SITES])
    x = train[COLUMNS].to_numpy(float)
    z = (x - x.mean(axis=0)) / x.std(axis=0)
    ref = sm.Logit(train["disease"].to_numpy(float), sm.add_constant(z)).fit(
        method="newton", tol=1e-12, disp=0
    )
    np.testing.assert_allclose(model.params_.to_numpy(), ref.params, rtol=0, atol=1e-8)
    np.testing.assert_allclose(model.bse_.to_numpy(), ref.bse, rtol=0, atol=1e-8)
    np.testing.assert_allclose(model.pvalues_.to_numpy(), ref.pvalues, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(model.results_.conf_int().to_numpy(), ref.conf_int(), atol=1e-8)
    assert model.results_.llf == pytest.approx(ref.llf, abs=1e-8)
    assert "Federated logistic regression" in model.summary() and "thalach" in model.summary()
    # predict_proba on a site's own test rows equals the reference model's predictions.
    test = fed.rows("hungarian", "test")
    zt = (test[COLUMNS].to_numpy(float) - x.mean(axis=0)) / x.std(axis=0)
    np.testing.assert_allclose(
        model.predict_proba(test)[:, 1], ref.predict(sm.add_constant(zt)), atol=1e-8
    )
    std = Standardiser(COLUMNS).fit(fed)
    np.testing.assert_allclose(std.mean_, x.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(std.scale_, x.std(axis=0), rtol=1e-12)


def test_estimators_follow_the_scikit_learn_contract():
    from sklearn.base import clone

    from radfed.api import MRMR, ComBat, LassoCV, Screening

    for est in (
        ComBat(covariates=["age"]),
        Standardiser(["age"]),
        MRMR(k=3),
        LassoCV(rule="lambda.1se"),
        Screening(0.1),
        LogisticRegression(["age"]),
    ):
        twin = clone(est)
        assert twin.get_params() == est.get_params() and twin is not est
        assert not [k for k in vars(twin) if k.endswith("_")]  # nothing learned yet
    lasso = LassoCV().set_params(n_lambdas=20)
    assert lasso.n_lambdas == 20
    with pytest.raises(ValueError, match="invalid parameter"):
        lasso.set_params(alpha=1.0)
    with pytest.raises(ValueError, match="not fitted"):
        LogisticRegression(["age"]).predict_proba(pd.DataFrame({"age": [50.0]}))
