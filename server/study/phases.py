"""The federated phases of a study, each driving its rounds through a transport.

Every phase pairs site statistics (answered at the sites) with the coordinator solvers
of :mod:`radfed.harmonization.combat`, :mod:`radfed.server.stats.mrmr`,
:mod:`radfed.server.stats.lasso` and :mod:`radfed.server.stats.solvers`; none of them
knows which transport carries it.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from radfed.harmonization.combat import (
    ComBatEstimates,
    solve_batch_effects,
    solve_location,
    solve_pooled_variance,
)
from radfed.server.federation.transport import Transport
from radfed.server.results import LogisticFit
from radfed.server.stats.lasso import LassoCVResult, lasso_cv
from radfed.server.stats.mrmr import MrmrResult, mrmr_federated
from radfed.server.stats.solvers import LogisticSpec, fit_logistic_many, pooled_standardisation
from radfed.shared.config import HarmonizationConfig
from radfed.shared.errors import FederationError
from radfed.shared.messages import RADSCORE

log = logging.getLogger(__name__)


def fit_combat(
    transport: Transport,
    features: list[str],
    batch_levels: list[str],
    levels: dict[str, list[str]],
    covariate_names: list[str],
    cfg: HarmonizationConfig,
) -> ComBatEstimates:
    """Distributed ComBat on the training rows: three rounds, then sites adjust locally.

    Raises
    ------
    FederationError
        With the solvers' diagnosis when the pooled design cannot be fitted (e.g. a
        covariate confounded with batch).
    """
    try:
        return _combat_rounds(transport, features, batch_levels, levels, covariate_names, cfg)
    except ValueError as exc:
        raise FederationError(f"ComBat: {exc}") from exc


def _combat_rounds(transport, features, batch_levels, levels, covariate_names, cfg):
    base = {"combat_features": features, "batch_levels": batch_levels, "levels": levels}
    replies = list(transport.ask("combat_design", base).values())
    location = solve_location(replies, batch_levels, covariate_names)
    replies = list(transport.ask("combat_residuals", {**base, "beta": location["beta"]}).values())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        variance = solve_pooled_variance(replies, features)
        replies = list(
            transport.ask(
                "combat_batches",
                {
                    **base,
                    "beta_covariates": location["beta_covariates"],
                    "grand_mean": location["grand_mean"],
                    "var_pooled": variance["var_pooled"],
                },
            ).values()
        )
        estimates = solve_batch_effects(
            replies,
            batch_levels=batch_levels,
            feature_names=features,
            covariate_names=covariate_names,
            parametric=cfg.parametric,
            mean_only=cfg.mean_only,
            **location,
            **variance,
        )
    for warning in caught:
        log.warning("ComBat: %s", warning.message)
    return estimates


def select_asker(transport: Transport, columns: list[str]):
    """``ask(request) -> replies`` for the selection solvers, over ``columns``."""

    def ask(request: dict[str, Any]) -> list[dict[str, Any]]:
        return list(transport.ask("select", {**request, "select_columns": columns}).values())

    return ask


#: Where mRMR runs relative to the LASSO's cross-validation, said in results.json and
#: the report: seed 000 selects once, before the CV, and so does radfed.
MRMR_PLACEMENT = (
    "mRMR runs once on all training rows, before the LASSO's K-fold cross-validation "
    "(as seed 000): the held-out folds helped choose the features, so the CV deviance "
    "and lambda.min are optimistic; the test split and external validation are not affected"
)


@dataclass
class RadiomicsSelection:
    """What feature selection produced: the mRMR picks, the LASSO CV and the Radscore."""

    mrmr: MrmrResult
    lasso: LassoCVResult
    rule: str

    @property
    def which(self) -> str:
        return "min" if self.rule == "lambda.min" else "1se"

    @property
    def beta(self) -> np.ndarray:
        return self.lasso.coef(self.which)

    def radscore_payload(self) -> dict[str, Any]:
        """The Radscore definition, sent with every later request."""
        return {
            "radscore_columns": list(self.lasso.feature_names),
            "radscore_center": np.asarray(self.lasso.center, dtype=float),
            "radscore_scale": np.asarray(self.lasso.scale, dtype=float),
            "radscore_beta": np.asarray(self.beta, dtype=float),
        }

    def formula(self) -> str:
        return self.lasso.radscore_formula(which=self.which)

    def to_dict(self) -> dict[str, Any]:
        lasso = self.lasso
        return {
            "mrmr": {
                "selected": self.mrmr.selected,
                "relevance": [float(self.mrmr.relevance[i]) for i in self.mrmr.selected_index],
                "scores": self.mrmr.scores.tolist(),
                "rounds": self.mrmr.rounds,
                "placement": MRMR_PLACEMENT,
            },
            "lasso": {
                "features": list(lasso.feature_names),
                "lambdas": lasso.lambdas.tolist(),
                "cvm": lasso.cvm.tolist(),
                "cvsd": lasso.cvsd.tolist(),
                "lambda_min": lasso.lambda_min,
                "lambda_1se": lasso.lambda_1se,
                "rule": self.rule,
                "coef": dict(
                    zip(["(Intercept)", *lasso.feature_names], self.beta.tolist(), strict=True)
                ),
                "nonzero": lasso.nonzero(self.which),
                "n_folds": lasso.n_folds,
                "rounds": lasso.rounds,
            },
            "radscore_formula": self.formula(),
            # The Radscore as sites compute it (standardised with the pooled mean and SD).
            "radscore": {
                k.removeprefix("radscore_"): _plain(v) for k, v in self.radscore_payload().items()
            },
        }


def select_radiomics(
    transport: Transport,
    features: list[str],
    k: int,
    folds: int,
    seed: int,
    n_lambdas: int,
    lambda_min_ratio: float | None,
    rule: str,
) -> RadiomicsSelection:
    """Standardise, mRMR to ``k`` features, then LASSO with ``folds``-fold CV."""
    transport.step = "standardise"
    center, scale, _ = pooled_standardisation(transport, features)
    transport.step = "mrmr"
    mrmr = mrmr_federated(
        select_asker(transport, features),
        features,
        k=min(k, len(features)),
        center=center,
        scale=scale,
    )
    log.info(
        "mRMR picked %d features: %s", len(mrmr.selected), ", ".join(mrmr.selected[:5]) + " ..."
    )
    transport.step = "lasso"
    index = [features.index(f) for f in mrmr.selected]
    lasso = lasso_cv(
        select_asker(transport, mrmr.selected),
        mrmr.selected,
        center[index],
        scale[index],
        n_folds=folds,
        seed=seed,
        n_lambdas=n_lambdas,
        lambda_min_ratio=lambda_min_ratio,
    )
    selection = RadiomicsSelection(mrmr, lasso, rule)
    log.info(
        "LASSO %s = %.4g: %d non-zero features",
        rule,
        lasso.lambda_min,
        len(lasso.nonzero(selection.which)),
    )
    return selection


def fit_standardised(
    transport: Transport, models: dict[str, list[str]], outcome: str
) -> dict[str, LogisticFit]:
    """Pooled standardisation of every model's columns (one round), then all the
    federated logistic fits in shared Newton rounds."""
    columns = list(dict.fromkeys(c for cols in models.values() for c in cols))
    center, scale, _ = pooled_standardisation(transport, columns)
    where = {c: i for i, c in enumerate(columns)}
    specs = {
        name: LogisticSpec(cols, center[[where[c] for c in cols]], scale[[where[c] for c in cols]])
        for name, cols in models.items()
    }
    return fit_logistic_many(transport, specs, outcome=outcome)


@dataclass
class ClinicalSelection:
    """Univariable screening of the clinical variables and what it retained."""

    univariable: dict[str, LogisticFit]
    threshold: float

    @property
    def pvalues(self) -> dict[str, float]:
        return {name: float(fit.pvalues[1]) for name, fit in self.univariable.items()}

    @property
    def retained(self) -> list[str]:
        return [name for name, p in self.pvalues.items() if p < self.threshold]

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "retained": self.retained,
            "univariable": {
                name: {
                    "coef_per_unit": float(fit.coef_per_unit[1]),
                    "se_per_unit": float(fit.se_per_unit[1]),
                    "odds_ratio_per_unit": float(np.exp(fit.coef_per_unit[1])),
                    "p": float(fit.pvalues[1]),
                    "iterations": fit.iterations,
                }
                for name, fit in self.univariable.items()
            },
        }


def screen_clinical(
    transport: Transport, clinical: list[str], outcome: str, threshold: float
) -> ClinicalSelection:
    """Federated univariable logistic regression of each clinical variable."""
    return ClinicalSelection(
        fit_standardised(transport, {c: [c] for c in clinical}, outcome), threshold
    )


__all__ = [
    "RADSCORE",
    "ClinicalSelection",
    "RadiomicsSelection",
    "fit_combat",
    "fit_standardised",
    "screen_clinical",
    "select_radiomics",
]


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value
