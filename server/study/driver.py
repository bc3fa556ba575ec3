"""The study driver: the phases of a federated study run, over any transport.

Phases (seed 000's method, federated): consistency (sites agree on extraction settings
and variables), split (each site splits its own patients), reproducibility (when sites
give second-reader or repeat masks: features with an ICC below the threshold are
dropped), ComBat harmonisation of the features, radiomics selection (standardisation,
mRMR, LASSO with K-fold CV -> the Radscore), the radiomics model (logistic on the
Radscore), the clinical model (univariable screening, then multivariable), the nomogram
(retained clinical variables plus the Radscore), and evaluation per site and split. The
number of federated rounds of each phase is recorded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

import radfed
from radfed.server.federation.transport import Transport
from radfed.server.results import LogisticFit, StudyResult
from radfed.server.stats.evaluation import evaluate_models
from radfed.server.study.external import external_validation
from radfed.server.study.phases import (
    fit_combat,
    fit_standardised,
    screen_clinical,
    select_radiomics,
)
from radfed.shared.config import StudyConfig
from radfed.shared.errors import FederationError
from radfed.shared.messages import RADSCORE, Payload

log = logging.getLogger(__name__)

CONSISTENT = ("features", "clinical", "settings_hash", "pyradiomics_version")


def check_consistency(described: dict[str, Payload]) -> dict[str, Any]:
    """Refuse a federation whose sites extracted or named their data differently.

    Returns
    -------
    dict
        The shared values (feature names, extraction settings hash, versions).

    Raises
    ------
    FederationError
        Listing every site that differs from the first site, and how.
    """
    reference_site, reference = next(iter(described.items()))
    problems = []
    for site, reply in described.items():
        for key in CONSISTENT:
            if reply[key] != reference[key]:
                mine, theirs = reply[key], reference[key]
                if isinstance(mine, list):
                    extra = sorted(set(mine) - set(theirs))[:5]
                    lacking = sorted(set(theirs) - set(mine))[:5]
                    detail = (
                        f"extra {extra}, lacking {lacking}"
                        if extra or lacking
                        else "different order"
                    )
                else:
                    detail = f"{mine!r} vs {theirs!r}"
                problems.append(f"{site} differs from {reference_site} in {key}: {detail}")
    if problems:
        raise FederationError("sites are not consistent:\n  " + "\n  ".join(problems))
    return {key: reference[key] for key in CONSISTENT} | {
        "radfed_version": reference["radfed_version"]
    }


def reader_comparisons(described: dict[str, Payload]) -> list[str]:
    """The reader comparisons some site has masks for (none: no reproducibility phase)."""
    from radfed.shared.reproducibility_stats import COMPARISONS

    masks = {m for reply in described.values() for m in reply.get("reader_masks", [])}
    return [name for name, columns in COMPARISONS.items() if set(columns[1:]) <= masks]


@dataclass
class FittedStudy:
    """The pipeline fitted on some sites: what the sites said, and the models."""

    described: dict[str, Payload]
    split: dict[str, Payload]
    shared: dict[str, Any]
    models: dict[str, LogisticFit]
    details: dict[str, Any]


class FederatedStudy:
    """Run a study over a transport and collect a :class:`StudyResult`.

    Parameters
    ----------
    config : StudyConfig
    transport : Transport
        Any of the three transports; the driver does not know which. It must reach
        every site of the study; the pipeline is fitted on the training sites.
    """

    def __init__(self, config: StudyConfig, transport: Transport) -> None:
        self.config = config
        self.transport = transport
        transport.protocol = config.protocol()

    def _phase(self, name: str) -> None:
        self.transport.step = name
        log.info("phase: %s", name)

    def run(self) -> StudyResult:
        """Fit on the training sites, evaluate, then validate externally."""
        cfg, transport = self.config, self.transport
        unreachable = sorted(set(cfg.site_names) - set(transport.reachable))
        if unreachable:
            raise FederationError(f"the transport cannot reach site(s) {unreachable}")
        transport.sites = cfg.training_sites
        fitted = self.fit()
        self._phase("evaluate")
        performance, evaluation, cutoffs = evaluate_models(transport, fitted.models, cfg.outcome)
        fitted.details["evaluation"] = evaluation
        fitted.details["external"] = external_validation(
            cfg, transport, fitted, cutoffs, refit=lambda sub: FederatedStudy(cfg, sub).fit()
        )
        return self._result(fitted, performance)

    def fit(self) -> FittedStudy:
        """The pipeline on ``transport.sites``: consistency, split, ComBat, selection,
        screening and the three models."""
        cfg, transport = self.config, self.transport
        self._phase("consistency")
        described = transport.ask("describe")
        for site, reply in described.items():
            if reply["site"] != site:
                raise FederationError(f"site {site!r} answered as {reply['site']!r}")
        shared = check_consistency(described)
        self._phase("split")
        split = transport.ask("split")
        fraction = cfg.privacy.max_param_fraction
        transport.param_budget = {
            subset: fraction * min(int(r[f"n_{subset}"]) for r in split.values())
            for subset in ("train", "test")
        }

        features, clinical = list(shared["features"]), list(shared["clinical"])
        models: dict[str, LogisticFit] = {}
        details: dict[str, Any] = {}
        comparisons = reader_comparisons(described)
        if features and comparisons:
            self._phase("reproducibility")
            repro = self._reproducibility(features, comparisons)
            details["reproducibility"] = repro.to_dict()
            features = repro.kept
            if not features:
                log.warning("no feature passes the ICC threshold %g", cfg.selection.icc_threshold)
        if features and cfg.harmonization.method == "combat":
            self._phase("combat")
            details["harmonization"] = self._harmonise(described, features)
        if features:
            self._phase("selection")
            sel = cfg.selection
            selection = select_radiomics(
                transport,
                features,
                sel.mrmr_k,
                sel.folds,
                cfg.seed,
                sel.n_lambdas,
                sel.lambda_min_ratio,
                sel.rule,
            )
            details["selection"] = selection.to_dict()
            transport.context.update(selection.radscore_payload())
        retained: list[str] = []
        if clinical:
            self._phase("screening")
            screening = screen_clinical(transport, clinical, cfg.outcome, cfg.univariable_p)
            details["clinical_screening"] = screening.to_dict()
            retained = screening.retained
            if not retained:
                log.warning("no clinical variable has p < %g: no clinical model", cfg.univariable_p)
        specs = {"radiomics": [RADSCORE]} if features else {}
        if retained:
            specs["clinical"] = retained
            if features:
                specs["nomogram"] = [*retained, RADSCORE]
        if specs:
            self._phase("models")
            models = fit_standardised(transport, specs, cfg.outcome)
        if not models:
            raise FederationError("no model to fit: no feature, and no clinical variable retained")
        return FittedStudy(described, split, shared, models, details)

    def _reproducibility(self, features: list[str], comparisons: list[str]) -> Any:
        """ICC of every feature across readers; the features below the threshold go."""
        from radfed.server.stats.reproducibility import reproducibility

        sel = self.config.selection
        replies = self.transport.ask(
            "reproducibility", {"icc_features": features, "comparisons": comparisons}
        )
        result = reproducibility(features, replies, comparisons, sel.icc_type, sel.icc_threshold)
        for name in comparisons:
            result.comparisons[name]["status"] = {
                site: reply[f"{name}_status"] for site, reply in replies.items()
            }
        return result

    def _harmonise(self, described: dict[str, Payload], features: list[str]) -> dict[str, Any]:
        """Fit ComBat on the training rows; later requests carry the estimates."""
        h = self.config.harmonization
        batch_levels = sorted({b for r in described.values() for b in r["batch_levels"]})
        levels = {
            c: sorted({lv for r in described.values() for lv in r["levels"][c]})
            for c in h.categorical
        }
        numeric = [c for c in h.covariates if c not in h.categorical]
        covariate_names = numeric + [f"{c}={lv}" for c in h.categorical for lv in levels[c][1:]]
        estimates = fit_combat(self.transport, features, batch_levels, levels, covariate_names, h)
        self.transport.context.update({**estimates.to_payload(), "levels": levels})
        return {
            "method": "combat",
            "batch": h.batch,
            "batch_levels": batch_levels,
            "levels": levels,
            "n_per_batch": dict(zip(batch_levels, estimates.n_per_batch.tolist(), strict=True)),
            "covariates": covariate_names,
            "parametric": h.parametric,
            "mean_only": h.mean_only,
            "unadjusted_features": [
                f for f, a in zip(features, estimates.adjusted, strict=True) if not a
            ],
            # The fitted batch effects (B x p) and pooled variance, for the record.
            "gamma_star": estimates.gamma_star.tolist(),
            "delta_star": estimates.delta_star.tolist(),
            "var_pooled": estimates.var_pooled.tolist(),
            # Everything a new patient's harmonisation needs (the logged MLflow model).
            "estimates": {
                k: v.tolist() if isinstance(v, np.ndarray) else v
                for k, v in estimates.to_payload().items()
            },
        }

    def _result(self, fitted: FittedStudy, performance: dict[str, Any]) -> StudyResult:
        cfg = self.config
        described, split, shared = fitted.described, fitted.split, fitted.shared
        sites = {
            site: {
                "n": described[site]["n"],
                "events": described[site]["events"],
                # A site sends its exclusions only when the count passes min_cell.
                "n_excluded": described[site]["n_excluded"]
                if described[site]["n_excluded"] >= 0
                else None,
                **{
                    subset: {
                        "n": split[site][f"n_{subset}"],
                        "events": split[site][f"events_{subset}"],
                    }
                    for subset in ("train", "test")
                },
            }
            for site in described
        }
        federation = {
            **shared,
            "sites": list(described),
            "validation_sites": cfg.validation_sites,
            "n_features": len(shared["features"]),
            "flwr_version": _flwr_version(),
            "radfed_version": radfed.__version__,
        }
        return StudyResult(
            study=cfg.name,
            outcome=cfg.outcome,
            transport=self.transport.name,
            sites=sites,
            models=fitted.models,
            performance=performance,
            rounds=dict(self.transport.rounds),
            federation=federation,
            details={"settings": cfg.as_params(), **fitted.details},
            created=datetime.now(UTC).isoformat(timespec="seconds"),
        )


def _flwr_version() -> str:
    from importlib.metadata import version

    return version("flwr")
