"""radfed's Python API: a federation and scikit-learn-style federated estimators.

For notebooks and scripts (``from radfed.api import ...``). A :class:`Federation` holds
the sites of a study, answering in this Python process (the in-process transport: every
request and reply still goes through the sites' own code, privacy rules and message
encoding, exactly as over Flower). Estimators follow scikit-learn's contract:
parameters in ``__init__``, ``fit(federation)`` returns ``self``, learned attributes end
in ``_``, ``get_params``/``set_params``; models predict on a site's rows
(``predict_proba``). Logistic fits carry statsmodels-style results (``params``,
``bse``, ``pvalues``, ``conf_int()``, ``summary()``).

========================  ==========================================================
name                      what it fits (federated, equal to the pooled analysis)
========================  ==========================================================
:class:`Federation`       the sites: a study file's folders, or pandas DataFrames
:class:`ComBat`           distributed ComBat (Chen et al. 2022) on the features
:class:`Standardiser`     pooled mean and SD (1/n, as glmnet)
:class:`MRMR`             mRMR feature selection (mrmr-selection's rule)
:class:`LassoCV`          cv.glmnet's L1 logistic path with K-fold CV; the Radscore
:class:`Screening`        univariable logistic screening of clinical variables
:class:`LogisticRegression`  logistic regression (Newton on summed Hessians)
:func:`fit_models`        several logistic models in shared rounds (as a study does)
:func:`evaluate`          per-site and pooled AUC, calibration, decision curves
:func:`validate`          the same on all patients of validation-only sites
========================  ==========================================================

A pipeline step changes what later steps see: ``federation.with_pipeline(combat)``
returns a federation whose sites harmonise their features with the fitted ComBat
before answering; ``.with_pipeline(lasso)`` adds the ``Radscore`` column. The
federation a step was given is never changed.

The statistics live in :mod:`radfed.server.study.phases`, :mod:`radfed.server.stats.solvers`,
:mod:`radfed.server.stats.mrmr`, :mod:`radfed.server.stats.lasso` and
:mod:`radfed.harmonization.combat`; this module only drives them. No MLflow or
matplotlib is imported.
"""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from radfed.server.results import LogisticFit
from radfed.shared.config import StudyConfig, load_study
from radfed.shared.logistic import design
from radfed.shared.messages import RADSCORE, Payload

__all__ = [
    "MRMR",
    "RADSCORE",
    "ComBat",
    "Federation",
    "LassoCV",
    "LogisticRegression",
    "LogisticResults",
    "Screening",
    "Standardiser",
    "evaluate",
    "fit_models",
    "validate",
]


# ------------------------------------------------------------------------ federation


class Federation:
    """The training sites of a study, reached in this process.

    Build one with :meth:`from_study` (site folders named by a study file) or
    :meth:`from_frames` (one pandas DataFrame per site). Fitting uses the study's
    training sites and each site's own training split (drawn at the site, stratified,
    seeded); validation-only sites are in :attr:`validation_sites`.

    Parameters
    ----------
    config : StudyConfig
        The study: outcome, variables, split, seed, privacy limits.
    transport : InProcessTransport, optional
        Default: one in-process worker per site of ``config``.
    """

    def __init__(self, config: StudyConfig, transport: Any = None) -> None:
        from radfed.server.federation.inprocess import InProcessTransport

        self.config = config
        if transport is None:
            transport = InProcessTransport.from_study(config)
        transport.protocol = config.protocol()
        transport.sites = list(config.training_sites)
        self.transport = transport
        self._described: dict[str, Payload] | None = None
        self._keep: Any = None  # a temporary folder that must live as long as we do

    # -- construction -----------------------------------------------------------------

    @classmethod
    def from_study(cls, study: str | Path | StudyConfig, jobs: int = 1) -> Federation:
        """The sites of a study file (``radfed run``'s sites, with the same split)."""
        from radfed.server.federation.inprocess import InProcessTransport

        config = study if isinstance(study, StudyConfig) else load_study(Path(study))
        return cls(config, InProcessTransport.from_study(config, jobs=jobs))

    @classmethod
    def from_frames(
        cls,
        frames: Mapping[str, pd.DataFrame],
        outcome: str,
        clinical: Sequence[str] = (),
        features: Sequence[str] = (),
        *,
        seed: int = 0,
        test_fraction: float = 0.3,
        covariates: Sequence[str] = (),
        categorical: Sequence[str] = (),
        folds: int = 10,
        min_cell: int = 3,
        validation: Sequence[str] = (),
        name: str = "notebook",
    ) -> Federation:
        """A federation over in-memory tables, one per site.

        Each DataFrame holds a site's patients: the 0/1 ``outcome``, the ``clinical``
        variables, the ``features`` (names or glob patterns) and any ComBat
        ``covariates``; a ``patient_id`` column is added from the index when absent.
        Each table is handed to its site as a Parquet file in a private temporary
        folder (exact for floats), so the site reads, checks and splits it with the very
        code a hospital runs; the folder, and the sites' state (their secret for the
        split), live as long as the federation.

        Parameters
        ----------
        frames : mapping of site name to DataFrame
        outcome, clinical, features, covariates, categorical
            As in a study file (``[study]`` and ``[harmonization]``).
        seed, test_fraction, folds, min_cell
            The study seed, test fraction, LASSO folds and minimum cell size.
        validation : sequence of str
            Sites that only validate (never used to fit).
        name : str
            The study's name.
        """
        import tomli_w

        from radfed.client.site import SiteSettings, SiteWorker
        from radfed.server.federation.inprocess import InProcessTransport

        keep = tempfile.TemporaryDirectory(prefix="radfed-api-")
        root = Path(keep.name)
        sites = []
        for site, frame in frames.items():
            folder = root / "sites" / site
            folder.mkdir(parents=True)
            table = frame.copy()
            if "patient_id" not in table.columns:
                table.insert(0, "patient_id", [f"{site}-{i}" for i in table.index])
            table["patient_id"] = table["patient_id"].astype(str)
            table.reset_index(drop=True).to_parquet(folder / "features.parquet", index=False)
            entry = {"name": site, "path": f"sites/{site}"}
            if site in validation:
                entry["role"] = "validation"
            sites.append(entry)
        study = {
            "study": {
                "name": name,
                "outcome": outcome,
                "clinical": list(clinical),
                "features": list(features),
                "seed": int(seed),
            },
            "split": {"test_fraction": float(test_fraction)},
            "harmonization": {"covariates": list(covariates), "categorical": list(categorical)},
            "selection": {"folds": int(folds)},
            "privacy": {"min_cell": int(min_cell)},
            "tracking": {"enabled": False},
            "validation": {"leave_one_site_out": False},
            "sites": sites,
        }
        if not features:
            del study["harmonization"]
        (root / "study.toml").write_text(tomli_w.dumps(study))
        config = load_study(root / "study.toml")
        workers = {
            s.name: SiteWorker(
                SiteSettings(s.name, s.path, config.privacy, state_dir=root / "state" / s.name)
            )
            for s in config.sites
        }
        federation = cls(config, InProcessTransport(workers))
        federation._keep = keep
        return federation

    def with_pipeline(self, *fitted: Any) -> Federation:
        """A federation whose sites apply fitted steps (ComBat, the Radscore) first.

        Each step contributes what every later request carries (:meth:`ComBat.payload`,
        :meth:`LassoCV.payload`); this federation is left as it was.
        """
        from radfed.server.federation.inprocess import InProcessTransport

        transport = InProcessTransport(self.transport.workers)
        clone = Federation(self.config, transport)
        clone.transport.context = dict(self.transport.context)
        for step in fitted:
            clone.transport.context.update(step.payload())
        clone._described, clone._keep = self._described, self._keep
        return clone

    # -- what the sites hold ------------------------------------------------------------

    @property
    def sites(self) -> list[str]:
        """The training sites (those that fit)."""
        return list(self.transport.sites)

    @property
    def validation_sites(self) -> list[str]:
        return list(self.config.validation_sites)

    @property
    def outcome(self) -> str:
        return self.config.outcome

    @property
    def seed(self) -> int:
        return self.config.seed

    def describe(self) -> dict[str, Payload]:
        """Each training site's description (counts, variable names, extraction
        settings), checked for consistency as a study's first phase does."""
        if self._described is None:
            from radfed.server.study.driver import check_consistency

            described = self.ask("describe")
            check_consistency(described)
            self._described = described
        return self._described

    @property
    def features(self) -> list[str]:
        """The feature names the sites resolved from the study's names and patterns."""
        return list(next(iter(self.describe().values()))["features"])

    @property
    def clinical(self) -> list[str]:
        return list(next(iter(self.describe().values()))["clinical"])

    def split(self) -> pd.DataFrame:
        """Patients and events per site and split (each site's own split)."""
        replies = self.ask("split")
        rows = {
            site: {
                f"{k}_{s}": r.get(f"{k}_{s}") for s in ("train", "test") for k in ("n", "events")
            }
            for site, r in replies.items()
        }
        return pd.DataFrame.from_dict(rows, orient="index")

    def ask(self, task: str, payload: Payload | None = None) -> dict[str, Payload]:
        """One federated round: ``task`` to every training site, replies by site."""
        return self.transport.ask(task, payload)

    @property
    def rounds(self) -> dict[str, int]:
        """Federated rounds used through this federation, by phase."""
        return dict(self.transport.rounds)

    def rows(self, site: str, subset: str = "all") -> pd.DataFrame:
        """A site's own rows as the site sees them through this federation's pipeline
        (harmonised features, the Radscore), for predictions at that site.

        In-process only: this reads the site's table in this Python process, as a
        hospital's statistician does with their own data. Nothing of the kind is ever
        sent by a site.
        """
        worker = self.transport.workers.get(site)
        if worker is None:
            raise KeyError(f"no site {site!r}; sites: {sorted(self.transport.workers)}")
        local = worker.site(self.transport.protocol)
        request = {**self.transport.context, "protocol": self.transport.protocol}
        rows = local.view(request, subset).copy()
        # Categorical clinical variables: each patient's level (after the study's
        # merge_levels) and, once screening knows the federation's levels, the dummy
        # columns ("cp=3") the models use.
        known = self.transport.context.get("clinical_levels") or {}
        for name in self.config.clinical_categorical:
            rows[name] = local.levels_of(name, rows.index)
            for level in known.get(name, [])[1:]:
                rows[f"{name}={level}"] = (rows[name] == level).astype(float)
        return rows

    def __repr__(self) -> str:
        steps = [
            k for k in ("combat_feature_names", "radscore_columns") if k in self.transport.context
        ]
        return (
            f"Federation({self.config.name!r}, sites={self.sites}, "
            f"validation={self.validation_sites}, pipeline={steps})"
        )


# ------------------------------------------------------------------------ estimators


class _Estimator:
    """get_params/set_params from ``__init__``'s signature (scikit-learn's contract)."""

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {name: getattr(self, name) for name in names}

    def set_params(self, **params: Any) -> _Estimator:
        valid = self.get_params()
        for key, value in params.items():
            if key not in valid:
                raise ValueError(f"invalid parameter {key!r} for {type(self).__name__}")
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def _fitted(self, attribute: str) -> None:
        if not hasattr(self, attribute):
            raise ValueError(f"this {type(self).__name__} is not fitted yet; call fit first")


class ComBat(_Estimator):
    """Distributed ComBat of the federation's features (three rounds).

    Parameters
    ----------
    covariates, categorical : sequence of str, optional
        Biological covariates to preserve and which of them are categorical (one-hot
        with the federation's levels). Default: the study's ``[harmonization]``; they
        must be among the study's covariates (the sites load those columns).
    parametric : bool, default True
        Parametric (True) or non-parametric empirical Bayes priors.
    mean_only : bool, default False
        Adjust batch means only.
    exclude : sequence of str, optional
        Features to keep out of ComBat besides the binary ones (every training site's
        values 0 or 1), which are always kept out. Default: the study's
        ``[harmonization] exclude``.

    Attributes
    ----------
    estimates_ : ComBatEstimates or None
        None when every feature is kept out.
    feature_names_, batch_levels_, covariate_names_ : list of str
        ``feature_names_`` are the features ComBat harmonised.
    kept_out_ : dict of str to str
        The features kept out of ComBat (they pass unchanged), each with its reason.
    levels_ : dict
        The federation's levels of each categorical covariate.
    gamma_star_, delta_star_ : ndarray of shape (batches, harmonised features)
    """

    def __init__(
        self,
        covariates: Sequence[str] | None = None,
        categorical: Sequence[str] | None = None,
        parametric: bool = True,
        mean_only: bool = False,
        exclude: Sequence[str] | None = None,
    ) -> None:
        self.covariates = covariates
        self.categorical = categorical
        self.parametric = parametric
        self.mean_only = mean_only
        self.exclude = exclude

    def fit(self, federation: Federation, features: Sequence[str] | None = None) -> ComBat:
        """Fit on the training rows of every site (no outcome used); binary and
        excluded features are kept out, as a study run keeps them out."""
        from dataclasses import replace

        from radfed.server.study.phases import combat_features, fit_combat

        study = federation.config.harmonization
        covariates = list(study.covariates if self.covariates is None else self.covariates)
        categorical = list(study.categorical if self.categorical is None else self.categorical)
        unknown = sorted(set(covariates) - set(study.covariates))
        if unknown or set(categorical) - set(covariates):
            raise ValueError(
                f"covariates {unknown} are not the study's; categorical must be covariates"
            )
        described = federation.describe()
        features = list(federation.features if features is None else features)
        if isinstance(self.exclude, str):
            raise TypeError(f"exclude must be a list of feature names, got {self.exclude!r}")
        exclude = study.exclude if self.exclude is None else tuple(self.exclude)
        unknown = sorted(set(self.exclude or ()) - set(features))
        if unknown:
            raise ValueError(f"exclude names {unknown}, which are not among the features")
        features, self.kept_out_ = combat_features(described, features, exclude)
        batch_levels = sorted({b for r in described.values() for b in r["batch_levels"]})
        levels = {
            c: sorted({lv for r in described.values() for lv in r["levels"][c]})
            for c in categorical
        }
        numeric = [c for c in covariates if c not in categorical]
        names = numeric + [f"{c}={lv}" for c in categorical for lv in levels[c][1:]]
        cfg = replace(
            study,
            covariates=tuple(covariates),
            categorical=tuple(categorical),
            parametric=self.parametric,
            mean_only=self.mean_only,
        )
        self.feature_names_ = features
        self.batch_levels_ = batch_levels
        self.levels_ = levels
        self.covariate_names_ = names
        if not features:  # every feature kept out: nothing to harmonise
            self.estimates_ = None
            self.gamma_star_ = self.delta_star_ = np.empty((len(batch_levels), 0))
            return self
        federation.transport.step = "combat"
        self.estimates_ = fit_combat(
            federation.transport, features, batch_levels, levels, names, cfg
        )
        self.gamma_star_ = self.estimates_.gamma_star
        self.delta_star_ = self.estimates_.delta_star
        return self

    def payload(self) -> Payload:
        """What every later request carries so that sites harmonise their rows."""
        self._fitted("estimates_")
        if self.estimates_ is None:
            return {}
        return {**self.estimates_.to_payload(), "levels": self.levels_}


class Standardiser(_Estimator):
    """Pooled mean and SD (1/n, as glmnet) of columns, from each site's n, mean and sum
    of squared deviations (one round; Chan's parallel formula, no cancellation).

    Parameters
    ----------
    columns : sequence of str, optional
        Default: the federation's features.
    subset : {"train", "test", "all"}, default "train"

    Attributes
    ----------
    columns_ : list of str
    mean_, scale_ : ndarray of shape (p,)
    n_ : int
    """

    def __init__(self, columns: Sequence[str] | None = None, subset: str = "train") -> None:
        self.columns = columns
        self.subset = subset

    def fit(self, federation: Federation) -> Standardiser:
        from radfed.server.stats.solvers import pooled_standardisation

        columns = list(federation.features if self.columns is None else self.columns)
        federation.transport.step = "standardise"
        self.mean_, self.scale_, self.n_ = pooled_standardisation(
            federation.transport, columns, self.subset
        )
        self.columns_ = columns
        return self

    def of(self, columns: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Mean and scale of some of the fitted columns, in the order given."""
        self._fitted("mean_")
        index = [self.columns_.index(c) for c in columns]
        return self.mean_[index], self.scale_[index]

    def transform(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``(x - mean) / sd`` of the fitted columns of ``frame``."""
        self._fitted("mean_")
        return (frame[self.columns_] - self.mean_) / self.scale_


class MRMR(_Estimator):
    """Federated mRMR: F-statistic relevance, mean |Pearson r| redundancy (k rounds).

    Runs before the LASSO's cross-validation, as in seed 000 (see the README): the CV
    deviance that follows is then optimistic.

    Parameters
    ----------
    k : int, default 30
        Features to keep.
    mode : {"columns", "gram"}, default "columns"
        One round per pick (cross-products with the picked feature), or one round with
        the whole Gram matrix.

    Attributes
    ----------
    selected_ : list of str
        The picks, in order.
    relevance_, scores_ : ndarray
    result_ : MrmrResult
    """

    def __init__(self, k: int = 30, mode: str = "columns") -> None:
        self.k = k
        self.mode = mode

    def fit(
        self,
        federation: Federation,
        features: Sequence[str] | None = None,
        standardiser: Standardiser | None = None,
    ) -> MRMR:
        from radfed.server.stats.mrmr import mrmr_federated
        from radfed.server.study.phases import select_asker

        features = list(federation.features if features is None else features)
        if standardiser is None:
            standardiser = Standardiser(features).fit(federation)
        center, scale = standardiser.of(features)
        federation.transport.step = "mrmr"
        self.result_ = mrmr_federated(
            select_asker(federation.transport, features),
            features,
            k=min(self.k, len(features)),
            mode=self.mode,
            center=center,
            scale=scale,
        )
        self.selected_ = list(self.result_.selected)
        self.relevance_ = np.asarray(self.result_.relevance)
        self.scores_ = np.asarray(self.result_.scores)
        return self

    def summary(self) -> str:
        """The picks with their relevance and mRMR scores."""
        self._fitted("result_")
        return self.result_.summary()


class LassoCV(_Estimator):
    """cv.glmnet's L1-penalised logistic regression with K-fold CV, federated.

    The objective is glmnet's on features standardised with the pooled mean and SD; the
    folds are drawn by each site within its training rows. The chosen model defines the
    Radscore, ``β0 + Σ β_j (x_j - mean_j) / sd_j``.

    Parameters
    ----------
    n_lambdas : int, default 100
    lambda_min_ratio : float, optional
        Default: glmnet's (1e-4 when N > p, else 0.01).
    rule : {"lambda.min", "lambda.1se"}, default "lambda.min"
    folds, seed : int, optional
        Default: the study's (the sites draw their folds with the study's settings).

    Attributes
    ----------
    result_ : LassoCVResult
    features_ : list of str
    lambdas_, cvm_, cvsd_ : ndarray
    lambda_min_, lambda_1se_, lambda_ : float
        ``lambda_`` is the one chosen by ``rule``.
    intercept_ : float
    coef_ : ndarray of shape (p,)
        Coefficients per pooled SD at ``lambda_``.
    center_, scale_ : ndarray of shape (p,)
    formula_ : str
        The Radscore formula.
    """

    def __init__(
        self,
        n_lambdas: int = 100,
        lambda_min_ratio: float | None = None,
        rule: str = "lambda.min",
        folds: int | None = None,
        seed: int | None = None,
    ) -> None:
        self.n_lambdas = n_lambdas
        self.lambda_min_ratio = lambda_min_ratio
        self.rule = rule
        self.folds = folds
        self.seed = seed

    @property
    def _which(self) -> str:
        if self.rule not in ("lambda.min", "lambda.1se"):
            raise ValueError(f"rule must be 'lambda.min' or 'lambda.1se', got {self.rule!r}")
        return "min" if self.rule == "lambda.min" else "1se"

    def fit(
        self,
        federation: Federation,
        features: Sequence[str] | None = None,
        standardiser: Standardiser | None = None,
    ) -> LassoCV:
        from radfed.server.stats.lasso import lasso_cv
        from radfed.server.study.phases import select_asker

        which = self._which
        features = list(federation.features if features is None else features)
        if standardiser is None:
            standardiser = Standardiser(features).fit(federation)
        center, scale = standardiser.of(features)
        federation.transport.step = "lasso"
        res = lasso_cv(
            select_asker(federation.transport, features),
            features,
            center,
            scale,
            n_folds=federation.config.selection.folds if self.folds is None else self.folds,
            seed=federation.seed if self.seed is None else self.seed,
            n_lambdas=self.n_lambdas,
            lambda_min_ratio=self.lambda_min_ratio,
        )
        beta = res.coef(which)
        self.result_ = res
        self.features_ = features
        self.lambdas_, self.cvm_, self.cvsd_ = res.lambdas, res.cvm, res.cvsd
        self.lambda_min_, self.lambda_1se_ = res.lambda_min, res.lambda_1se
        self.lambda_ = res.lambda_min if which == "min" else res.lambda_1se
        self.intercept_, self.coef_ = float(beta[0]), np.asarray(beta[1:])
        self.center_, self.scale_ = np.asarray(center), np.asarray(scale)
        self.formula_ = res.radscore_formula(which=which)
        return self

    def summary(self) -> str:
        """The λ path, the CV choice and the coefficients."""
        self._fitted("result_")
        return self.result_.summary()

    def payload(self) -> Payload:
        """The Radscore definition every later request carries."""
        self._fitted("coef_")
        return {
            "radscore_columns": list(self.features_),
            "radscore_center": self.center_,
            "radscore_scale": self.scale_,
            "radscore_beta": np.concatenate([[self.intercept_], self.coef_]),
        }

    def decision_function(self, frame: pd.DataFrame) -> np.ndarray:
        """The Radscore (log-odds) of each row of ``frame`` (harmonised features)."""
        self._fitted("coef_")
        X = design(frame[self.features_].to_numpy(dtype=float), self.center_, self.scale_)
        return X @ np.concatenate([[self.intercept_], self.coef_])

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """Probabilities of each class, shape (n, 2), as scikit-learn's."""
        p = 1.0 / (1.0 + np.exp(-self.decision_function(frame)))
        return np.column_stack([1.0 - p, p])


# ---------------------------------------------------------------- logistic regression


class LogisticResults:
    """statsmodels-style results of a federated logistic regression.

    Coefficients are per pooled SD of each predictor (the fit is on standardised
    columns); ``params_per_unit`` and ``bse_per_unit`` are on the variables' own scales.
    Wald inference from the inverse of the summed Hessian.
    """

    def __init__(self, fit: LogisticFit) -> None:
        self.fit = fit
        self.names = list(fit.names)

    def _series(self, values: np.ndarray) -> pd.Series:
        return pd.Series(np.asarray(values, dtype=float), index=self.names)

    @property
    def params(self) -> pd.Series:
        return self._series(self.fit.coef)

    @property
    def bse(self) -> pd.Series:
        return self._series(self.fit.se)

    @property
    def tvalues(self) -> pd.Series:
        """Wald z statistics (statsmodels' name)."""
        return self._series(self.fit.zvalues)

    @property
    def pvalues(self) -> pd.Series:
        return self._series(self.fit.pvalues)

    @property
    def params_per_unit(self) -> pd.Series:
        return self._series(self.fit.coef_per_unit)

    @property
    def bse_per_unit(self) -> pd.Series:
        return self._series(self.fit.se_per_unit)

    @property
    def nobs(self) -> int:
        return int(self.fit.n)

    @property
    def deviance(self) -> float:
        return float(self.fit.deviance)

    @property
    def llf(self) -> float:
        """Log-likelihood at the estimate."""
        return -0.5 * float(self.fit.deviance)

    def cov_params(self) -> pd.DataFrame:
        return pd.DataFrame(self.fit.cov, index=self.names, columns=self.names)

    def conf_int(self, alpha: float = 0.05) -> pd.DataFrame:
        """Wald confidence intervals, columns 0 (lower) and 1 (upper), as statsmodels."""
        return pd.DataFrame(self.fit.conf_int(alpha), index=self.names, columns=[0, 1])

    def odds_ratios(self, alpha: float = 0.05) -> pd.DataFrame:
        """Odds ratio per SD with its interval (the intercept's row is the baseline odds)."""
        ci = np.exp(self.conf_int(alpha))
        return pd.DataFrame({"odds_ratio": np.exp(self.params), "lower": ci[0], "upper": ci[1]})

    def summary(self, alpha: float = 0.05) -> str:
        """A text table in the manner of statsmodels' ``Logit`` summary."""
        width = 78
        lo, hi = alpha / 2, 1 - alpha / 2
        ci = self.conf_int(alpha)
        lines = [
            "Federated logistic regression results".center(width).rstrip(),
            "=" * width,
            _pair("Dep. Variable:", self.fit.outcome, "No. Observations:", self.nobs),
            _pair("Sites:", self.fit.n_sites, "Df Model:", len(self.names) - 1),
            _pair("Converged:", self.fit.converged, "Log-Likelihood:", f"{self.llf:.4f}"),
            _pair("Iterations:", self.fit.iterations, "Deviance:", f"{self.deviance:.4f}"),
            "-" * width,
            f"{'':<24}{'coef':>9}{'std err':>10}{'z':>9}{'P>|z|':>9}"
            f"{f'[{lo:.3f}':>9}{f'{hi:.3f}]':>9}",
        ]
        for name in self.names:
            lines.append(
                f"{name[:24]:<24}{self.params[name]:>9.4f}{self.bse[name]:>10.4f}"
                f"{self.tvalues[name]:>9.3f}{self.pvalues[name]:>9.3f}"
                f"{ci.loc[name, 0]:>9.3f}{ci.loc[name, 1]:>9.3f}"
            )
        lines += [
            "=" * width,
            "Coefficients per pooled SD of each predictor (params_per_unit: own units).",
        ]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _pair(left: str, left_value: Any, right: str, right_value: Any) -> str:
    return f"{left:<18}{left_value!s:>20}   {right:<18}{right_value!s:>19}"


class LogisticRegression(_Estimator):
    """Logistic regression fitted on the pooled training rows of every site.

    Predictors are standardised with their pooled mean and SD (one round), then Newton
    steps on the summed Hessians and scores run to convergence; the Wald covariance is
    the inverse of the summed Hessian. Equal to statsmodels' ``Logit`` on the pooled
    standardised rows.

    Parameters
    ----------
    columns : sequence of str
        Predictors (clinical variables, features, ``"Radscore"`` after a
        :class:`LassoCV` step).

    Attributes
    ----------
    results_ : LogisticResults
    params_, bse_, pvalues_ : pandas.Series
    intercept_ : float
    coef_ : ndarray of shape (p,)
        Per pooled SD.
    center_, scale_ : ndarray of shape (p,)
    n_iter_ : int
    """

    def __init__(self, columns: Sequence[str] = ()) -> None:
        self.columns = columns

    def fit(self, federation: Federation) -> LogisticRegression:
        fits = _fit_standardised(federation, {"model": list(self.columns)})
        return self._set(fits["model"])

    def _set(self, fit: LogisticFit) -> LogisticRegression:
        self.fit_ = fit
        self.results_ = LogisticResults(fit)
        self.params_ = self.results_.params
        self.bse_ = self.results_.bse
        self.pvalues_ = self.results_.pvalues
        self.intercept_ = float(fit.coef[0])
        self.coef_ = np.asarray(fit.coef[1:])
        self.center_, self.scale_ = fit.center, fit.scale
        self.n_iter_ = fit.iterations
        return self

    def decision_function(self, frame: pd.DataFrame) -> np.ndarray:
        """Linear predictor (log-odds) of each row of ``frame``."""
        self._fitted("fit_")
        X = design(frame[list(self.fit_.columns)].to_numpy(dtype=float), self.center_, self.scale_)
        return X @ self.fit_.coef

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """Probabilities of each class, shape (n, 2), as scikit-learn's."""
        p = 1.0 / (1.0 + np.exp(-self.decision_function(frame)))
        return np.column_stack([1.0 - p, p])

    def predict(self, frame: pd.DataFrame, threshold: float = 0.5) -> np.ndarray:
        """1 where the predicted risk is at least ``threshold``."""
        return (self.predict_proba(frame)[:, 1] >= threshold).astype(int)

    def summary(self) -> str:
        self._fitted("results_")
        return self.results_.summary()


def _fit_standardised(
    federation: Federation, models: Mapping[str, list[str]]
) -> dict[str, LogisticFit]:
    from radfed.server.study.phases import fit_standardised

    federation.transport.step = "models"
    return fit_standardised(federation.transport, dict(models), federation.outcome)


def fit_models(
    federation: Federation, models: Mapping[str, Sequence[str]]
) -> dict[str, LogisticRegression]:
    """Several logistic models in shared rounds (one standardisation round over all
    their columns, then Newton rounds carrying every unconverged model), as a study
    fits its clinical, radiomics and nomogram models."""
    fits = _fit_standardised(federation, {k: list(v) for k, v in models.items()})
    return {name: LogisticRegression(models[name])._set(fit) for name, fit in fits.items()}


class Screening(_Estimator):
    """Univariable logistic screening: a variable is retained when its Wald p-value is
    below ``threshold`` (all univariable models share their rounds).

    Parameters
    ----------
    threshold : float, default 0.05

    Attributes
    ----------
    pvalues_ : pandas.Series
    retained_ : list of str
    models_ : dict of str to LogisticRegression
    """

    def __init__(self, threshold: float = 0.05) -> None:
        self.threshold = threshold

    def fit(self, federation: Federation, columns: Sequence[str] | None = None) -> Screening:
        """A study's categorical clinical variables (``[study] categorical``) enter with
        their dummy columns and are tested by one likelihood-ratio test each (see
        :class:`~radfed.server.study.phases.ClinicalSelection`); ``retained_`` then
        lists the retained variables' model columns, dummies included."""
        from radfed.server.study.phases import clinical_levels, screen_clinical

        columns = list(federation.clinical if columns is None else columns)
        federation.transport.step = "screening"
        categorical = [c for c in federation.config.clinical_categorical if c in columns]
        levels = clinical_levels(federation.describe(), categorical)
        selection = screen_clinical(
            federation.transport, columns, federation.outcome, self.threshold, levels
        )
        self.selection_ = selection
        self.models_ = {
            c: LogisticRegression(fit.columns)._set(fit) for c, fit in selection.univariable.items()
        }
        self.pvalues_ = pd.Series(selection.pvalues, dtype=float)
        self.retained_ = selection.retained
        return self


# ------------------------------------------------------------------------ evaluation


def evaluate(
    federation: Federation,
    models: Mapping[str, LogisticRegression],
    subsets: Sequence[str] = ("train", "test"),
) -> dict[str, Any]:
    """Per-site and pooled metrics of fitted models, as a study's evaluate phase.

    Returns ``performance[model][site or "pooled"][subset]``: n, events, AUC with its
    DeLong CI, Brier score, calibration intercept, slope and Hosmer-Lemeshow test,
    sensitivity and specificity at the pooled Youden cut-off, decision curves, and rms
    ``val.prob``'s ``dxy``, ``r2``, ``brier_scaled`` and ``calibration.ici``, ``e50``,
    ``e90``, ``emax`` (docs/python-api.md, "val.prob's indices").
    """
    from radfed.server.stats.evaluation import evaluate_models

    fits = {name: m.fit_ for name, m in models.items()}
    work = federation.with_pipeline()  # evaluation adds the models to its context
    work.transport.step = "evaluate"
    performance, _, _ = evaluate_models(work.transport, fits, federation.outcome, tuple(subsets))
    return performance


def validate(
    federation: Federation,
    models: Mapping[str, LogisticRegression],
    sites: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Metrics of fitted models on all patients of sites that did not fit them.

    ``sites`` defaults to the study's validation-only sites. Sensitivity, specificity
    and accuracy use each model's Youden cut-off on the pooled training data, as
    ``radfed run`` does. Returns ``{site: {"status", "reason", "n", "events",
    "metrics": {model: metrics}, "comparisons": [...]}}``.
    """
    from radfed.server.stats.evaluation import evaluate_models, external_metrics

    fits = {name: m.fit_ for name, m in models.items()}
    work = federation.with_pipeline()
    work.transport.step = "evaluate"
    _, _, cutoffs = evaluate_models(work.transport, fits, federation.outcome, ("train",))
    work.transport.step = "validation"
    targets = list(federation.validation_sites if sites is None else sites)
    return external_metrics(work.transport, fits, targets, cutoffs, federation.outcome)
