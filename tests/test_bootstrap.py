"""Harrell's bootstrap optimism correction, federated, against a pooled bootstrap.

The oracle is written here, apart from the federated code: for each replicate it stacks
the training rows of the heart-disease hospitals, each row repeated by its site's
Poisson weights (the same weights: the public weight function with the site's secret
from its state folder), and reruns the pooled pipeline with the reference libraries
(neuroCombat, mrmr-selection, scikit-learn's L1 logistic polished by Newton on its
active set, statsmodels), then scores the replicate's models on the replicate and on
the original training rows with scikit-learn and statsmodels.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from sklearn.metrics import brier_score_loss, roc_auc_score

from radfed.client.site import SiteSettings, SiteWorker
from radfed.client.site_state import SiteState, default_state_dir
from radfed.server.federation.inprocess import InProcessTransport
from radfed.server.study.bootstrap import EXACT
from radfed.server.study.driver import FederatedStudy
from radfed.shared.bootstrap import poisson_weights
from radfed.shared.config import load_study
from radfed.shared.errors import StudyConfigError
from radfed.shared.messages import RADSCORE
from radfed.shared.privacy import PrivacyPolicy
from radfed.tests.conftest import heart_study_text
from radfed.tests.reference import (
    binary_columns,
    complete_rows,
    expand_features,
    feature_tables,
    glmnet_deviance,
    site_assignment,
    sklearn_l1,
)

B = 3
SITES = ["cleveland", "hungarian"]  # VA's 15 healthy training patients are too few


def _study(heart_dir, bootstrap: int | None, name: str = "study.toml"):
    text = heart_study_text(SITES, pipeline=True)
    if bootstrap is not None:
        text = text.replace("[validation]\n", f"[validation]\nbootstrap = {bootstrap}\n")
    path = heart_dir / name
    path.write_text(text)
    return load_study(path)


def _run(config):
    transport = InProcessTransport.from_study(config)
    return FederatedStudy(config, transport).run()


@pytest.fixture(scope="module")
def heart_module_dir(tmp_path_factory, shared_data):
    from radfed.experiments.heart_disease import write_sites

    root = tmp_path_factory.mktemp("bootstrap")
    write_sites(root / "sites", shared_data / "heart_disease")
    return root


@pytest.fixture(scope="module")
def runs(heart_module_dir):
    """The study without the option, with bootstrap = 0 and with bootstrap = B."""
    off = _run(_study(heart_module_dir, None))
    zero = _run(_study(heart_module_dir, 0))
    config = _study(heart_module_dir, B)
    return config, off, zero, _run(config)


# -- the pooled bootstrap -------------------------------------------------------------


def _weights(config, name: str, b: int) -> dict[str, int]:
    """patient id -> copies in replicate b (1 each for b = 0), with the site's secret."""
    site = next(s for s in config.sites if s.name == name)
    assignment = site_assignment(config, name)
    train = [pid for pid, (subset, _) in assignment.items() if subset == "train"]
    if b == 0:
        return dict.fromkeys(train, 1)
    secret = SiteState(default_state_dir(name, site.path)).secret()
    return dict(zip(train, poisson_weights(len(train), config.seed, name, secret, b), strict=True))


def _original_rows(config) -> pd.DataFrame:
    """Every training site's training rows (complete cases), with id, site and fold."""
    tables = feature_tables(config)
    parts = []
    for name, table in tables.items():
        complete, test = complete_rows(config, name, table)
        ids = table.loc[complete.index, "patient_id"].astype(str).to_numpy()
        assignment = site_assignment(config, name)
        part = complete[~test].assign(site=name, patient_id=ids[~test])
        part["fold"] = [assignment[i][1] for i in part["patient_id"]]
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def _replicate_rows(config, original: pd.DataFrame, b: int) -> pd.DataFrame:
    copies = np.concatenate(
        [
            original.loc[original["site"] == name, "patient_id"].map(_weights(config, name, b))
            for name in SITES
        ]
    ).astype(int)
    return original.loc[np.repeat(original.index.to_numpy(), copies)].reset_index(drop=True)


def _combat(config, rows: pd.DataFrame, features: list[str]):
    """neuroCombat on ``rows``; returns the harmonised rows and a function applying the
    same estimates to other rows (ComBat's adjustment written out, checked here on the
    rows it was fitted on)."""
    from neuroCombat import neuroCombat

    h = config.harmonization
    kept_out = set(binary_columns(config, features)) | set(h.exclude)
    harmonised = [f for f in features if f not in kept_out]
    out = neuroCombat(
        dat=rows[harmonised].to_numpy(dtype=float).T,
        covars=rows[list(h.covariates)].assign(batch=rows["site"].to_numpy()),
        batch_col="batch",
        categorical_cols=list(h.categorical),
        continuous_cols=[c for c in h.covariates if c not in h.categorical],
        parametric=h.parametric,
        mean_only=h.mean_only,
    )
    est = out["estimates"]
    levels = {c: sorted(rows[c].unique()) for c in h.categorical}

    def covariates(frame: pd.DataFrame) -> np.ndarray:
        cols = [(frame[c] == lv).astype(float) for c in h.categorical for lv in levels[c][1:]]
        cols += [frame[c].astype(float) for c in h.covariates if c not in h.categorical]
        return np.column_stack(cols)

    # The covariate effects: mod.mean = C @ B over the fitted rows.
    coef = np.linalg.lstsq(covariates(rows), est["mod.mean"].T, rcond=None)[0]
    grand = est["stand.mean"][:, 0]
    sd = np.sqrt(est["var.pooled"][:, 0])
    batches = list(est["batches"])

    def apply(frame: pd.DataFrame) -> pd.DataFrame:
        mean = grand + covariates(frame) @ coef
        z = (frame[harmonised].to_numpy(dtype=float) - mean) / sd
        k = np.array([batches.index(s) for s in frame["site"]])
        z = (z - est["gamma.star"][k]) / np.sqrt(est["delta.star"][k])
        adjusted = frame[features].astype(float).copy()
        adjusted[harmonised] = z * sd + mean
        return adjusted

    fitted = rows[features].astype(float).copy()
    fitted[harmonised] = out["data"].T
    np.testing.assert_allclose(apply(rows).to_numpy(), fitted.to_numpy(), rtol=0, atol=1e-9)
    return fitted, apply


def _polished_l1(Z: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """glmnet's L1 logistic solution at λ: scikit-learn's saga, then an active-set
    Newton method from its solution (signs fixed on the active set, the smooth problem
    there; a coefficient that crosses zero leaves, a violated KKT condition enters), to
    machine precision, ending only when every KKT condition holds."""
    out = sklearn_l1(Z, y, lam)
    for _ in range(4 * Z.shape[1] + 4):
        active = np.flatnonzero(out[1:] != 0)
        sign = np.sign(out[1:][active])
        X = np.column_stack([np.ones(len(y)), Z[:, active]])
        theta = out[np.concatenate([[0], active + 1])]
        penalty = np.concatenate([[0.0], lam * sign])
        for _ in range(100):
            p = 1 / (1 + np.exp(-X @ theta))
            grad = X.T @ (p - y) / len(y) + penalty
            hess = X.T @ (X * (p * (1 - p))[:, None]) / len(y)
            step = np.linalg.solve(hess, grad)
            theta -= step
            if np.abs(step).max() < 1e-14:
                break
        out = np.zeros(Z.shape[1] + 1)
        flipped = np.sign(theta[1:]) != sign
        theta[1:][flipped] = 0.0  # crossed zero: it is zero
        out[np.concatenate([[0], active + 1])] = theta
        if flipped.any():
            continue
        p = 1 / (1 + np.exp(-(out[0] + Z @ out[1:])))
        score = Z.T @ (y - p) / len(y)
        off = np.setdiff1d(np.arange(Z.shape[1]), active)
        violated = off[np.abs(score[off]) > lam * (1 + 1e-12)]
        if not len(violated):
            return out
        j = violated[np.argmax(np.abs(score[violated]))]
        out[1 + j] = 1e-12 * np.sign(score[j])  # enters with the sign of its score
    raise AssertionError("the active-set Newton method did not settle")


def _logit(rows: pd.DataFrame, outcome: str, columns: list[str]):
    """statsmodels Logit; returns a function giving the linear predictor on any rows."""
    mean, sd = rows[columns].mean(), rows[columns].std(ddof=0)
    X = sm.add_constant(((rows[columns] - mean) / sd).to_numpy(), has_constant="add")
    fit = sm.Logit(rows[outcome].to_numpy(dtype=float), X).fit(
        method="newton", tol=1e-12, maxiter=100, disp=0
    )
    return lambda frame: fit.params[0] + ((frame[columns] - mean) / sd).to_numpy() @ fit.params[1:]


def _pooled_pipeline(config, rows: pd.DataFrame, lambdas: np.ndarray):
    """The study's pipeline on ``rows`` (replicate rows, repeated): what it chose, and
    each model's linear predictor as a function of raw rows."""
    from mrmr import mrmr_classif

    outcome, sel = config.outcome, config.selection
    features = list(config.features)
    y = rows[outcome].to_numpy(dtype=float)
    harmonised, apply = _combat(config, rows, features)
    picked = mrmr_classif(
        X=harmonised, y=rows[outcome], K=sel.mrmr_k, show_progress=False, n_jobs=1
    )
    mean, sd = harmonised[picked].mean(), harmonised[picked].std(ddof=0)
    Z = ((harmonised[picked] - mean) / sd).to_numpy()
    lambda_max = np.abs(Z.T @ (y - y.mean())).max() / len(y)
    folds = rows["fold"].to_numpy(dtype=int)
    means = np.empty((sel.folds, len(lambdas)))
    for f in range(sel.folds):
        train, test = folds != f, folds == f
        for i, lam in enumerate(lambdas):
            beta = _polished_l1(Z[train], y[train], lam)
            means[f, i] = glmnet_deviance(beta[0] + Z[test] @ beta[1:], y[test]).mean()
    n_k = np.bincount(folds, minlength=sel.folds).astype(float)
    cvm = n_k @ means / n_k.sum()
    lam = float(lambdas[int(np.argmin(cvm))])  # lambda.min
    beta = _polished_l1(Z, y, lam)

    def radscore(frame: pd.DataFrame) -> np.ndarray:
        z = ((apply(frame)[picked] - mean) / sd).to_numpy()
        return beta[0] + z @ beta[1:]

    retained = []
    for name in config.clinical:
        X = sm.add_constant(rows[[name]].to_numpy(dtype=float))
        uni = sm.Logit(y, X).fit(disp=0, tol=1e-12)
        if uni.pvalues[1] < config.univariable_p:
            retained.append(name)
    scored = rows.assign(**{RADSCORE: radscore(rows)})
    columns = {"radiomics": [RADSCORE]}
    if retained:
        columns.update(clinical=retained, nomogram=[*retained, RADSCORE])
    fits = {m: _logit(scored, outcome, cols) for m, cols in columns.items()}
    models = {
        m: (lambda frame, fit=fit: fit(frame.assign(**{RADSCORE: radscore(frame)})))
        for m, fit in fits.items()
    }
    chose = {
        "mrmr": picked,
        "lambda_max": lambda_max,
        "lambda": lam,
        "radscore": beta,
        "retained": retained,
    }
    return chose, models


def _metrics(rows: pd.DataFrame, outcome: str, lp: np.ndarray) -> dict[str, float]:
    y = rows[outcome].to_numpy(dtype=float)
    p = 1 / (1 + np.exp(-lp))
    pairs = concordant = 0.0
    for name in SITES:
        mine = rows["site"].to_numpy() == name
        events = y[mine].sum()
        weight = events * (mine.sum() - events)
        pairs += weight
        concordant += roc_auc_score(y[mine], lp[mine]) * weight
    calibration = sm.Logit(y, sm.add_constant(lp)).fit(
        method="newton", tol=1e-12, maxiter=100, disp=0
    )
    return {
        "auc_within_site": concordant / pairs,
        "brier": brier_score_loss(y, p),
        "cal_intercept": float(calibration.params[0]),
        "cal_slope": float(calibration.params[1]),
    }


@pytest.fixture(scope="module")
def oracle(runs):
    config, _, _, result = runs
    config = expand_features(config, feature_tables(config))
    boot = result.details["evaluation"]["bootstrap"]
    original = _original_rows(config)
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        for rep in boot["per_replicate"]:
            rows = _replicate_rows(config, original, rep["b"])
            chose, models = _pooled_pipeline(config, rows, np.array(rep["fit"]["lambdas"]))
            out[rep["b"]] = {
                "chose": chose,
                "apparent": {m: _metrics(rows, config.outcome, f(rows)) for m, f in models.items()},
                "test": {
                    m: _metrics(original, config.outcome, f(original)) for m, f in models.items()
                },
            }
        # b = 0: the study's own pipeline on the original rows, for the apparent values.
        rep0 = result.details["selection"]["lasso"]["lambdas"]
        chose, models = _pooled_pipeline(config, original, np.array(rep0))
        out[0] = {m: _metrics(original, config.outcome, f(original)) for m, f in models.items()}
    return out


# -- tests ----------------------------------------------------------------------------


def test_each_replicate_refits_what_the_pooled_bootstrap_refits(runs, oracle):
    _, _, _, result = runs
    boot = result.details["evaluation"]["bootstrap"]
    assert boot["B"] == B and boot["replicates_ok"] == B and not boot["failed"]
    for rep in boot["per_replicate"]:
        mine, theirs = rep["fit"], oracle[rep["b"]]["chose"]
        assert mine["mrmr"] == theirs["mrmr"]
        assert mine["lambdas"][0] == pytest.approx(theirs["lambda_max"], rel=1e-9)
        ratios = np.diff(np.log(mine["lambdas"]))
        np.testing.assert_allclose(ratios, ratios[0], rtol=1e-9)
        assert mine["lambda"] == theirs["lambda"]
        radscore = np.array(list(mine["radscore"].values()))
        np.testing.assert_allclose(radscore, theirs["radscore"], rtol=0, atol=1e-7)
        assert mine["retained"] == theirs["retained"]
    # The replicates are different data sets: their λ paths differ.
    assert len({rep["fit"]["lambdas"][0] for rep in boot["per_replicate"]}) == B


def test_optimism_and_corrected_values_equal_the_pooled_bootstrap(runs, oracle):
    _, _, _, result = runs
    boot = result.details["evaluation"]["bootstrap"]
    reps = boot["per_replicate"]
    worst = 0.0
    for model, metrics in boot["models"].items():
        for metric in EXACT:
            for rep in reps:
                for which in ("apparent", "test"):
                    mine = rep[which][model][metric]
                    theirs = oracle[rep["b"]][which][model][metric]
                    worst = max(worst, abs(mine - theirs))
                    assert mine == pytest.approx(theirs, abs=1e-6), (model, metric, which)
            ours = [oracle[r["b"]] for r in reps]
            optimism = np.mean(
                [o["apparent"][model][metric] - o["test"][model][metric] for o in ours]
            )
            entry = metrics[metric]
            assert entry["apparent"] == pytest.approx(oracle[0][model][metric], abs=1e-6)
            assert entry["optimism"] == pytest.approx(optimism, abs=1e-6)
            corrected = oracle[0][model][metric] - optimism
            assert entry["corrected"] == pytest.approx(corrected, abs=1e-6)
            assert entry["replicates"] == B
    print(f"largest federated - pooled difference: {worst:.2e}")
    # Optimism is real on these data: the apparent AUC of the nomogram beats the test one
    # on average (a test that could not fail would not show the refits happened).
    assert boot["models"]["nomogram"]["auc_within_site"]["optimism"] != 0


def test_bootstrap_off_changes_nothing_and_on_leaves_the_main_fit_alone(runs):
    _, off, zero, on = runs
    # Copies: to_dict shares the result's details.
    a, b, c = (json.loads(json.dumps(r.to_dict(), default=str)) for r in (off, zero, on))
    for d in (a, b, c):
        d.pop("created")
    assert json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)
    assert "bootstrap" not in a["settings"] and "bootstrap" not in a["evaluation"]
    assert c["settings"]["bootstrap"] == str(B)
    # The main fit's numbers do not move when replicates share its rounds.
    c["evaluation"].pop("bootstrap")
    for key in ("models", "performance", "evaluation", "selection", "clinical_screening"):
        assert json.dumps(a[key], sort_keys=True, default=str) == json.dumps(
            c[key], sort_keys=True, default=str
        ), key


def test_replicates_share_rounds(runs):
    _, off, _, on = runs
    alone, shared = sum(off.rounds.values()), sum(on.rounds.values())
    # B refits alone would take about (B + 1) times the rounds; shared, barely more.
    assert shared < 1.5 * alone
    assert alone <= shared


@pytest.mark.slow
def test_simulation_engine_gives_the_same_correction(runs):
    """The replicates through Flower's Simulation Engine (each site a ClientApp in a Ray
    worker, the bootstrap number in every request's context): the same replicates,
    optimism and corrected values as in-process, in the same rounds."""
    from radfed.server.federation.simulation import run_in_simulation

    config, _, _, result = runs
    simulated = run_in_simulation(config)
    assert simulated.transport == "simulation"
    assert simulated.rounds == result.rounds
    mine = result.details["evaluation"]["bootstrap"]
    theirs = simulated.details["evaluation"]["bootstrap"]
    assert theirs["replicates_ok"] == mine["replicates_ok"] == B
    for model, metrics in mine["models"].items():
        for metric in EXACT:
            for key in ("apparent", "optimism", "corrected"):
                assert theirs["models"][model][metric][key] == pytest.approx(
                    metrics[metric][key], abs=1e-9
                ), (model, metric, key)


def test_config_bounds(heart_dir):
    for bad in (-1, 1.5, True, "3", 10**6):
        text = heart_study_text(SITES, pipeline=True).replace(
            "[validation]\n", f"[validation]\nbootstrap = {json.dumps(bad)}\n"
        )
        (heart_dir / "bad.toml").write_text(text)
        with pytest.raises(StudyConfigError, match=r"\[validation\]: bootstrap must be") as err:
            load_study(heart_dir / "bad.toml")
        assert "\n" not in str(err.value)


# -- the site's rules -------------------------------------------------------------------


@pytest.fixture
def site(heart_dir):
    """A worker for cleveland, its Site loaded by an ordinary answer, and a request."""
    config = _study(heart_dir, None)
    settings = SiteSettings(
        "cleveland", heart_dir / "sites" / "cleveland", PrivacyPolicy(), max_bootstrap=20
    )
    worker = SiteWorker(settings)
    request = {"protocol": config.protocol(), "columns": ["age", "chol"]}
    reply = worker.handle({"task": "moments", **request})
    assert "error" not in reply, reply
    return config, worker, worker.site(config.protocol()), request


def test_site_refuses_bad_replicate_numbers(site):
    _, worker, _, request = site
    for bad in (0, -1, 21, 10**12, 1.5, "1", True, [1], None, {"b": 1}, float("nan")):
        reply = worker.handle({"task": "moments", **request, "bootstrap": bad})
        assert reply.get("error", "").startswith(
            "request field 'bootstrap' must be a replicate number from 1 to 20"
        ), bad
        assert "\n" not in reply["error"]


def test_a_site_with_no_replicates_refuses_every_one(heart_dir):
    config = _study(heart_dir, None)
    settings = SiteSettings(
        "cleveland", heart_dir / "sites" / "cleveland", PrivacyPolicy(), max_bootstrap=0
    )
    request = {"task": "moments", "protocol": config.protocol(), "columns": ["age", "chol"]}
    worker = SiteWorker(settings)
    assert "error" not in worker.handle(request)
    reply = worker.handle({**request, "bootstrap": 1})
    assert reply["error"] == "request field 'bootstrap': this site answers no replicate"


def test_a_replicate_answers_over_training_rows_only(site):
    _, worker, _, request = site
    asks = [
        {"task": "moments", **request, "subset": "test"},
        {"task": "moments", **request, "subset": "all"},
        {"task": "describe", **request},
        {"task": "split", **request},
        {"task": "evaluate", **request, "models": []},  # default subsets: train and test
        {"task": "evaluate", **request, "models": [], "subsets": ["train", "test"]},
    ]
    for ask in asks:
        reply = worker.handle({**ask, "bootstrap": 1})
        assert "error" in reply and "\n" not in reply["error"], ask
        assert "training rows only" in reply["error"], reply["error"]


def test_a_replicate_is_the_training_rows_repeated_by_the_public_weights(site):
    config, worker, s, request = site
    for b in (1, 2):
        reply = worker.handle({"task": "moments", **request, "bootstrap": b})
        assert "error" not in reply, reply
        secret = SiteState(s.settings.state_dir).secret()
        w = poisson_weights(int((~s.test_mask).sum()), config.seed, "cleveland", secret, b)
        rows = np.repeat(np.flatnonzero(~s.test_mask), w)
        x = s.table.frame[["age", "chol"]].to_numpy(dtype=float)[rows]
        assert reply["n"] == w.sum()
        np.testing.assert_allclose(reply["mean"], x.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(reply["m2"], ((x - x.mean(axis=0)) ** 2).sum(axis=0))
    # Outside a replicate the site is as before.
    plain = worker.handle({"task": "moments", **request})
    assert plain["n"] == (~s.test_mask).sum()


def test_a_site_records_a_replicates_patient_set_with_its_weights(site):
    """The differencing rule judges a replicate's set by its weights: the site hands them
    to its state, which records them beside the members (compared by weight later)."""
    config, worker, s, request = site
    reply = worker.handle({"task": "moments", **request, "bootstrap": 3})
    assert "error" not in reply, reply
    secret = SiteState(s.settings.state_dir).secret()
    w = poisson_weights(int((~s.test_mask).sum()), config.seed, "cleveland", secret, 3)
    answered = json.loads((s.settings.state_dir / "answered_sets.json").read_text())
    weighted = [a for a in answered if "weights" in a]
    assert [sorted(a["weights"]) for a in weighted] == [sorted(w[w > 0].tolist())]


def test_counts_in_a_replicate_hold_min_cell_distinct_patients(site):
    """A cell a single repeated patient could fill is refused: inside a replicate the
    minimum cell is min_cell times the largest weight, and every threshold and bin count
    sent, and every difference of them, passes it."""
    config, worker, s, request = site
    model = {
        "models": ["m"],
        "subsets": ["train"],
        "m_columns": ["age", "thalach"],
        "m_center": [54.0, 150.0],
        "m_scale": [9.0, 23.0],
        "m_beta": [0.2, 0.5, -0.8],
    }
    secret = SiteState(s.settings.state_dir).secret()
    w = poisson_weights(int((~s.test_mask).sum()), config.seed, "cleveland", secret, 3)
    cell = 3 * int(w.max())
    reply = worker.handle({"task": "evaluate", **request, **model, "bootstrap": 3})
    assert reply["train_status"] == "ok" and reply["train_n"] == w.sum()
    for key in ("train_tp", "train_fp"):
        steps = -np.diff(np.concatenate([np.asarray(reply[key])[0], [0.0]]))
        assert np.all((steps == 0) | (steps >= cell)), key
    bins = np.asarray(reply["train_bin_n"])[0]
    assert np.all((bins == 0) | (bins >= cell))
    # The rule itself: a count of one patient repeated up to the largest weight is small.
    s._bootstrap("evaluate", {"bootstrap": 3, "subsets": ["train"]})
    try:
        assert s.policy.min_cell == cell and s.policy.small(int(w.max()))
    finally:
        s.replicate, s._weights, s._replicate_policy = 0, None, None


def test_differencing_two_weighted_sets_that_isolate_one_patient(tmp_path):
    """Two replicates whose weights differ at one patient only (the coordinator cannot
    choose the weights, but the rule does not rely on that): the second is refused; two
    ordinary Poisson replicates of the same patients differ at many and are answered."""
    state = SiteState(tmp_path / "state")
    policy = PrivacyPolicy(min_cell=3)
    ids = np.array([f"p{i}" for i in range(60)])
    y = np.arange(60) % 2
    train = np.ones(60, dtype=bool)
    w1 = np.ones(60, dtype=int)
    state.check_sets({"train": train}, ids, y, "s", policy, weights=w1)  # = unweighted
    w2 = w1.copy()
    w2[7] = 3  # one patient counted three times: the difference is that patient
    with pytest.raises(Exception, match="differencing"):
        state.check_sets({"train": train}, ids, y, "s", policy, weights=w2)
    rng = np.random.default_rng(0)
    w3 = rng.poisson(1.0, 60)
    state.check_sets({"train": w3 > 0}, ids, y, "s", policy, weights=w3)
    w4 = w3.copy()
    w4[np.flatnonzero(w3 > 0)[:2]] += 1  # two patients' weights differ
    with pytest.raises(Exception, match="differencing"):
        state.check_sets({"train": w4 > 0}, ids, y, "s", policy, weights=w4)
    w5 = rng.poisson(1.0, 60)  # another replicate: answered
    state.check_sets({"train": w5 > 0}, ids, y, "s", policy, weights=w5)
    # The same replicate again is the same set (answered).
    state.check_sets({"train": w3 > 0}, ids, y, "s", policy, weights=w3)


def test_report_and_mlflow_metrics_show_the_correction(runs):
    from radfed.server.outputs.report import render_report
    from radfed.server.tracking.runs import study_metrics

    _, off, _, on = runs
    html = render_report(json.loads(json.dumps(on.to_dict(), default=str)))
    assert 'id="bootstrap"' in html and "Bootstrap optimism correction" in html
    assert f"{B} of {B} bootstrap replicates" in html
    plain = render_report(json.loads(json.dumps(off.to_dict(), default=str)))
    assert 'id="bootstrap"' not in plain
    metrics = study_metrics(on)
    entry = on.details["evaluation"]["bootstrap"]["models"]["nomogram"]["cal_slope"]
    assert metrics["bootstrap.nomogram.cal_slope_corrected"] == entry["corrected"]
    assert metrics["bootstrap.nomogram.auc_within_site_optimism"] == pytest.approx(
        on.details["evaluation"]["bootstrap"]["models"]["nomogram"]["auc_within_site"]["optimism"]
    )
    assert not any(k.startswith("bootstrap.") for k in study_metrics(off))
