"""Coordinator half of seed 000's classifier comparison on the Radscore (Table 3).

The site half is :mod:`radfed.shared.classifier_stats`. Here: XGBoost bagging (the
trees the sites boosted each round appended to the global model, as Flower's
``FedXgbBagging``), FedAvg (the sample-size-weighted mean of the sites' parameters),
the random forest as the union of the sites' trees, and Table 3: per site and split,
AUC, sensitivity, specificity and accuracy of every classifier at probability 0.5.

Imports neither Flower nor MLflow; xgboost loads when a model is predicted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from radfed.server.stats import inference
from radfed.server.stats.evaluation import (
    _at_cutoff,
    _exact,
    counts_at_thresholds,
    missing_metrics,
)
from radfed.shared.classifier_stats import CLASSIFIERS, GRID, METHODS, SITE_LOCAL
from radfed.shared.evaluation_stats import THRESHOLDS
from radfed.shared.messages import Payload

#: Table 3's cut-off: an event is predicted at probability >= 0.5.
CUTOFF = 0.5
CUTOFF_RULE = (
    "probability >= 0.5 predicts an event (SVMs: decision value >= 0, probability "
    "expit(decision value)); counts from each site's threshold counts, merged to its "
    "minimum cell size (interpolated where 0.5 falls in a merged cell)"
)
METRICS = ("auc", "sensitivity", "specificity", "accuracy")


# ------------------------------------------------------------------- XGBoost bagging


def tree_counts(model: str | bytes) -> tuple[int, int]:
    """Trees and parallel trees of an XGBoost JSON model."""
    param = json.loads(model)["learner"]["gradient_booster"]["model"]["gbtree_model_param"]
    return int(param["num_trees"]), int(param["num_parallel_tree"])


def aggregate_bagging(previous: str, current: str) -> str:
    """The global model ``previous`` with the trees of a site's model ``current``
    appended (the first site's model becomes the global one).

    Flower's ``aggregate_bagging`` appends ``num_parallel_tree`` trees of the current
    model (its clients boost one tree per round); here every tree the site boosted is
    appended, one boosting iteration each, so both agree when a site boosts one tree.
    """
    if not previous:
        return current
    n_prev, _ = tree_counts(previous)
    n_curr, _ = tree_counts(current)
    prev, curr = json.loads(previous), json.loads(current)
    model = prev["learner"]["gradient_booster"]["model"]
    model["gbtree_model_param"]["num_trees"] = str(n_prev + n_curr)
    for k, tree in enumerate(curr["learner"]["gradient_booster"]["model"]["trees"][:n_curr]):
        tree["id"] = n_prev + k
        model["trees"].append(tree)
        model["tree_info"].append(0)
        model["iteration_indptr"].append(model["iteration_indptr"][-1] + 1)
    return json.dumps(prev)


def bag_round(previous: str, site_models: Sequence[str]) -> str:
    """One round of bagging: every site's new trees appended, in the sites' order."""
    for model in site_models:
        previous = aggregate_bagging(previous, model)
    return previous


def grid_margin(model: str) -> np.ndarray:
    """The model's margin (log-odds) at every point of the sites' grid: what a site
    needs to predict its rows, quantised onto the same grid (zeros for no model)."""
    if not model:
        return np.zeros(len(GRID))
    import xgboost as xgb

    booster = xgb.Booster(model_file=bytearray(model.encode()))
    data = xgb.DMatrix(GRID.astype(np.float32)[:, None])
    return booster.predict(data, output_margin=True).astype(float)


# ---------------------------------------------------------------- FedAvg and forests


def fedavg(params: Sequence[np.ndarray], n: Sequence[float]) -> np.ndarray:
    """Sample-size-weighted mean of the sites' parameters (FedAvg)."""
    w = np.asarray(n, dtype=float)
    return np.tensordot(w / w.sum(), np.stack([np.asarray(p, float) for p in params]), axes=1)


def forest_union(replies: Mapping[str, Payload]) -> np.ndarray:
    """Every site's random-forest trees (as probabilities on the grid), stacked."""
    trees = [
        np.asarray(reply[k], dtype=float)
        for reply in replies.values()
        for k in sorted((k for k in reply if k.startswith("rf_tree_")), key=_tree_index)
    ]
    return np.stack(trees)


def _tree_index(key: str) -> int:
    return int(key.rpartition("_")[2])


def forest_probability(trees: np.ndarray) -> np.ndarray:
    """The forest's prediction on the grid: the mean of its trees' probabilities."""
    return np.asarray(trees, dtype=float).mean(axis=0)


# --------------------------------------------------------------------------- Table 3


def classifier_metrics(reply: Payload, subset: str, j: int) -> dict[str, Any]:
    """AUC (DeLong CI), sensitivity, specificity and accuracy at :data:`CUTOFF` of
    classifier ``j`` on one site's ``subset``, from its ``classifiers`` evaluate reply
    (the same fields a site's ``evaluate`` reply has)."""
    status = reply.get(f"{subset}_status", "refused")
    n, events = reply.get(f"{subset}_n"), reply.get(f"{subset}_events")
    if status != "ok":
        reason = reply.get(f"{subset}_reason", "")
        return missing_metrics(n, events, status, reason) | dict.fromkeys(METRICS, math.nan)
    n, events = int(n), int(events)
    auc, var = float(reply[f"{subset}_auc"][j]), float(reply[f"{subset}_auc_cov"][j, j])
    c = int(np.flatnonzero(np.isclose(THRESHOLDS, CUTOFF))[0])
    at = _at_cutoff(
        counts_at_thresholds(reply, subset, j, "tp"),
        counts_at_thresholds(reply, subset, j, "fp"),
        n,
        events,
        c,
    )
    return {
        "n": n,
        "events": events,
        "status": "ok",
        "auc": auc,
        "auc_ci": list(inference.auc_ci(auc, var)),
        "sensitivity": at["sensitivity"],
        "specificity": at["specificity"],
        "accuracy": at["accuracy"],
        "cutoff_exact": bool(_exact(reply, subset, j)[c]),
    }


def classifier_table(
    replies: Mapping[str, Payload],
    names: Sequence[str] = CLASSIFIERS,
    subsets: Sequence[str] = ("train", "test"),
) -> dict[str, Any]:
    """Seed 000's Table 3 per site: ``sites[site][subset][classifier][metric]``, plus
    ``table[site][subset]`` with metrics as rows and classifiers as columns."""
    sites = {
        site: {
            s: {c: classifier_metrics(reply, s, j) for j, c in enumerate(names)} for s in subsets
        }
        for site, reply in replies.items()
    }
    table = {
        site: {
            s: {
                "columns": list(names),
                "rows": {metric: [by_subset[s][c][metric] for c in names] for metric in METRICS},
                # False where 0.5 fell in a cell the site merged (interpolated counts).
                "cutoff_exact": [by_subset[s][c].get("cutoff_exact", False) for c in names],
            }
            for s in subsets
        }
        for site, by_subset in sites.items()
    }
    return {"sites": sites, "table": table}


def describe(names: Sequence[str] = CLASSIFIERS) -> dict[str, Any]:
    """How each classifier was trained, and which are site-local."""
    return {
        "classifiers": list(names),
        "methods": {c: METHODS[c] for c in names},
        "site_local": [c for c in names if c in SITE_LOCAL],
        "cutoff": CUTOFF,
        "cutoff_rule": CUTOFF_RULE,
    }
