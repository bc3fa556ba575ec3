"""Independent pooled references for the federated estimates (test oracles only).

Everything here reads the sites' files with pandas and fits with statsmodels on the
pooled rows: it shares no code with the federated path except the documented,
seeded per-site split rule.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import statsmodels.api as sm

from radfed.client.site import stratified_split
from radfed.shared.config import StudyConfig


def pooled_training_rows(config: StudyConfig, tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Training rows of every site, stacked: complete cases, each site's own split."""
    columns = [config.outcome, *config.clinical, *config.features]
    parts = []
    for name, table in tables.items():
        complete = table[columns].apply(pd.to_numeric, errors="coerce").dropna()
        complete = complete[complete[config.outcome].isin([0, 1])]
        y = complete[config.outcome].to_numpy()
        test = stratified_split(y, config.test_fraction, config.seed, name)
        parts.append(complete[~test].assign(site=name))
    return pd.concat(parts)


def feature_tables(config: StudyConfig) -> dict[str, pd.DataFrame]:
    """Each site's features.csv, as pandas reads it."""
    return {
        s.name: pd.read_csv(s.path / "features.csv", na_values=["NA", "?"]) for s in config.sites
    }


def pooled_logit(rows: pd.DataFrame, outcome: str, columns: list[str]):
    """statsmodels Logit on pooled rows standardised with the pooled mean and SD (ddof=0)."""
    x = rows[columns].to_numpy(dtype=float)
    z = (x - x.mean(axis=0)) / x.std(axis=0, ddof=0)
    X = sm.add_constant(z, has_constant="add")
    return sm.Logit(rows[outcome].to_numpy(dtype=float), X).fit(
        method="newton", tol=1e-12, maxiter=100, disp=0
    )


def assert_matches_logit(model: dict, reference, tol: float = 1e-6) -> None:
    """Compare a results.json model entry with a statsmodels fit, coefficient by coefficient."""
    names = ["(Intercept)", *model["columns"]]
    coef = np.array([model["coefficients"][n]["coef"] for n in names])
    se = np.array([model["coefficients"][n]["se"] for n in names])
    np.testing.assert_allclose(coef, reference.params, rtol=0, atol=tol)
    np.testing.assert_allclose(se, reference.bse, rtol=0, atol=tol)
