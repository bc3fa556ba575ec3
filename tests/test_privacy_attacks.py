"""A hostile coordinator against a real site worker: every attack of issue 9, by hand.

Each test plays the coordinator with unmodified site code and requests shaped to make
the site reveal one patient's values, with the site's ``min_cell`` at 5 and at 10, and
checks that the site refuses, or that what it sends carries no count below its limit.
See docs/privacy.md for the threat model and the rule behind each refusal.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from radfed.client.site import SiteSettings, SiteWorker
from radfed.shared.config import load_study
from radfed.shared.messages import roundtrip
from radfed.shared.privacy import PrivacyPolicy
from radfed.tests.conftest import heart_study_text

MIN_CELLS = [5, 10]
CLINICAL = ["age", "sex", "trestbps", "thalach", "oldpeak"]


@pytest.fixture(params=MIN_CELLS, ids=lambda m: f"min_cell={m}")
def min_cell(request) -> int:
    return request.param


def _protocol(heart_dir: Path, **changes) -> dict:
    (heart_dir / "study.toml").write_text(heart_study_text(["cleveland", "hungarian", "va"]))
    protocol = load_study(heart_dir / "study.toml").protocol()
    # 3 folds: with min_cell 10 a site's folds must hold 10 events and 10 non-events.
    protocol.update({"folds": 3, **changes})
    return protocol


def _worker(heart_dir: Path, min_cell: int, site: str = "cleveland", tmp: Path | None = None):
    state = (tmp or heart_dir) / f"state-{site}-{min_cell}"
    return SiteWorker(
        SiteSettings(
            site, heart_dir / "sites" / site, PrivacyPolicy(min_cell=min_cell), state_dir=state
        )
    )


def _ask(worker: SiteWorker, protocol: dict, task: str, **payload) -> dict:
    """One request as a transport delivers it (through the Flower record encoding)."""
    return worker.handle(roundtrip({"task": task, "protocol": protocol, **payload}))


def _table(heart_dir: Path, site: str = "cleveland") -> pd.DataFrame:
    table = pd.read_csv(heart_dir / "sites" / site / "features.csv")
    return table.dropna(subset=["disease", *CLINICAL_ALL])


CLINICAL_ALL = ["age", "sex", "cp", "trestbps", "thalach", "exang", "oldpeak"]


def _model(name: str, columns, center, scale, beta) -> dict:
    return {
        f"{name}_columns": list(columns),
        f"{name}_center": np.asarray(center, dtype=float),
        f"{name}_scale": np.asarray(scale, dtype=float),
        f"{name}_beta": np.asarray(beta, dtype=float),
    }


def _refused(reply: dict, rule: str) -> None:
    assert reply.get("error_kind") == "privacy", reply
    assert f"refused by the {rule} rule" in reply["error"], reply["error"]


def _cells_ok(counts: np.ndarray, total: float, m: int) -> None:
    """Cumulative counts at thresholds: every count and every difference of adjacent
    counts (the patients between two thresholds) is 0 or at least ``m``."""
    values = np.concatenate([[total], np.asarray(counts, dtype=float), [0.0]])
    cells = -np.diff(values)
    assert np.all((values == 0) | (values >= m)), values
    assert np.all((cells == 0) | (cells >= m)), cells


# --------------------------------------------------------------- disclosure shape


def test_crafted_bins_and_thresholds_cannot_isolate_a_patient(heart_dir, min_cell):
    """Thousands of thresholds and bins in the request, each patient alone in one: the
    site uses its own grid, and merges until every cell holds 0 or >= min_cell."""
    table = _table(heart_dir)
    worker = _worker(heart_dir, min_cell)
    protocol = _protocol(heart_dir)
    age = table["age"].to_numpy(float)
    reply = _ask(
        worker,
        protocol,
        "evaluate",
        models=["age"],
        subsets=["all"],
        thresholds=np.linspace(0.0001, 0.9999, 5000),
        bin_edges=np.linspace(0, 1, 5001),
        n_bins=5000,
        hl_groups=300,
        **_model("age", ["age"], [age.mean()], [age.std()], [0.0, 1.0]),
    )
    assert reply["all_status"] == "ok"
    n, events = int(reply["all_n"]), int(reply["all_events"])
    assert reply["all_tp"].shape == (1, 99) and reply["all_bin_n"].shape == (1, 10)
    _cells_ok(reply["all_tp"][0], events, min_cell)
    _cells_ok(reply["all_fp"][0], n - events, min_cell)
    for key in ("all_bin_n", "all_bin_observed"):
        values = reply[key][0]
        assert np.all((values == 0) | (values >= min_cell)), (key, values)
    nonevents = reply["all_bin_n"][0] - reply["all_bin_observed"][0]
    assert np.all((nonevents == 0) | (nonevents >= min_cell))
    assert reply["all_hl_df"][0] <= 10  # the site's deciles, not the request's 300 groups


def test_sparse_honest_bins_are_merged(heart_dir, min_cell):
    """An honest model on a small split: fixed-width bins hold 1 or 2 patients; the site
    merges them before they leave."""
    table = _table(heart_dir, "va")
    worker = _worker(heart_dir, min_cell, "va")
    protocol = _protocol(heart_dir)
    x = table[["age", "thalach"]].to_numpy(float)
    model = _model("m", ["age", "thalach"], x.mean(0), x.std(0), [0.8, 0.4, -0.9])
    reply = _ask(worker, protocol, "evaluate", models=["m"], subsets=["test"], **model)
    if reply["test_status"] != "ok":  # refused outright is also safe
        assert "reason" in reply["test_reason"] or reply["test_reason"]
        return
    n, observed = reply["test_bin_n"][0], reply["test_bin_observed"][0]
    for v in (n, observed, n - observed):
        assert np.all((v == 0) | (v >= min_cell)), v
    assert (n > 0).sum() < 10  # merged: fewer non-empty bins than the grid has


# ------------------------------------------------------------------- crafted models


def test_saturated_or_scaled_coefficients_are_refused(heart_dir, min_cell):
    """The gradient bisection attack: with a near-zero scale (or huge coefficients) the
    logistic gradient Σ(y - p) becomes a count of patients older than c; bisecting c
    recovers each age. The site refuses both forms, and answers an honest model."""
    table = _table(heart_dir)
    worker = _worker(heart_dir, min_cell)
    protocol = _protocol(heart_dir)
    age = table["age"].to_numpy(float)
    c = float(np.median(age)) + 0.5
    tiny = _ask(
        worker, protocol, "logistic", models=["a"], **_model("a", ["age"], [c], [1e-6], [0, 1])
    )
    _refused(tiny, "standardisation")
    steep = _ask(
        worker,
        protocol,
        "logistic",
        models=["a"],
        **_model("a", ["age"], [c], [age.std()], [0.0, 1e4]),
    )
    _refused(steep, "saturation")
    assert not any(k.endswith("_gradient") for k in steep)
    honest = _ask(
        worker,
        protocol,
        "logistic",
        models=["a"],
        **_model("a", ["age"], [age.mean()], [age.std()], [0.1, 0.5]),
    )
    assert "a_gradient" in honest and "error" not in honest


def test_steep_model_centred_on_one_patient_is_refused(heart_dir, min_cell):
    """A model steep in every direction and centred on one patient makes the Hessian
    that patient's x xᵀ (and two such requests differing in the outcome's sign give the
    outcome). Refused as saturated, and, when gentle enough to pass that rule, as
    concentrated on fewer than min_cell patients."""
    table = _table(heart_dir)
    worker = _worker(heart_dir, min_cell)
    protocol = _protocol(heart_dir)
    x = table[CLINICAL].to_numpy(float)
    center, scale = x.mean(0), x.std(0)
    z = (x - center) / scale
    target = z[17]
    direction = np.ones(len(CLINICAL)) / np.sqrt(len(CLINICAL))
    distance = (z - target) @ direction
    # Steep, and just steep enough that the target's nearest neighbour has |eta| = 8
    # (a weight 1/750 of the target's): the Hessian is then the target's x xᵀ.
    nearest = np.min(np.abs(distance[np.abs(distance) > 1e-12]))
    for slope in (1e3, 8.0 / nearest):
        beta = np.concatenate([[-(target @ direction) * slope], direction * slope])
        reply = _ask(
            worker,
            protocol,
            "logistic",
            models=["steep"],
            **_model("steep", CLINICAL, center, scale, beta),
        )
        assert reply.get("error_kind") == "privacy", reply
        assert re.search(r"refused by the (saturation|concentration) rule", reply["error"])
    # The same attack through the LASSO's requests.
    lasso = _ask(
        worker,
        protocol,
        "select",
        step="lasso_irls",
        select_columns=CLINICAL,
        n_folds=int(protocol["folds"]),
        seed=1,
        problem_folds=np.array([int(protocol["folds"])]),
        beta=np.concatenate([[-(target @ direction) * 1e3], direction * 1e3])[None, :],
        center=center,
        scale=scale,
    )
    _refused(lasso, "saturation")


# ------------------------------------------------------------- patient sets and pins


def test_moved_seed_fraction_or_folds_is_refused(heart_dir, min_cell):
    """Moving the study's seed, split fraction or folds between requests would move one
    patient at a time between the sums: the site pinned the protocol when it first
    answered, and refuses any change."""
    worker = _worker(heart_dir, min_cell)
    protocol = _protocol(heart_dir)
    first = _ask(worker, protocol, "moments", columns=["age"], subset="train")
    assert "error" not in first, first
    for key, value in (("seed", 8), ("test_fraction", 0.31), ("folds", 9)):
        moved = _ask(worker, {**protocol, key: value}, "moments", columns=["age"], subset="train")
        _refused(moved, "pinned-study")
        assert key in moved["error"]


def test_difference_of_two_requests_is_refused(heart_dir, min_cell):
    """The same sums under a second study name whose split moves one patient: the two
    training sets differ by one patient, whose row is their difference. The site
    remembers every answered patient set, across studies."""
    worker = _worker(heart_dir, min_cell)
    protocol = _protocol(heart_dir)
    assert "error" not in _ask(worker, protocol, "moments", columns=["age"], subset="train")
    n_train = int(_ask(worker, protocol, "split")["n_train"])
    n = n_train + int(_ask(worker, protocol, "split")["n_test"])
    # A fraction moving exactly one patient of one class into the test split.
    other = {
        **protocol,
        "study": "heart-copy",
        "test_fraction": protocol["test_fraction"] + 0.6 / n,
    }
    reply = _ask(worker, other, "moments", columns=["age"], subset="train")
    _refused(reply, "differencing")


def test_lasso_folds_are_the_sites_own(heart_dir, min_cell, tmp_path):
    """A request's seed cannot steer the site's folds: two LASSO requests differing only
    in ``seed`` get identical replies."""
    worker = _worker(heart_dir, min_cell)
    protocol = _protocol(heart_dir)
    table = _table(heart_dir)
    x = table[["age", "thalach"]].to_numpy(float)
    k = int(protocol["folds"])
    request = dict(
        step="lasso_irls",
        select_columns=["age", "thalach"],
        n_folds=k,
        problem_folds=np.arange(k + 1),
        beta=np.zeros((k + 1, 3)),
        center=x.mean(0),
        scale=x.std(0),
    )
    a = _ask(worker, protocol, "select", seed=1, **request)
    b = _ask(worker, protocol, "select", seed=99, **request)
    assert "error" not in a, a
    np.testing.assert_array_equal(a["test_deviance"], b["test_deviance"])
    np.testing.assert_array_equal(a["gradient"], b["gradient"])


def test_all_minus_train_is_refused(heart_dir, min_cell):
    """Switzerland's test split has too few non-events and is refused on its own; the
    site also refuses the training split once it answered over all patients, because
    "all minus train" is that test split."""
    worker = _worker(heart_dir, min_cell, "switzerland")
    protocol = _protocol(heart_dir)
    _refused(_ask(worker, protocol, "split"), "min-cell")
    everyone = _ask(worker, protocol, "moments", columns=["age"], subset="all")
    assert "error" not in everyone, everyone
    train = _ask(worker, protocol, "moments", columns=["age"], subset="train")
    _refused(train, "differencing")


def test_many_small_models_are_refused(heart_dir, min_cell):
    """Ten 5-parameter models in one request on a site's training split: the parameter
    rule counts all the request's models together."""
    worker = _worker(heart_dir, min_cell, "va")
    protocol = _protocol(heart_dir)
    table = _table(heart_dir, "va")
    cols = ["age", "trestbps", "thalach", "oldpeak"]
    x = table[cols].to_numpy(float)
    one = _model("m0", cols, x.mean(0), x.std(0), np.zeros(5))
    assert "error" not in _ask(worker, protocol, "logistic", models=["m0"], **one)
    many = {}
    for i in range(10):
        many.update(_model(f"m{i}", cols, x.mean(0), x.std(0), np.full(5, 0.01 * i)))
    reply = _ask(worker, protocol, "logistic", models=[f"m{i}" for i in range(10)], **many)
    _refused(reply, "parameters")


# ------------------------------------------------------------------------ messages


def test_refusals_quote_no_counts_ids_or_paths(heart_dir, min_cell, tmp_path):
    """Refusals name the rule, never the small count; errors never carry a patient id or
    a local path."""
    worker = _worker(heart_dir, min_cell, "switzerland")
    protocol = _protocol(heart_dir)
    reply = _ask(worker, protocol, "split")
    numbers = set(re.findall(r"\d+", reply["error"]))
    assert numbers <= {str(min_cell)}, reply["error"]
    assert "non_events" not in reply["error"] and "=" not in reply["error"]

    # A broken site folder: the loader's message names the folder and a patient.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "features.csv").write_text(
        "patient_id,disease,age,sex,cp,trestbps,thalach,exang,oldpeak\n"
        "P-SECRET-1,1,50,1,1,120,150,0,1\nP-SECRET-1,0,60,0,2,130,140,1,2\n"
    )
    site = SiteWorker(
        SiteSettings("broken", broken, PrivacyPolicy(min_cell=min_cell), state_dir=tmp_path / "s")
    )
    reply = _ask(site, protocol, "describe")
    assert "error" in reply
    assert str(broken) not in reply["error"] and str(tmp_path) not in reply["error"]
    assert "P-SECRET-1" not in reply["error"]
    # An unknown column names only what the request asked for.
    reply = _ask(worker, protocol, "moments", columns=["no_such_column"], subset="all")
    assert "no_such_column" in reply["error"] and str(heart_dir) not in reply["error"]


# ---------------------------------------------------------------- honest publications


def _small_counts(results: dict, m: int) -> list[tuple[str, float]]:
    """Every per-site count in results.json below ``m`` (zero allowed)."""
    bad: list[tuple[str, float]] = []

    def check(where: str, value) -> None:
        if value is None:
            return
        v = float(value)
        if 0 < v < m - 1e-9:
            bad.append((where, v))

    def metrics(where: str, entry: dict) -> None:
        if not isinstance(entry, dict) or entry.get("n") is None:
            return
        n, events = entry.get("n"), entry.get("events")
        check(f"{where} n", n)
        check(f"{where} events", events)
        if n is not None and events is not None:
            check(f"{where} non-events", n - events)
        bins = (entry.get("calibration") or {}).get("bins") or {}
        for i, (bn, bo) in enumerate(zip(bins.get("n", []), bins.get("observed", []), strict=True)):
            check(f"{where} bin {i} n", bn)
            check(f"{where} bin {i} events", bo)
            check(f"{where} bin {i} non-events", bn - bo)
        roc = entry.get("roc") or {}
        if events and n:
            tp = np.round(np.asarray(roc.get("tpr", []), dtype=float) * events)
            fp = np.round(np.asarray(roc.get("fpr", []), dtype=float) * (n - events))
            for name, counts, total in (("events", tp, events), ("non-events", fp, n - events)):
                values = np.concatenate([[total], counts, [0]])
                for i, v in enumerate(values):
                    check(f"{where} {name} at threshold {i}", v)
                for i, v in enumerate(-np.diff(values)):
                    check(f"{where} {name} between thresholds {i}", v)

    for site, info in results["sites"].items():
        check(f"{site} n", info["n"])
        check(f"{site} events", info["events"])
        check(f"{site} excluded", info.get("n_excluded"))
        for split in ("train", "test"):
            check(f"{site} {split} n", info[split]["n"])
            check(f"{site} {split} events", info[split]["events"])
    for model, per_site in results["performance"].items():
        for site, splits in per_site.items():
            if site == "pooled":
                continue
            for split, entry in splits.items():
                metrics(f"{model} {site} {split}", entry)
    external = results.get("external", {})
    for group in ("held_out", "validation"):
        for site, entry in (external.get(group) or {}).items():
            for model, m_entry in (entry.get("metrics") or {}).items():
                metrics(f"external {site} {model}", m_entry)
    return bad


def test_honest_runs_publish_no_small_counts(tmp_path, shared_data):
    """The packaged heart-disease study, leave-one-site-out and the validation site
    included, at its sites' minimum cell size (3): results.json holds no per-site count
    below it, and the pooled calibration is the smooth curve."""
    from radfed.cli import main

    out = tmp_path / "hd"
    assert main(["-q", "heart-disease", "--out", str(out)]) == 0
    study = out / "study.toml"
    assert main(["-q", "run", str(study), "--out", str(out / "run"), "--no-track"]) == 0
    results = json.loads(next((out / "run").rglob("results.json")).read_text())
    assert results["external"]["held_out"]  # leave-one-site-out ran
    assert _small_counts(results, 3) == []
    pooled = results["performance"]["nomogram"]["pooled"]["test"]["calibration"]
    assert pooled["curve"]["status"] == "ok"
    assert len(pooled["curve"]["observed"]) == len(pooled["curve"]["predicted"])
    assert np.all(np.asarray(pooled["curve"]["lower"]) <= np.asarray(pooled["curve"]["upper"]))


def test_the_walker_finds_small_counts():
    """The publication check itself can fail."""
    results = {
        "sites": {
            "a": {
                "n": 40,
                "events": 20,
                "train": {"n": 28, "events": 2},
                "test": {"n": 12, "events": 6},
            }
        },
        "performance": {},
    }
    assert _small_counts(results, 5) == [("a train events", 2.0)]


def test_calibration_terms_select_no_patients(heart_dir, min_cell):
    """A hinge (x - t)+ is zero below its knot: moving a crafted model's intercept would
    put one patient at a time above it. The calibration curve's terms are powers of
    logit p over every patient, and only logistic fits may use them."""
    table = _table(heart_dir)
    worker = _worker(heart_dir, min_cell)
    protocol = _protocol(heart_dir)
    age = table["age"].to_numpy(float)
    model = _model("a", ["age"], [age.mean()], [age.std()], [-2.0, 1.0])
    for columns in (["cal:a:1"], ["cal:a:2"]):
        reply = _ask(worker, protocol, "moments", columns=columns, subset="all", **model)
        assert reply["error_kind"] == "data" and "calibration" in reply["error"], reply
    fit = _model("c", ["lp:a", "cal:a:2", "cal:a:3"], np.zeros(3), np.ones(3), np.zeros(4))
    reply = _ask(worker, protocol, "logistic", models=["c"], **model, **fit)
    assert reply["c_hessian"].shape == (4, 4)
