"""The classifier-comparison phase (seed 000's Table 3), over any transport.

``rounds`` training rounds, then one evaluation round. Each training round every site
boosts XGBoost trees from the global margin, runs its FedAvg epochs of the linear SVM
and the network, and (round 0) grows its random-forest trees; the coordinator appends
the trees (bagging), averages the parameters and, after the last round, asks every
site for each classifier's discrimination on its train and test rows (the radial SVM
and KNN fitted there, on its own rows). Needs the Radscore in the transport's context
(after the main fit) and the radiomics model (after its evaluation).
"""

from __future__ import annotations

import logging
from typing import Any

from radfed.server.federation.shared_rounds import Cancelled
from radfed.server.federation.transport import SiteFailure, Transport
from radfed.server.stats import classifiers as sc
from radfed.shared import classifier_stats as cs
from radfed.shared.config import StudyConfig
from radfed.shared.errors import FederationError

log = logging.getLogger(__name__)

PHASE = "classifiers"


def compare_classifiers(transport: Transport, config: StudyConfig) -> dict[str, Any]:
    """Train the federated classifiers on ``transport.sites`` and tabulate all seven.

    A secondary analysis: when a site refuses (say its training split is too small for
    the models' parameters), the entry says so (``status = "refused"``, ``reason``) and
    the study goes on; a site that stops answering stops it as in any phase.

    Returns
    -------
    dict
        ``status``, :func:`~radfed.server.stats.classifiers.describe` (methods, cut-off
        rule), ``sites`` and ``table``
        (:func:`~radfed.server.stats.classifiers.classifier_table`), the federated
        models' sizes and parameters, and the settings used.
    """
    try:
        return {"status": "ok", **_compare(transport, config)}
    except (SiteFailure, Cancelled):
        raise
    except FederationError as exc:
        log.warning("classifier comparison not run: %s", exc)
        return {"status": "refused", "reason": str(exc), **sc.describe()}


def _compare(transport: Transport, config: StudyConfig) -> dict[str, Any]:
    cfg = config.classifiers
    transport.step = PHASE
    log.info("phase: %s", PHASE)
    hidden = cs.SITE_LIMITS.hidden
    model, margin = "", sc.grid_margin("")
    svm, nn = cs.svm_init(), cs.nn_init(int(config.seed), hidden)
    forest = None
    for r in range(cfg.rounds):
        request = {
            "step": cs.TRAIN_STEP,
            "round": r,
            "trees": cfg.trees_per_round,
            "forest_trees": cfg.forest_trees,
            "xgb_margin": margin,
            "svm_params": svm,
            "nn_params": nn,
        }
        replies = transport.ask(PHASE, request)
        sites = list(replies)
        n = [float(replies[s]["n"]) for s in sites]
        model = sc.bag_round(model, [str(replies[s]["xgb_model"]) for s in sites])
        margin = sc.grid_margin(model)
        svm = sc.fedavg([replies[s]["svm_params"] for s in sites], n)
        nn = sc.fedavg([replies[s]["nn_params"] for s in sites], n)
        if r == 0:
            forest = sc.forest_union(replies)
    replies = transport.ask(
        PHASE,
        {
            "step": cs.EVALUATE_STEP,
            "xgb_margin": margin,
            "rf_prob": sc.forest_probability(forest),
            "svm_params": svm,
            "nn_params": nn,
            "classifiers": list(cs.CLASSIFIERS),
            "subsets": ["train", "test"],
        },
    )
    return {
        **sc.describe(),
        **sc.classifier_table(replies),
        "models": {
            "xgboost": {"trees": sc.tree_counts(model)[0]},
            "random_forest": {"trees": len(forest)},
            "svm_linear": {"coef": svm.tolist()},
            "neural_network": {"hidden": hidden, "params": nn.tolist()},
        },
        "settings": {
            "rounds": cfg.rounds,
            "trees_per_round": cfg.trees_per_round,
            "forest_trees": cfg.forest_trees,
            "site_limits": dict(vars(cs.SITE_LIMITS)),
        },
    }
