"""Site-side statistics of seed 000's classifier comparison on the Radscore (Table 3).

Each site holds its patients' Radscore (one number each, the LASSO linear predictor)
and outcome. Seven classifiers turn it into a predicted probability:

==================  ==========================================================  ==========
classifier          how it is trained                                           federated
==================  ==========================================================  ==========
``logistic``        radfed's radiomics model (logistic on the Radscore), reused  exact
``xgboost``         Flower's XGBoost bagging: each site boosts trees from the    yes
                    global model, the coordinator appends them
``svm_radial``      scikit-learn ``SVC(kernel="rbf")`` on the site's own rows   site-local
``svm_linear``      FedAvg of full-batch gradient descent on a smoothed hinge   yes
``random_forest``   each site grows trees on subsamples of its rows; the forest  yes
                    is the union of the sites' trees
``neural_network``  FedAvg of a 1-hidden-layer tanh network (cross-entropy)      yes
``knn``             scikit-learn ``KNeighborsClassifier`` on the site's own rows site-local
==================  ==========================================================  ==========

Radial SVM and KNN keep patients' values in the model (support vectors, neighbours):
they cannot be federated without pooling rows, so each site fits and scores them on its
own rows and the model never leaves it.

Privacy, at the site (:class:`ClassifierLimits` are the site's, never the request's):

- Trees are grown on the Radscore quantised onto the site's grid (:data:`GRID`, the
  value grid of :mod:`~radfed.shared.evaluation_stats`): a split threshold is then a
  function of grid points, never a patient's value. Every leaf of a tree a site sends
  holds 0 or at least ``min_cell`` distinct training patients (random forest: subsamples
  drawn without replacement and ``min_samples_leaf >= min_cell``; XGBoost: a minimum
  hessian of ``min_cell / 4`` per leaf, which forces ``min_cell`` rows as p(1-p) <= 1/4);
  the site then counts each leaf's patients, events and non-events (each 0 or at least
  ``min_cell``) and regrows shallower trees, or refuses.
- A tree travels as its values on the grid (random forest) or as XGBoost's JSON with
  the per-node loss changes and hessian sums zeroed (bagging); the global model comes
  back as its margin on the grid, so the site never parses a model the request built.
- FedAvg models are small (2 and ``3 H + 1`` parameters) and count against the site's
  parameter limit; a crafted global model (non-finite, beyond the site's weight bound,
  saturated, or weighting a few patients only, by the concentration rule) is refused.
- What is sent about a classifier's predictions is exactly what ``evaluate`` sends
  about a model's: DeLong AUCs and threshold counts merged to ``min_cell``
  (:func:`discrimination`).

Imports neither Flower nor MLflow; xgboost and scikit-learn load when used.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import expit

from radfed.shared import evaluation_stats as es
from radfed.shared.errors import RadfedError
from radfed.shared.privacy import PrivacyPolicy, refuse

#: Seed 000's Table 3 columns, in its order (LASSO = logistic on the Radscore).
CLASSIFIERS = (
    "logistic",
    "xgboost",
    "svm_radial",
    "svm_linear",
    "random_forest",
    "neural_network",
    "knn",
)
#: Classifiers fitted and scored at each site on its own rows only (never federated).
SITE_LOCAL = ("svm_radial", "knn")
#: How each classifier is trained (results.json, the report).
METHODS = {
    "logistic": "federated, exact: radfed's radiomics model (logistic on the Radscore)",
    "xgboost": "federated: XGBoost bagging (Flower's FedXgbBagging), trees on the site grid",
    "svm_radial": "site-local, not federated: each site fits and scores its own rows",
    "svm_linear": "federated: FedAvg of full-batch gradient descent on a smoothed hinge",
    "random_forest": "federated: union of the sites' trees (grown on site subsamples)",
    "neural_network": "federated: FedAvg of a 1-hidden-layer tanh network",
    "knn": "site-local, not federated: each site fits and scores its own rows",
}
#: The site's quantisation grid of the Radscore (thresholds are functions of it).
GRID = es.VALUE_GRID
#: Steps of the ``classifiers`` task.
TRAIN_STEP, EVALUATE_STEP = "train", "evaluate"
#: Request fields that would ask for a site-local model: refused, the model stays.
LOCAL_MODEL_FIELDS = ("local_models", "svm_radial_model", "knn_model", "support_vectors")


@dataclass(frozen=True)
class ClassifierLimits:
    """A site's own settings for the classifier comparison; a request picks only among
    bounded options (trees per round up to ``max_trees``, the round index)."""

    max_trees: int = 3  # XGBoost trees one site boosts in one round
    max_forest_trees: int = 20  # random-forest trees one site grows
    max_rounds: int = 20
    xgb_depth: int = 2
    xgb_eta: float = 0.3
    xgb_lambda: float = 1.0
    forest_depth: int = 3
    subsample: float = 0.7  # of the training rows, drawn without replacement
    epochs: int = 20  # FedAvg local epochs of full-batch gradient descent
    learning_rate: float = 0.1
    svm_alpha: float = 0.01  # L2 penalty of the linear SVM
    svm_tau: float = 0.5  # smoothing of the hinge (softplus temperature)
    nn_alpha: float = 0.001  # L2 penalty of the network
    hidden: int = 4
    max_weight: float = 50.0  # bound on every FedAvg parameter a request carries
    knn_k: int = 15


#: The limits every site uses unless configured otherwise.
SITE_LIMITS = ClassifierLimits()


def n_nn_params(hidden: int) -> int:
    """Parameters of the network: hidden weights and biases, output weights and bias."""
    return 3 * hidden + 1


# ------------------------------------------------------------------- request checks


def bounded_int(request: dict[str, Any], key: str, low: int, high: int) -> int:
    """A whole number of the request in ``[low, high]`` (hostile input)."""
    value = request.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise RadfedError(f"request field {key!r} must be a whole number")
    if not low <= int(value) <= high:
        raise RadfedError(f"request field {key!r} must be in {low}..{high} (the site's limit)")
    return int(value)


def params_vector(
    request: dict[str, Any], key: str, size: int, limits: ClassifierLimits
) -> np.ndarray:
    """A FedAvg model's parameters from the request: ``size`` finite numbers within the
    site's weight bound (a steep crafted model would single out patients)."""
    v = np.asarray(request.get(key, []), dtype=float)
    if v.shape != (size,):
        raise RadfedError(f"request field {key!r} must have {size} numbers")
    if not np.all(np.isfinite(v)):
        raise RadfedError(f"request field {key!r} must be finite")
    if np.any(np.abs(v) > limits.max_weight):
        raise refuse(
            "saturation", key, f"a parameter exceeds the site's bound of ±{limits.max_weight:g}"
        )
    return v


def grid_vector(request: dict[str, Any], key: str, low: float, high: float) -> np.ndarray:
    """A function on the site's grid from the request: finite values in [low, high]."""
    v = np.asarray(request.get(key, []), dtype=float)
    if v.shape != GRID.shape:
        raise RadfedError(f"request field {key!r} must hold one value per site grid point")
    if not np.all(np.isfinite(v)) or np.any((v < low) | (v > high)):
        raise RadfedError(f"request field {key!r} must be finite, in [{low:g}, {high:g}]")
    return v


def refuse_local_model_requests(request: dict[str, Any]) -> None:
    """Site-local models (radial SVM, KNN) hold patients' values: never sent."""
    asked = [k for k in LOCAL_MODEL_FIELDS if k in request]
    if asked:
        raise refuse(
            "shape",
            "classifiers",
            "site-local classifiers (radial SVM, KNN) never leave the site",
        )


# ------------------------------------------------------------------------ quantising


def quantise(x: np.ndarray, grid: np.ndarray = GRID) -> np.ndarray:
    """Each value's grid cell: the largest grid point at or below it (the first below
    the grid). Trees grown on these values split only between grid points."""
    x = np.asarray(x, dtype=float)
    idx = np.clip(np.searchsorted(grid, x, side="right") - 1, 0, len(grid) - 1)
    return idx


def on_grid(x: np.ndarray) -> np.ndarray:
    """``x`` quantised onto :data:`GRID` (float32, as XGBoost reads features)."""
    return GRID[quantise(x)].astype(np.float32)


# -------------------------------------------------------------------------- XGBoost


def _strip(model: dict[str, Any]) -> dict[str, Any]:
    """Zero each tree's per-node loss changes and hessian sums: prediction needs the
    splits and leaf values only, so nothing else of the site's data leaves it."""
    for tree in model["learner"]["gradient_booster"]["model"]["trees"]:
        tree["loss_changes"] = [0.0] * len(tree["loss_changes"])
        tree["sum_hessian"] = [0.0] * len(tree["sum_hessian"])
    return model


def boost_trees(
    x: np.ndarray,
    y: np.ndarray,
    margin: np.ndarray,
    n_trees: int,
    limits: ClassifierLimits,
    min_cell: int,
    seed: int,
) -> str:
    """New XGBoost trees boosted from the global model's margin on the site's rows.

    Parameters
    ----------
    x : ndarray of shape (n,)
        The training rows' Radscore (quantised here onto the site grid).
    y : ndarray of shape (n,)
        Outcomes, 0/1.
    margin : ndarray of shape (n,)
        The global model's margin (log-odds) of each row.
    n_trees : int
        Trees to boost (one per boosting round, as Flower's local epochs).

    Returns
    -------
    str
        XGBoost's JSON of a booster holding the new trees only (base score 0.5, margin
        0), per-node statistics zeroed; every leaf holds 0 or >= ``min_cell`` rows.

    Raises
    ------
    PrivacyRefusal
        When even single-split trees have a leaf of 1 to ``min_cell - 1`` rows.
    """
    import xgboost as xgb

    data = xgb.DMatrix(on_grid(x)[:, None], label=np.asarray(y, float), base_margin=margin)
    # Shallower until every leaf passes; last, a single leaf per tree (no split).
    for depth in [*range(limits.xgb_depth, 0, -1), 0]:
        params = {
            "objective": "binary:logistic",
            "tree_method": "exact",  # thresholds: midpoints of adjacent grid points
            "max_depth": max(depth, 1),
            "eta": limits.xgb_eta,
            "reg_lambda": limits.xgb_lambda,
            # p(1-p) <= 1/4, so a hessian sum of min_cell/4 needs >= min_cell rows.
            "min_child_weight": min_cell / 4 if depth else float(len(y)),
            "base_score": 0.5,
            "nthread": 1,
            "seed": seed % 2**31,
        }
        booster = xgb.train(params, data, num_boost_round=n_trees)
        leaves = booster.predict(data, pred_leaf=True).reshape(len(y), -1).astype(int)
        if leaves_pass(leaves, min_cell, y):
            return json.dumps(_strip(json.loads(bytes(booster.save_raw("json")))))
    raise refuse(
        "min-cell",
        "classifiers (xgboost)",
        f"a tree leaf would hold fewer training patients than the site's minimum cell "
        f"size {min_cell}",
    )


def leaves_pass(leaves: np.ndarray, min_cell: int, y: np.ndarray | None = None) -> bool:
    """Whether every leaf (column ``t`` of ``leaves``: each row's leaf in tree ``t``)
    holds 0 or at least ``min_cell`` rows and, given the outcomes ``y``, 0 or at least
    ``min_cell`` events and non-events (a leaf's event share is a count in disguise)."""
    for t in range(leaves.shape[1]):
        ids, codes = np.unique(leaves[:, t], return_inverse=True)
        cells = [np.bincount(codes.ravel(), minlength=len(ids))]
        if y is not None:
            events = np.bincount(codes.ravel(), weights=np.asarray(y, float), minlength=len(ids))
            cells += [events, cells[0] - events]
        if any(np.any((c > 0) & (c < min_cell)) for c in cells):
            return False
    return True


# ---------------------------------------------------------------------- random forest


def grow_forest(
    x: np.ndarray,
    y: np.ndarray,
    n_trees: int,
    limits: ClassifierLimits,
    min_cell: int,
    seed: int,
) -> np.ndarray:
    """The site's random-forest trees, each as its probability on the site grid.

    Each tree is grown on a subsample (``limits.subsample`` of the rows, without
    replacement, so a leaf's rows are distinct patients) with ``min_samples_leaf =
    min_cell``; the leaves are counted again before anything is sent.

    Returns
    -------
    ndarray of shape (n_trees, len(GRID))
    """
    from sklearn.tree import DecisionTreeClassifier

    xq = on_grid(x).astype(float)[:, None]
    y = np.asarray(y, dtype=int)
    rng = np.random.default_rng(seed)
    size = max(1, round(limits.subsample * len(y)))
    out = np.empty((n_trees, len(GRID)))
    for t in range(n_trees):
        rows = rng.choice(len(y), size=size, replace=False)
        state = int(rng.integers(2**31))
        # Shallower until every leaf passes (a single leaf, the subsample's share of
        # events, passes when the subsample does).
        for depth in range(limits.forest_depth, -1, -1):
            if depth == 0:
                leaves, value = np.zeros((size, 1), dtype=int), np.full(len(GRID), y[rows].mean())
            else:
                tree = DecisionTreeClassifier(
                    max_depth=depth, min_samples_leaf=min_cell, random_state=state
                ).fit(xq[rows], y[rows])
                leaves = tree.apply(xq[rows])[:, None]
                classes = list(tree.classes_)
                proba = tree.predict_proba(GRID[:, None])
                value = proba[:, classes.index(1)] if 1 in classes else np.zeros(len(GRID))
            if leaves_pass(leaves, min_cell, y[rows]):
                out[t] = value
                break
        else:
            raise refuse(
                "min-cell",
                "classifiers (random forest)",
                "a subsample's events or non-events are below the minimum cell",
            )
    return out


# ---------------------------------------------------------------------------- FedAvg


def svm_score(theta: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Decision value ``w x + b`` of the linear SVM ``theta = (w, b)``."""
    return theta[0] * x + theta[1]


def svm_epochs(
    theta: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    limits: ClassifierLimits,
    policy: PrivacyPolicy,
) -> np.ndarray:
    """``limits.epochs`` steps of full-batch gradient descent on the smoothed hinge
    ``mean(tau softplus((1 - s f(x)) / tau)) + alpha/2 w²`` (``s = ±1``) from ``theta``.

    Why smoothed: the hinge's subgradient sums over the rows inside the margin, a count
    of patients past a threshold the model sets; the smooth loss weighs every row by
    ``expit((1 - s f) / tau)``, and those weights, like a logistic fit's, must rest on
    at least ``min_cell`` patients (the concentration rule) at every step.
    """
    s = 2.0 * np.asarray(y, float) - 1.0
    tau = limits.svm_tau
    theta = np.asarray(theta, dtype=float).copy()
    for _ in range(limits.epochs):
        u = (1 - s * svm_score(theta, x)) / tau
        w = expit(u)  # each row's weight in the gradient
        policy.check_linear_predictor(u * tau, "classifiers (svm_linear)", w)
        gw = -np.sum(w * s * x) / len(x) + limits.svm_alpha * theta[0]
        gb = -np.sum(w * s) / len(x)
        theta -= limits.learning_rate * np.array([gw, gb])
    return theta


def svm_loss(theta: np.ndarray, x: np.ndarray, y: np.ndarray, limits: ClassifierLimits) -> float:
    """The smoothed-hinge objective :func:`svm_epochs` descends (for references)."""
    s = 2.0 * np.asarray(y, float) - 1.0
    u = (1 - s * svm_score(theta, x)) / limits.svm_tau
    return float(
        limits.svm_tau * np.mean(np.logaddexp(0, u)) + limits.svm_alpha / 2 * theta[0] ** 2
    )


def nn_unpack(theta: np.ndarray, hidden: int) -> tuple[np.ndarray, ...]:
    """``theta`` as (hidden weights, hidden biases, output weights, output bias)."""
    h = hidden
    return theta[:h], theta[h : 2 * h], theta[2 * h : 3 * h], theta[3 * h]


def nn_forward(theta: np.ndarray, x: np.ndarray, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    """Hidden activations (n, H) and output logit (n,) of the network."""
    w1, b1, w2, b2 = nn_unpack(theta, hidden)
    a = np.tanh(np.outer(x, w1) + b1)
    return a, a @ w2 + b2


def nn_epochs(
    theta: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    limits: ClassifierLimits,
    policy: PrivacyPolicy,
) -> np.ndarray:
    """``limits.epochs`` steps of full-batch gradient descent on the mean cross-entropy
    plus ``alpha/2 ||theta||²`` (biases included) from ``theta``.

    The model of the request is checked as any logistic model is: its output logit
    neither saturated nor with weights p(1-p) concentrated on fewer than ``min_cell``
    patients; its hidden units not saturated for most patients.
    """
    y = np.asarray(y, dtype=float)
    theta = np.asarray(theta, dtype=float).copy()
    h = limits.hidden
    w1, b1, _, _ = nn_unpack(theta, h)
    policy.check_linear_predictor(np.outer(x, w1) + b1, "classifiers (neural_network, hidden)")
    for _ in range(limits.epochs):
        a, logit = nn_forward(theta, x, h)
        p = expit(logit)
        policy.check_linear_predictor(logit, "classifiers (neural_network)", p * (1 - p))
        _, _, w2, _ = nn_unpack(theta, h)
        d = (p - y) / len(x)  # dLoss/dlogit per row
        da = np.outer(d, w2) * (1 - a**2)  # through tanh
        grad = np.concatenate([x @ da, da.sum(axis=0), a.T @ d, [d.sum()]])
        theta -= limits.learning_rate * (grad + limits.nn_alpha * theta)
    return theta


def nn_init(seed: int, hidden: int) -> np.ndarray:
    """Deterministic initial network from the study seed (Glorot-like scales)."""
    rng = np.random.default_rng([seed, 14])
    w1 = rng.normal(0.0, 1.0, hidden)
    b1 = rng.normal(0.0, 0.5, hidden)
    w2 = rng.normal(0.0, 1.0 / math.sqrt(hidden), hidden)
    return np.concatenate([w1, b1, w2, [0.0]])


def svm_init() -> np.ndarray:
    """The linear SVM starts at zero (the hinge is convex)."""
    return np.zeros(2)


# --------------------------------------------------------------------- site-local fits


def site_local_scores(
    x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, limits: ClassifierLimits
) -> dict[str, np.ndarray]:
    """Radial SVM and KNN fitted on the site's training rows, as probabilities of the
    rows ``x_eval``; the fitted models stay here.

    The SVM's probability is ``expit(decision value)`` (p >= 0.5 where it predicts an
    event; Platt scaling would need a random inner CV); KNN's is the share of events
    among the ``min(k, n)`` nearest training patients.
    """
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC

    X, Z = np.asarray(x_train, float)[:, None], np.asarray(x_eval, float)[:, None]
    svm = SVC(kernel="rbf", C=1.0, gamma="scale").fit(X, y_train)
    knn = KNeighborsClassifier(n_neighbors=min(limits.knn_k, len(X))).fit(X, y_train)
    return {
        "svm_radial": expit(svm.decision_function(Z)),
        "knn": knn.predict_proba(Z)[:, list(knn.classes_).index(1)],
    }
