"""What a hospital computes: site statistics over its own rows, behind its privacy rules.

Every request names a task and carries the study protocol plus the pipeline fitted so
far (ComBat estimates, the Radscore), so any process may answer any request. The site
treats every field of a request as hostile: it pins the study's protocol the first time
it answers it, draws its split and folds with a secret of its own, owns the grids of
its evaluation counts, refuses crafted models and patient sets that differ from an
answered one by fewer than ``min_cell`` patients, and logs every request and reply to
its append-only audit log (:mod:`radfed.client.site_state`). The site answers with
aggregates only (sums, cross-products, counts); each reply passes the site's
:class:`~radfed.shared.privacy.PrivacyPolicy` before it leaves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from scipy.special import expit

import radfed
from radfed.client.data import SiteTable, TableSpec
from radfed.client.site_state import SiteState, default_state_dir, protocol_hash
from radfed.client.table_cache import cached_site_table
from radfed.client.validate import reason_counts
from radfed.shared import evaluation_stats as es
from radfed.shared.bootstrap import poisson_weights
from radfed.shared.config import SITE_BATCH
from radfed.shared.errors import PrivacyRefusal, RadfedError
from radfed.shared.logistic import design, newton_pieces
from radfed.shared.messages import BATCH, RADSCORE, Payload, pack, unpack
from radfed.shared.messages import LINEAR_PREDICTOR as LP
from radfed.shared.privacy import PrivacyPolicy, refuse
from radfed.shared.selection_stats import assign_folds

log = logging.getLogger(__name__)

#: Harmonised views a site keeps (per subset and pipeline): fits that share rounds (the
#: main fit and each leave-one-site-out refit) take turns, each with its own pipeline.
VIEWS_KEPT = 16

TRAIN, TEST = "train", "test"
SPLITS = (TRAIN, TEST)
SUBSETS = (TRAIN, TEST, "all")
#: Derived column prefix: a power of a model's logit p ("cal:nomogram:2"), for the
#: smooth calibration curve (logistic fits only).
CALIBRATION = "cal:"


@dataclass(frozen=True)
class SiteSettings:
    """A site's own settings: where its data is and which limits it enforces."""

    name: str
    data_dir: Path
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    cache_dir: Path | None = None
    jobs: int = 1
    progress: bool = False
    #: The site's own state (secret, pinned studies, answered sets, audit log);
    #: default :func:`~radfed.client.site_state.default_state_dir`, fixed at creation.
    state_dir: Path | None = None
    #: Protocol hashes the site's IT approved; when given, no other study is answered.
    approved_studies: tuple[str, ...] = ()
    #: The highest bootstrap replicate the site answers (each one is a refit of the
    #: whole pipeline on its training rows reweighted: see :meth:`Site._bootstrap`).
    max_bootstrap: int = 200
    #: The most classifier-comparison training rounds the site answers (seed 000's
    #: Table 3: each round sends XGBoost trees and FedAvg parameters); 0: none.
    max_classifier_rounds: int = 20

    def __post_init__(self) -> None:
        if self.state_dir is None:
            object.__setattr__(self, "state_dir", default_state_dir(self.name, self.data_dir))


def stratified_split(
    y: np.ndarray,
    test_fraction: float,
    seed: int,
    site: str,
    secret: bytes = b"",
    levels: Sequence[np.ndarray] = (),
    min_cell: int = 0,
) -> np.ndarray:
    """Boolean mask of test rows: the same fraction of each class, reproducible per site.

    The generator is seeded by the study seed, the site name and the site's secret, so
    a site's split does not change when other sites join or leave, and the coordinator,
    who knows neither the secret nor the data, can neither predict nor steer it.

    ``levels`` holds each categorical variable's level per row (clinical variables and
    ComBat's categorical covariates). A level held by 1 to ``min_cell - 1`` patients of a
    split would make the site refuse every model with that variable on it (or, for a
    covariate, send that small count inside ComBat's sums), so draws are repeated (on
    the same stream, at most :data:`SPLIT_DRAWS` times) until every level is absent from
    a split or held by at least ``min_cell`` of its patients; levels fewer than
    ``min_cell`` patients hold in all are left out of the check (no split helps them).
    Without levels the first draw is the split; when no draw qualifies the first one is
    kept, and the site's rules refuse what it cannot answer.
    """
    words = np.frombuffer(hashlib.sha256(secret).digest(), dtype=np.uint32) if secret else []
    rng = np.random.default_rng([seed, zlib.crc32(site.encode()), *map(int, words)])
    first = None
    # Each variable as level codes once, with the levels at least min_cell patients hold.
    coded = [_codes(labels, min_cell) for labels in levels]
    for _ in range(SPLIT_DRAWS if len(levels) and min_cell > 1 else 1):
        test = np.zeros(len(y), dtype=bool)
        for cls in (0, 1):
            idx = np.flatnonzero(y == cls)
            n_test = round(test_fraction * len(idx))
            test[rng.permutation(idx)[:n_test]] = True
        first = test if first is None else first
        if not any(_rare(c, rows, min_cell) for c in coded for rows in (test, ~test)):
            return test
    return first


#: How many split draws a site tries for one without a rare categorical level.
SPLIT_DRAWS = 1000


def _codes(labels: np.ndarray, min_cell: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's level code, and which levels at least ``min_cell`` patients hold in
    all (no split helps the others)."""
    _, codes, totals = np.unique(labels, return_inverse=True, return_counts=True)
    return codes.ravel(), totals >= min_cell


def _rare(coded: tuple[np.ndarray, np.ndarray], rows: np.ndarray, min_cell: int) -> bool:
    """Whether a checked level is held by 1 to ``min_cell - 1`` of the ``rows``."""
    codes, checked = coded
    counts = np.bincount(codes[rows], minlength=len(checked))[checked]
    return bool(np.any((counts > 0) & (counts < min_cell)))


def table_spec(protocol: dict[str, Any]) -> TableSpec:
    """The columns a study's protocol needs from a site table."""
    categorical = list(protocol.get("categorical", []))
    clinical_categorical = list(protocol.get("clinical_categorical", []))
    batch = protocol.get("batch", SITE_BATCH)
    labels = ([] if batch == SITE_BATCH else [batch]) + categorical + clinical_categorical
    numeric = [c for c in protocol.get("covariates", []) if c not in categorical]
    return TableSpec(
        outcome=protocol["outcome"],
        clinical=tuple(protocol["clinical"]),
        features=tuple(protocol["features"]),
        numeric=tuple(numeric),
        labels=tuple(dict.fromkeys(labels)),
        categorical=tuple(clinical_categorical),
    )


def _digest(request: Payload, prefixes: tuple[str, ...]) -> str:
    """A fingerprint of the pipeline parameters in a request (to reuse a computed view)."""
    h = hashlib.sha256()
    for key in sorted(k for k in request if k.startswith(prefixes)):
        value = request[key]
        h.update(key.encode())
        h.update(value.tobytes() if isinstance(value, np.ndarray) else json.dumps(value).encode())
    return h.hexdigest()


class Site:
    """A site's analysis table for one study, with its split, folds and statistics.

    Parameters
    ----------
    settings : SiteSettings
    protocol : dict
        The study protocol sent by the coordinator (outcome, variables, split, seed,
        extraction parameters, batch and covariates). Pinned at the site the first time
        the study is answered; a later change is refused.
    """

    PIPELINE = ("combat_", "radscore_", "levels")

    def __init__(self, settings: SiteSettings, protocol: dict[str, Any]) -> None:
        self.settings = settings
        self.protocol = protocol
        self.study = str(protocol.get("study", ""))
        self.state = SiteState(settings.state_dir)
        self.protocol_hash = self.state.pin(
            protocol, settings.approved_studies, settings.privacy.min_cell
        )
        self.table: SiteTable = cached_site_table(  # reused across messages
            settings.data_dir,
            table_spec(protocol),
            params=protocol.get("extraction_params", "default"),
            cache_dir=settings.cache_dir,
            jobs=settings.jobs,
            progress=settings.progress,
        )
        secret = self.state.secret()
        y = self.table.y
        # Rare levels decide the draw through the min_cell pinned with the study (a
        # study pinned before redraws existed keeps its first draw).
        rule = self.state.split_rule(self.study)
        self.test_mask = stratified_split(
            y,
            protocol["test_fraction"],
            protocol["seed"],
            settings.name,
            secret,
            levels=self._split_levels() if rule["rule"] >= 2 else (),
            min_cell=rule["min_cell"],
        )
        # Folds of the training rows, drawn here with the site's secret and the pinned
        # number of folds: a request's seed or fold count is never used.
        self.n_folds = int(protocol.get("folds", 10))
        self.folds = assign_folds(
            y[~self.test_mask], self.n_folds, int(protocol["seed"]), settings.name, secret
        )
        fold_of_row = np.full(len(y), -1)
        fold_of_row[~self.test_mask] = self.folds
        self.ids = self.table.frame.index.to_numpy(dtype=str)
        self.state.write_assignment(
            self.study, self.ids, np.where(self.test_mask, TEST, TRAIN), fold_of_row
        )
        self.sent_counts: dict[str, float] = {}
        self.sets_used: list[str] = []
        self.pending_sets: dict[str, np.ndarray] = {}
        self._views: dict[tuple[str, int, str], pd.DataFrame] = {}
        #: The bootstrap replicate being answered (0: none) and, per row, its weights
        #: (0 on test rows), with the site's policy for it (see :meth:`_bootstrap`).
        self.replicate = 0
        self._weights: np.ndarray | None = None
        self._replicate_policy: PrivacyPolicy | None = None
        self.handlers: dict[str, Callable[[Payload], Payload]] = {
            "describe": self.describe,
            "split": self.split_counts,
            "moments": self.moments,
            "logistic": self.logistic,
            "evaluate": self.evaluate,
            "combat_design": self.combat_design,
            "combat_residuals": self.combat_residuals,
            "combat_batches": self.combat_batches,
            "select": self.select,
            "reproducibility": self.reproducibility,
            "classifiers": self.classifiers,
        }

    def _split_levels(self) -> list[np.ndarray]:
        """Per row, the level of each categorical clinical variable, ComBat categorical
        covariate and (when not the site) ComBat batch: what the split keeps from rare
        cells."""
        batch = self.protocol.get("batch", SITE_BATCH)
        names = [c for c in self.protocol.get("categorical", []) if c in self.table.labels]
        if batch != SITE_BATCH and batch in self.table.labels:
            names.append(batch)
        return [self.levels_of(c) for c in self.protocol.get("clinical_categorical", [])] + [
            self.table.labels[c].to_numpy(dtype=str) for c in dict.fromkeys(names)
        ]

    @property
    def policy(self) -> PrivacyPolicy:
        if self._replicate_policy is not None:  # inside a bootstrap replicate
            return self._replicate_policy
        return self.settings.privacy

    def rows(self, subset: str) -> np.ndarray:
        """Boolean mask of the patients of ``subset`` (in a bootstrap replicate, the
        training patients it holds at least once): what the differencing rule judges."""
        if subset == TRAIN:
            if self._weights is not None:
                return ~self.test_mask & (self._weights > 0)
            return ~self.test_mask
        if subset == TEST:
            return self.test_mask
        if subset == "all":
            return np.ones_like(self.test_mask)
        raise RadfedError(f"unknown subset {str(subset)[:40]!r}; a site answers over {SUBSETS}")

    def index(self, subset: str) -> np.ndarray:
        """Positions of the rows of ``subset`` in the site's table, in table order: in
        a bootstrap replicate, each training row repeated by its weight (the rows every
        statistic is computed over)."""
        if subset == TRAIN and self._weights is not None:
            return np.repeat(np.arange(len(self._weights)), self._weights)
        return np.flatnonzero(self.rows(subset))

    def fold_of_rows(self) -> np.ndarray:
        """The CV fold of each row of :meth:`index` of the training split (a repeated
        row keeps its patient's fold)."""
        if self._weights is not None:
            return np.repeat(self.folds, self._weights[~self.test_mask])
        return self.folds

    def _counts(self, subset: str) -> dict[str, int]:
        y = self.table.y[self.index(subset)]
        return {"n": len(y), "events": int(y.sum()), "non_events": int(len(y) - y.sum())}

    def _answer_over(self, subsets: list[str]) -> None:
        """Apply the differencing rule to the patient sets of ``subsets``."""
        self._check_sets({s: self.rows(s) for s in subsets})

    def _check_sets(self, sets: dict[str, np.ndarray]) -> None:
        # Checked now, remembered only once the reply passed every rule (handle). Sets
        # are of distinct patients: the site's own min_cell, also in a replicate.
        privacy, weights = self.settings.privacy, self._weights
        self.state.check_sets(
            sets, self.ids, self.table.y, self.study, privacy, record=False, weights=weights
        )
        self.pending_sets.update(sets)
        self.sets_used += [s for s in sets if s not in self.sets_used]

    def _sent(self, name: str, value: float) -> None:
        self.sent_counts[name] = value

    # -- the pipeline as the coordinator has fitted it so far ---------------------------

    def batches(self, subset: str) -> np.ndarray:
        """Batch label of each row: the site's name, or its batch column."""
        rows = self.index(subset)
        batch = self.protocol.get("batch", SITE_BATCH)
        if batch == SITE_BATCH:
            return np.full(len(rows), self.settings.name, dtype=object)
        return self.table.labels[batch].to_numpy(dtype=object)[rows]

    def covariates(self, subset: str, levels: dict[str, list[str]]) -> np.ndarray:
        """ComBat's covariate design columns, encoded with the federation's levels."""
        from radfed.harmonization.combat import encode_covariates

        rows = self.index(subset)
        categorical = list(self.protocol.get("categorical", []))
        numeric = [c for c in self.protocol.get("covariates", []) if c not in categorical]
        frame = pd.concat([self.table.frame[numeric], self.table.labels[categorical]], axis=1)
        cov, _ = encode_covariates(frame.iloc[rows], numeric, {c: levels[c] for c in categorical})
        return cov

    def view(self, request: Payload, subset: str) -> pd.DataFrame:
        """The rows of ``subset`` after the pipeline in ``request``: ComBat-harmonised
        features and, when the request defines it, the Radscore column (a linear
        predictor, checked like any model's)."""
        key = (subset, self.replicate, _digest(request, self.PIPELINE))
        if key not in self._views:
            frame = self.table.frame.iloc[self.index(subset)].copy()
            if "combat_feature_names" in request:
                from radfed.harmonization.combat import ComBatEstimates, apply_combat

                est = self._with_own_batches(ComBatEstimates.from_payload(request), request)
                names = list(est.feature_names)
                cov = self.covariates(subset, request.get("levels", {}))
                # .loc keeps the frame in one block (no fragmentation warnings).
                frame.loc[:, names] = apply_combat(
                    est, frame[names].to_numpy(), self.batches(subset), cov
                )
            if "radscore_columns" in request:
                frame[RADSCORE] = self._guarded_lp(request, "radscore", frame, "Radscore")
            self._views[key] = frame
            while len(self._views) > VIEWS_KEPT:  # the least recently used goes
                self._views.pop(next(iter(self._views)))
        self._views[key] = self._views.pop(key)
        return self._views[key]

    def _with_own_batches(self, estimates: Any, request: Payload) -> Any:
        """ComBat estimates extended by this site's batches that the federation never
        saw (a held-out or validation-only site): estimated here, from all of the site's
        rows and without the outcome; nothing is sent."""
        from radfed.harmonization.combat import estimate_new_batch

        own = set(self.batches("all"))
        if own <= set(estimates.batch_levels):
            return estimates
        names = list(estimates.feature_names)
        return estimate_new_batch(
            estimates,
            self.table.frame[names].to_numpy(dtype=float),
            self.batches("all"),
            self.covariates("all", request.get("levels", {})),
        )

    def _columns(self, frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
        columns = _names(columns, "columns")
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise RadfedError(f"the site has no column(s) {missing}")
        if not columns:
            return np.empty((len(frame), 0))
        return frame[columns].to_numpy(dtype=float)

    def _standardised(
        self,
        request: Payload,
        model: str,
        frame: pd.DataFrame,
        context: str,
        calibration: bool = False,
    ) -> np.ndarray:
        """The design matrix of ``model`` on ``frame``, after the standardisation rule."""
        columns = _names(request[f"{model}_columns"], f"{model}_columns")
        derived = [c.startswith((LP, CALIBRATION)) for c in columns]
        x = self._derived(request, columns, frame, calibration)
        center = _vector(request[f"{model}_center"], len(columns), f"{model}_center")
        scale = _vector(request[f"{model}_scale"], len(columns), f"{model}_scale")
        raw = ~np.asarray(derived, dtype=bool)
        # Derived columns (another model's logit p, its spline basis) are checked as
        # linear predictors when they are made; raw columns against the site's data.
        self.policy.check_standardisation(x[:, raw], center[raw], scale[raw], context)
        return design(x, center, scale)

    def _guarded_lp(
        self, request: Payload, model: str, frame: pd.DataFrame, context: str
    ) -> np.ndarray:
        """A model's linear predictor on ``frame``, refused when crafted (saturated,
        or standardised unlike the site's data)."""
        X = self._standardised(request, model, frame, context)
        beta = _vector(request[f"{model}_beta"], X.shape[1], f"{model}_beta")
        eta = X @ beta
        self.policy.check_linear_predictor(eta, context)
        return eta

    def _derived(
        self,
        request: Payload,
        columns: list[str],
        frame: pd.DataFrame,
        calibration: bool = False,
    ) -> np.ndarray:
        """Columns of ``frame``, where "lp:{model}" is the linear predictor of a model
        the request carries and, in calibration fits only (``calibration``),
        "cal:{model}:{k}" its k-th power (k = 2 or 3).

        Powers, not spline terms: a hinge (x - t)+ is zero below its knot, so moving a
        crafted model's intercept would select patients one at a time; a power of the
        linear predictor sums over every patient of the set.
        """
        out = []
        for c in columns:
            if c.startswith(LP):
                out.append(self._guarded_lp(request, c[len(LP) :], frame, f"model {c}"))
            elif c.startswith(CALIBRATION):
                model, _, k = c[len(CALIBRATION) :].rpartition(":")
                if not calibration or k not in ("2", "3"):
                    raise RadfedError(f"column {c!r} is only a calibration fit's (k = 2, 3)")
                lp = self._guarded_lp(request, model, frame, f"model {model}")
                out.append(lp ** int(k))
            elif self._dummy_of(c):
                out.append(self._dummy(request, frame, c))
            else:
                out.append(self._columns(frame, [c])[:, 0])
        return np.column_stack(out) if out else np.empty((len(frame), 0))

    # -- categorical clinical variables (one-hot, with the federation's levels) ---------

    def _dummy_of(self, column: str) -> str:
        """The categorical clinical variable whose dummy column ``column`` ("name=level")
        is, or ''."""
        name, sep, _ = column.partition("=")
        return name if sep and name in self.protocol.get("clinical_categorical", []) else ""

    def _dummy(self, request: Payload, frame: pd.DataFrame, column: str) -> np.ndarray:
        """1 where the patient's level is the column's, else 0. A level of the rows that
        the request's federation levels (``clinical_levels``) lack is an error: the
        patient would silently count as the reference level."""
        name, _, level = column.partition("=")
        labels = self.levels_of(name, frame.index)
        known = (request.get("clinical_levels") or {}).get(name)
        if known is not None:
            extra = sorted({str(v) for v in labels} - set(map(str, known)))
            if extra:
                raise RadfedError(
                    f"categorical variable {name!r} has level(s) {extra[:5]} at this site that "
                    f"the federation's levels {list(known)[:10]} lack"
                )
        return (labels == level).astype(float)

    def levels_of(self, name: str, index: pd.Index | None = None) -> np.ndarray:
        """Each patient's level (of ``index``, default all) of a categorical clinical
        variable, after the study's ``merge_levels``."""
        labels = self.table.labels[name] if index is None else self.table.labels.loc[index, name]
        groups = (self.protocol.get("merge_levels") or {}).get(name) or {}
        merged = {old: new for new, olds in groups.items() for old in olds}
        return np.array([merged.get(v, v) for v in labels.astype(str)], dtype=str)

    def _check_levels(
        self, columns: list[str], frame: pd.DataFrame, subset: str, context: str
    ) -> None:
        """Refuse a reply over ``frame``'s patients that uses a dummy column of a
        categorical variable one of whose levels (the reference included) some but fewer
        than ``min_cell`` of them hold: a mean or Hessian of the dummies would publish
        that count. Dummies are answered over the training patients only (the models
        never need others): a level's count over all patients minus its count over the
        training ones would be its count in the test split. A refusal names the
        variable, never the level or the count."""
        names = list(dict.fromkeys(filter(None, map(self._dummy_of, columns))))
        if names and subset != TRAIN:
            raise refuse(
                "differencing",
                context,
                f"the dummy columns of {names} are answered over the training patients only",
            )
        for name in names:
            counts = pd.Series(self.levels_of(name, frame.index)).value_counts()
            if any(self.policy.small(int(n)) for n in counts):
                raise refuse(
                    "min-cell",
                    context,
                    f"a level of the categorical variable {name!r} is held by fewer patients "
                    f"than the site's minimum cell size {self.policy.min_cell} (merge rare "
                    "levels, or leave the variable numeric)",
                )

    def _outcome(self, frame: pd.DataFrame) -> np.ndarray:
        return frame[self.table.outcome].to_numpy(dtype=float)

    def _data(
        self, request: Payload, columns: list[str], subset: str
    ) -> tuple[np.ndarray, np.ndarray]:
        frame = self.view(request, subset)
        return self._derived(request, _names(columns, "columns"), frame), self._outcome(frame)

    # -- tasks -------------------------------------------------------------------------

    def describe(self, request: Payload) -> Payload:
        """What the coordinator checks for consistency; counts and names, no values.

        Exclusions are sent as a count only when it passes ``min_cell`` (zero included);
        their reasons stay at the site (``radfed validate``). ``binary_features`` names
        the features whose every value here is 0 or 1 (ComBat keeps them out)."""
        from radfed.harmonization.binary import site_binary_features

        self._answer_over(["all"])
        counts = self._counts("all")
        self.policy.check_counts(counts, "describe")
        # ComBat's categorical covariates and the categorical clinical variables (after
        # the study's merges): the names of the levels the site holds, never counts.
        categorical = list(self.protocol.get("categorical", []))
        clinical = list(self.protocol.get("clinical_categorical", []))
        excluded = self.excluded()
        shown = excluded if not self.policy.small(excluded) else -1
        for k, v in counts.items():
            self._sent(f"all {k}", v)
        self._sent("excluded", shown)
        return {
            # Patients per kind of reason (no values, no ids), small counts merged.
            "exclusions": self.policy.suppress(reason_counts(self.table.problems)),
            "site": self.settings.name,
            **counts,
            "n_excluded": shown,
            "clinical": self.table.clinical,
            "features": self.table.features,
            "settings_hash": self.table.settings_hash,
            "pyradiomics_version": self.table.pyradiomics_version,
            "radfed_version": radfed.__version__,
            "batch_levels": sorted(set(self.batches("all"))),
            "levels": {
                **{c: sorted(set(self.table.labels[c])) for c in categorical},
                **{c: sorted({str(v) for v in self.levels_of(c)}) for c in clinical},
            },
            # Which reproducibility masks the site has (names only; see reproducibility).
            "reader_masks": sorted(
                r for r, t in getattr(self.table, "readers", {}).items() if len(t)
            ),
            # Which features are 0/1 here, for ComBat to keep out: a yes or no per
            # feature over all of the site's patients (the set just checked), never
            # over rows a request names.
            **site_binary_features(
                self.table.frame[self.table.features].to_numpy(dtype=float), self.table.features
            ),
        }

    def excluded(self) -> int:
        """Patients kept out (one per patient, whatever its number of problems)."""
        return len({(p.row, p.patient_id) for p in self.table.problems})

    def split_counts(self, request: Payload) -> Payload:
        """Patients and events in each split."""
        reply: Payload = {}
        for subset in SPLITS:
            counts = self._counts(subset)
            self.policy.check_counts(counts, f"{subset} split")
            reply.update({f"{k}_{subset}": v for k, v in counts.items()})
            for k, v in counts.items():
                self._sent(f"{subset} {k}", v)
        self._answer_over(list(SPLITS))
        return reply

    def moments(self, request: Payload) -> Payload:
        """n, mean and sum of squared deviations from the mean (``m2``) of each column.

        The coordinator combines them exactly by Chan's parallel formula; raw Σx² would
        lose the SD of a feature whose mean dwarfs it (mean 1e9, SD 30) to cancellation.
        """
        subset = _subset(request.get("subset", TRAIN))
        columns = _names(request["columns"], "columns")
        self._check_levels(columns, self.view(request, subset), subset, "moments")
        self._answer_over([subset])
        x, _ = self._data(request, request["columns"], subset)
        self.policy.check_counts({"n": len(x)}, "moments")
        self._sent(f"{subset} n", len(x))
        mean = x.mean(axis=0)
        return {"n": len(x), "mean": mean, "m2": ((x - mean) ** 2).sum(axis=0)}

    def logistic(self, request: Payload) -> Payload:
        """For each model: Hessian, score and deviance of the log-likelihood at its beta.

        ``models`` names the models; each has ``{model}_columns``, ``_center``, ``_scale``
        and ``_beta`` (several models are fitted in the same rounds). The parameters of
        all the request's models together count against the site's parameter limit;
        each model's linear predictor must be neither saturated nor concentrated on
        fewer than ``min_cell`` patients.
        """
        subset = _subset(request.get("subset", TRAIN))
        self._answer_over([subset])
        counts = self._counts(subset)
        self.policy.check_counts(counts, "logistic")
        models = _names(request["models"], "models")
        n_params = sum(len(_names(request[f"{m}_columns"], "columns")) + 1 for m in models)
        self.policy.check_parameters(n_params, counts["n"], "logistic")
        frame = self.view(request, subset)
        y = self._outcome(frame)
        reply: Payload = {}
        for model in models:
            columns = _names(request[f"{model}_columns"], "columns")
            self._check_levels(columns, frame, subset, f"logistic ({model})")
            X = self._standardised(request, model, frame, f"logistic ({model})", True)
            beta = _vector(request[f"{model}_beta"], X.shape[1], f"{model}_beta")
            eta = X @ beta
            mu = expit(eta)
            self.policy.check_linear_predictor(eta, f"logistic ({model})", mu * (1 - mu))
            pieces = newton_pieces(X, y, beta)
            reply.update(
                {
                    f"{model}_hessian": pieces.hessian,
                    f"{model}_gradient": pieces.gradient,
                    f"{model}_deviance": pieces.deviance,
                    f"{model}_n": pieces.n,
                }
            )
            if request.get(f"{model}_gap") is True:
                reply[f"{model}_gap"] = self._calibration_gap(request, model, columns, X, mu)
        self._sent(f"{subset} n", counts["n"])
        return reply

    def _announce(
        self, reply: Payload, subset: str, status: str, reason: str, counts: dict[str, int]
    ) -> bool:
        """Put a subset's evaluation status in ``reply`` and, unless it is refused, its
        n and events (the subset then passes the differencing rule); False: refused."""
        reply.update({f"{subset}_status": status, f"{subset}_reason": reason})
        if status == "refused":
            return False
        self._answer_over([subset])
        reply.update({f"{subset}_n": counts["n"], f"{subset}_events": counts["events"]})
        self._sent(f"{subset} n", counts["n"])
        self._sent(f"{subset} events", counts["events"])
        return True

    def _calibration_gap(
        self, request: Payload, model: str, columns: list[str], X: np.ndarray, curve: np.ndarray
    ) -> float:
        """``sum |c(lp) - expit(lp)|`` over the rows, ``c`` the curve being fitted and
        ``lp`` its first column, another model's linear predictor: the numerator of the
        pooled ICI. A sum over the split like the deviance sent beside it."""
        if not columns[0].startswith(LP):
            raise RadfedError(
                f"request field {model + '_gap'!r}: a calibration gap needs a model's "
                "linear predictor as the first column"
            )
        center = _vector(request[f"{model}_center"], len(columns), f"{model}_center")
        scale = _vector(request[f"{model}_scale"], len(columns), f"{model}_scale")
        lp = X[:, 1] * scale[0] + center[0]
        return float(np.abs(curve - expit(lp)).sum())

    def evaluate(self, request: Payload) -> Payload:
        """Per subset and model: discrimination, calibration and decision-curve sums.

        ``models`` names the models (each with ``{model}_columns``, ``_center``,
        ``_scale``, ``_beta``); ``subsets`` the rows (default train and test). The grids
        are the site's own (:data:`~radfed.shared.evaluation_stats.THRESHOLDS`,
        :data:`~radfed.shared.evaluation_stats.BIN_EDGES`, decile Hosmer-Lemeshow
        groups), whatever the request says; threshold cells and risk bins are merged
        until every count sent, and every difference of counts sent, is 0 or at least
        ``min_cell`` (``{subset}_tp_exact`` and ``_fp_exact`` mark the thresholds whose
        counts are exact). A subset with one class only is reported as undefined, and one whose
        counts are below the site's minimum cell as refused, each with its reason.
        For rms ``val.prob``'s indices: each model's log-likelihood sum, its smooth
        calibration curve fitted here (4 coefficients, within the parameter limit) and
        the ICI of that curve (a mean over the split); no quantile or maximum of the
        patients' errors leaves the site. With ``ranges_model`` and ``ranges``, the
        training split's merged counts on the site's value grid for the nomogram's axes
        (:meth:`_value_counts`).
        """
        models = _names(request["models"], "models")
        subsets = [_subset(s) for s in _names(request.get("subsets", list(SPLITS)), "subsets")]
        m = self.policy.min_cell
        reply: Payload = {}
        columns = [c for name in models for c in _names(request[f"{name}_columns"], "columns")]
        for subset in subsets:
            counts = self._counts(subset)
            status, reason = self._evaluable(counts)
            rare = self._rare_level(columns, subset)
            if rare and status != "refused":
                status, reason = "refused", rare
            # Each model's calibration intercept and slope is a fit here: on a split too
            # small for all of them (parameter rule) they are not fitted, the rest is sent.
            fit_calibration = 2 * len(models) <= self.policy.max_param_fraction * counts["n"]
            # The site's own smooth calibration curves (val.prob's ICI, E50, E90, Emax)
            # are fits too, counted with the intercepts and slopes.
            n_curve = (es.CURVE_DEGREE + 1) * len(models)
            fit_curves = 2 * len(models) + n_curve <= self.policy.max_param_fraction * counts["n"]
            if not self._announce(reply, subset, status, reason, counts):
                continue
            if subset == TRAIN and request.get("ranges") and counts["n"]:
                reply.update(self._value_counts(request, models, subset))
            if status != "ok":
                continue
            x, y = self._data(request, [f"{LP}{name}" for name in models], subset)
            P = expit(x)
            # DeLong on the linear predictors (their ties), counts on the risks.
            stats = es.discrimination(y, x, P, m)
            tp, fp = stats["tp"], stats["fp"]
            bin_n, observed, expected = es.coarsen_bins(*es.calibration_bins(y, P, es.BIN_EDGES), m)
            # HL on g - 2 df where the model was fitted (train), g df on other patients.
            hl = [
                es.hosmer_lemeshow(y, P[:, j], es.HL_GROUPS, validation=subset != TRAIN)
                for j in range(len(models))
            ]
            fits = (
                np.array([es.calibration_fit(y, P[:, j]) for j in range(len(models))])
                if fit_calibration
                else np.full((len(models), 2), np.nan)
            )
            curves = np.full((len(models), es.CURVE_DEGREE + 1), np.nan)
            if fit_curves:
                curves = np.array(
                    [es.calibration_curve_fit(y, x[:, j]) for j in range(len(models))]
                )
            errors = [es.calibration_errors(x[:, j], curves[j]) for j in range(len(models))]
            reply.update(
                {
                    **{f"{subset}_{k}": v for k, v in stats.items()},
                    f"{subset}_bin_n": bin_n,
                    f"{subset}_bin_observed": observed,
                    f"{subset}_bin_expected": expected,
                    f"{subset}_brier": np.array([es.brier(y, P[:, j]) for j in range(len(models))]),
                    f"{subset}_cal_intercept": fits[:, 0],
                    f"{subset}_cal_slope": fits[:, 1],
                    f"{subset}_hl_statistic": np.array([h.statistic for h in hl]),
                    f"{subset}_hl_df": np.array([h.df for h in hl], dtype=float),
                    f"{subset}_hl_p": np.array([h.pvalue for h in hl]),
                    # val.prob's R² (with n and events) and ICI: sums over the subset.
                    f"{subset}_loglik": np.array(
                        [es.log_likelihood(y, P[:, j]) for j in range(len(models))]
                    ),
                    f"{subset}_ici": np.array([float(np.mean(e)) for e in errors]),
                    **{f"{subset}_curve_{k}": curves[:, k] for k in range(curves.shape[1])},
                }
            )
            self._sent(f"{subset} smallest count at a threshold or bin", _smallest(tp, fp, bin_n))
        return reply

    def _value_counts(self, request: Payload, models: list[str], subset: str) -> Payload:
        """For the nomogram's axis ranges: the patients of ``subset`` (the training
        split) at or below each point of the site's value grid, for each column of
        ``ranges``, merged until every cell, and both tails, hold 0 or at least
        ``min_cell`` (:func:`~radfed.shared.evaluation_stats.value_counts_at_grid`).

        Only numeric predictors of the request's model ``ranges_model`` are answered
        (its raw columns and the Radscore, which :meth:`view` computes and guards like
        any linear predictor), never a derived or dummy column; the grid is the site's
        :data:`~radfed.shared.evaluation_stats.VALUE_GRID`, and a request field that
        would set thresholds is ignored.
        """
        model = request.get("ranges_model")
        if not isinstance(model, str) or model not in models:
            raise RadfedError("request field 'ranges_model' must name one of the models")
        allowed = _names(request[f"{model}_columns"], f"{model}_columns")
        columns = _names(request["ranges"], "ranges")
        bad = [
            c
            for c in columns
            if c not in allowed or c.startswith((LP, CALIBRATION)) or self._dummy_of(c)
        ]
        if bad:
            raise RadfedError(
                f"ranges: {bad[:5]} are not numeric predictors of model {model!r}"[:300]
            )
        x = self._columns(self.view(request, subset), columns)
        if not np.isfinite(x).all():
            raise RadfedError("ranges: a requested column holds non-finite values")
        at_or_below, exact = es.value_counts_at_grid(x, self.policy.min_cell)
        self._sent(f"{subset} smallest count at a value-grid point", _smallest(at_or_below))
        return {
            f"{subset}_range_le": at_or_below,
            f"{subset}_range_exact": exact.astype(float),
        }

    def _rare_level(self, columns: list[str], subset: str) -> str:
        """Why models on ``columns`` may not be evaluated on ``subset`` ('' when they
        may): they use a categorical variable one of whose levels some but fewer than
        ``min_cell`` of the split's patients hold (for all patients: of either split's,
        as all minus the training ones is the test split). A model of that level's dummy
        alone would make the log-likelihood (or AUC) a function of those few patients'
        outcomes. Names the variable, never the level or the count."""
        for name in dict.fromkeys(filter(None, map(self._dummy_of, columns))):
            for split in SPLITS if subset not in SPLITS else (subset,):
                index = self.table.frame.iloc[self.index(split)].index
                counts = pd.Series(self.levels_of(name, index)).value_counts()
                if any(self.policy.small(int(n)) for n in counts):
                    return str(
                        refuse(
                            "min-cell",
                            "evaluate",
                            f"a level of the categorical variable {name!r} is held by fewer "
                            f"patients than the site's minimum cell size {self.policy.min_cell} "
                            "in a split (merge rare levels, or leave the variable numeric)",
                        )
                    )
        return ""

    def _evaluable(self, counts: dict[str, int]) -> tuple[str, str]:
        """("ok", ""), ("undefined", why) for one class only, or ("refused", why)."""
        if counts["n"] == 0:
            excluded = self.excluded()
            shown = f"{excluded}" if not self.policy.small(excluded) else "some"
            return "undefined", f"no patient with complete data ({shown} excluded)"
        try:
            self.policy.check_counts({"n": counts["n"]}, "evaluate")
        except PrivacyRefusal as exc:
            return "refused", str(exc)
        if counts["events"] == 0 or counts["non_events"] == 0:
            missing = "events" if counts["events"] == 0 else "non-events"
            return "undefined", f"only one class: no {missing} among {counts['n']} patients"
        try:
            self.policy.check_counts(
                {"events": counts["events"], "non-events": counts["non_events"]}, "evaluate"
            )
        except PrivacyRefusal as exc:
            return "refused", str(exc)
        return "ok", ""

    def _combat_inputs(self, request: Payload) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self._answer_over([TRAIN])
        x, _ = self._data(request, request["combat_features"], TRAIN)
        cov = self.covariates(TRAIN, request.get("levels", {}))
        self.policy.check_counts(self._held_batches(), "ComBat")
        return x, self.batches(TRAIN), cov

    def _held_batches(self) -> dict[str, int]:
        # Counts of the batches this site holds; absent batches are zeros by design.
        labels, counts = np.unique(self.batches(TRAIN), return_counts=True)
        return {f"batch {b}": int(c) for b, c in zip(labels, counts, strict=True)}

    def combat_design(self, request: Payload) -> Payload:
        from radfed.harmonization.combat import site_design_moments

        x, batch, cov = self._combat_inputs(request)
        return site_design_moments(x, batch, cov, request["batch_levels"])

    def combat_residuals(self, request: Payload) -> Payload:
        from radfed.harmonization.combat import site_residual_moments

        x, batch, cov = self._combat_inputs(request)
        return site_residual_moments(x, batch, cov, request["batch_levels"], request["beta"])

    def combat_batches(self, request: Payload) -> Payload:
        from radfed.harmonization.combat import site_batch_moments

        x, batch, cov = self._combat_inputs(request)
        return site_batch_moments(
            x,
            batch,
            cov,
            request["batch_levels"],
            request["beta_covariates"],
            request["grand_mean"],
            request["var_pooled"],
        )

    def select(self, request: Payload) -> Payload:
        """mRMR and LASSO statistics over the training rows (see shared.selection_stats).

        The LASSO's folds are the site's own (drawn with its secret, the pinned number
        of folds); every fold's training and held-out rows pass the differencing rule.
        """
        from radfed.shared.selection_stats import answer

        self._answer_over([TRAIN])
        train = self.rows(TRAIN)  # in a replicate: its patients
        folds = self.fold_of_rows()
        if request.get("step") == "lasso_irls":
            sets = {}
            for k in range(self.n_folds):
                in_fold = np.zeros(len(self.ids), dtype=bool)
                in_fold[np.flatnonzero(~self.test_mask)[self.folds == k]] = True
                sets[f"fold {k}"] = in_fold & train
                sets[f"train without fold {k}"] = train & ~in_fold
            self._check_sets(sets)
        x, y = self._data(request, request["select_columns"], TRAIN)
        if "without_fold" in request:
            # mRMR inside the LASSO's CV: the site names the rows (its own fold, drawn
            # with its secret); the coordinator can only name a fold it has.
            if request.get("step") not in ("mrmr_moments", "mrmr_cross"):
                raise RadfedError("only mRMR's statistics are answered without a fold")
            fold = request["without_fold"]
            if isinstance(fold, (bool, np.bool_)) or not isinstance(fold, (int, np.integer)):
                raise RadfedError("request field 'without_fold' must be a fold number")
            if not 0 <= int(fold) < self.n_folds:
                raise RadfedError(f"the site has no fold {int(fold)} (0..{self.n_folds - 1})")
            in_fold = np.zeros(len(self.ids), dtype=bool)
            in_fold[np.flatnonzero(~self.test_mask)[self.folds == int(fold)]] = True
            self._check_sets({f"train without fold {int(fold)}": train & ~in_fold})
            keep = folds != int(fold)
            x, y = x[keep], y[keep]
        return answer(request, x, y, folds, self.n_folds, self.policy)

    def classifiers(self, request: Payload) -> Payload:
        """Seed 000's classifier comparison on the Radscore (Table 3; the statistics are
        :mod:`radfed.shared.classifier_stats`).

        ``step = "train"``: one federated round over the training rows: ``trees`` new
        XGBoost trees boosted from the global margin ``xgb_margin`` (on the site grid),
        in round 0 the site's ``forest_trees`` random-forest trees, and ``epochs`` of
        the linear SVM and the network from ``svm_params`` and ``nn_params`` (FedAvg).
        ``step = "evaluate"``: each classifier's probabilities on the site's rows of
        ``subsets``, answered as :meth:`evaluate` answers a model (DeLong AUC, threshold
        counts merged to ``min_cell``); the radial SVM and KNN are fitted and scored
        here and never sent. The grid, depths, subsample, epochs and caps are the
        site's (:data:`~radfed.shared.classifier_stats.SITE_LIMITS`, its rounds capped
        by its own ``max_classifier_rounds``; 0 takes no part).
        """
        from radfed.shared import classifier_stats as cs

        cap = self.settings.max_classifier_rounds
        if cap <= 0:
            raise RadfedError(
                "this site takes no part in the classifier comparison "
                "(its max_classifier_rounds is 0)"
            )
        limits, m = replace(cs.SITE_LIMITS, max_rounds=cap), self.policy.min_cell
        cs.refuse_local_model_requests(request)
        step = request.get("step")
        if step not in (cs.TRAIN_STEP, cs.EVALUATE_STEP):
            raise RadfedError("request field 'step' must be 'train' or 'evaluate'")
        counts = self._counts(TRAIN)
        self.policy.check_counts(counts, "classifiers")
        self._answer_over([TRAIN])
        train = self.view(request, TRAIN)
        if RADSCORE not in train.columns:
            raise RadfedError("the classifiers need the Radscore: the request defines none")
        x, y = train[RADSCORE].to_numpy(dtype=float), self._outcome(train)
        n_nn = cs.n_nn_params(limits.hidden)
        svm = cs.params_vector(request, "svm_params", 2, limits)
        nn = cs.params_vector(request, "nn_params", n_nn, limits)
        self.policy.check_parameters(2 + n_nn, counts["n"], "classifiers")
        # The global XGBoost model as its margin on the site's grid, and the forest as
        # its probability there: the site never parses a model the request built.
        margin = cs.grid_vector(request, "xgb_margin", -limits.max_weight, limits.max_weight)
        row_margin = margin[cs.quantise(x)]
        p = expit(row_margin)
        self.policy.check_linear_predictor(row_margin, "classifiers (xgboost)", p * (1 - p))
        self._sent("train n", counts["n"])
        if step == cs.TRAIN_STEP:
            rnd = cs.bounded_int(request, "round", 0, limits.max_rounds - 1)
            trees = cs.bounded_int(request, "trees", 1, limits.max_trees)
            # The site's own stream (its secret): the coordinator cannot steer subsamples.
            secret = self.state.secret() + f"{self.study}:classifiers:{rnd}".encode()
            seed = int.from_bytes(hashlib.sha256(secret).digest()[:8], "little")
            reply: Payload = {
                "n": counts["n"],
                "xgb_model": cs.boost_trees(x, y, row_margin, trees, limits, m, seed),
                "svm_params": cs.svm_epochs(svm, x, y, limits, self.policy),
                "nn_params": cs.nn_epochs(nn, x, y, limits, self.policy),
            }
            if rnd == 0:
                n_forest = cs.bounded_int(request, "forest_trees", 1, limits.max_forest_trees)
                forest = cs.grow_forest(x, y, n_forest, limits, m, seed)
                reply.update({f"rf_tree_{t}": forest[t] for t in range(n_forest)})
            return reply
        forest = cs.grid_vector(request, "rf_prob", 0.0, 1.0)
        names = _names(request.get("classifiers", list(cs.CLASSIFIERS)), "classifiers")
        unknown = [c for c in names if c not in cs.CLASSIFIERS]
        if unknown:
            raise RadfedError(f"unknown classifier(s) {unknown[:3]}; known: {list(cs.CLASSIFIERS)}")
        subsets = [_subset(s) for s in _names(request.get("subsets", list(SPLITS)), "subsets")]
        reply = {}
        for subset in subsets:
            counts = self._counts(subset)
            status, reason = self._evaluable(counts)
            if not self._announce(reply, subset, status, reason, counts):
                continue
            if status != "ok":
                continue
            frame = self.view(request, subset)
            z, yz = frame[RADSCORE].to_numpy(dtype=float), self._outcome(frame)
            scores = {
                # Reused, not refitted: the radiomics model the context carries.
                "logistic": expit(self._derived(request, [f"{LP}radiomics"], frame)[:, 0]),
                "xgboost": expit(margin[cs.quantise(z)]),
                "svm_linear": expit(cs.svm_score(svm, z)),
                "random_forest": forest[cs.quantise(z)],
                "neural_network": expit(cs.nn_forward(nn, z, limits.hidden)[1]),
                **cs.site_local_scores(x, y, z, limits),
            }
            P = np.column_stack([scores[c] for c in names])
            stats = es.discrimination(yz, P, P, m)
            reply.update({f"{subset}_{k}": v for k, v in stats.items()})
            self._sent(
                f"{subset} smallest count at a threshold (classifiers)",
                _smallest(stats["tp"], stats["fp"]),
            )
        return reply

    def reproducibility(self, request: Payload) -> Payload:
        """Per comparison of readers, the sums of the federated ICC (see
        shared.reproducibility_stats) over the training patients rated on every mask.

        The features are the extracted ones, before harmonisation. A comparison this
        site has no such patient for is sent with ``n = 0``; one whose patients are
        fewer than the minimum cell, or differ from an answered set by fewer, is
        refused for this site only (``{name}_status``) and sent with ``n = 0``.
        """
        from radfed.shared.reproducibility_stats import (
            COMPARISONS,
            complete_ratings,
            site_icc_sums,
        )

        features = _names(request["icc_features"], "icc_features")
        missing = [f for f in features if f not in self.table.frame.columns]
        if missing:
            raise RadfedError(f"the site has no feature(s) {missing[:5]}")
        reply: Payload = {}
        train = self.rows(TRAIN)
        for name in _names(request["comparisons"], "comparisons"):
            if name not in COMPARISONS:
                raise RadfedError(f"unknown comparison {name!r}; known: {sorted(COMPARISONS)}")
            columns = COMPARISONS[name]
            tables = [self.table.frame[features]] + [
                getattr(self.table, "readers", {})
                .get(c, pd.DataFrame(columns=features))
                .reindex(index=self.table.frame.index, columns=features)
                for c in columns[1:]
            ]
            rated = np.isfinite(np.stack([t.to_numpy(dtype=float) for t in tables], axis=1)).all(
                axis=(1, 2)
            )
            chosen = train & rated
            # The rows rated (in a bootstrap replicate, repeated by their weights).
            picked = self.index(TRAIN)
            picked = picked[chosen[picked]]
            status = "ok" if chosen.any() else "none"
            if chosen.any():
                try:
                    self.policy.check_counts({"n": len(picked)}, f"reproducibility {name}")
                    self._check_sets({f"reproducibility {name}": chosen})
                except PrivacyRefusal as exc:
                    status, picked = f"refused: {exc}", picked[:0]
            self._sent(f"reproducibility {name} n", len(picked))
            ratings = complete_ratings([t.to_numpy(dtype=float)[picked] for t in tables])
            sums = site_icc_sums(ratings)
            reply.update({f"{name}_{k}": v for k, v in sums.items()})
            reply[f"{name}_status"] = status
        return reply

    def handle(self, task: str, request: Payload) -> Payload:
        """Answer one request; the reply is checked against the privacy rules."""
        handler = self.handlers.get(task)
        if handler is None:
            raise RadfedError(
                f"unknown task {str(task)[:40]!r}; a site knows {sorted(self.handlers)}"
            )
        self.sent_counts, self.sets_used, self.pending_sets = {}, [], {}
        try:
            self._bootstrap(task, request)
            reply = handler(request)
            PrivacyPolicy.check_shapes(reply, request_sizes(request), task)
            self.state.check_sets(
                self.pending_sets,
                self.ids,
                self.table.y,
                self.study,
                self.settings.privacy,
                weights=self._weights,
            )
        finally:
            self.replicate, self._weights, self._replicate_policy = 0, None, None
        return reply

    #: Tasks answered in a bootstrap replicate: those over the training rows.
    REPLICATED = (
        "moments",
        "logistic",
        "evaluate",
        "combat_design",
        "combat_residuals",
        "combat_batches",
        "select",
        "reproducibility",
    )

    def _bootstrap(self, task: str, request: Payload) -> None:
        """Enter bootstrap replicate ``request["bootstrap"]`` when the request names one.

        The replicate is the site's training rows, each repeated by its Poisson(1)
        weight (:func:`~radfed.shared.bootstrap.poisson_weights`, drawn with the site's
        secret; a repeated row keeps its patient's fold). The number must be a whole
        number from 1 to the site's own ``max_bootstrap``; only training rows are
        answered. Within the replicate the site's minimum cell size is multiplied by
        the largest weight, so every count sent (and every difference of sets) of at
        least that size holds at least ``min_cell`` distinct patients, and the parameter
        limit counts distinct patients (``max_param_fraction`` scaled by distinct over
        weighted rows). The weights never leave the site.
        """
        if "bootstrap" not in request:
            return
        b, cap = request["bootstrap"], self.settings.max_bootstrap
        if (
            isinstance(b, (bool, np.bool_))
            or not isinstance(b, (int, np.integer))
            or not 1 <= int(b) <= cap
        ):
            if not cap:
                raise RadfedError("request field 'bootstrap': this site answers no replicate")
            raise RadfedError(
                f"request field 'bootstrap' must be a replicate number from 1 to {cap} "
                "(the site's limit)"
            )
        if task not in self.REPLICATED:
            raise RadfedError(
                f"task {str(task)[:40]!r} is not answered in a bootstrap replicate "
                "(a replicate answers over the training rows only)"
            )
        asked = request.get("subsets", list(SPLITS)) if task == "evaluate" else None
        asked = [request.get("subset", TRAIN)] if asked is None else asked
        if not isinstance(asked, (list, tuple)) or any(s != TRAIN for s in asked):
            raise RadfedError("a bootstrap replicate answers over the training rows only")
        train = ~self.test_mask
        drawn = poisson_weights(
            int(train.sum()),
            int(self.protocol["seed"]),
            self.settings.name,
            self.state.secret(),
            int(b),
        )
        weights = np.zeros(len(train), dtype=np.int64)
        weights[train] = drawn
        privacy = self.settings.privacy
        largest, distinct = max(int(drawn.max(initial=0)), 1), int((drawn > 0).sum())
        self.replicate, self._weights = int(b), weights
        self._replicate_policy = replace(
            privacy,
            min_cell=int(privacy.min_cell) * largest,
            max_param_fraction=privacy.max_param_fraction * distinct / max(int(drawn.sum()), 1),
        )


def _names(value: Any, what: str) -> list[str]:
    """A request's list of names, checked (hostile input)."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise RadfedError(f"request field {what!r} must be a list of names")
    if not all(isinstance(v, str) for v in value):
        raise RadfedError(f"request field {what!r} must hold names only")
    return list(value)


def _vector(value: Any, length: int, what: str) -> np.ndarray:
    """A request's numeric vector of the given length, checked (hostile input)."""
    v = np.asarray(value, dtype=float)
    if v.shape != (length,):
        raise RadfedError(f"request field {what!r} must have {length} numbers")
    if not np.all(np.isfinite(v)):
        raise RadfedError(f"request field {what!r} must be finite")
    return v


def _subset(value: Any) -> str:
    if value not in SUBSETS:
        raise RadfedError(f"unknown subset; a site answers over {SUBSETS}")
    return str(value)


def _smallest(*arrays: np.ndarray) -> float:
    values = np.concatenate([np.asarray(a, dtype=float).ravel() for a in arrays])
    values = values[values > 0]
    return float(values.min()) if len(values) else 0.0


def request_sizes(request: Payload) -> set[int]:
    """Every size the request fixes (its lists and array dimensions, plus one for an
    intercept) and the sizes of the site's own grids: a reply array may have these
    dimensions and no other."""
    sizes = {1, len(es.THRESHOLDS), len(es.BIN_EDGES) - 1, len(es.VALUE_GRID)}
    for value in request.values():
        if isinstance(value, np.ndarray):
            sizes.update(value.shape)
        elif isinstance(value, list):
            sizes.add(len(value))
        elif isinstance(value, dict):
            sizes.update(len(v) for v in value.values() if isinstance(v, list))
    for key in ("n_folds", "folds", "n_bins"):
        if isinstance(request.get(key), int):
            sizes.add(request[key])
    # A ComBat design has one column per batch plus the covariate design columns.
    if "batch_levels" in request:
        protocol = request.get("protocol", {})
        categorical = protocol.get("categorical", [])
        n_cov = sum(len(v) - 1 for v in request.get("levels", {}).values())
        n_cov += len([c for c in protocol.get("covariates", []) if c not in categorical])
        sizes.add(len(request["batch_levels"]) + n_cov)
    return sizes | {s + 1 for s in sizes}


class SiteWorker:
    """A site's request handler: loads its data once per study and answers requests.

    Errors never crash the site: a refusal or a data problem becomes an ``error`` reply
    that names the site, the rule or the reason, and never a patient id, a local path
    or a small count (the full message stays in the site's log). Every request and
    reply is appended to the site's audit log.
    """

    _cache: ClassVar[dict[tuple[SiteSettings, str], Site]] = {}

    def __init__(self, settings: SiteSettings) -> None:
        self.settings = settings
        self.state = SiteState(settings.state_dir)

    def site(self, protocol: dict[str, Any]) -> Site:
        # One Site per (site settings, study protocol) in this process: later requests of
        # the same study reuse the loaded table and split.
        if not isinstance(protocol, dict):
            raise RadfedError("the request carries no study protocol")
        key = (self.settings, json.dumps(protocol, sort_keys=True, default=str))
        if key not in self._cache:
            log.info(
                "site %s: loading its data for study %r", self.settings.name, protocol.get("study")
            )
            self._cache[key] = Site(self.settings, protocol)
        return self._cache[key]

    def handle(self, request: Payload) -> Payload:
        task = request.get("task", "")
        if task == BATCH:
            return self._batch(request)
        protocol = request.get("protocol") if isinstance(request.get("protocol"), dict) else {}
        entry: dict[str, Any] = {
            "site": self.settings.name,
            "task": str(task)[:40],
            "step": str(request.get("step", ""))[:40],
            "study": str(protocol.get("study", ""))[:200],
            "protocol_hash": protocol_hash(protocol) if protocol else "",
            "request": _shapes({k: v for k, v in request.items() if k != "protocol"}),
        }
        site: Site | None = None
        try:
            if task == "hello":
                reply: Payload = {"site": self.settings.name}
            else:
                site = self.site(request.get("protocol"))
                reply = site.handle(task, request)
            entry.update(outcome="answered", rule="passed every rule", reply=_shapes(reply))
        except PrivacyRefusal as exc:
            log.warning("site %s refused %s: %s", self.settings.name, task, exc)
            message = self._public(str(exc), site)
            entry.update(outcome="refused", rule=exc.rule, message=message)
            reply = {"error": message, "error_kind": "privacy"}
        except (RadfedError, ValueError, KeyError, TypeError) as exc:
            log.error("site %s cannot answer %s: %s", self.settings.name, task, exc)
            detail = f"missing request field {exc}" if isinstance(exc, KeyError) else str(exc)
            message = self._public(detail, site)
            entry.update(outcome="error", rule="", message=message)
            reply = {"error": message, "error_kind": "data"}
        except Exception:  # report, do not crash the site's process
            ref = uuid.uuid4().hex[:8]
            log.exception("site %s failed on %s (reference %s)", self.settings.name, task, ref)
            entry.update(outcome="error", rule="", message=f"internal error {ref}")
            reply = {
                "error": f"internal error at the site (reference {ref} in its log)",
                "error_kind": "internal",
            }
        if site is not None:
            # What left the site: nothing when the request was refused.
            answered = entry["outcome"] == "answered"
            entry.update(subsets=site.sets_used, counts_sent=site.sent_counts if answered else {})
        try:
            self.state.audit(entry)
        except OSError as exc:  # an unwritable audit log stops the site from answering
            log.error("site %s cannot write its audit log: %s", self.settings.name, exc)
            return {"error": "the site cannot write its audit log", "error_kind": "internal"}
        return reply

    def _batch(self, request: Payload) -> Payload:
        """Several requests in one message (independent fits sharing a round): each is
        judged, answered and audited exactly as if it had come alone."""
        try:
            items = unpack(request)
        except ValueError as exc:
            entry = {
                "site": self.settings.name,
                "task": BATCH,
                "step": "",
                "study": "",
                "protocol_hash": "",
                "request": {"batch_size": str(request.get("batch_size"))[:40]},
                "outcome": "error",
                "rule": "",
                "message": str(exc),
            }
            try:
                self.state.audit(entry)
            except OSError as write_error:
                log.error("site %s cannot write its audit log: %s", self.settings.name, write_error)
            return {"error": str(exc), "error_kind": "data"}
        return pack([self.handle(item) for item in items])

    def _public(self, message: str, site: Site | None) -> str:
        """``message`` without local paths or patient ids (they stay in the site's log)."""
        for folder in (self.settings.data_dir, self.settings.cache_dir, self.settings.state_dir):
            if folder is not None:
                message = message.replace(str(Path(folder).resolve()), "<site folder>")
                message = message.replace(str(folder), "<site folder>")
        message = _PATH.sub("<site path>", message)
        message = _PATIENT.sub("(patient <id>)", message)
        message = _ID_LIST.sub("patient_id(s) [<ids>]", message)
        if site is not None:
            ids = {p.patient_id for p in site.table.problems if p.patient_id} | set(site.ids)
        else:  # the data did not load: read the ids the folder holds, to scrub them
            ids = _folder_ids(self.settings.data_dir)
        if ids:
            for pid in sorted(ids, key=len, reverse=True):
                quoted = re.escape(pid)
                # Short ids ("12") only where quoted, longer ones wherever they stand.
                pattern = rf"(?<![\w.-]){quoted}(?![\w.-])" if len(pid) >= 3 else rf"'{quoted}'"
                message = re.sub(pattern, "<id>", message)
        return message[:500]


#: Absolute paths (and ~ paths) in messages.
_PATH = re.compile(r"(?<![\w<])(?:~|/)[\w.@%+-]+(?:/[\w.@%+ -]*[\w.@%+-])*/?")
#: "(patient P001)" as manifest problems write it, and "patient_id=P001".
_PATIENT = re.compile(r"\(patient [^)]*\)|patient_id[ =:]+['\"]?[^\s,)'\"]+['\"]?", re.I)


#: "patient_id(s) ['A', 'B']" as the table readers list duplicates.
_ID_LIST = re.compile(r"patient_id\(s\) \[[^\]]*\]")


def _folder_ids(folder: Path) -> set[str]:
    """Every patient id in a site folder's tables (best effort, for scrubbing)."""
    ids: set[str] = set()
    for name in ("manifest.csv", "features.csv", "features.parquet"):
        path = Path(folder) / name
        try:
            if name.endswith(".parquet"):
                frame = pd.read_parquet(path)
                column = frame.index if "patient_id" not in frame else frame["patient_id"]
            else:
                column = pd.read_csv(path, usecols=["patient_id"], dtype=str)["patient_id"]
            ids |= {str(v) for v in column.dropna()}
        except Exception:  # unreadable tables hold nothing to scrub
            continue
    return ids


def _shapes(payload: Payload) -> dict[str, Any]:
    """A payload as the audit log keeps it: shapes, names and numbers, no arrays."""
    out: dict[str, Any] = {}
    for key, value in payload.items():
        if isinstance(value, np.ndarray):
            out[key] = f"array{list(value.shape)}"
        elif isinstance(value, (list, tuple)):
            out[key] = f"list[{len(value)}]"
        elif isinstance(value, dict):
            out[key] = f"dict[{len(value)}]"
        elif isinstance(value, str):
            out[key] = value[:200]
        else:
            out[key] = value
    return out
