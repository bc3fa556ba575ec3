"""What a hospital computes: site statistics over its own rows, behind its privacy rules.

Every request names a task and carries the study protocol. The site answers with
aggregates only (sums, cross-products, counts); each reply passes the site's
:class:`~radfed.shared.privacy.PrivacyPolicy` before it leaves.
"""

from __future__ import annotations

import json
import logging
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

import radfed
from radfed.client.data import SiteTable, load_site_table
from radfed.shared.errors import PrivacyRefusal, RadfedError
from radfed.shared.logistic import design, linear_predictor, newton_pieces
from radfed.shared.messages import Payload
from radfed.shared.metrics import auc
from radfed.shared.privacy import PrivacyPolicy

log = logging.getLogger(__name__)

TRAIN, TEST = "train", "test"
SPLITS = (TRAIN, TEST)


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


class Site:
    """A site's analysis table for one study, with its split and statistics.

    Parameters
    ----------
    settings : SiteSettings
    protocol : dict
        The study protocol sent by the coordinator (outcome, variables, split, seed,
        extraction parameters).
    """

    def __init__(self, settings: SiteSettings, protocol: dict[str, Any]) -> None:
        self.settings = settings
        self.protocol = protocol
        self.table: SiteTable = load_site_table(
            settings.data_dir,
            outcome=protocol["outcome"],
            clinical=list(protocol["clinical"]),
            features=list(protocol["features"]),
            params=protocol.get("extraction_params", "default"),
            cache_dir=settings.cache_dir,
            jobs=settings.jobs,
            progress=settings.progress,
        )
        y = self.table.y
        self.test_mask = stratified_split(
            y, protocol["test_fraction"], protocol["seed"], settings.name
        )
        self.handlers: dict[str, Callable[[Payload], Payload]] = {
            "describe": self.describe,
            "split": self.split_counts,
            "moments": self.moments,
            "logistic": self.logistic,
            "evaluate": self.evaluate,
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

    def _data(self, columns: list[str], subset: str) -> tuple[np.ndarray, np.ndarray]:
        rows = self.rows(subset)
        return self.table.matrix(columns)[rows], self.table.y[rows]

    # -- tasks -------------------------------------------------------------------------

    def describe(self, request: Payload) -> Payload:
        """What the coordinator checks for consistency; counts and names, no values."""
        counts = self._counts("all")
        self.policy.check_counts(counts, "describe")
        return {
            "site": self.settings.name,
            **counts,
            "n_excluded": len(self.table.problems),
            "clinical": self.table.clinical,
            "features": self.table.features,
            "settings_hash": self.table.settings_hash,
            "pyradiomics_version": self.table.pyradiomics_version,
            "radfed_version": radfed.__version__,
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
        x, _ = self._data(request["columns"], request.get("subset", TRAIN))
        self.policy.check_counts({"n": len(x)}, "moments")
        return {"n": len(x), "sum": x.sum(axis=0), "sumsq": (x**2).sum(axis=0)}

    def logistic(self, request: Payload) -> Payload:
        """Hessian, score and deviance of the logistic log-likelihood at ``beta``."""
        columns = request["columns"]
        x, y = self._data(columns, request.get("subset", TRAIN))
        counts = {"n": len(y), "events": int(y.sum()), "non_events": int(len(y) - y.sum())}
        self.policy.check_counts(counts, "logistic")
        self.policy.check_parameters(len(columns) + 1, len(y), "logistic")
        X = design(x, request["center"], request["scale"])
        pieces = newton_pieces(X, y, request["beta"])
        return {
            "hessian": pieces.hessian,
            "gradient": pieces.gradient,
            "deviance": pieces.deviance,
            "n": pieces.n,
        }

    def evaluate(self, request: Payload) -> Payload:
        """Per split: n, events and AUC of a standardised logistic model."""
        columns = request["columns"]
        reply: Payload = {}
        for subset in SPLITS:
            x, y = self._data(columns, subset)
            counts = {"n": len(y), "events": int(y.sum()), "non_events": int(len(y) - y.sum())}
            self.policy.check_counts(counts, f"evaluate ({subset})")
            eta = linear_predictor(x, request["center"], request["scale"], request["beta"])
            reply.update({f"n_{subset}": counts["n"], f"events_{subset}": counts["events"]})
            reply[f"auc_{subset}"] = auc(y, eta)
        return reply

    def handle(self, task: str, request: Payload) -> Payload:
        """Answer one request; the reply is checked against the privacy rules."""
        handler = self.handlers.get(task)
        if handler is None:
            raise RadfedError(f"unknown task {task!r}; this site knows {sorted(self.handlers)}")
        reply = handler(request)
        n_cols = len(request.get("columns", []))
        PrivacyPolicy.check_shapes(reply, {n_cols, n_cols + 1}, task)
        return reply


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
        except RadfedError as exc:
            log.error("site %s cannot answer %s: %s", self.settings.name, task, exc)
            return {"error": str(exc), "error_kind": "data"}
        except Exception as exc:  # report, do not crash the site's process
            log.exception("site %s failed on %s", self.settings.name, task)
            return {"error": f"{type(exc).__name__}: {exc}", "error_kind": "internal"}
