"""Seed 000's classifier comparison on the Radscore (Table 3), federated.

On three real hospitals (UCI heart disease): each federated method against its
reference (XGBoost bagging against Flower's ``aggregate_bagging`` on the same site
trees, FedAvg against an independent numpy loop and Flower's ``aggregate``, the forest
union recomputed here), each per-site AUC recomputed here from the site's rows, the
site-local radial SVM and KNN against scikit-learn fitted here on that site's rows, and
crafted requests refused (or ignored) with one-line errors.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import expit
from sklearn.metrics import roc_auc_score

from radfed.experiments.heart_disease import shared_data_dir, write_sites
from radfed.server.federation.inprocess import InProcessTransport
from radfed.server.results import StudyResult
from radfed.server.stats import classifiers as sc
from radfed.server.study.driver import FederatedStudy
from radfed.shared import classifier_stats as cs
from radfed.shared.config import load_study
from radfed.shared.errors import PrivacyRefusal, StudyConfigError
from radfed.shared.messages import BATCH, RADSCORE, from_record, unpack
from radfed.tests.conftest import heart_study_text
from radfed.tests.reference import complete_rows, feature_tables

SITES = ["cleveland", "hungarian", "va"]


class Recording(InProcessTransport):
    """Keeps every ``classifiers`` request and reply, per site, in order."""

    def __init__(self, workers) -> None:
        super().__init__(workers)
        self.log: list[tuple[str, dict, dict]] = []

    def _exchange(self, requests):
        replies = super()._exchange(requests)
        for site, record in requests.items():
            request, reply = from_record(record), from_record(replies[site])
            pairs = (
                zip(unpack(request), unpack(reply), strict=True)
                if request.get("task") == BATCH
                else [(request, reply)]
            )
            self.log += [(site, q, r) for q, r in pairs if q.get("task") == "classifiers"]
        return replies


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("heart_classifiers")
    write_sites(root / "sites", shared_data_dir() / "heart_disease")
    text = heart_study_text(SITES, pipeline=True) + "\n[classifiers]\ncompare = true\n"
    (root / "study.toml").write_text(text)
    return load_study(root / "study.toml")


@pytest.fixture(scope="module")
def run(study):
    transport = Recording.from_study(study)
    result = FederatedStudy(study, transport).run()
    return result, transport


def train_rounds(transport):
    """Per round, {site: (request, reply)} of the training steps."""
    rounds: dict[int, dict] = {}
    for site, q, r in transport.log:
        if q["step"] == cs.TRAIN_STEP:
            rounds.setdefault(q["round"], {})[site] = (q, r)
    return [rounds[k] for k in sorted(rounds)]


def evaluate_request(transport):
    return next(q for _, q, _ in transport.log if q["step"] == cs.EVALUATE_STEP)


def site_rows(study, transport, site, subset):
    """A site's Radscore and outcome for ``subset`` (its harmonised view: equal to
    neuroCombat's, test_pipeline_exact), with its split checked against the site's files."""
    request = evaluate_request(transport)
    frame = transport.workers[site].site(study.protocol()).view(request, subset)
    _, test = complete_rows(study, site, feature_tables(study)[site])
    assert len(frame) == int((test if subset == "test" else ~test).sum())
    return frame[RADSCORE].to_numpy(float), frame[study.outcome].to_numpy(float)


def table(result):
    return result.details["classifiers"]["sites"]


# ----------------------------------------------------------------------- the table


def test_table_3_layout_in_results_json(run, tmp_path):
    result, _ = run
    entry = result.details["classifiers"]
    assert entry["status"] == "ok"
    assert entry["site_local"] == ["svm_radial", "knn"]
    assert all("site-local, not federated" in entry["methods"][c] for c in entry["site_local"])
    assert entry["cutoff"] == 0.5 and "0.5" in entry["cutoff_rule"]
    path = result.write_json(tmp_path / "results.json")
    back = StudyResult.read_json(path).details["classifiers"]
    for site in SITES:
        for subset in ("train", "test"):
            layout = back["table"][site][subset]
            assert layout["columns"] == list(cs.CLASSIFIERS)
            assert set(layout["rows"]) == {"auc", "sensitivity", "specificity", "accuracy"}
            for metric, row in layout["rows"].items():
                assert len(row) == 7 and all(0 <= v <= 1 for v in row), (site, metric)
    assert json.loads(path.read_text())["classifiers"]["status"] == "ok"


def test_logistic_column_is_the_radiomics_model(run):
    """Reused, not refitted: the same AUC as the radiomics model's evaluation (whose fit
    equals statsmodels on the pooled rows: test_pipeline_exact)."""
    result, _ = run
    for site in SITES:
        for subset in ("train", "test"):
            mine = table(result)[site][subset]["logistic"]["auc"]
            assert mine == pytest.approx(result.performance["radiomics"][site][subset]["auc"])


def test_metrics_at_one_half_equal_the_counts_on_the_site_rows(run, study):
    """Sensitivity, specificity and accuracy at p >= 0.5 of the logistic column,
    recomputed from the rows (exact unless the site merged cells around 0.5)."""
    result, transport = run
    fit = result.models["radiomics"]
    for site in SITES:
        x, y = site_rows(study, transport, site, "test")
        p = expit(fit.coef[0] + (x - fit.center[0]) / fit.scale[0] * fit.coef[1])
        m = table(result)[site]["test"]["logistic"]
        if m["cutoff_exact"]:
            assert m["sensitivity"] == pytest.approx(np.mean(p[y == 1] >= 0.5))
            assert m["specificity"] == pytest.approx(np.mean(p[y == 0] < 0.5))
            assert m["accuracy"] == pytest.approx(np.mean((p >= 0.5) == (y == 1)))
        assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)


# -------------------------------------------------------------------------- XGBoost


def test_xgboost_bagging_equals_flowers_aggregate_bagging(run, study):
    import xgboost as xgb
    from flwr.serverapp.strategy.strategy_utils import aggregate_bagging

    result, transport = run
    assert study.classifiers.trees_per_round == 1  # Flower's clients boost one tree a round
    flower = b""
    mine = ""
    for i, by_site in enumerate(train_rounds(transport)):
        request = next(iter(by_site.values()))[0]
        # Each round starts from the global model of the rounds before.
        np.testing.assert_allclose(request["xgb_margin"], sc.grid_margin(mine), atol=1e-6)
        for site in SITES:
            tree = by_site[site][1]["xgb_model"]
            flower = aggregate_bagging(flower, tree.encode())
        mine = sc.bag_round(mine, [by_site[s][1]["xgb_model"] for s in SITES])
        assert json.loads(mine) == json.loads(flower), f"round {i}"
    n_trees = len(SITES) * study.classifiers.rounds
    assert result.details["classifiers"]["models"]["xgboost"]["trees"] == n_trees
    booster = xgb.Booster(model_file=bytearray(flower))
    # The per-site AUC of Flower's aggregated booster on the site's rows, on the grid.
    for site in SITES:
        for subset in ("train", "test"):
            x, y = site_rows(study, transport, site, subset)
            grid_x = cs.GRID[np.searchsorted(cs.GRID, x, side="right") - 1]
            margin = booster.predict(xgb.DMatrix(grid_x.astype(np.float32)[:, None]))
            mine = table(result)[site][subset]["xgboost"]["auc"]
            assert mine == pytest.approx(roc_auc_score(y, margin), abs=1e-9)


def test_every_xgboost_leaf_holds_min_cell_training_patients(run, study):
    """The trees the sites sent, counted here on each site's training rows: patients,
    events and non-events of every leaf are 0 or at least min_cell."""
    import xgboost as xgb

    _, transport = run
    m = study.privacy.min_cell
    for by_site in train_rounds(transport):
        for site in SITES:
            x, y = site_rows(study, transport, site, "train")
            booster = xgb.Booster(model_file=bytearray(by_site[site][1]["xgb_model"].encode()))
            leaves = booster.predict(xgb.DMatrix(cs.on_grid(x)[:, None]), pred_leaf=True)
            leaves = leaves.reshape(len(x), -1)
            for t in range(leaves.shape[1]):
                for leaf in np.unique(leaves[:, t]):
                    rows = leaves[:, t] == leaf
                    for count in (rows.sum(), y[rows].sum(), (1 - y[rows]).sum()):
                        assert count == 0 or count >= m
            tree = json.loads(by_site[site][1]["xgb_model"])
            for t in tree["learner"]["gradient_booster"]["model"]["trees"]:
                assert not any(t["sum_hessian"]) and not any(t["loss_changes"])


def test_a_large_min_cell_keeps_every_leaf_large():
    """A site with a large minimum cell sends trees (stumps, or a single leaf) whose
    every leaf holds that many of its patients; a leaf built around one patient fails
    the site's count."""
    import xgboost as xgb

    rng = np.random.default_rng(0)
    x = rng.normal(size=60)
    y = (x + rng.normal(size=60) > 0).astype(float)
    smallest_class = int(min(y.sum(), len(y) - y.sum()))
    for min_cell in (3, 12, smallest_class):
        model = cs.boost_trees(x, y, np.zeros(60), 2, cs.SITE_LIMITS, min_cell, seed=1)
        booster = xgb.Booster(model_file=bytearray(model.encode()))
        leaves = booster.predict(xgb.DMatrix(cs.on_grid(x)[:, None]), pred_leaf=True)
        for t in range(leaves.shape[1]):
            assert np.unique(leaves[:, t], return_counts=True)[1].min() >= min_cell
    with pytest.raises(PrivacyRefusal, match="min-cell rule"):
        cs.boost_trees(x, y, np.zeros(60), 2, cs.SITE_LIMITS, smallest_class + 1, seed=1)
    isolating = np.zeros((60, 1), dtype=int)
    isolating[17] = 1  # one patient alone in a leaf
    assert not cs.leaves_pass(isolating, 3)
    assert cs.leaves_pass(np.zeros((60, 1), dtype=int), 3)
    # A leaf of ten patients of whom one had the event: its event share is a small count.
    one_event = np.zeros(60)
    one_event[isolating[:, 0] == 0] = 1
    isolating[:10] = 1
    one_event[:10] = [1] + [0] * 9
    assert cs.leaves_pass(isolating, 3) and not cs.leaves_pass(isolating, 3, one_event)
    # Few events at all: the trees become single leaves, which still pass.
    rare = np.zeros(60)
    rare[:4] = 1
    model = cs.boost_trees(x, rare, np.zeros(60), 2, cs.SITE_LIMITS, 3, seed=1)
    booster = xgb.Booster(model_file=bytearray(model.encode()))
    leaves = booster.predict(xgb.DMatrix(cs.on_grid(x)[:, None]), pred_leaf=True)
    assert cs.leaves_pass(leaves.reshape(60, -1), 3, rare)


# ---------------------------------------------------------------------------- FedAvg


def _svm_grad(theta, x, y, tau, alpha):
    # The smoothed hinge tau*log(1+exp((1 - s f)/tau)): d/df = -s * sigmoid((1 - s f)/tau).
    s = 2 * y - 1
    f = theta[0] * x + theta[1]
    w = 1 / (1 + np.exp(-(1 - s * f) / tau))
    return np.array([np.mean(-w * s * x) + alpha * theta[0], np.mean(-w * s)])


def _nn_grad(theta, x, y, hidden, alpha):
    w1, b1, w2, b2 = (theta[:hidden], theta[hidden : 2 * hidden], theta[2 * hidden : -1], theta[-1])
    z = x[:, None] * w1[None, :] + b1[None, :]
    a = np.tanh(z)
    p = 1 / (1 + np.exp(-(a @ w2 + b2)))
    r = (p - y) / len(x)
    dz = r[:, None] * w2[None, :] * (1 - a**2)
    g = np.concatenate([(dz * x[:, None]).sum(0), dz.sum(0), (r[:, None] * a).sum(0), [r.sum()]])
    return g + alpha * theta


def _fedavg_loop(data, grad, theta, rounds, epochs, lr):
    """An independent FedAvg: each site's epochs of gradient descent, weighted mean."""
    for _ in range(rounds):
        updates = []
        for x, y in data:
            t = theta.copy()
            for _ in range(epochs):
                t = t - lr * grad(t, x, y)
            updates.append(t)
        n = np.array([len(x) for x, _ in data], float)
        theta = sum(w * u for w, u in zip(n / n.sum(), updates, strict=True))
    return theta


def test_fedavg_equals_an_independent_loop_and_flowers_aggregate(run, study):
    from flwr.server.strategy.aggregate import aggregate

    result, transport = run
    lim = cs.SITE_LIMITS
    data = [site_rows(study, transport, s, "train") for s in SITES]
    rounds = study.classifiers.rounds
    svm = _fedavg_loop(
        data,
        lambda t, x, y: _svm_grad(t, x, y, lim.svm_tau, lim.svm_alpha),
        np.zeros(2),
        rounds,
        lim.epochs,
        lim.learning_rate,
    )
    nn = _fedavg_loop(
        data,
        lambda t, x, y: _nn_grad(t, x, y, lim.hidden, lim.nn_alpha),
        cs.nn_init(study.seed, lim.hidden),
        rounds,
        lim.epochs,
        lim.learning_rate,
    )
    models = result.details["classifiers"]["models"]
    np.testing.assert_allclose(models["svm_linear"]["coef"], svm, rtol=0, atol=1e-8)
    np.testing.assert_allclose(models["neural_network"]["params"], nn, rtol=0, atol=1e-8)
    # One round's averaging as Flower's FedAvg aggregates the same site updates.
    by_site = train_rounds(transport)[-1]
    for key in ("svm_params", "nn_params"):
        flower = aggregate([([by_site[s][1][key]], int(by_site[s][1]["n"])) for s in SITES])
        mine = sc.fedavg([by_site[s][1][key] for s in SITES], [by_site[s][1]["n"] for s in SITES])
        np.testing.assert_allclose(mine, flower[0], rtol=0, atol=1e-12)
    # Per-site AUCs recomputed from the federated parameters; and a central fit of the
    # same losses (all training rows, as many epochs) ranks patients about as well.
    central_svm = _fedavg_loop(
        [tuple(np.concatenate(v) for v in zip(*data, strict=True))],
        lambda t, x, y: _svm_grad(t, x, y, lim.svm_tau, lim.svm_alpha),
        np.zeros(2),
        rounds,
        lim.epochs,
        lim.learning_rate,
    )
    central_nn = _fedavg_loop(
        [tuple(np.concatenate(v) for v in zip(*data, strict=True))],
        lambda t, x, y: _nn_grad(t, x, y, lim.hidden, lim.nn_alpha),
        cs.nn_init(study.seed, lim.hidden),
        rounds,
        lim.epochs,
        lim.learning_rate,
    )
    for site in SITES:
        x, y = site_rows(study, transport, site, "test")
        t = table(result)[site]["test"]
        assert t["svm_linear"]["auc"] == pytest.approx(roc_auc_score(y, svm[0] * x + svm[1]))
        _, logit = cs.nn_forward(nn, x, lim.hidden)
        assert t["neural_network"]["auc"] == pytest.approx(roc_auc_score(y, logit))
        central = roc_auc_score(y, central_svm[0] * x + central_svm[1])
        assert abs(t["svm_linear"]["auc"] - central) < 0.02
        central = roc_auc_score(y, cs.nn_forward(central_nn, x, lim.hidden)[1])
        assert abs(t["neural_network"]["auc"] - central) < 0.02


# ---------------------------------------------------------------------- random forest


def test_random_forest_is_the_union_of_the_site_trees(run, study):
    result, transport = run
    first = train_rounds(transport)[0]
    trees = [
        first[s][1][f"rf_tree_{k}"] for s in SITES for k in range(study.classifiers.forest_trees)
    ]
    assert all(t.shape == cs.GRID.shape for t in trees)
    union = np.mean(trees, axis=0)
    sent = evaluate_request(transport)["rf_prob"]
    np.testing.assert_allclose(sent, union, atol=1e-12)
    assert result.details["classifiers"]["models"]["random_forest"]["trees"] == len(trees)
    for site in SITES:
        for subset in ("train", "test"):
            x, y = site_rows(study, transport, site, subset)
            p = union[np.searchsorted(cs.GRID, x, side="right") - 1]
            mine = table(result)[site][subset]["random_forest"]["auc"]
            assert mine == pytest.approx(roc_auc_score(y, p), abs=1e-9)


def test_forest_leaves_hold_min_cell_distinct_patients():
    """Each tree's subsample is drawn without replacement, its leaves >= min_cell."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=80)
    y = (x + rng.normal(size=80) > 0).astype(float)
    trees = cs.grow_forest(x, y, 5, cs.SITE_LIMITS, min_cell=12, seed=4)
    xq = cs.on_grid(x)
    for tree in trees:
        # The rows of each constant piece of the step function: >= min_cell of the
        # subsample each, so >= min_cell of all rows.
        values = tree[cs.quantise(xq)]
        assert np.unique(values, return_counts=True)[1].min() >= 12


# ---------------------------------------------------------------------- site-local


def test_site_local_svm_and_knn_equal_sklearn_on_the_sites_own_rows(run, study):
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.svm import SVC

    result, transport = run
    for site in SITES:
        xt, yt = site_rows(study, transport, site, "train")
        x, y = site_rows(study, transport, site, "test")
        svm = SVC(kernel="rbf", C=1.0, gamma="scale").fit(xt[:, None], yt)
        knn = KNeighborsClassifier(n_neighbors=cs.SITE_LIMITS.knn_k).fit(xt[:, None], yt)
        t = table(result)[site]["test"]
        assert t["svm_radial"]["auc"] == pytest.approx(
            roc_auc_score(y, svm.decision_function(x[:, None])), abs=1e-9
        )
        assert t["knn"]["auc"] == pytest.approx(
            roc_auc_score(y, knn.predict_proba(x[:, None])[:, 1]), abs=1e-9
        )


# --------------------------------------------------------------------------- attacks


def _ask(transport, site, changes=None):
    """The phase's evaluate request with ``changes``, as site ``site`` answers it."""
    request = {**evaluate_request(transport), **(changes or {})}
    return transport.workers[site].handle(request)


def _refused(reply, words):
    assert "error" in reply, reply.keys()
    assert "\n" not in reply["error"] and words in reply["error"], reply["error"]


def test_crafted_requests_are_refused_with_one_line_errors(run, study):
    _, transport = run
    site = "cleveland"
    train = {"step": cs.TRAIN_STEP, "round": 1, "trees": 1, "forest_trees": 1}
    hidden = cs.SITE_LIMITS.hidden
    nn = np.zeros(cs.n_nn_params(hidden))
    steep = nn.copy()  # hidden units within the weight bound, saturated for most patients
    steep[: 2 * hidden] = 49.0
    # A global model that saturates every patient but those of one grid cell.
    x, _ = site_rows(study, transport, site, "train")
    margin = np.full(len(cs.GRID), 40.0)
    margin[cs.quantise(x[:1])] = 0.0
    cases = [
        ({**train, "trees": 10**6}, "'trees' must be in 1.."),
        ({**train, "round": 999}, "'round' must be in 0.."),
        ({**train, "round": 0, "forest_trees": 10**5}, "'forest_trees' must be in 1.."),
        ({"step": "dump"}, "'step' must be"),
        ({"svm_params": np.array([np.nan, 0.0])}, "must be finite"),
        ({"nn_params": nn + 1e6}, "saturation rule"),
        ({**train, "nn_params": steep}, "saturation rule"),
        ({**train, "xgb_margin": margin}, "saturation rule"),
        ({"xgb_margin": np.zeros(5)}, "one value per site grid point"),
        ({"rf_prob": np.full(len(cs.GRID), 2.0)}, "must be finite, in [0, 1]"),
        ({"local_models": True}, "never leave the site"),
        ({"knn_model": True}, "never leave the site"),
        ({"classifiers": ["knn", "oracle"]}, "unknown classifier"),
        # Bootstrap weights would repeat patients inside a leaf's count.
        ({"bootstrap": 1}, "not answered in a bootstrap replicate"),
    ]
    for changes, words in cases:
        _refused(_ask(transport, site, changes), words)


def test_request_grids_thresholds_and_tree_json_are_ignored(run, study):
    """The grid, thresholds and global model are the site's own: a request's are never
    read (a crafted tree JSON is not even parsed)."""
    _, transport = run
    honest = _ask(transport, "hungarian")
    crafted = _ask(
        transport,
        "hungarian",
        {
            "grid": np.array([0.1234, 0.1235]),
            "thresholds": np.array([0.5]),
            "min_samples_leaf": 1,
            "xgb_model": '{"learner": {"gradient_booster": ' + "[" * 10000,
        },
    )
    assert "error" not in crafted
    assert set(crafted) == set(honest)
    for key, value in honest.items():
        np.testing.assert_array_equal(np.asarray(crafted[key]), np.asarray(value))


def test_sites_whose_limit_the_models_exceed_refuse_and_the_phase_says_so(run, study):
    """Sites whose parameter limit is below the SVM's and network's parameters refuse
    the round; the phase's entry says why (the study would go on)."""
    from radfed.client.site import SiteSettings, SiteWorker
    from radfed.server.study.classifiers import compare_classifiers
    from radfed.shared.privacy import PrivacyPolicy

    _, transport = run
    strict = PrivacyPolicy(min_cell=3, max_param_fraction=0.03)
    workers = {s.name: SiteWorker(SiteSettings(s.name, s.path, strict)) for s in study.sites}
    small = InProcessTransport({s: workers[s] for s in SITES})
    small.context, small.protocol = dict(transport.context), transport.protocol
    entry = compare_classifiers(small, study)
    assert entry["status"] == "refused" and "parameters rule" in entry["reason"]
    assert "table" not in entry and entry["site_local"] == ["svm_radial", "knn"]


@pytest.mark.parametrize(("cap", "words"), [(0, "takes no part"), (3, "'round' must be in 0..2")])
def test_a_sites_own_round_cap_refuses_the_comparison(run, study, cap, words):
    """A site whose max_classifier_rounds is below the study's rounds (or 0) refuses;
    the study records why and goes on. At the study's own number of rounds it answers."""
    from radfed.client.site import SiteSettings, SiteWorker
    from radfed.server.study.classifiers import compare_classifiers

    _, transport = run

    def federation(cleveland_cap: int) -> InProcessTransport:
        workers = {
            s.name: SiteWorker(
                SiteSettings(
                    s.name,
                    s.path,
                    study.privacy,
                    max_classifier_rounds=cleveland_cap if s.name == "cleveland" else 20,
                )
            )
            for s in study.sites
        }
        small = InProcessTransport({s: workers[s] for s in SITES})
        small.context, small.protocol = dict(transport.context), transport.protocol
        return small

    assert study.classifiers.rounds == 5
    entry = compare_classifiers(federation(cap), study)
    assert entry["status"] == "refused" and "cleveland" in entry["reason"], entry
    assert words in entry["reason"]
    if cap == 3:  # the same site, allowed the study's rounds, takes part
        assert compare_classifiers(federation(5), study)["status"] == "ok"


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("compare = 1", "compare must be true or false"),
        ("compare = true\nrounds = 0", r"rounds must be an integer in 1..20"),
        ("compare = true\ntrees_per_round = 50", r"trees_per_round must be an integer in 1..3"),
        ("compare = true\nforest_trees = 2.5", r"forest_trees must be an integer in 1..20"),
        ("compare = true\ntrees = 3", r"unknown key\(s\) \['trees'\]"),
    ],
)
def test_bad_classifiers_sections(tmp_path, section, message):
    path = tmp_path / "study.toml"
    path.write_text(heart_study_text(SITES) + f"\n[classifiers]\n{section}\n")
    with pytest.raises(StudyConfigError, match=message) as info:
        load_study(path)
    assert "\n" not in str(info.value)


def test_classifiers_are_off_by_default(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text(heart_study_text(SITES))
    config = load_study(path)
    assert not config.classifiers.compare
    assert not any(k.startswith("classifiers") for k in config.as_params())


# ------------------------------------------------------------------ report and MLflow


def test_report_and_mlflow_carry_table_3(run):
    from radfed.server.outputs.report import render_report
    from radfed.server.tracking.runs import study_metrics

    result, _ = run
    html = render_report(result.to_dict())
    assert 'id="classifiers"' in html and "Classifiers on the Radscore" in html
    assert "site-local, not federated" in html
    assert html.count("<caption>") >= 2 * len(SITES)
    metrics = study_metrics(result)
    for site in SITES:
        for subset in ("train", "test"):
            for name in cs.CLASSIFIERS:
                key = f"classifier.{name}.{site}.{subset}.auc"
                assert metrics[key] == table(result)[site][subset][name]["auc"]
    off = StudyResult.from_dict({**result.to_dict(), "classifiers": None})
    assert not any(k.startswith("classifier.") for k in study_metrics(off))
    assert 'id="classifiers"' not in render_report({**result.to_dict(), "classifiers": None})


# ---------------------------------------------------------------- Flower Simulation


@pytest.mark.slow
def test_simulation_engine_gives_the_same_table(run, study):
    """The phase through Flower's Simulation Engine (sites in Ray workers): the same
    Table 3 as in-process, number for number."""
    from radfed.server.federation.simulation import run_in_simulation

    result, _ = run
    simulated = run_in_simulation(study)
    assert simulated.transport == "simulation"
    assert simulated.rounds["classifiers"] == result.rounds["classifiers"]
    mine, theirs = result.details["classifiers"], simulated.details["classifiers"]
    assert theirs["status"] == "ok"
    for site in SITES:
        for subset in ("train", "test"):
            for metric, row in mine["table"][site][subset]["rows"].items():
                np.testing.assert_allclose(
                    theirs["table"][site][subset]["rows"][metric], row, rtol=0, atol=1e-9
                )


def test_garbage_in_any_field_gets_a_one_line_answer_never_an_internal_error(run):
    """Every field of both steps, replaced by values of the wrong kind: refused with a
    one-line data or privacy error (or ignored), never a crash of the site."""
    _, transport = run
    garbage = [None, "x", [1, 2], {"a": 1}, np.array([np.inf]), -1, True, 1e308, np.zeros((2, 2))]
    train = {"step": cs.TRAIN_STEP, "round": 0, "trees": 1, "forest_trees": 2}
    keys = ["step", "round", "trees", "forest_trees", "svm_params", "nn_params", "xgb_margin"]
    keys += ["rf_prob", "classifiers", "subsets"]
    for base in ({}, train):
        for key in keys:
            for value in garbage:
                reply = _ask(transport, "va", {**base, key: value})
                if "error" in reply:
                    assert reply["error_kind"] in ("data", "privacy"), (key, value, reply)
                    assert "\n" not in reply["error"]
