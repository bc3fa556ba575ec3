"""The evaluation figures draw the numbers of the results schema, and say what they skip.

The metrics are computed here with numpy from simulated predictions (ROC points, net
benefit and calibration bins on the shared 99-threshold grid), then sent through the
results.json round trip (NaN -> null -> NaN in dicts, null kept in lists), as the
figures will meet them.
"""

from __future__ import annotations

import io
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import statsmodels.api as sm
from matplotlib.patches import Polygon
from matplotlib.text import Text
from scipy import stats
from scipy.special import expit, logit
from sklearn.metrics import roc_auc_score as mann_whitney_auc

from radfed.server.outputs.plots import (
    calibration_figure,
    decision_curve_figure,
    forest_figure,
    lasso_cv_figure,
    model_color,
    radscore_coefficients_figure,
    roc_figure,
    save_figure,
)
from radfed.server.results import _finite, _nan

THRESHOLDS = np.round(np.arange(1, 100) / 100, 2)
MODELS = ("radiomics", "clinical", "nomogram")
STRENGTH = {"radiomics": 1.2, "clinical": 0.8, "nomogram": 1.8}  # separation in log-odds


# --------------------------------------------------------------------------- metrics


def metrics(y: np.ndarray, p: np.ndarray) -> dict[str, Any]:
    """The schema's metrics dict, computed from outcomes and predicted probabilities."""
    n, events = len(y), int(y.sum())
    a = mann_whitney_auc(y, p)
    n1, n0 = events, n - events
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)  # Hanley-McNeil
    se = math.sqrt((a * (1 - a) + (n1 - 1) * (q1 - a * a) + (n0 - 1) * (q2 - a * a)) / (n1 * n0))
    positive = p[:, None] >= THRESHOLDS[None, :]
    tp = (positive & (y[:, None] == 1)).sum(axis=0)
    fp = (positive & (y[:, None] == 0)).sum(axis=0)
    odds = THRESHOLDS / (1 - THRESHOLDS)
    prevalence = events / n
    edges = np.quantile(p, np.linspace(0, 1, 11))
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, 9)
    counts = np.bincount(which, minlength=10)
    observed = np.bincount(which, weights=y, minlength=10)
    expected = np.bincount(which, weights=p, minlength=10)
    full = counts > 0
    hl = float(
        np.sum((observed - expected)[full] ** 2 / (expected * (1 - expected / counts))[full])
    )
    slope_fit = sm.Logit(y, sm.add_constant(logit(p))).fit(disp=0)
    large = sm.GLM(y, np.ones((n, 1)), family=sm.families.Binomial(), offset=logit(p)).fit()
    cutoff = 0.5
    predicted = p >= cutoff
    accuracy = float(np.mean(predicted == y))
    return {
        "n": n,
        "events": events,
        "status": "ok",
        "reason": None,
        "auc": a,
        "auc_se": se,
        "auc_ci": [a - 1.96 * se, a + 1.96 * se],
        "brier": float(np.mean((p - y) ** 2)),
        "cutoff": cutoff,
        "accuracy": accuracy,
        "accuracy_ci": [accuracy - 0.05, accuracy + 0.05],
        "sensitivity": float(predicted[y == 1].mean()),
        "specificity": float((~predicted[y == 0]).mean()),
        "calibration": {
            "intercept": float(large.params[0]),
            "slope": float(slope_fit.params[1]),
            "hl_statistic": hl,
            "hl_df": 8,
            "hl_p": float(stats.chi2.sf(hl, 8)),
            "bins": {
                "edges": edges.tolist(),
                "n": counts.tolist(),
                "observed": observed.tolist(),
                "expected": expected.tolist(),
            },
        },
        "roc": {"tpr": (tp / n1).tolist(), "fpr": (fp / n0).tolist()},
        "net_benefit": (tp / n - fp / n * odds).tolist(),
        "treat_all": (prevalence - (1 - prevalence) * odds).tolist(),
    }


def undefined(n: int, events: int, reason: str, status: str = "undefined") -> dict[str, Any]:
    nan = float("nan")
    return {
        "n": n,
        "events": events,
        "status": status,
        "reason": reason,
        "auc": nan,
        "auc_se": nan,
        "auc_ci": [nan, nan],
        "brier": nan,
        "cutoff": nan,
        "accuracy": nan,
        "accuracy_ci": [nan, nan],
        "sensitivity": nan,
        "specificity": nan,
        "calibration": nan,
        "roc": {"tpr": [nan] * 99, "fpr": [nan] * 99},
        "net_benefit": [nan] * 99,
        "treat_all": [nan] * 99,
    }


def predictions(rng: np.random.Generator, y: np.ndarray, model: str) -> np.ndarray:
    lp = -0.9 + STRENGTH[model] * (y - 0.35) + rng.normal(0, 1, len(y))
    return expit(lp)


def round_trip(obj: Any) -> Any:
    """As results.json stores and StudyResult.from_dict reads it back."""
    return _nan(json.loads(json.dumps(_finite(obj))))


@pytest.fixture(scope="module")
def performance() -> dict[str, Any]:
    rng = np.random.default_rng(2024)
    y = (rng.random(400) < 0.35).astype(int)
    y_b = (rng.random(60) < 0.4).astype(int)
    perf: dict[str, Any] = {}
    for model in MODELS:
        pooled = metrics(y, predictions(rng, y, model))
        pooled["approximate"] = {"auc_ci": "DeLong variance pooled from site components"}
        site_b = metrics(y_b, predictions(rng, y_b, model))
        perf[model] = {"pooled": {"test": pooled}, "hospital_b": {"test": site_b}}
    perf["clinical"]["hospital_b"]["test"] = undefined(
        60, 0, "only one class among the test patients"
    )
    for model in MODELS:  # a split where nothing can be drawn
        perf[model]["hospital_c"] = {"test": undefined(4, 2, "fewer than 5 patients", "refused")}
    return round_trip(perf)


def texts(fig) -> str:
    return "\n".join(t.get_text() for t in fig.findobj(Text))


def legend_texts(fig) -> list[str]:
    return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]


def render(fig) -> None:
    """Draw without writing a file (cheap: low resolution), to catch drawing errors."""
    fig.savefig(io.BytesIO(), format="png", dpi=40)


def check_png(path: Path, min_bytes: int = 15_000) -> None:
    assert path.is_file() and path.stat().st_size > min_bytes
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- tests


def test_roc_legend_has_exact_auc_and_ci(performance, tmp_path: Path) -> None:
    fig = roc_figure(performance, "pooled", "test")
    legend = legend_texts(fig)
    for model in MODELS:
        m = performance[model]["pooled"]["test"]
        lo, hi = m["auc_ci"]
        entry = next(t for t in legend if t.startswith(model))
        assert f"AUC {m['auc']:.3f} ({lo:.3f}–{hi:.3f})" in entry
        assert "≈" in entry  # the pooled CI is marked approximate
        line = next(ln for ln in fig.axes[0].get_lines() if ln.get_label() == entry)
        assert line.get_color() == model_color(model)
        x, y = line.get_xdata(), line.get_ydata()
        assert (x[0], y[0], x[-1], y[-1]) == (0, 0, 1, 1)
        assert np.all(np.diff(x) >= 0) and np.all(np.diff(y) >= 0)
    all_text = texts(fig)
    assert "99-threshold" in all_text and "pooled" in all_text and "test split" in all_text
    assert "DeLong variance pooled" in all_text
    check_png(save_figure(fig, tmp_path / "roc")[0])


def test_calibration_points_and_legend(performance, tmp_path: Path) -> None:
    fig = calibration_figure(performance, "pooled", "test")
    for model in MODELS:
        cal = performance[model]["pooled"]["test"]["calibration"]
        entry = next(t for t in legend_texts(fig) if t.startswith(model))
        assert f"slope {cal['slope']:.2f}" in entry
        assert f"intercept {cal['intercept']:.2f}" in entry
        assert f"p = {cal['hl_p']:.3f}" in entry if cal["hl_p"] >= 0.001 else "p = < 0.001" in entry
    ax = fig.axes[0]
    sizes = [c.get_offsets() for c in ax.collections]
    assert len(sizes) == 3
    bins = performance["nomogram"]["pooled"]["test"]["calibration"]["bins"]
    expected = np.array(bins["expected"]) / np.array(bins["n"])
    assert np.allclose(np.sort(sizes[2][:, 0]), np.sort(expected))
    check_png(save_figure(fig, tmp_path / "calibration")[0])


def test_decision_curve_limits_and_reference_lines(performance, tmp_path: Path) -> None:
    fig = decision_curve_figure(performance, THRESHOLDS, "pooled", "test")
    ax = fig.axes[0]
    m = performance["nomogram"]["pooled"]["test"]
    prevalence = m["events"] / m["n"]
    low, high = ax.get_ylim()
    assert low == pytest.approx(-0.05 * prevalence) and prevalence <= high < 1.05 * prevalence
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert {"Treat all", "Treat none"} <= set(lines)
    assert np.allclose(lines["Treat all"].get_ydata(), m["treat_all"])
    assert np.allclose(lines["nomogram"].get_ydata(), m["net_benefit"])
    assert lines["nomogram"].get_color() == model_color("nomogram")
    # A threshold grid that does not match (results without one): skipped and said so.
    short = decision_curve_figure(performance, [], "pooled", "test")
    entries = [t.replace("\n", " ") for t in legend_texts(short)[:3]]
    assert all("99 net-benefit values for 0 thresholds" in t for t in entries)
    check_png(save_figure(fig, tmp_path / "dca")[0])


def test_undefined_entries_are_skipped_and_named(performance, tmp_path: Path) -> None:
    reason = "only one class among the test patients"
    for name, make in {
        "roc": lambda s: roc_figure(performance, s, "test"),
        "calibration": lambda s: calibration_figure(performance, s, "test"),
        "dca": lambda s: decision_curve_figure(performance, THRESHOLDS, s, "test"),
    }.items():
        fig = make("hospital_b")
        clinical = next(t for t in legend_texts(fig) if t.startswith("clinical"))
        assert "not shown" in clinical and "undefined" in clinical
        assert reason in clinical.replace("\n", " ")
        assert any(t.startswith("nomogram") and "not shown" not in t for t in legend_texts(fig))
        check_png(save_figure(fig, tmp_path / f"{name}_b")[0])

        # Nothing drawable: every model named with the refusal, and the title says so.
        fig = make("hospital_c")
        assert "no model could be drawn" in fig.axes[0].get_title()
        assert sum("refused: fewer than 5 patients" in t for t in legend_texts(fig)) == 3
        render(fig)

        fig = make("nowhere")  # a site absent from the table
        assert "no test results at nowhere" in texts(fig)
        render(fig)


def lasso_result() -> dict[str, Any]:
    """A LASSO CV summary as results.json holds it (cv.glmnet's rules applied here)."""
    lambdas = np.geomspace(0.2, 0.002, 40)
    x = np.log(lambdas)
    cvm = 1.05 + 0.03 * (x + 4.2) ** 2 + 0.004 * np.sin(7 * x)
    cvsd = np.full_like(cvm, 0.035)
    i_min = int(np.argmin(cvm))
    i_1se = int(np.flatnonzero(cvm <= cvm[i_min] + cvsd[i_min])[0])  # largest λ within 1 SE
    features = ["wavelet-LLH_glcm_Idmn", "original_shape_Sphericity", "log-sigma-3_firstorder_Mean"]
    features += ["original_glszm_ZoneEntropy", "wavelet-HHL_gldm_LargeDependenceEmphasis"]
    beta = [0.42, -0.61, 0.0, 0.17, -0.08]
    return {
        "features": features,
        "lambdas": lambdas.tolist(),
        "cvm": cvm.tolist(),
        "cvsd": cvsd.tolist(),
        "lambda_min": float(lambdas[i_min]),
        "lambda_1se": float(lambdas[i_1se]),
        "rule": "lambda.1se",
        "coef": {"(Intercept)": -0.55, **dict(zip(features, beta, strict=True))},
        "nonzero": [f for f, b in zip(features, beta, strict=True) if b],
        "n_folds": 10,
    }


def test_lasso_cv_and_coefficients(tmp_path: Path) -> None:
    lasso = lasso_result()
    fig = lasso_cv_figure(lasso)
    ax = fig.axes[0]
    verticals = {
        ln.get_label(): ln.get_xdata()[0] for ln in ax.get_lines() if ln.get_label()[:2] == "λ."
    }
    assert len(verticals) == 2
    assert sorted(verticals.values()) == pytest.approx(
        sorted(np.log([lasso["lambda_min"], lasso["lambda_1se"]]))
    )
    assert any("λ.1se" in label and "Radscore" in label for label in verticals)
    assert "10-fold" in ax.get_title() and "deviance" in ax.get_ylabel()
    check_png(save_figure(fig, tmp_path / "lasso_cv")[0])

    fig = radscore_coefficients_figure(lasso)
    ax = fig.axes[0]
    names = [t.get_text() for t in ax.get_yticklabels()]
    widths = [bar.get_width() for bar in ax.patches]
    assert names == [
        "original_shape_Sphericity",
        "wavelet-HHL_gldm_LargeDependenceEmphasis",
        "original_glszm_ZoneEntropy",
        "wavelet-LLH_glcm_Idmn",
    ]
    assert widths == sorted(widths) == [-0.61, -0.08, 0.17, 0.42]
    assert "4 non-zero" in ax.get_title()
    check_png(save_figure(fig, tmp_path / "radscore")[0])

    empty = radscore_coefficients_figure({"coef": {"(Intercept)": 0.1, "f": 0.0}})
    assert "No non-zero coefficients" in texts(empty)


def dersimonian_laird(auc: np.ndarray, se: np.ndarray) -> dict[str, Any]:
    w = 1 / se**2
    fixed = np.sum(w * auc) / w.sum()
    q = float(np.sum(w * (auc - fixed) ** 2))
    k = len(auc)
    tau2 = max(0.0, (q - (k - 1)) / (w.sum() - np.sum(w**2) / w.sum()))
    w_re = 1 / (se**2 + tau2)
    mean = float(np.sum(w_re * auc) / w_re.sum())
    half = 1.96 / math.sqrt(w_re.sum())
    return {
        "auc": mean,
        "ci": [mean - half, mean + half],
        "tau2": tau2,
        "i2": max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0,
        "q": q,
        "q_p": float(stats.chi2.sf(q, k - 1)),
        "k": k,
        "method": "DerSimonian-Laird",
    }


def test_forest_plot(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    held_out: dict[str, Any] = {}
    for i, site in enumerate(["cleveland", "hungarian", "va"]):
        y = (rng.random(150 + 50 * i) < 0.45).astype(int)
        held_out[site] = {
            "status": "ok",
            "reason": None,
            "metrics": {m: metrics(y, predictions(rng, y, m)) for m in MODELS},
        }
    held_out["va"]["metrics"]["clinical"] = undefined(200, 0, "no events at va")
    held_out["switzerland"] = {
        "status": "failed",
        "reason": "too few healthy patients to fit without this site",
        "metrics": {},
    }
    meta = {}
    for model in MODELS:
        rows = [e["metrics"][model] for e in held_out.values() if e["status"] == "ok"]
        rows = [r for r in rows if r["status"] == "ok"]
        meta[model] = dersimonian_laird(
            np.array([r["auc"] for r in rows]), np.array([r["auc_se"] for r in rows])
        )
    external = round_trip({"held_out": held_out, "meta": meta})

    fig = forest_figure(external)
    all_text = texts(fig)
    for model in MODELS:
        assert f"I² = {100 * meta[model]['i2']:.0f}%" in all_text
        assert f"{meta[model]['auc']:.3f}" in all_text
    site = held_out["hungarian"]["metrics"]["nomogram"]
    assert f"{site['auc']:.3f} ({site['auc_ci'][0]:.3f}–{site['auc_ci'][1]:.3f})" in all_text
    assert "too few healthy patients" in all_text and "switzerland" in all_text
    assert "no events at va" in all_text
    diamonds = [p for p in fig.axes[0].patches if isinstance(p, Polygon)]
    assert len(diamonds) == 3
    assert [d.get_facecolor()[:3] for d in diamonds] == [
        matplotlib.colors.to_rgb(model_color(m)) for m in MODELS
    ]
    check_png(save_figure(fig, tmp_path / "forest")[0])

    only = forest_figure(external, models=["nomogram"])
    assert "radiomics" not in texts(only)
    save_figure(only, tmp_path / "forest_nomogram")


def test_save_figure_formats_and_closing(performance, tmp_path: Path) -> None:
    fig = roc_figure(performance, "pooled", "test", models=["nomogram"])
    written = save_figure(fig, tmp_path / "sub" / "roc.pooled.test", formats=("png", "svg"))
    assert [p.name for p in written] == ["roc.pooled.test.png", "roc.pooled.test.svg"]
    check_png(written[0])
    words = {"".join(e.itertext()) for e in ET.parse(written[1]).getroot().iter()}
    assert any(w.startswith("nomogram: ≈AUC") for w in words)  # SVG text stays text

    made_by_pyplot = plt.figure()
    made_by_pyplot.add_subplot().plot([0, 1])
    save_figure(made_by_pyplot, tmp_path / "pyplot")
    assert not plt.fignum_exists(made_by_pyplot.number)
