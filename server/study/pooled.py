"""The pooled reference run (``radfed run --pooled``): the same study, centrally.

All sites' rows in one place, fitted with the reference libraries — neuroCombat,
scikit-learn and statsmodels — with no federated code: mRMR is recomputed from
scikit-learn's F-test and pandas' Pearson correlations. The federated run is then set
beside it as an equivalence table, so anyone can check that federation changed nothing.

This needs the optional dependencies ``pip install radfed[pooled]`` (it is a check run by
a coordinator with access to pooled test data, never part of a real federation).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from radfed.client.site import table_spec
from radfed.client.site_state import default_state_dir, read_assignment
from radfed.server.results import StudyResult
from radfed.shared.config import StudyConfig
from radfed.shared.errors import RadfedError
from radfed.shared.messages import RADSCORE

log = logging.getLogger(__name__)

# DESIGN.md's tolerances: federated results equal the pooled analysis to these.
TOLERANCE = {"combat": 1e-6, "logistic": 1e-6, "lasso": 1e-4, "mrmr": 0}


def _require_references():
    try:
        import neuroCombat  # noqa: F401
        import sklearn  # noqa: F401
        import statsmodels  # noqa: F401
    except ImportError as exc:
        raise RadfedError(
            f"the pooled run needs the reference libraries: pip install 'radfed[pooled]' ({exc})"
        ) from exc


def pooled_table(config: StudyConfig) -> pd.DataFrame:
    """Every site's analysable rows in one frame with ``site`` and ``split`` columns."""
    from radfed.client.data import load_site_table

    parts = []
    for site in config.sites:
        table = load_site_table(site.path, table_spec(config.protocol()), config.extraction_params)
        labels = table.labels.drop(columns=[c for c in table.labels if c in table.frame])
        frame = pd.concat([table.frame, labels], axis=1)
        # The site's own split and folds (drawn with its secret), from the assignment
        # file it keeps for its statisticians.
        assignment = read_assignment(default_state_dir(site.name, site.path), config.name)
        ids = frame.index.astype(str)
        parts.append(
            frame.assign(
                site=site.name,
                split=[assignment[i][0] for i in ids],
                fold=[-1 if assignment[i][1] is None else assignment[i][1] for i in ids],
            )
        )
    return pd.concat(parts)


def combat_columns(table: pd.DataFrame, features: list[str], config: StudyConfig) -> list[str]:
    """The features ComBat harmonises: not 0/1 over all rows of the training sites, and
    not named in ``[harmonization] exclude`` (the others pass unchanged)."""
    rows = table[table["site"].isin(config.training_sites)]
    binary = [f for f in features if rows[f].isin([0, 1]).all()]
    return [f for f in features if f not in binary and f not in config.harmonization.exclude]


def pooled_combat(
    train: pd.DataFrame, features: list[str], config: StudyConfig
) -> tuple[pd.DataFrame, dict]:
    """neuroCombat on pooled training rows: the harmonised frame and its estimates."""
    from neuroCombat import neuroCombat

    h = config.harmonization
    numeric = [c for c in h.covariates if c not in h.categorical]
    batch = train["site"] if h.batch == "site" else train[h.batch]
    covars = train[list(h.covariates)].assign(batch=batch.to_numpy())
    out = neuroCombat(
        dat=train[features].to_numpy(dtype=float).T,
        covars=covars,
        batch_col="batch",
        categorical_cols=list(h.categorical),
        continuous_cols=numeric,
        parametric=h.parametric,
        mean_only=h.mean_only,
    )
    return pd.DataFrame(out["data"].T, columns=features, index=train.index), out["estimates"]


def _mrmr(X: pd.DataFrame, y: np.ndarray, k: int) -> list[str]:
    """mRMR with F-test relevance and mean |Pearson r| redundancy (mrmr-selection's FCQ)."""
    from sklearn.feature_selection import f_classif

    relevance = pd.Series(f_classif(X, y)[0], index=X.columns).fillna(0)
    selected: list[str] = []
    redundancy = pd.DataFrame(0.00001, index=X.columns, columns=X.columns)
    for _ in range(min(k, X.shape[1])):
        candidates = [c for c in X.columns if c not in selected]
        if selected:
            last = selected[-1]
            redundancy.loc[candidates, last] = (
                X[candidates].corrwith(X[last]).abs().clip(lower=0.001)
            )
            denominator = redundancy.loc[candidates, selected].mean(axis=1)
        else:
            denominator = pd.Series(1.0, index=candidates)
        score = relevance.loc[candidates] / denominator
        selected.append(score.idxmax())
    return selected


def _l1_logistic(X: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """glmnet's objective, -loglik/n + λ‖β‖₁ with the intercept free, by statsmodels.

    statsmodels' SLSQP solve is deterministic and reaches ~1e-9 in the deviance;
    scikit-learn's saga (random coordinate order) wandered by up to 2e-4 at λ_max.
    """
    import warnings

    import statsmodels.api as sm

    alpha = np.r_[0.0, np.full(X.shape[1], lam * len(y))]
    with warnings.catch_warnings():  # SLSQP's "not converged" chatter at acc=1e-14
        warnings.simplefilter("ignore")
        fit = sm.Logit(y, sm.add_constant(X, has_constant="add")).fit_regularized(
            method="l1", alpha=alpha, acc=1e-14, maxiter=10_000, trim_mode="off", disp=0
        )
    return np.asarray(fit.params)


def _lasso(
    train: pd.DataFrame,
    Z: pd.DataFrame,
    y: np.ndarray,
    lambdas: np.ndarray,
    config: StudyConfig,
    fold_Z: list[np.ndarray] | None = None,
):
    """The L1 logistic at each λ, with the sites' own CV folds (on each fold's own
    columns ``fold_Z[k]`` when mRMR ran inside the folds)."""
    folds = train["fold"].to_numpy(dtype=int)
    cvm = []
    for lam in lambdas:
        deviances, sizes = [], []
        for k in range(config.selection.folds):
            held = folds == k
            Zk = Z if fold_Z is None else fold_Z[k]
            b = _l1_logistic(Zk[~held], y[~held], lam)
            p = np.clip(1 / (1 + np.exp(-(b[0] + Zk[held] @ b[1:]))), 1e-5, 1 - 1e-5)
            deviances.append(-2 * np.mean(y[held] * np.log(p) + (1 - y[held]) * np.log(1 - p)))
            sizes.append(held.sum())
        cvm.append(np.average(deviances, weights=sizes))
    return np.array(cvm)


def pooled_levels(table: pd.DataFrame, config: StudyConfig) -> dict[str, list[str]]:
    """The levels of each categorical clinical variable: sorted, over all rows of the
    training sites (the first is the reference)."""
    rows = merged(table[table["site"].isin(config.training_sites)], config)
    return {c: sorted(set(rows[c])) for c in config.clinical_categorical}


def merged(frame: pd.DataFrame, config: StudyConfig) -> pd.DataFrame:
    """``frame`` with its categorical clinical variables as text, the study's
    ``merge_levels`` applied."""
    recode = {
        c: {old: new for new, olds in config.merge_levels.get(c, {}).items() for old in olds}
        for c in config.clinical_categorical
    }
    return frame.assign(**{c: frame[c].astype(str).replace(m) for c, m in recode.items()})


def with_dummies(frame: pd.DataFrame, levels: dict[str, list[str]]) -> pd.DataFrame:
    """``frame`` with a 0/1 column ``name=level`` per categorical variable and level but
    the first (pandas' ``get_dummies(drop_first=True)`` with the given levels)."""
    dummies = {
        f"{c}={lv}": (frame[c] == lv).astype(float)
        for c, lv_all in levels.items()
        for lv in lv_all[1:]
    }
    return frame.assign(**dummies)


def _screening(
    train: pd.DataFrame, y: np.ndarray, levels: dict[str, list[str]], screening: dict
) -> list[Equivalence]:
    """Each categorical variable's likelihood-ratio statistic (statsmodels' ``llr``,
    against the intercept-only model) and every screening p-value."""
    import statsmodels.api as sm

    lr, p = [], []
    for name, entry in screening["univariable"].items():
        columns = [f"{name}={lv}" for lv in levels[name][1:]] if name in levels else [name]
        X = sm.add_constant(train[columns].to_numpy(dtype=float), has_constant="add")
        fit = sm.Logit(y, X).fit(method="newton", tol=1e-12, maxiter=100, disp=0)
        if name in levels:
            lr.append((entry["statistic"], fit.llr))
            p.append((entry["p"], fit.llr_pvalue))
        else:
            p.append((entry["p"], fit.pvalues[1]))
    rows = [Equivalence("screening p-values", _diff(*zip(*p, strict=True)), TOLERANCE["logistic"])]
    if lr:
        rows.append(
            Equivalence(
                "screening likelihood-ratio statistics (categorical)",
                _diff(*zip(*lr, strict=True)),
                TOLERANCE["logistic"],
            )
        )
    return rows


def _logit(frame: pd.DataFrame, y: np.ndarray, columns: list[str]):
    import statsmodels.api as sm

    z = (frame[columns] - frame[columns].mean()) / frame[columns].std(ddof=0)
    return sm.Logit(y, sm.add_constant(z.to_numpy(), has_constant="add")).fit(
        method="newton", tol=1e-12, disp=0
    )


@dataclass
class Equivalence:
    """One row of the federated-versus-pooled table."""

    estimate: str
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(self.max_abs_diff <= self.tolerance)

    def to_dict(self) -> dict[str, Any]:
        return {
            "estimate": self.estimate,
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "ok": self.ok,
        }


def _diff(a, b) -> float:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:  # e.g. ComBat on other features: no element to compare
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def equivalence(config: StudyConfig, federated: StudyResult) -> list[Equivalence]:
    """Fit the study on pooled data with the reference libraries and compare."""
    _require_references()
    table = pooled_table(config)
    train = table[table["split"] == "train"]
    y = train[config.outcome].to_numpy(dtype=float)
    rows: list[Equivalence] = []
    details = federated.details
    frame = train.copy()
    if "selection" in details:
        features = list(federated.federation["features"])
        harmonised = combat_columns(table, features, config)
        mine = details.get("harmonization") or {}
        if "harmonised" in mine:
            # A site of an older radfed names no binary features: the federation then
            # harmonises features the pooled reference keeps out (this row fails).
            rows.append(
                Equivalence(
                    "ComBat harmonised features (0 = same features)",
                    float(list(mine["harmonised"]) != harmonised),
                    0,
                )
            )
        if mine and harmonised:
            frame[harmonised], reference = pooled_combat(train, harmonised, config)
            for key, theirs in (
                ("gamma_star", "gamma.star"),
                ("delta_star", "delta.star"),
                ("var_pooled", "var.pooled"),
            ):
                rows.append(
                    Equivalence(
                        f"ComBat {key}",
                        _diff(np.ravel(mine[key]), np.ravel(reference[theirs])),
                        TOLERANCE["combat"],
                    )
                )
        sel = details["selection"]
        z = (frame[features] - frame[features].mean()) / frame[features].std(ddof=0)
        picked = _mrmr(z, y.astype(int), len(sel["mrmr"]["selected"]))
        rows.append(
            Equivalence(
                "mRMR selection (0 = same features, same order)",
                float(picked != sel["mrmr"]["selected"]),
                0,
            )
        )
        lasso = sel["lasso"]
        Zs = z[lasso["features"]].to_numpy()
        lam = lasso[lasso["rule"].replace(".", "_")]
        reference = _l1_logistic(Zs, y.astype(int), lam)
        coef = np.array(list(lasso["coef"].values()))
        rows.append(
            Equivalence(
                f"LASSO coefficients at {lasso['rule']}",
                _diff(coef, reference),
                TOLERANCE["lasso"],
            )
        )
        fold_picks = [f["selected"] for f in sel["mrmr"].get("folds", [])]
        if fold_picks:  # mrmr_in_folds: each fold's mRMR on its own training rows
            held = train["fold"].to_numpy(dtype=int)
            same = all(
                _mrmr(z[held != f], y[held != f].astype(int), len(sel["mrmr"]["selected"])) == picks
                for f, picks in enumerate(fold_picks)
            )
            rows.append(Equivalence("mRMR fold selections (0 = same)", float(not same), 0))
        fold_Z = [z[picks].to_numpy() for picks in fold_picks] or None
        cvm = _lasso(train, Zs, y.astype(int), np.array(lasso["lambdas"]), config, fold_Z)
        rows.append(
            Equivalence("LASSO CV deviance curve", _diff(lasso["cvm"], cvm), TOLERANCE["lasso"])
        )
        frame[RADSCORE] = coef[0] + Zs @ coef[1:]
    levels = pooled_levels(table, config)
    frame = with_dummies(merged(frame, config), levels)
    if "clinical_screening" in details:
        rows += _screening(frame, y, levels, details["clinical_screening"])
    for name, model in federated.models.items():
        ref = _logit(frame, y, model.columns)
        rows.append(
            Equivalence(
                f"{name} model coefficients", _diff(model.coef, ref.params), TOLERANCE["logistic"]
            )
        )
        rows.append(
            Equivalence(
                f"{name} model standard errors", _diff(model.se, ref.bse), TOLERANCE["logistic"]
            )
        )
    return rows
