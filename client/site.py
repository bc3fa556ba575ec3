"""What a hospital computes: site statistics over its own rows, behind its privacy rules.

Every request names a task and carries the study protocol plus the pipeline fitted so
far (ComBat estimates, the Radscore): sites keep no state between requests, so any
process may answer any request. The site answers with aggregates only (sums,
cross-products, counts); each reply passes the site's
:class:`~radfed.shared.privacy.PrivacyPolicy` before it leaves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

import radfed
from radfed.client.data import SiteTable, TableSpec, load_site_table
from radfed.shared.errors import PrivacyRefusal, RadfedError
from radfed.shared.logistic import design, newton_pieces
from radfed.shared.messages import LINEAR_PREDICTOR as LP
from radfed.shared.messages import RADSCORE, Payload
from radfed.shared.privacy import PrivacyPolicy

log = logging.getLogger(__name__)

TRAIN, TEST = "train", "test"
SPLITS = (TRAIN, TEST)
SITE_BATCH = "site"


@dataclass(frozen=True)
class SiteSettings:
    """A site's own settings: where its data is and which limits it enforces."""

    name: str
    data_dir: Path
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    cache_dir: Path | None = None
    jobs: int = 1
    progress: bool = False


def stratified_split(y: np.ndarray, test_fraction: float, seed: int, site: str) -> np.ndarray:
    """Boolean mask of test rows: the same fraction of each class, reproducible per site.

    The generator is seeded by the study seed and the site name, so a site's split does
    not change when other sites join or leave.
    """
    rng = np.random.default_rng([seed, zlib.crc32(site.encode())])
    test = np.zeros(len(y), dtype=bool)
    for cls in (0, 1):
        idx = np.flatnonzero(y == cls)
        n_test = round(test_fraction * len(idx))
        test[rng.permutation(idx)[:n_test]] = True
    return test


def table_spec(protocol: dict[str, Any]) -> TableSpec:
    """The columns a study's protocol needs from a site table."""
    categorical = list(protocol.get("categorical", []))
    batch = protocol.get("batch", SITE_BATCH)
    labels = ([] if batch == SITE_BATCH else [batch]) + categorical
    numeric = [c for c in protocol.get("covariates", []) if c not in categorical]
    return TableSpec(
        outcome=protocol["outcome"],
        clinical=tuple(protocol["clinical"]),
        features=tuple(protocol["features"]),
        numeric=tuple(numeric),
        labels=tuple(dict.fromkeys(labels)),
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
    """A site's analysis table for one study, with its split and statistics.

    Parameters
    ----------
    settings : SiteSettings
    protocol : dict
        The study protocol sent by the coordinator (outcome, variables, split, seed,
        extraction parameters, batch and covariates).
    """

    PIPELINE = ("combat_", "radscore_", "levels")

    def __init__(self, settings: SiteSettings, protocol: dict[str, Any]) -> None:
        self.settings = settings
        self.protocol = protocol
        self.table: SiteTable = load_site_table(
            settings.data_dir,
            table_spec(protocol),
            params=protocol.get("extraction_params", "default"),
            cache_dir=settings.cache_dir,
            jobs=settings.jobs,
            progress=settings.progress,
        )
        y = self.table.y
        self.test_mask = stratified_split(
            y, protocol["test_fraction"], protocol["seed"], settings.name
        )
        self._views: dict[tuple[str, str], pd.DataFrame] = {}
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
        }

    @property
    def policy(self) -> PrivacyPolicy:
        return self.settings.privacy

    def rows(self, subset: str) -> np.ndarray:
        if subset == TRAIN:
            return ~self.test_mask
        if subset == TEST:
            return self.test_mask
        if subset == "all":
            return np.ones_like(self.test_mask)
        raise ValueError(f"unknown subset {subset!r}")

    def _counts(self, subset: str) -> dict[str, int]:
        y = self.table.y[self.rows(subset)]
        return {"n": len(y), "events": int(y.sum()), "non_events": int(len(y) - y.sum())}

    # -- the pipeline as the coordinator has fitted it so far ---------------------------

    def batches(self, subset: str) -> np.ndarray:
        """Batch label of each row: the site's name, or its batch column."""
        rows = self.rows(subset)
        batch = self.protocol.get("batch", SITE_BATCH)
        if batch == SITE_BATCH:
            return np.full(int(rows.sum()), self.settings.name, dtype=object)
        return self.table.labels[batch].to_numpy(dtype=object)[rows]

    def covariates(self, subset: str, levels: dict[str, list[str]]) -> np.ndarray:
        """ComBat's covariate design columns, encoded with the federation's levels."""
        from radfed.harmonization.combat import encode_covariates

        rows = self.rows(subset)
        categorical = list(self.protocol.get("categorical", []))
        numeric = [c for c in self.protocol.get("covariates", []) if c not in categorical]
        frame = pd.concat([self.table.frame[numeric], self.table.labels[categorical]], axis=1)
        cov, _ = encode_covariates(frame.loc[rows], numeric, {c: levels[c] for c in categorical})
        return cov

    def view(self, request: Payload, subset: str) -> pd.DataFrame:
        """The rows of ``subset`` after the pipeline in ``request``: ComBat-harmonised
        features and, when the request defines it, the Radscore column."""
        key = (subset, _digest(request, self.PIPELINE))
        if key not in self._views:
            frame = self.table.frame.loc[self.rows(subset)].copy()
            if "combat_feature_names" in request:
                from radfed.harmonization.combat import ComBatEstimates, apply_combat

                est = self._with_own_batches(ComBatEstimates.from_payload(request), request)
                names = list(est.feature_names)
                cov = self.covariates(subset, request.get("levels", {}))
                frame[names] = apply_combat(est, frame[names].to_numpy(), self.batches(subset), cov)
            if "radscore_columns" in request:
                x = frame[list(request["radscore_columns"])].to_numpy(dtype=float)
                X = design(x, request["radscore_center"], request["radscore_scale"])
                frame[RADSCORE] = X @ request["radscore_beta"]
            self._views = {k: v for k, v in self._views.items() if k[1] == key[1]}
            self._views[key] = frame
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

    def _data(
        self, request: Payload, columns: list[str], subset: str
    ) -> tuple[np.ndarray, np.ndarray]:
        frame = self.view(request, subset)
        # "lp:{model}" is the linear predictor of a fitted model the request carries
        # (for calibration fits of y on logit p).
        extra = {c: self._linear_predictor(request, c[3:], frame) for c in columns if c[:3] == LP}
        missing = [c for c in columns if c not in frame.columns and c not in extra]
        if missing:
            raise RadfedError(f"the site has no column(s) {missing}")
        x = (
            np.column_stack(
                [extra[c] if c in extra else frame[c].to_numpy(dtype=float) for c in columns]
            )
            if columns
            else np.empty((len(frame), 0))
        )
        return x, frame[self.table.outcome].to_numpy(dtype=float)

    @staticmethod
    def _linear_predictor(request: Payload, model: str, frame: pd.DataFrame) -> np.ndarray:
        x = frame[list(request[f"{model}_columns"])].to_numpy(dtype=float)
        X = design(x, request[f"{model}_center"], request[f"{model}_scale"])
        return X @ request[f"{model}_beta"]

    # -- tasks -------------------------------------------------------------------------

    def describe(self, request: Payload) -> Payload:
        """What the coordinator checks for consistency; counts and names, no values."""
        counts = self._counts("all")
        self.policy.check_counts(counts, "describe")
        categorical = list(self.protocol.get("categorical", []))
        return {
            "site": self.settings.name,
            **counts,
            "n_excluded": len(self.table.problems),
            "clinical": self.table.clinical,
            "features": self.table.features,
            "settings_hash": self.table.settings_hash,
            "pyradiomics_version": self.table.pyradiomics_version,
            "radfed_version": radfed.__version__,
            "batch_levels": sorted(set(self.batches("all"))),
            "levels": {c: sorted(set(self.table.labels[c])) for c in categorical},
        }

    def split_counts(self, request: Payload) -> Payload:
        """Patients and events in each split."""
        reply: Payload = {}
        for subset in SPLITS:
            counts = self._counts(subset)
            self.policy.check_counts(counts, f"{subset} split")
            reply.update({f"{k}_{subset}": v for k, v in counts.items()})
        return reply

    def moments(self, request: Payload) -> Payload:
        """n, sum and sum of squares of each column (for pooled mean and SD)."""
        x, _ = self._data(request, request["columns"], request.get("subset", TRAIN))
        self.policy.check_counts({"n": len(x)}, "moments")
        return {"n": len(x), "sum": x.sum(axis=0), "sumsq": (x**2).sum(axis=0)}

    def logistic(self, request: Payload) -> Payload:
        """For each model: Hessian, score and deviance of the log-likelihood at its beta.

        ``models`` names the models; each has ``{model}_columns``, ``_center``, ``_scale``
        and ``_beta`` (several models are fitted in the same rounds).
        """
        subset = request.get("subset", TRAIN)
        counts = self._counts(subset)
        self.policy.check_counts(counts, "logistic")
        reply: Payload = {}
        for model in request["models"]:
            columns = request[f"{model}_columns"]
            self.policy.check_parameters(len(columns) + 1, counts["n"], f"logistic ({model})")
            x, y = self._data(request, columns, subset)
            X = design(x, request[f"{model}_center"], request[f"{model}_scale"])
            pieces = newton_pieces(X, y, request[f"{model}_beta"])
            reply.update(
                {
                    f"{model}_hessian": pieces.hessian,
                    f"{model}_gradient": pieces.gradient,
                    f"{model}_deviance": pieces.deviance,
                    f"{model}_n": pieces.n,
                }
            )
        return reply

    def evaluate(self, request: Payload) -> Payload:
        """Per subset and model: discrimination, calibration and decision-curve sums.

        ``models`` names the models (each with ``{model}_columns``, ``_center``,
        ``_scale``, ``_beta``); ``subsets`` the rows (default train and test);
        ``thresholds`` the probability grid of the threshold counts; ``bin_edges`` the
        risk bins. Every array is sized by the request (models x thresholds or bins).
        A subset with one class only is reported as undefined, and one whose counts are
        below the site's minimum cell as refused, each with its reason.
        """
        from radfed.shared import evaluation_stats as es

        models = list(request["models"])
        thresholds = np.asarray(request["thresholds"], dtype=float)
        edges = np.asarray(request["bin_edges"], dtype=float)
        reply: Payload = {}
        for subset in request.get("subsets", list(SPLITS)):
            counts = self._counts(subset)
            status, reason = self._evaluable(counts)
            reply.update({f"{subset}_status": status, f"{subset}_reason": reason})
            if status == "refused":
                continue
            reply.update({f"{subset}_n": counts["n"], f"{subset}_events": counts["events"]})
            if status != "ok":
                continue
            x, y = self._data(request, [f"{LP}{m}" for m in models], subset)
            P = 1 / (1 + np.exp(-x))
            roc = es.delong(y, x)
            tp, fp = es.threshold_counts(y, P, thresholds)
            bin_n, observed, expected = es.calibration_bins(y, P, edges)
            hl = [
                es.hosmer_lemeshow(y, P[:, j], int(request.get("hl_groups", 10)))
                for j in range(len(models))
            ]
            fits = np.array([es.calibration_fit(y, P[:, j]) for j in range(len(models))])
            reply.update(
                {
                    f"{subset}_auc": roc.auc,
                    f"{subset}_auc_cov": roc.cov,
                    f"{subset}_tp": tp,
                    f"{subset}_fp": fp,
                    f"{subset}_bin_n": bin_n,
                    f"{subset}_bin_observed": observed,
                    f"{subset}_bin_expected": expected,
                    f"{subset}_brier": np.array([es.brier(y, P[:, j]) for j in range(len(models))]),
                    f"{subset}_cal_intercept": fits[:, 0],
                    f"{subset}_cal_slope": fits[:, 1],
                    f"{subset}_hl_statistic": np.array([h.statistic for h in hl]),
                    f"{subset}_hl_df": np.array([h.df for h in hl], dtype=float),
                    f"{subset}_hl_p": np.array([h.pvalue for h in hl]),
                }
            )
        return reply

    def _evaluable(self, counts: dict[str, int]) -> tuple[str, str]:
        """("ok", ""), ("undefined", why) for one class only, or ("refused", why)."""
        if counts["n"] == 0:
            # The commonest reason only: no patient identifier leaves the site.
            reasons = Counter(p.reason for p in self.table.problems).most_common(1)
            why = f" ({reasons[0][1]} for {reasons[0][0]})" if reasons else ""
            excluded = len(self.table.problems)
            return "undefined", f"no patient with complete data: {excluded} excluded{why}"
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
        """mRMR and LASSO statistics over the training rows (see shared.selection_stats)."""
        from radfed.shared.selection_stats import answer

        x, y = self._data(request, request["select_columns"], TRAIN)
        return answer(request, x, y, self.settings.name, self.policy)

    def handle(self, task: str, request: Payload) -> Payload:
        """Answer one request; the reply is checked against the privacy rules."""
        handler = self.handlers.get(task)
        if handler is None:
            raise RadfedError(f"unknown task {task!r}; this site knows {sorted(self.handlers)}")
        reply = handler(request)
        PrivacyPolicy.check_shapes(reply, request_sizes(request), task)
        return reply


def request_sizes(request: Payload) -> set[int]:
    """Every size the request fixes (its lists and array dimensions, plus one for an
    intercept): a reply array may have these dimensions and no other."""
    sizes = {1}
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
    that names the site and the reason, and is logged at the site.
    """

    _cache: ClassVar[dict[tuple[SiteSettings, str], Site]] = {}

    def __init__(self, settings: SiteSettings) -> None:
        self.settings = settings

    def site(self, protocol: dict[str, Any]) -> Site:
        # One Site per (site settings, study protocol) in this process: later requests of
        # the same study reuse the loaded table and split.
        key = (self.settings, json.dumps(protocol, sort_keys=True))
        if key not in self._cache:
            log.info("site %s: loading %s", self.settings.name, self.settings.data_dir)
            self._cache[key] = Site(self.settings, protocol)
        return self._cache[key]

    def handle(self, request: Payload) -> Payload:
        task = request.get("task", "")
        try:
            if task == "hello":
                return {"site": self.settings.name}
            return self.site(request["protocol"]).handle(task, request)
        except PrivacyRefusal as exc:
            log.warning("site %s refused %s: %s", self.settings.name, task, exc)
            return {"error": str(exc), "error_kind": "privacy"}
        except (RadfedError, ValueError) as exc:
            log.error("site %s cannot answer %s: %s", self.settings.name, task, exc)
            return {"error": str(exc), "error_kind": "data"}
        except Exception as exc:  # report, do not crash the site's process
            log.exception("site %s failed on %s", self.settings.name, task)
            return {"error": f"{type(exc).__name__}: {exc}", "error_kind": "internal"}
