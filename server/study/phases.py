"""The federated phases of a study, each driving its rounds through a transport.

Every phase pairs site statistics (answered at the sites) with the coordinator solvers
of :mod:`radfed.harmonization.combat`, :mod:`radfed.server.stats.mrmr`,
:mod:`radfed.server.stats.lasso` and :mod:`radfed.server.stats.solvers`; none of them
knows which transport carries it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from radfed.harmonization.binary import solve_kept_out
from radfed.harmonization.combat import (
    ComBatEstimates,
    solve_batch_effects,
    solve_location,
    solve_pooled_variance,
)
from radfed.server.federation.shared_rounds import together
from radfed.server.federation.transport import Transport
from radfed.server.results import LogisticFit
from radfed.server.stats.lasso import LassoCVResult, lasso_cv
from radfed.server.stats.mrmr import MrmrResult, mrmr_federated
from radfed.server.stats.solvers import LogisticSpec, fit_logistic_many, pooled_standardisation
from radfed.shared.config import HarmonizationConfig
from radfed.shared.errors import FederationError
from radfed.shared.messages import RADSCORE, Payload

log = logging.getLogger(__name__)


#: How the features ComBat keeps out are chosen, said in results.json.
KEPT_OUT_RULE = (
    "a feature is kept out of ComBat when every training site reports all of its values "
    "there as 0 or 1 (binary; each site says yes or no per feature, over all of its "
    "patients), or when [harmonization] exclude names it; kept-out features pass unchanged "
    "to standardisation, mRMR, the LASSO and the Radscore"
)


def combat_features(
    described: dict[str, Payload], features: list[str], exclude: tuple[str, ...] | list[str] = ()
) -> tuple[list[str], dict[str, str]]:
    """The features ComBat harmonises and those it keeps out ({feature: reason}), from
    the training sites' ``describe`` replies (no round of its own)."""
    solved = solve_kept_out(list(described.values()), features, exclude)
    absent = [e for e in exclude if e not in features]
    if absent:  # a misspelt name, or one the reproducibility filter dropped
        log.warning("[harmonization] exclude: %s not among the study's features", absent)
    if solved["kept_out"]:
        log.info("ComBat keeps out %s", ", ".join(solved["kept_out"]))
    return solved["harmonised"], solved["kept_out"]


def fit_combat(
    transport: Transport,
    features: list[str],
    batch_levels: list[str],
    levels: dict[str, list[str]],
    covariate_names: list[str],
    cfg: HarmonizationConfig,
) -> ComBatEstimates:
    """Distributed ComBat on the training rows: three rounds, then sites adjust locally.

    ``features`` are those ComBat harmonises (:func:`combat_features`): the estimates
    name only them, so the sites leave every other feature as it is.

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


def select_asker(transport: Transport, columns: list[str], without_fold: int | None = None):
    """``ask(request) -> replies`` for the selection solvers, over ``columns``; with
    ``without_fold``, over each site's training rows outside that CV fold of its own."""
    extra = {} if without_fold is None else {"without_fold": int(without_fold)}

    def ask(request: dict[str, Any]) -> list[dict[str, Any]]:
        payload = {**request, "select_columns": columns, **extra}
        return list(transport.ask("select", payload).values())

    return ask


#: Where mRMR runs relative to the LASSO's cross-validation, said in results.json and
#: the report: seed 000 selects once, before the CV, and so does radfed.
MRMR_PLACEMENT = (
    "mRMR runs once on all training rows, before the LASSO's K-fold cross-validation "
    "(as seed 000): the held-out folds helped choose the features, so the CV deviance "
    "and lambda.min are optimistic; the test split and external validation are not affected"
)
#: The placement with ``[selection] mrmr_in_folds = true``.
MRMR_PLACEMENT_IN_FOLDS = (
    "mRMR runs inside each fold of the LASSO's K-fold cross-validation, on that fold's "
    "training rows only, so each fold's LASSO sees only its own picks and the CV deviance "
    "and lambda.min are not optimistic from selection; the final fit uses the picks of "
    "mRMR on all training rows (as cv.glmnet's full-data fit)"
)


@dataclass
class RadiomicsSelection:
    """What feature selection produced: the mRMR picks, the LASSO CV and the Radscore."""

    mrmr: MrmrResult
    lasso: LassoCVResult
    rule: str
    #: With mRMR inside the CV: per fold, mRMR on that fold's training rows.
    fold_mrmr: list[MrmrResult] | None = None

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
                "placement": MRMR_PLACEMENT if self.fold_mrmr is None else MRMR_PLACEMENT_IN_FOLDS,
                **(
                    {}
                    if self.fold_mrmr is None
                    else {
                        "folds": [
                            {"fold": k, "selected": m.selected, "rounds": m.rounds}
                            for k, m in enumerate(self.fold_mrmr)
                        ]
                    }
                ),
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
                # With mRMR in the folds: each fold's mean held-out deviance per λ (its
                # LASSO on its own picks), the pieces of cvm.
                **(
                    {}
                    if self.fold_mrmr is None
                    else {
                        "fold_deviance": [[_finite(v) for v in row] for row in lasso.fold_deviance]
                    }
                ),
                # Where a site's refusal ended the λ path (the rule, never a count).
                "path_end": None
                if lasso.path_end is None
                else {
                    "index": lasso.path_end.index,
                    "lambda_refused": lasso.path_end.lambda_refused,
                    "rule": lasso.path_end.rule,
                    "sites": list(lasso.path_end.sites),
                    "note": lasso.path_end.describe(),
                },
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
    mrmr_in_folds: bool = False,
) -> RadiomicsSelection:
    """Standardise, mRMR to ``k`` features, then LASSO with ``folds``-fold CV.

    With ``mrmr_in_folds``, mRMR also runs on each fold's training rows (every site's
    training rows outside its own fold k; all K + 1 selections share rounds), and the
    LASSO runs on the union of all picks with each fit held to its own picks (glmnet's
    ``exclude``): fold k's fit to fold k's picks, the full-data fit (and so λ_max, the
    path and the Radscore) to the ordinary picks.
    """
    transport.step = "standardise"
    center, scale, _ = pooled_standardisation(transport, features)
    transport.step = "mrmr"

    def run_mrmr(lane: Transport, without_fold: int | None = None) -> MrmrResult:
        return mrmr_federated(
            select_asker(lane, features, without_fold),
            features,
            k=min(k, len(features)),
            center=center,
            scale=scale,
        )

    fold_mrmr = None
    if mrmr_in_folds:
        *fold_mrmr, mrmr = together(
            transport,
            [functools.partial(run_mrmr, without_fold=f) for f in range(folds)] + [run_mrmr],
        )
    else:
        mrmr = run_mrmr(transport)
    log.info(
        "mRMR picked %d features: %s", len(mrmr.selected), ", ".join(mrmr.selected[:5]) + " ..."
    )
    transport.step = "lasso"
    # The full picks first, then those only some fold picked (fixed at 0 in the others).
    columns = list(mrmr.selected)
    for fold in fold_mrmr or []:
        columns += [f for f in fold.selected if f not in columns]
    exclude = None
    if fold_mrmr is not None:
        picks = [set(m.selected) for m in [*fold_mrmr, mrmr]]
        exclude = np.array([[c not in chosen for c in columns] for chosen in picks])
    index = [features.index(f) for f in columns]
    lasso = lasso_cv(
        select_asker(transport, columns),
        columns,
        center[index],
        scale[index],
        n_folds=folds,
        seed=seed,
        n_lambdas=n_lambdas,
        lambda_min_ratio=lambda_min_ratio,
        exclude=exclude,
    )
    if len(columns) > len(mrmr.selected):
        lasso = _restricted(lasso, len(mrmr.selected))
    selection = RadiomicsSelection(mrmr, lasso, rule, fold_mrmr)
    log.info(
        "LASSO %s = %.4g: %d non-zero features",
        rule,
        lasso.lambda_min,
        len(lasso.nonzero(selection.which)),
    )
    return selection


def _finite(value: float) -> float | None:
    """A number for JSON: None for the NaN of a fold without held-out rows."""
    return float(value) if np.isfinite(value) else None


def _restricted(lasso: LassoCVResult, p: int) -> LassoCVResult:
    """The LASSO result on its first ``p`` features (the full-data fit's own; the
    others are 0 in it): what the Radscore and the record use. The fold paths lose
    the coefficients of features only other folds picked."""
    return dataclasses.replace(
        lasso,
        feature_names=list(lasso.feature_names[:p]),
        coef_path=lasso.coef_path[:, : p + 1],
        fold_coef_path=lasso.fold_coef_path[:, :, : p + 1],
        center=np.asarray(lasso.center)[:p],
        scale=np.asarray(lasso.scale)[:p],
    )


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


#: The intercept-only model fitted beside a screening with categorical variables: its
#: deviance is the null deviance of their likelihood-ratio tests.
NULL_MODEL = "(null)"


def dummy_columns(name: str, levels: list[str]) -> list[str]:
    """A categorical variable's dummy columns ``name=level``, one per level but the
    first (the reference)."""
    return [f"{name}={level}" for level in levels[1:]]


def clinical_levels(described: dict[str, Payload], categorical: list[str]) -> dict[str, list[str]]:
    """The federation's levels of each categorical clinical variable: the sorted union
    of the level names every site reported in ``describe`` (as ComBat's covariates)."""
    return {
        c: sorted({str(level) for reply in described.values() for level in reply["levels"][c]})
        for c in categorical
    }


@dataclass
class ClinicalSelection:
    """Univariable screening of the clinical variables and what it retained.

    A numeric variable is tested by the Wald z-test of its coefficient. A categorical
    one (``levels`` holds the federation's levels) enters with its dummy columns and is
    tested by one likelihood-ratio test of them all, on ``len(levels) - 1`` df, as R's
    ``anova(glm, test = "Chisq")`` or rms's ``lrtest``: the federated fits give the
    exact pooled deviances, the variable's and the intercept-only model's (``null``).
    The Wald chi-square of the dummies is reported beside it.
    """

    univariable: dict[str, LogisticFit]
    threshold: float
    levels: dict[str, list[str]] = field(default_factory=dict)
    null: LogisticFit | None = None
    #: The study's ``merge_levels`` (levels the sites read as one), for the record.
    merged: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def columns(self, name: str) -> list[str]:
        """The model columns of a variable: its dummies when categorical."""
        return dummy_columns(name, self.levels[name]) if name in self.levels else [name]

    def test(self, name: str) -> dict[str, Any]:
        """The screening test of a variable: ``test``, ``statistic``, ``df`` and ``p``."""
        from scipy import stats

        fit = self.univariable[name]
        if name not in self.levels:
            z = float(fit.zvalues[1])
            return {"test": "Wald z", "statistic": z, "df": 1, "p": float(fit.pvalues[1])}
        if self.null is None:
            raise FederationError(f"no intercept-only fit to test the categorical {name!r}")
        df = len(fit.columns)
        lr = max(float(self.null.deviance - fit.deviance), 0.0)
        beta, cov = fit.coef[1:], fit.cov[1:, 1:]
        wald = float(beta @ np.linalg.solve(cov, beta))
        return {
            "test": "likelihood ratio",
            "statistic": lr,
            "df": df,
            "p": float(stats.chi2.sf(lr, df)),
            "wald_statistic": wald,
            "wald_p": float(stats.chi2.sf(wald, df)),
        }

    @property
    def pvalues(self) -> dict[str, float]:
        return {name: self.test(name)["p"] for name in self.univariable}

    @property
    def retained_variables(self) -> list[str]:
        """The variables with p below the threshold."""
        return [name for name, p in self.pvalues.items() if p < self.threshold]

    @property
    def retained(self) -> list[str]:
        """The model columns of the retained variables (a categorical one with all its
        dummies): what the clinical model and the nomogram fit."""
        return [c for name in self.retained_variables for c in self.columns(name)]

    @property
    def context(self) -> Payload:
        """What later requests carry so that sites encode the categorical variables
        with the federation's levels (a site refuses to score a level it lacks)."""
        return {"clinical_levels": dict(self.levels)} if self.levels else {}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"threshold": self.threshold, "retained": self.retained}
        if self.levels:
            out["retained_variables"] = self.retained_variables
            out["levels"] = dict(self.levels)
            if self.merged:
                out["merge_levels"] = dict(self.merged)
            out["categorical_test"] = (
                "likelihood ratio on len(levels) - 1 df (the dummies' Wald chi-square beside it)"
            )
        out["univariable"] = {
            name: self._categorical(name) if name in self.levels else self._numeric(fit)
            for name, fit in self.univariable.items()
        }
        return out

    @staticmethod
    def _numeric(fit: LogisticFit) -> dict[str, Any]:
        return {
            "coef_per_unit": float(fit.coef_per_unit[1]),
            "se_per_unit": float(fit.se_per_unit[1]),
            "odds_ratio_per_unit": float(np.exp(fit.coef_per_unit[1])),
            "p": float(fit.pvalues[1]),
            "iterations": fit.iterations,
        }

    def _categorical(self, name: str) -> dict[str, Any]:
        fit = self.univariable[name]
        coef, se, p = fit.coef_per_unit, fit.se_per_unit, fit.pvalues
        return {
            "categorical": True,
            "levels": list(self.levels[name]),
            "reference": self.levels[name][0],
            **self.test(name),
            "deviance": float(fit.deviance),
            "null_deviance": float(self.null.deviance) if self.null else None,
            "coefficients": {
                column: {
                    "coef_per_unit": float(coef[j]),
                    "se_per_unit": float(se[j]),
                    "odds_ratio_per_unit": float(np.exp(coef[j])),
                    "p": float(p[j]),
                }
                for j, column in enumerate(fit.columns, start=1)
            },
            "iterations": fit.iterations,
        }


def screen_clinical(
    transport: Transport,
    clinical: list[str],
    outcome: str,
    threshold: float,
    levels: dict[str, list[str]] | None = None,
) -> ClinicalSelection:
    """Federated univariable logistic regression of each clinical variable.

    ``levels`` are the federation's levels of the categorical variables
    (:func:`clinical_levels` of the ``describe`` replies); when not given and the
    study's protocol declares categorical variables, they are asked for (one
    ``describe`` round). With categorical variables, an intercept-only model shares
    the Newton rounds (its deviance is their likelihood-ratio tests' null deviance),
    and the levels join the transport's context for later requests.

    Raises
    ------
    FederationError
        A categorical variable with a single level over the federation.
    """
    protocol = transport.protocol or {}
    categorical = [c for c in protocol.get("clinical_categorical", []) if c in clinical]
    if levels is None:
        levels = clinical_levels(transport.ask("describe"), categorical) if categorical else {}
    levels = {c: list(levels[c]) for c in clinical if c in levels}
    single = [c for c, lv in levels.items() if len(lv) < 2]
    if single:
        raise FederationError(
            f"categorical clinical variable(s) {single} have a single level over the "
            "training sites: nothing to screen (leave them out of the study)"
        )
    models = {c: dummy_columns(c, levels[c]) if c in levels else [c] for c in clinical}
    if levels:
        models[NULL_MODEL] = []
    fits = fit_standardised(transport, models, outcome)
    null = fits.pop(NULL_MODEL, None)
    fits = {c: fits[c] for c in clinical}  # the study's order, not the order of convergence
    merged = {c: m for c, m in (protocol.get("merge_levels") or {}).items() if c in levels}
    selection = ClinicalSelection(fits, threshold, levels, null, merged)
    transport.context.update(selection.context)
    return selection


__all__ = [
    "KEPT_OUT_RULE",
    "RADSCORE",
    "ClinicalSelection",
    "RadiomicsSelection",
    "clinical_levels",
    "combat_features",
    "dummy_columns",
    "fit_combat",
    "fit_standardised",
    "screen_clinical",
    "select_radiomics",
]


def _plain(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value
