"""rms ``val.prob``'s indices (Dxy, Nagelkerke R², scaled Brier, ICI, E50, E90, Emax),
per site and split and pooled, against independent computations on the patient rows.

The study is the clinical heart-disease study on three real hospitals. Each site's and
split's predictions are rebuilt here from the fitted model's published coefficients
applied to the rows as pandas reads them; the indices are written out from their
definitions (pair counting for Dxy, the log-likelihood for R², statsmodels for the
smooth calibration curve), never with radfed's own functions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy.special import expit

from radfed.server.federation.inprocess import InProcessTransport
from radfed.server.study.driver import FederatedStudy
from radfed.shared.config import load_study
from radfed.tests.conftest import heart_study_text
from radfed.tests.reference import feature_tables, pooled_rows

EXACT = 1e-9
#: Documented accuracy of the pooled calibration errors on the heart-disease hospitals
#: at min_cell 3 (docs/python-api.md, "val.prob's indices"): the estimate's distance
#: from the per-patient value. It depends on how wide the sites' merged cells come out,
#: so on the split: over 85 runs with fresh site secrets the largest seen were E50
#: 0.0055 and Emax 0.105 (and ICI 0.0148 when it too came from the cells; it is now
#: exact, from the sites' sums of |c(lp) - p|); the bounds held in every run. At a site
#: only the bounds are documented: its cells are merged wide (0.2-0.5 at a 42-patient
#: split), and its E90 estimate was seen 0.24 away.
ICI_ACCURACY = 1e-7
E50_ACCURACY = 0.01
E90_ACCURACY = 0.02
EMAX_ACCURACY = 0.15
EPS = 1e-8  # the sites' probability clipping


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from radfed.experiments.heart_disease import shared_data_dir, write_sites

    root = tmp_path_factory.mktemp("valprob")
    write_sites(root / "sites", shared_data_dir() / "heart_disease")
    (root / "study.toml").write_text(heart_study_text(["cleveland", "hungarian", "va"]))
    return load_study(root / "study.toml")


@pytest.fixture(scope="module")
def evaluated(study):
    return FederatedStudy(study, InProcessTransport.from_study(study)).run()


@pytest.fixture(scope="module")
def rows(study, evaluated):
    """Every site's and split's rows with each model's linear predictor, from the fitted
    model's coefficients (per SD of the pooled training rows, as published)."""
    tables = feature_tables(study)
    frames = []
    for split in ("train", "test"):
        frame = pooled_rows(study, tables, split).assign(split=split)
        for name, fit in evaluated.models.items():
            if any(c not in frame for c in fit.columns):
                continue
            z = (frame[fit.columns].to_numpy(float) - fit.center) / fit.scale
            frame[f"lp_{name}"] = fit.coef[0] + z @ fit.coef[1:]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def _models(evaluated, rows) -> list[str]:
    names = [m for m in evaluated.performance if f"lp_{m}" in rows]
    assert names
    return names


# ----------------------------------------------------------------- independent oracles


def _dxy(y: np.ndarray, lp: np.ndarray) -> float:
    """Somers' Dxy by counting every event/non-event pair (ties within 1e-9 of the
    largest |lp| are ties, as pROC counts patients with identical covariates)."""
    diff = lp[y == 1][:, None] - lp[y == 0][None, :]
    tol = 1e-9 * np.max(np.abs(lp))
    concordant = np.sum(diff > tol)
    discordant = np.sum(diff < -tol)
    return float((concordant - discordant) / diff.size)


def _nagelkerke(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, EPS, 1 - EPS)
    n = len(y)
    loglik = np.sum(y * np.log(p) + (1 - y) * np.log(1 - p))
    rate = y.mean()
    null = np.sum(y * np.log(rate) + (1 - y) * np.log(1 - rate))
    lr = 2 * (loglik - null)
    return float((1 - np.exp(-lr / n)) / (1 - np.exp(2 * null / n)))


def _scaled_brier(y: np.ndarray, p: np.ndarray) -> float:
    rate = y.mean()
    return float(np.mean((p - y) ** 2) / (rate * (1 - rate)))


def _curve(y: np.ndarray, lp: np.ndarray) -> np.ndarray:
    """The smooth calibration curve: statsmodels' Logit of y on 1, lp, lp², lp³."""
    X = np.column_stack([lp**k for k in range(4)])
    return sm.Logit(y, X).fit(disp=0, method="newton", tol=1e-12, maxiter=100).params


def _errors(y: np.ndarray, lp: np.ndarray) -> dict[str, float]:
    """val.prob's Eavg (ICI), E50, E90 (R's type-7 quantile) and Emax, per patient."""
    coef = _curve(y, lp)
    c = expit(np.column_stack([lp**k for k in range(4)]) @ coef)
    err = np.abs(c - expit(lp))
    return {
        "ici": float(err.mean()),
        "e50": float(np.quantile(err, 0.5)),
        "e90": float(np.quantile(err, 0.9)),
        "emax": float(err.max()),
    }


ACCURACY = {"ici": ICI_ACCURACY, "e50": E50_ACCURACY, "e90": E90_ACCURACY, "emax": EMAX_ACCURACY}


def _assert_errors(
    cal: dict, truth: dict[str, float], where: str, seen: list, estimates: bool = True
) -> None:
    for key, value in truth.items():
        low, high = cal["errors_bounds"][key]
        # The true value lies in the bounds (which hold whatever the patients' places
        # in their cells); pooled, the estimate within the documented accuracy.
        assert low - 1e-7 <= value <= high + 1e-7, (where, key, low, value, high)
        assert low - 1e-12 <= cal[key] <= high + 1e-12 or key == "ici"
        if estimates:
            assert abs(cal[key] - value) <= ACCURACY[key], (where, key, cal[key], value)
        seen.append((where, key, cal[key] - value, high - low))


# ------------------------------------------------------------------------------- tests


def test_site_indices_equal_the_patient_level_computation(study, evaluated, rows):
    outcome = study.outcome
    seen: list = []
    for model in _models(evaluated, rows):
        for site in study.training_sites:
            for split in ("train", "test"):
                part = rows[(rows["site"] == site) & (rows["split"] == split)]
                y = part[outcome].to_numpy(float)
                lp = part[f"lp_{model}"].to_numpy()
                p = expit(lp)
                m = evaluated.performance[model][site][split]
                assert m["status"] == "ok" and m["n"] == len(y)
                assert m["dxy"] == pytest.approx(_dxy(y, lp), abs=EXACT)
                assert m["dxy"] == pytest.approx(2 * (m["auc"] - 0.5), abs=1e-15)
                np.testing.assert_allclose(m["dxy_ci"], 2 * (np.asarray(m["auc_ci"]) - 0.5))
                assert m["r2"] == pytest.approx(_nagelkerke(y, p), abs=EXACT)
                assert m["brier_scaled"] == pytest.approx(_scaled_brier(y, p), abs=EXACT)
                assert m["brier_skill"] == pytest.approx(1 - _scaled_brier(y, p), abs=EXACT)
                cal = m["calibration"]
                truth = _errors(y, lp)
                # The site's ICI is its own mean over its patients: exact (to the
                # curve fits' convergence).
                assert cal["ici"] == pytest.approx(truth["ici"], abs=1e-7)
                _assert_errors(cal, truth, f"{model} {site} {split}", seen, estimates=False)
    _report(seen)


def test_pooled_indices_equal_the_patient_level_computation(study, evaluated, rows):
    outcome = study.outcome
    seen: list = []
    for model in _models(evaluated, rows):
        for split in ("train", "test"):
            part = rows[rows["split"] == split]
            y = part[outcome].to_numpy(float)
            lp = part[f"lp_{model}"].to_numpy()
            p = expit(lp)
            m = evaluated.performance[model]["pooled"][split]
            assert m["n"] == len(y)
            assert m["r2"] == pytest.approx(_nagelkerke(y, p), abs=EXACT)
            assert m["brier_scaled"] == pytest.approx(_scaled_brier(y, p), abs=EXACT)
            assert m["brier_skill"] == pytest.approx(1 - _scaled_brier(y, p), abs=EXACT)
            # Dxy is 2 (AUC - 1/2) of the pooled AUC, which compares pairs across sites
            # on the sites' merged threshold counts: as approximate as that AUC (within
            # 0.05, test_evaluation_exact), and marked so.
            assert m["dxy"] == pytest.approx(2 * (m["auc"] - 0.5), abs=1e-15)
            assert m["dxy"] == pytest.approx(_dxy(y, lp), abs=0.1)
            assert "dxy" in m["approximate"]
            cal = m["calibration"]
            # The same curve: the federated fit equals statsmodels' on the pooled rows.
            np.testing.assert_allclose(cal["curve"]["coef"], _curve(y, lp), atol=1e-6)
            truth = _errors(y, lp)
            _assert_errors(cal, truth, f"{model} pooled {split}", seen)
            # The pooled ICI is the sites' summed |c(lp) - p| under the pooled curve, at
            # the curve fit's last iterate: exact to its convergence.
            assert cal["ici"] == pytest.approx(truth["ici"], abs=1e-7)
            assert cal["errors_bounds"]["ici"] == [cal["ici"], cal["ici"]]
            assert "the ICI is exact" in m["approximate"]["calibration_errors"]
    _report(seen)


def _report(seen: list) -> None:
    """The measured accuracy (pytest -s shows it; docs/python-api.md quotes it)."""
    for key in ("ici", "e50", "e90", "emax"):
        errs = [abs(d) for _, k, d, _ in seen if k == key]
        widths = [w for _, k, _, w in seen if k == key]
        print(f"{key}: max |estimate - truth| {max(errs):.2g}, bounds up to {max(widths):.2g}")


def test_r2_and_log_likelihood_clip_like_the_calibration_fits():
    from radfed.shared.evaluation_stats import log_likelihood

    y = np.array([0, 1, 1, 0])
    p = np.array([0.0, 1.0, 0.5, 0.2])
    clipped = np.clip(p, EPS, 1 - EPS)
    expected = np.sum(y * np.log(clipped) + (1 - y) * np.log(1 - clipped))
    assert log_likelihood(y, p) == pytest.approx(expected, rel=1e-12)


def test_a_site_too_small_for_its_curves_sends_none(study):
    """The site's own curves count against its parameter limit (a third of the
    patients): on a split too small for them the site sends NaN, and the coordinator
    reports the errors as missing with the reason; nothing else changes."""
    from radfed.server.stats.evaluation import site_metrics

    evaluated = FederatedStudy(study, InProcessTransport.from_study(study)).run()
    models = list(evaluated.models)
    reply = _a_reply(study, evaluated, models)
    for k in range(4):
        reply[f"test_curve_{k}"] = np.full(len(models), np.nan)
    m = site_metrics(reply, "test", 0, None)
    assert np.isnan(m["calibration"]["ici"]) and m["calibration"]["errors_bounds"] is None
    assert "not fitted" in m["calibration"]["errors_reason"]
    assert np.isfinite(m["r2"]) and np.isfinite(m["dxy"])


def _a_reply(study, evaluated, models):
    """One site's evaluate reply, asked again of the same site."""
    from radfed.server.stats.evaluation import evaluation_request, model_payload

    transport = InProcessTransport.from_study(study)
    transport.protocol = study.protocol()
    transport.context.update(model_payload(evaluated.models))
    site = study.training_sites[0]
    return transport.ask("evaluate", evaluation_request(models, ["test"]), sites=[site])[site]


def test_site_sends_no_single_patient_value(study):
    """What the evaluate reply adds for val.prob: per model a log-likelihood sum, the
    ICI (a mean over the split), the site's four curve coefficients; never a quantile
    or a maximum of its patients' errors."""
    from radfed.shared.messages import from_record

    transport = InProcessTransport.from_study(study)
    exchange = transport._exchange
    keys: set[str] = set()

    def spy(requests):
        out = exchange(requests)
        if from_record(next(iter(requests.values())))["task"] == "evaluate":
            for r in out.values():
                keys.update(from_record(r))
        return out

    transport._exchange = spy
    FederatedStudy(study, transport).run()
    added = {k.split("_", 1)[1] for k in keys if k.startswith(("train_", "test_"))}
    assert {"loglik", "ici", "curve_0", "curve_3"} <= added
    assert not any(w in k for k in added for w in ("e50", "e90", "emax", "quantile", "max"))


def test_indices_reach_mlflow_metrics_and_the_report(evaluated):
    from radfed.server.outputs.report import render_report
    from radfed.server.tracking.runs import study_metrics

    metrics = study_metrics(evaluated)
    m = evaluated.performance["clinical"]["pooled"]["test"]
    assert metrics["clinical/test/dxy/pooled"] == pytest.approx(m["dxy"])
    assert metrics["clinical/test/r2/pooled"] == pytest.approx(m["r2"])
    assert metrics["clinical/test/brier_scaled/pooled"] == pytest.approx(m["brier_scaled"])
    for key in ("ici", "e50", "e90", "emax"):
        assert metrics[f"clinical/test/{key}/pooled"] == pytest.approx(m["calibration"][key])
    assert "clinical/train/ici/cleveland" in metrics
    html = render_report(evaluated.to_dict())
    assert "Validation indices (rms val.prob)" in html and "Emax" in html
