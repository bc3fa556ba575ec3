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

import dataclasses
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

import radfed
from radfed.server.federation.shared_rounds import rounds_so_far, together
from radfed.server.federation.transport import SiteFailure, Transport
from radfed.server.results import LogisticFit, StudyResult
from radfed.server.stats.axis_ranges import drawn_model
from radfed.server.stats.evaluation import evaluate_models
from radfed.server.study.bootstrap import bootstrap_jobs
from radfed.server.study.bootstrap import summary as bootstrap_summary
from radfed.server.study.checkpoint import Checkpoint
from radfed.server.study.classifiers import compare_classifiers
from radfed.server.study.external import leave_one_site_out, meta_analysis, validation_sites
from radfed.server.study.phases import (
    KEPT_OUT_RULE,
    clinical_levels,
    combat_features,
    fit_combat,
    fit_standardised,
    screen_clinical,
    select_radiomics,
)
from radfed.shared.config import MIN_TRAINING_SITES, StudyConfig
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

    def __init__(
        self, config: StudyConfig, transport: Transport, checkpoint: Checkpoint | None = None
    ) -> None:
        self.config = config
        self.transport = transport
        # Completed phases on disk: a restarted coordinator resumes after the last one.
        self.checkpoint = checkpoint
        transport.protocol = config.protocol()

    def _phase(self, name: str, transport: Transport | None = None) -> None:
        (transport or self.transport).step = name
        log.info("phase: %s", name)

    def run(self) -> StudyResult:
        """Fit on the training sites, evaluate, then validate externally.

        A training site that stops answering (:class:`SiteFailure`) stops the run
        (``[federation] on_site_failure = "stop"``), or (``"drop"``) the whole fit
        starts again from the first phase without it: every exact step depends on the
        site set of the steps before it (ComBat, standardisation, folds, LASSO), so
        only a fit from the start on the remaining sites gives a pooled analysis of
        them. The result records each dropped site (``federation["dropped_sites"]``)
        and the abandoned rounds (``rounds["abandoned"]``). Validation-only and
        held-out sites failing during external validation only fail their entries.
        """
        cfg, transport = self.config, self.transport
        unreachable = sorted(set(cfg.site_names) - set(transport.reachable))
        if unreachable:
            raise FederationError(f"the transport cannot reach site(s) {unreachable}")
        dropped: list[dict[str, Any]] = []
        abandoned = 0
        active = self
        saved = self.checkpoint.load("fit") if self.checkpoint else None
        if saved is not None:  # a resumed run: the fit and its evaluation are done
            active_config, state = saved[3], saved[4]
            active = FederatedStudy(active_config, transport, self.checkpoint)
            transport.sites, transport.context = state["sites"], state["context"]
            transport.param_budget = state["budget"]
            transport.rounds = Counter(self._rounds_saved(state["rounds"]))
            dropped, abandoned = state["dropped"], state["abandoned"]
        while True:
            try:
                fitted, performance, external = active._fit_evaluate_validate(
                    saved, dropped, abandoned
                )
                break
            except SiteFailure as failure:
                if saved is not None:
                    raise
                active = FederatedStudy(
                    self._without(failure, active.config, dropped), transport, self.checkpoint
                )
                abandoned += sum(transport.rounds.values())
                transport.rounds = Counter()
        fitted.details["external"] = external
        for site, failure in transport.failed.items():  # during external validation
            if site not in {d["site"] for d in dropped}:
                record = next(r for r in failure.records() if r["site"] == site)
                action = (
                    "its external validation is marked failed"
                    if site in cfg.validation_sites
                    else "the leave-one-site-out entries that need it are marked failed "
                    "(the main fit, finished before, keeps it)"
                )
                dropped.append({**record, "action": action})
        result = self._result(fitted, performance)
        if abandoned:
            result.rounds["abandoned"] = abandoned
        if dropped:
            result.federation["dropped_sites"] = dropped
        return result

    def _fit_evaluate_validate(
        self, saved: tuple | None, dropped: list[dict[str, Any]], abandoned: int
    ) -> tuple[FittedStudy, dict[str, Any], dict[str, Any]]:
        """The main fit and its evaluation and validation sites, beside every
        leave-one-site-out refit: they do not depend on each other, so they share rounds.

        Raises
        ------
        SiteFailure
            A training site stopped answering during the main fit or its evaluation (the
            refits are then abandoned too).
        """
        cfg, transport, checkpoint = self.config, self.transport, self.checkpoint
        if saved is None:
            transport.sites = cfg.training_sites
            transport.context, transport.param_budget = {}, {}
        status, jobs = leave_one_site_out(
            cfg,
            list(transport.sites),
            refit=lambda sub: FederatedStudy(cfg, sub).fit(),
            checkpoint=checkpoint,
        )

        def main(lane: Transport) -> tuple[FittedStudy, dict[str, Any], dict[str, Any]]:
            if saved is not None:
                fitted, performance, cutoffs = saved[:3]
            else:
                fitted, performance, cutoffs = FederatedStudy(cfg, lane)._fit_and_evaluate()
                if checkpoint:
                    state = {
                        "sites": list(lane.sites),
                        "context": lane.context,
                        "budget": lane.param_budget,
                        "rounds": rounds_so_far(lane),
                        "dropped": dropped,
                        "abandoned": abandoned,
                    }
                    checkpoint.save("fit", (fitted, performance, cutoffs, cfg, state))
            if cfg.classifiers.compare:
                # Seed 000's Table 3 needs the Radscore and the radiomics model (in the
                # lane's context now): it shares rounds with the validation sites.
                validation, fitted.details["classifiers"] = together(
                    lane,
                    [
                        lambda sub: validation_sites(cfg, sub, fitted, cutoffs),
                        lambda sub: compare_classifiers(sub, cfg),
                    ],
                )
            else:
                validation = validation_sites(cfg, lane, fitted, cutoffs)
            # The transport ends with the main fit's state (its context: the fitted
            # pipeline), as when it ran alone.
            transport.context, transport.param_budget = lane.context, lane.param_budget
            return fitted, performance, validation

        # Harrell's bootstrap (none unless [validation] bootstrap): B more refits.
        boot = bootstrap_jobs(cfg, refit=lambda sub: FederatedStudy(cfg, sub).fit())
        outcomes = together(
            transport,
            [main, *jobs.values(), *boot],
            tallies=[None, *["external"] * len(jobs), *["bootstrap"] * len(boot)],
            cancel_on_error=True,
        )
        fitted, performance, validation = outcomes[0]
        held_out = dict(zip(jobs, outcomes[1 : 1 + len(jobs)], strict=True))
        if boot:
            fitted.details["evaluation"]["bootstrap"] = bootstrap_summary(
                cfg, performance, outcomes[1 + len(jobs) :]
            )
        external = {
            "validation": validation,
            "held_out": held_out,
            "meta": meta_analysis(held_out, list(fitted.models)) if held_out else {},
            **status,
        }
        return fitted, performance, external

    def _rounds_saved(self, rounds: dict[str, int]) -> dict[str, int]:
        """A resumed run's rounds so far: the newest checkpoint's count (the main fit's,
        or a later leave-one-site-out refit's, which includes it)."""
        counts = [rounds]
        for held in self.config.training_sites:
            entry = self.checkpoint.load(f"held_out-{held}") if self.checkpoint else None
            if entry is not None:
                counts.append(entry[1])
        return max(counts, key=lambda c: sum(c.values()))

    def _fit_and_evaluate(self) -> tuple[FittedStudy, dict[str, Any], dict[str, int]]:
        """The pipeline on the training sites, from the first phase, and its evaluation.

        Raises
        ------
        SiteFailure
            A training site stopped answering, here or in a round whose failure a
            phase recorded without raising (a calibration curve).
        """
        cfg, transport = self.config, self.transport
        transport.sites = cfg.training_sites
        transport.context, transport.param_budget = {}, {}
        fitted = self.fit()
        self._phase("evaluate")
        # The nomogram's axis ranges travel in this round.
        performance, evaluation, cutoffs = evaluate_models(
            transport, fitted.models, cfg.outcome, ranges_model=drawn_model(fitted.models)
        )
        for site in cfg.training_sites:
            if site in transport.failed:
                raise transport.failed[site]
        fitted.details["evaluation"] = evaluation
        return fitted, performance, cutoffs

    def _without(
        self, failure: SiteFailure, config: StudyConfig, dropped: list[dict[str, Any]]
    ) -> StudyConfig:
        """The study without the failed sites, when the policy and the sites left allow.

        Raises
        ------
        SiteFailure
            The policy is ``"stop"`` (its message names the site, phase and wait, and
            what to do).
        FederationError
            Fewer than :data:`MIN_TRAINING_SITES` training sites would remain.
        """
        if self.config.on_site_failure != "drop":
            raise failure
        left = [s for s in config.training_sites if s not in failure.failures]
        if len(left) < MIN_TRAINING_SITES:
            raise FederationError(
                f'{failure.what}; on_site_failure = "drop" would leave {len(left)} training '
                f"site(s) ({', '.join(left) or 'none'}), fewer than the {MIN_TRAINING_SITES} "
                "a federated fit needs: restart the site's SuperNode and run the study again"
            ) from failure
        action = f"the fit restarted from the first phase on {', '.join(left)}"
        dropped += [{**r, "action": action} for r in failure.records()]
        log.warning(
            '%s: on_site_failure = "drop": %s (%d round(s) of the failed attempt abandoned)',
            failure.what,
            action,
            sum(self.transport.rounds.values()),
        )
        return dataclasses.replace(
            config, sites=tuple(s for s in config.sites if s.name not in failure.failures)
        )

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
        # The radiomics phases and the clinical screening do not depend on each other:
        # they share rounds.
        jobs: list[Callable[[Transport], Any]] = []
        if features:
            jobs.append(lambda lane: self._radiomics(lane, described, features))
        if clinical:
            jobs.append(lambda lane: self._screening(lane, described, clinical))
        outcomes = together(transport, jobs)
        if features:
            radiomics, context, features = outcomes.pop(0)
            details.update(radiomics)
            transport.context.update(context)
        retained: list[str] = []
        if clinical:
            screening = outcomes.pop(0)
            transport.context.update(screening.context)  # the categorical levels
            details["clinical_screening"] = screening.to_dict()
            retained = screening.retained
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

    def _radiomics(
        self, transport: Transport, described: dict[str, Payload], features: list[str]
    ) -> tuple[dict[str, Any], Payload, list[str]]:
        """Reproducibility, ComBat and the selection of the Radscore.

        Returns the phases' details, the context later requests need (the ComBat
        estimates and the Radscore) and the features kept.
        """
        cfg = self.config
        details: dict[str, Any] = {}
        comparisons = reader_comparisons(described)
        if comparisons:
            self._phase("reproducibility", transport)
            repro = self._reproducibility(transport, features, comparisons)
            details["reproducibility"] = repro.to_dict()
            features = repro.kept
            if not features:
                log.warning("no feature passes the ICC threshold %g", cfg.selection.icc_threshold)
        if features and cfg.harmonization.method == "combat":
            self._phase("combat", transport)
            details["harmonization"] = self._harmonise(transport, described, features)
        if features:
            self._phase("selection", transport)
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
                mrmr_in_folds=sel.mrmr_in_folds,
            )
            details["selection"] = selection.to_dict()
            transport.context.update(selection.radscore_payload())
        return details, transport.context, features

    def _screening(
        self, transport: Transport, described: dict[str, Payload], clinical: list[str]
    ) -> Any:
        """Univariable screening of the clinical variables."""
        cfg = self.config
        self._phase("screening", transport)
        levels = clinical_levels(described, list(cfg.clinical_categorical))
        screening = screen_clinical(
            transport, clinical, cfg.outcome, cfg.univariable_p, levels=levels
        )
        if not screening.retained:
            log.warning("no clinical variable has p < %g: no clinical model", cfg.univariable_p)
        return screening

    def _reproducibility(
        self, transport: Transport, features: list[str], comparisons: list[str]
    ) -> Any:
        """ICC of every feature across readers; the features below the threshold go."""
        from radfed.server.stats.reproducibility import reproducibility

        sel = self.config.selection
        replies = transport.ask(
            "reproducibility", {"icc_features": features, "comparisons": comparisons}
        )
        result = reproducibility(features, replies, comparisons, sel.icc_type, sel.icc_threshold)
        for name in comparisons:
            result.comparisons[name]["status"] = {
                site: reply[f"{name}_status"] for site, reply in replies.items()
            }
        return result

    def _harmonise(
        self, transport: Transport, described: dict[str, Payload], features: list[str]
    ) -> dict[str, Any]:
        """Fit ComBat on the training rows; later requests carry the estimates.

        Binary features and those the study excludes are kept out (the estimates do
        not name them, so the sites leave them as they are)."""
        h = self.config.harmonization
        batch_levels = sorted({b for r in described.values() for b in r["batch_levels"]})
        harmonised, kept_out = combat_features(described, features, h.exclude)
        which = {"harmonised": harmonised, "kept_out": kept_out, "kept_out_rule": KEPT_OUT_RULE}
        if not harmonised:
            log.warning("ComBat: every feature is kept out (%s); nothing to harmonise", kept_out)
            return {"method": "combat", "batch": h.batch, "batch_levels": batch_levels, **which}
        features = harmonised
        levels = {
            c: sorted({lv for r in described.values() for lv in r["levels"][c]})
            for c in h.categorical
        }
        numeric = [c for c in h.covariates if c not in h.categorical]
        covariate_names = numeric + [f"{c}={lv}" for c in h.categorical for lv in levels[c][1:]]
        estimates = fit_combat(transport, features, batch_levels, levels, covariate_names, h)
        transport.context.update({**estimates.to_payload(), "levels": levels})
        return {
            "method": "combat",
            "batch": h.batch,
            "batch_levels": batch_levels,
            # The features ComBat harmonised (the columns of gamma_star, delta_star and
            # var_pooled) and those it kept out, with why.
            **which,
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
                # Patients per kind of reason, as the site published them (-1: fewer
                # than its minimum cell size, merged into "other reasons").
                "exclusions": dict(described[site].get("exclusions") or {}),
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
