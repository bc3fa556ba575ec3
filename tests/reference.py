"""Independent pooled references for the federated estimates (test oracles only).

Everything here reads the sites' files with pandas and fits with the reference
libraries (neuroCombat, mrmr-selection, scikit-learn, statsmodels) on the pooled rows:
it shares no code with the federated path. Each site's split and folds are read from
the assignment file the site writes for its own statisticians (the split is drawn with
the site's secret, so nobody else can recompute it).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import statsmodels.api as sm
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from radfed.client.site_state import default_state_dir, read_assignment
from radfed.shared.config import StudyConfig


def site_assignment(config: StudyConfig, name: str) -> dict[str, tuple[str, int | None]]:
    """patient id -> (subset, fold) as site ``name`` wrote it (after it answered)."""
    site = next(s for s in config.sites if s.name == name)
    return read_assignment(default_state_dir(name, site.path), config.name)


def site_test_mask(config: StudyConfig, name: str, complete: pd.DataFrame) -> np.ndarray:
    """Test rows of ``complete`` (a site's complete cases as the reference reads them),
    checking that the site analysed exactly these patients."""
    assignment = site_assignment(config, name)
    ids = complete["patient_id"].astype(str).to_numpy()
    assert set(ids) == set(assignment), f"{name}: the site's complete cases differ"
    return np.array([assignment[i][0] == "test" for i in ids])


def site_folds(config: StudyConfig, name: str, train: pd.DataFrame) -> np.ndarray:
    """The site's CV fold of each of its training rows in ``train``."""
    assignment = site_assignment(config, name)
    return np.array([assignment[i][1] for i in train["patient_id"].astype(str)], dtype=int)


def feature_tables(config: StudyConfig) -> dict[str, pd.DataFrame]:
    """Each site's table as pandas reads it: features.csv, or the manifest joined with
    the features.parquet that `radfed extract` wrote."""
    tables = {}
    for site in config.sites:
        if (site.path / "features.csv").is_file():
            tables[site.name] = pd.read_csv(site.path / "features.csv", na_values=["NA", "?"])
        else:
            manifest = pd.read_csv(site.path / "manifest.csv", dtype={"patient_id": str})
            features = pd.read_parquet(site.path / "features.parquet")
            tables[site.name] = manifest.merge(features, left_on="patient_id", right_index=True)
    return tables


def expand_features(config: StudyConfig, tables: dict[str, pd.DataFrame]) -> StudyConfig:
    """The study with its feature patterns expanded against the tables' columns."""
    import dataclasses
    import fnmatch

    columns = list(next(iter(tables.values())).columns)
    names = [c for c in columns if any(fnmatch.fnmatchcase(c, p) for p in config.features)]
    return dataclasses.replace(config, features=tuple(names))


def pooled_rows(
    config: StudyConfig, tables: dict[str, pd.DataFrame], subset: str = "train"
) -> pd.DataFrame:
    """Rows of every site, stacked: complete cases, each site's own split."""
    parts = []
    for name, table in tables.items():
        complete, test = complete_rows(config, name, table)
        parts.append(complete[test if subset == "test" else ~test].assign(site=name))
    return pd.concat(parts, ignore_index=True)


def complete_rows(
    config: StudyConfig, name: str, table: pd.DataFrame
) -> tuple[pd.DataFrame, np.ndarray]:
    """A site's complete cases (the study's columns, a 0/1 outcome) and its test mask."""
    columns = list(dict.fromkeys([config.outcome, *config.clinical, *config.features]))
    columns += [c for c in config.harmonization.covariates if c not in columns]
    complete = table[columns].apply(pd.to_numeric, errors="coerce").dropna()
    complete = complete[complete[config.outcome].isin([0, 1])]
    return complete, site_test_mask(config, name, table.loc[complete.index])


def pooled_training_rows(config: StudyConfig, tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    return pooled_rows(config, tables, "train")


def standardise(frame: pd.DataFrame) -> pd.DataFrame:
    """Pooled mean and SD with ddof=0 (glmnet's)."""
    return (frame - frame.mean()) / frame.std(ddof=0)


def pooled_logit(rows: pd.DataFrame, outcome: str, columns: list[str]):
    """statsmodels Logit on pooled rows standardised with the pooled mean and SD (ddof=0)."""
    X = sm.add_constant(standardise(rows[columns]).to_numpy(), has_constant="add")
    y = rows[outcome].to_numpy(dtype=float)
    return sm.Logit(y, X).fit(method="newton", tol=1e-12, maxiter=100, disp=0)


def assert_matches_logit(model: dict, reference, tol: float = 1e-6) -> None:
    """Compare a results.json model entry with a statsmodels fit, coefficient by coefficient."""
    names = ["(Intercept)", *model["columns"]]
    coef = np.array([model["coefficients"][n]["coef"] for n in names])
    se = np.array([model["coefficients"][n]["se"] for n in names])
    np.testing.assert_allclose(coef, reference.params, rtol=0, atol=tol)
    np.testing.assert_allclose(se, reference.bse, rtol=0, atol=tol)


def binary_columns(config: StudyConfig, features: list[str]) -> list[str]:
    """The features that are 0 or 1 in every complete row of the training sites (train
    and test: all of each site's patients), found with pandas."""
    tables = {n: t for n, t in feature_tables(config).items() if n in config.training_sites}
    rows = pd.concat([pooled_rows(config, tables, "train"), pooled_rows(config, tables, "test")])
    return [f for f in features if rows[f].isin([0, 1]).all()]


def pooled_combat(rows: pd.DataFrame, config: StudyConfig) -> pd.DataFrame:
    """neuroCombat on the pooled training rows (batch = site) of every feature but the
    binary ones (:func:`binary_columns`) and those of ``[harmonization] exclude``, which
    are returned unchanged, as the federation keeps them out of ComBat."""
    from neuroCombat import neuroCombat

    h = config.harmonization
    features = list(config.features)
    kept_out = set(binary_columns(config, features)) | set(h.exclude)
    harmonised = [f for f in features if f not in kept_out]
    out = rows[features].astype(float).copy()
    if harmonised:
        batch = rows["site"] if h.batch == "site" else rows[h.batch]
        result = neuroCombat(
            dat=rows[harmonised].to_numpy(dtype=float).T,
            covars=rows[list(h.covariates)].assign(batch=batch.to_numpy()),
            batch_col="batch",
            categorical_cols=list(h.categorical),
            continuous_cols=[c for c in h.covariates if c not in h.categorical],
            parametric=h.parametric,
            mean_only=h.mean_only,
        )
        out[harmonised] = result["data"].T
    return out


def assert_same_results(mine: dict, theirs: dict, tol: float = 1e-9) -> None:
    """Two results.json contents agree on every estimate (transport against transport)."""
    assert mine["models"].keys() == theirs["models"].keys()
    for name, model in mine["models"].items():
        other = theirs["models"][name]
        assert model["columns"] == other["columns"]
        for coef, values in model["coefficients"].items():
            for key in ("coef", "se"):
                assert abs(values[key] - other["coefficients"][coef][key]) < tol, (name, coef, key)
    for model, per_site in mine["performance"].items():
        for site, splits in per_site.items():
            for split, values in splits.items():
                assert abs(values["auc"] - theirs["performance"][model][site][split]["auc"]) < tol
    if "selection" in mine:
        a, b = mine["selection"], theirs["selection"]
        assert a["mrmr"]["selected"] == b["mrmr"]["selected"]
        np.testing.assert_allclose(a["lasso"]["cvm"], b["lasso"]["cvm"], atol=tol)
        np.testing.assert_allclose(
            list(a["lasso"]["coef"].values()), list(b["lasso"]["coef"].values()), atol=tol
        )
    assert mine["rounds"] == theirs["rounds"]


def in_memory_ask(sites: list[tuple[str, np.ndarray, np.ndarray]], log: list | None = None):
    """One federated round of the selection solvers, in memory: every (name, X, y) site
    answers with its own rows (``log`` collects requests and replies)."""
    from radfed.shared.selection_stats import answer, assign_folds

    def folds(request, name, y):
        if request["step"] != "lasso_irls":
            return None
        return assign_folds(y, int(request["n_folds"]), int(request["seed"]), name)

    def ask(request):
        replies = [answer(request, X, y, folds(request, name, y)) for name, X, y in sites]
        if log is not None:
            log.append((request, replies))
        return replies

    return ask


# -- evaluation oracles (pROC and ResourceSelection formulas, written out) ----------


def delong_oracle(y: np.ndarray, S: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pROC's formulas with the psi kernel over all event/non-event pairs, O(m n)."""
    y = y.astype(bool)
    m, n = int(y.sum()), int((~y).sum())
    k = S.shape[1]
    v10, v01 = np.empty((m, k)), np.empty((n, k))
    for r in range(k):
        x, z = S[y, r], S[~y, r]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        v10[:, r] = psi.mean(axis=1)  # each event against all non-events
        v01[:, r] = psi.mean(axis=0)  # each non-event against all events
    theta = v10.mean(axis=0)
    s10 = sum(np.outer(v - theta, v - theta) for v in v10) / (m - 1)
    s01 = sum(np.outer(v - theta, v - theta) for v in v01) / (n - 1)
    return theta, s10 / m + s01 / n


def hoslem_oracle(y: np.ndarray, p: np.ndarray, g: int = 10) -> tuple[float, int]:
    """ResourceSelection::hoslem.test transcribed with numpy and pandas:
    qq <- unique(quantile(yhat, seq(0, 1, 1/g)))          # type 7
    cutyhat <- cut(yhat, breaks = qq, include.lowest = TRUE)   # right-closed
    chisq <- sum((observed - expected)^2 / expected)       # y0 and y1 columns
    df <- length(unique(cutyhat)) - 2
    (empty intervals, NaN in R, are dropped as the module documents)."""
    qq = np.unique(np.quantile(p, np.linspace(0, 1, g + 1), method="linear"))
    cut = pd.cut(p, bins=qq, include_lowest=True, right=True)
    frame = pd.DataFrame({"cut": cut, "y1": y, "y0": 1 - y, "e1": p, "e0": 1 - p})
    tab = frame.groupby("cut", observed=True)[["y0", "y1", "e0", "e1"]].sum()
    chisq = ((tab["y1"] - tab["e1"]) ** 2 / tab["e1"]).sum()
    chisq += ((tab["y0"] - tab["e0"]) ** 2 / tab["e0"]).sum()
    return float(chisq), len(tab) - 2


# -- glmnet's L1 logistic fit and CV deviance, with scikit-learn ---------------------


def sklearn_l1(Z: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """glmnet's solution at λ via sklearn: C = 1/(N λ), intercept unpenalised (saga)."""
    model = LogisticRegression(
        C=1.0 / (len(y) * lam),
        l1_ratio=1.0,
        solver="saga",
        tol=1e-10,
        max_iter=200_000,
        random_state=0,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        model.fit(Z, y)
    if not model.coef_.any():
        # saga's intercept converges slowly when every coefficient is 0 (it stops up to
        # ~1e-3 short); the intercept-only optimum is closed-form.
        return np.concatenate([[np.log(y.mean() / (1 - y.mean()))], model.coef_[0]])
    return np.concatenate([model.intercept_, model.coef_[0]])


def glmnet_deviance(eta: np.ndarray, y: np.ndarray) -> np.ndarray:
    """cv.lognet's per-row deviance: probabilities clamped to [1e-5, 1 - 1e-5]."""
    p = np.clip(1.0 / (1.0 + np.exp(-eta)), 1e-5, 1 - 1e-5)
    return -2.0 * (y * np.log(p) + (1 - y) * np.log(1 - p))
