"""The HTML report: rendered from a schema-2 results dict, opened in headless Chromium."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score as mann_whitney_auc

from radfed.server.outputs.report import (
    ReportError,
    figures_from_dir,
    render_report,
    report_from_run,
    write_report,
)
from radfed.server.results import LogisticFit

matplotlib.use("Agg")

SITES = ("hospital_a", "hospital_b", "hospital_c")
MODELS = ("radiomics", "clinical", "nomogram")
THRESHOLDS = [round(t / 100, 2) for t in range(1, 100)]
EDGES = [round(e / 10, 1) for e in range(11)]
SECTIONS = [
    "Study settings",
    "Cohort",
    "Radscore",
    "Models",
    "Discrimination",
    "Paired DeLong tests",
    "Calibration",
    "External validation",
    "Federated versus pooled equivalence",
    "Federated rounds",
    "Figures",
]
UNDEFINED_REASON = "only one class in the test split (0 events): AUC undefined"
FAILED_REASON = "hospital_b refused: a model has more parameters than a third of its patients"
STUDY = "lumbar <fasciitis> & co"


# ---------------------------------------------------------------------------------------
# A realistic results.json (schema radfed.results/2)


def _metrics(y: np.ndarray, p: np.ndarray, cutoff: float) -> dict[str, Any]:
    """The METRICS entry of predictions ``p`` for outcomes ``y``, computed directly."""
    n, events = len(y), int(y.sum())
    auc = mann_whitney_auc(y, p)
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)  # Hanley-McNeil
    se = math.sqrt(
        (auc * (1 - auc) + (events - 1) * (q1 - auc**2) + (n - events - 1) * (q2 - auc**2))
        / (events * (n - events))
    )
    t = np.array(THRESHOLDS)[:, None]
    tp = ((p >= t) & (y == 1)).sum(axis=1)
    fp = ((p >= t) & (y == 0)).sum(axis=1)
    w = t[:, 0] / (1 - t[:, 0])
    pred = p >= cutoff
    correct = int((pred == y.astype(bool)).sum())
    bin_of = np.clip((p * 10).astype(int), 0, 9)
    n_bin = np.bincount(bin_of, minlength=10)
    obs = np.bincount(bin_of, weights=y, minlength=10)
    exp = np.bincount(bin_of, weights=p, minlength=10)
    return {
        "n": n,
        "events": events,
        "status": "ok",
        "reason": None,
        "auc": auc,
        "auc_se": se,
        "auc_ci": [max(0.0, auc - 1.96 * se), min(1.0, auc + 1.96 * se)],
        "brier": float(np.mean((p - y) ** 2)),
        "cutoff": cutoff,
        "accuracy": correct / n,
        "accuracy_ci": [correct / n - 0.1, min(1.0, correct / n + 0.08)],
        "sensitivity": float((pred & (y == 1)).sum() / events),
        "specificity": float((~pred & (y == 0)).sum() / (n - events)),
        "calibration": {
            "intercept": 0.05,
            "slope": 0.91,
            "hl_statistic": 7.3,
            "hl_df": 8,
            "hl_p": 0.504,
            "bins": {
                "edges": EDGES,
                "n": n_bin.tolist(),
                "observed": obs.tolist(),
                "expected": exp.tolist(),
            },
        },
        "roc": {"tpr": (tp / events).tolist(), "fpr": (fp / (n - events)).tolist()},
        "net_benefit": (tp / n - fp / n * w).tolist(),
        "treat_all": (events / n - (n - events) / n * w).tolist(),
    }


def _undefined(n: int, events: int) -> dict[str, Any]:
    return {"n": n, "events": events, "status": "undefined", "reason": UNDEFINED_REASON}


def _fit(columns: list[str], rng: np.random.Generator) -> dict[str, Any]:
    p = len(columns) + 1
    a = rng.normal(size=(p, p)) * 0.1
    return LogisticFit(
        columns=columns,
        coef=rng.normal(size=p),
        cov=a @ a.T + np.eye(p) * 0.02,
        center=rng.normal(50, 10, size=p - 1),
        scale=rng.uniform(1, 12, size=p - 1),
        n=168,
        deviance=151.2,
        iterations=6,
        converged=True,
    ).to_dict()


def _nan_to_null(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _nan_to_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_null(v) for v in obj]
    return obj


def make_results() -> dict[str, Any]:
    """Three hospitals; hospital_c's test split has no event; hospital_b fails when held
    out (a privacy refusal)."""
    rng = np.random.default_rng(3)
    sizes = {"hospital_a": (56, 24), "hospital_b": (56, 24), "hospital_c": (42, 8)}
    sites, data = {}, {}
    for site, (n_train, n_test) in sizes.items():
        split_data = {}
        for split, n in (("train", n_train), ("test", n_test)):
            y = rng.integers(0, 2, n)
            if site == "hospital_c" and split == "test":
                y[:] = 0
            lp = {m: (1.2 + 0.5 * k) * (y - 0.5) + rng.normal(size=n) for k, m in enumerate(MODELS)}
            split_data[split] = (y, {m: 1 / (1 + np.exp(-v)) for m, v in lp.items()})
        data[site] = split_data
        train_ev, test_ev = (int(split_data[s][0].sum()) for s in ("train", "test"))
        sites[site] = {
            "n": n_train + n_test,
            "events": train_ev + test_ev,
            "n_excluded": 2 if site == "hospital_b" else 0,
            "train": {"n": n_train, "events": train_ev},
            "test": {"n": n_test, "events": test_ev},
        }
    cutoffs = {"radiomics": 0.46, "clinical": 0.52, "nomogram": 0.49}
    performance: dict[str, Any] = {}
    for m in MODELS:
        performance[m] = {}
        for site in SITES:
            performance[m][site] = {}
            for split in ("train", "test"):
                y, p = data[site][split]
                performance[m][site][split] = (
                    _undefined(len(y), 0) if y.sum() == 0 else _metrics(y, p[m], cutoffs[m])
                )
        performance[m]["pooled"] = {}
        for split in ("train", "test"):
            y = np.concatenate([data[s][split][0] for s in SITES])
            p = np.concatenate([data[s][split][1][m] for s in SITES])
            pooled = _metrics(y, p, cutoffs[m])
            pooled["approximate"] = {
                "auc": "pairs across sites compared on the 0.01 probability grid",
                "auc_ci": "Hanley-McNeil standard error of the pooled AUC",
                "hl": "10 fixed-width risk bins, not deciles of risk",
            }
            performance[m]["pooled"][split] = pooled
    comparisons = {
        site: {
            split: []
            if performance["nomogram"][site][split]["status"] != "ok"
            else [
                {"models": ["nomogram", "clinical"], "auc_diff": 0.081, "z": 2.05, "p": 0.0403},
                {"models": ["nomogram", "radiomics"], "auc_diff": 0.032, "z": 1.10, "p": 0.271},
                {"models": ["radiomics", "clinical"], "auc_diff": 0.049, "z": 0.81, "p": 0.418},
            ]
            for split in ("train", "test")
        }
        for site in SITES
    }
    external_ok = {}
    data["hospital_d"] = data["hospital_a"]  # a validation-only hospital (same size)
    for site in ("hospital_a", "hospital_c", "hospital_d"):
        y = np.concatenate([data[site][s][0] for s in ("train", "test")])
        p = {m: np.concatenate([data[site][s][1][m] for s in ("train", "test")]) for m in MODELS}
        external_ok[site] = {
            "status": "ok",
            "reason": None,
            "training_sites": [s for s in SITES if s != site],
            "n": len(y),
            "events": int(y.sum()),
            "metrics": {m: _metrics(y, p[m], cutoffs[m]) for m in MODELS},
            "radscore_formula": "Radscore = 0.071 + 0.092 * wavelet-HLH_glcm_ClusterShade",
        }
    results = {
        "schema": "radfed.results/2",
        "study": STUDY,
        "created": "2026-11-21T06:00:00+00:00",
        "outcome": "fasciitis",
        "transport": "inprocess",
        "federation": {
            "sites": list(SITES),
            "features": ["original_firstorder_90Percentile", "wavelet-HLH_glcm_ClusterShade"],
            "clinical": ["age", "sex", "cobb_angle"],
            "settings_hash": "5b1f0c2e9a7d",
            "pyradiomics_version": "3.0.1",
            "flwr_version": "1.41.0",
            "radfed_version": "0.1.0",
            "mlflow_run_id": "95881dc5a3f04c6e8f3b9d1f2a7c4e10",
            "mlflow_uri": "sqlite:////data/radfed-demo/mlflow.db",
        },
        "settings": {
            "outcome": "fasciitis",
            "seed": "42",
            "test_fraction": "0.3",
            "selection.mrmr_k": "30",
            "selection.rule": "lambda.min",
            "privacy.min_cell": "3",
            "clinical": '["age", "sex", "cobb_angle"]',
            "sites": json.dumps(list(SITES)),
        },
        "sites": sites,
        "models": {
            "radiomics": _fit(["radscore"], rng),
            "clinical": _fit(["age", "sex", "cobb_angle"], rng),
            "nomogram": _fit(["radscore", "age", "cobb_angle"], rng),
        },
        "performance": performance,
        "rounds": {
            "consistency": 1,
            "split": 1,
            "combat": 3,
            "standardise": 1,
            "mrmr": 15,
            "lasso": 8,
            "screening": 7,
            "models": 8,
            "evaluate": 1,
        },
        "harmonization": {
            "method": "combat",
            "batch_levels": list(SITES),
            "n_per_batch": {s: sites[s]["n"] for s in SITES},
        },
        "selection": {
            "mrmr": {"selected": [f"f{i}" for i in range(30)], "scores": [0.1] * 30},
            "lasso": {
                "n_folds": 10,
                "rule": "lambda.min",
                "lambda_min": 0.0213,
                "lambda_1se": 0.0611,
                "nonzero": ["a", "b", "c", "d"],
            },
            "radscore_formula": "Radscore = 0.069 + 0.088 * wavelet-HLH_glcm_ClusterShade "
            "- 0.051 * original_firstorder_90Percentile",
        },
        "clinical_screening": {
            "threshold": 0.05,
            "retained": ["age", "cobb_angle"],
            "univariable": {
                "age": {"odds_ratio_per_unit": 1.041, "odds_ratio_ci": [1.01, 1.07], "p": 0.006},
                "sex": {"odds_ratio_per_unit": 1.21, "odds_ratio_ci": [0.66, 2.2], "p": 0.54},
                "cobb_angle": {
                    "odds_ratio_per_unit": 1.08,
                    "odds_ratio_ci": [1.03, 1.13],
                    "p": 0.0004,
                },
            },
        },
        "evaluation": {
            "thresholds": THRESHOLDS,
            "cutoffs": cutoffs,
            "cutoff_rule": "Youden on the pooled training data, 0.01 threshold grid",
            "comparisons": comparisons,
        },
        "external": {
            "status": "ran",
            "reason": None,
            "validation": {"hospital_d": external_ok["hospital_d"]},
            "held_out": {
                "hospital_a": external_ok["hospital_a"],
                "hospital_b": {
                    "status": "failed",
                    "reason": FAILED_REASON,
                    "training_sites": ["hospital_a", "hospital_c"],
                    "n": None,
                    "events": None,
                    "metrics": {},
                    "radscore_formula": None,
                },
                "hospital_c": external_ok["hospital_c"],
            },
            "meta": {
                m: {
                    "auc": 0.81 + 0.03 * k,
                    "ci": [0.70, 0.90 + 0.03 * k],
                    "tau2": 0.004,
                    "i2": 0.31,
                    "prediction_interval": [0.41, 0.97],
                    "q": 1.45,
                    "q_p": 0.228,
                    "k": 2,
                    "method": "DerSimonian-Laird",
                }
                for k, m in enumerate(MODELS)
            },
        },
        "equivalence": [
            {
                "estimate": "ComBat-adjusted features",
                "max_abs_diff": 3e-9,
                "tolerance": 1e-6,
                "ok": True,
            },
            {
                "estimate": "Nomogram coefficients",
                "max_abs_diff": 2e-11,
                "tolerance": 1e-6,
                "ok": True,
            },
        ],
    }
    # As results.json stores it: strict JSON, NaN as null.
    return json.loads(json.dumps(_nan_to_null(results), allow_nan=False))


def make_figures(folder: Path, results: dict[str, Any]) -> dict[str, Path]:
    """Small real PNGs: a ROC curve, a calibration plot and a decision curve."""
    from matplotlib.figure import Figure

    folder.mkdir(parents=True, exist_ok=True)
    figures = {}
    m = results["performance"]["nomogram"]["hospital_a"]["test"]
    for key in ("roc/hospital_a/test", "calibration/pooled/test", "decision/pooled/test"):
        fig = Figure(figsize=(3, 3))
        ax = fig.add_subplot()
        if key.startswith("roc"):
            ax.plot(m["roc"]["fpr"], m["roc"]["tpr"], color="#D55E00")
            ax.plot([0, 1], [0, 1], color="0.6", ls="--")
        elif key.startswith("calibration"):
            ax.plot([0, 1], [0, 1], color="0.6", ls="--")
            ax.plot(np.linspace(0.05, 0.95, 10), np.linspace(0.1, 0.9, 10), "o-")
        else:
            ax.plot(THRESHOLDS, m["net_benefit"], label="nomogram")
            ax.plot(THRESHOLDS, m["treat_all"], label="treat all")
            ax.set_ylim(-0.1, 0.6)
        ax.set_title(key, fontsize=7)
        path = folder / (key.replace("/", "_") + ".png")
        fig.savefig(path, dpi=60)
        figures[key] = path
    return figures


# ---------------------------------------------------------------------------------------
# The browser


class _Dom(HTMLParser):
    """What the tests need from a dumped DOM: body attributes, headings, images, text."""

    def __init__(self) -> None:
        super().__init__()
        self.body: dict[str, str | None] = {}
        self.headings: dict[str, list[str]] = {"h1": [], "h2": [], "h3": []}
        self.images: list[dict[str, str | None]] = []
        self.text: list[str] = []
        self._heading: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body":
            self.body = dict(attrs)
        elif tag in self.headings:
            self._heading = tag
            self.headings[tag].append("")
        elif tag == "img":
            self.images.append(dict(attrs))

    def handle_endtag(self, tag: str) -> None:
        if tag == self._heading:
            self._heading = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._heading:
            self.headings[self._heading][-1] += data


def chromium() -> str:
    exe = (
        os.environ.get("RADFED_CHROMIUM")
        or shutil.which("chromium")
        or shutil.which("chromium-browser")
        or shutil.which("google-chrome")
    )
    if not exe:
        pytest.fail(
            "the report test needs a headless Chromium: apt-get install chromium "
            "(or set RADFED_CHROMIUM to a Chrome/Chromium binary)"
        )
    return exe


def browse(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess:
    """Open ``page`` in headless Chromium (no sandbox: CI containers run as root)."""
    cmd = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--no-first-run",
        "--no-default-browser-check",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *extra,
        page.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}):\n{proc.stderr[-2000:]}"
    return proc


def dump_dom(page: Path, profile: Path) -> _Dom:
    dom = _Dom()
    dom.feed(browse(page, profile, "--dump-dom").stdout)
    assert dom.body.get("data-loaded") == "1", "the page's load handler did not run"
    return dom


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    tmp = tmp_path_factory.mktemp("report")
    results = make_results()
    figures = make_figures(tmp / "figures", results)
    path = write_report(results, figures, tmp / "report.html")
    return path, results, figures


@pytest.fixture(scope="module")
def dom(report, tmp_path_factory: pytest.TempPathFactory) -> _Dom:
    return dump_dom(report[0], tmp_path_factory.mktemp("chromium"))


# ---------------------------------------------------------------------------------------
# Tests in the browser


def test_browser_renders_every_section(dom):
    assert dom.headings["h2"][0] == "Contents"
    assert dom.headings["h2"][1:] == SECTIONS
    assert dom.headings["h1"] == [f"Study report: {STUDY}"]  # escaped, shown literally
    h3 = dom.headings["h3"]
    for title in ("Radiomics model (Radscore)", "Clinical model", "Nomogram (Radscore + clinical)"):
        assert h3.count(title) == 2  # coefficient table and discrimination table
    for title in (
        "Validation-only sites",
        "Validation site: hospital_d",
        "Leave-one-site-out",
        "Held out: hospital_a",
        "Held out: hospital_c",
        "Held-out sites not evaluated",
        "Random-effects summary across held-out sites",
    ):
        assert title in h3
    for title in ("ROC curves", "Calibration curves", "Decision curves"):
        assert title in h3


def test_browser_decodes_every_image_and_loads_nothing(dom, report):
    path, _, figures = report
    assert len(dom.images) == len(figures) == 3
    assert all(img["src"].startswith("data:image/png;base64,") for img in dom.images)
    assert dom.body["data-images"] == "3"
    assert dom.body["data-broken-images"] == "0"
    assert dom.body["data-csp-violations"] == "0"
    assert dom.body["data-external-requests"] == "0"
    page = path.read_text()
    assert not re.search(r"https?://", page), "the page must not reference any URL"
    assert not re.search(r"""(src|href)\s*=\s*["'](?!data:|#)""", page)


def test_browser_check_catches_external_and_broken_images(report, tmp_path):
    """Negative control: the page's own check sees a remote and a corrupt image."""
    page = (
        report[0]
        .read_text()
        .replace(
            "</main>",
            '<img src="https://example.invalid/x.png">'
            '<img src="data:image/png;base64,AAAA"></main>',
        )
    )
    bad = tmp_path / "bad.html"
    bad.write_text(page)
    dom = dump_dom(bad, tmp_path / "profile")
    assert dom.body["data-broken-images"] == "2"
    assert int(dom.body["data-csp-violations"]) >= 1  # blocked before any request


def test_browser_screenshot(report, tmp_path):
    shot = tmp_path / "report.png"
    browse(
        report[0],
        tmp_path / "profile",
        f"--screenshot={shot}",
        "--window-size=1280,1600",
        "--hide-scrollbars",
    )
    image = matplotlib.image.imread(shot)
    assert image.shape[:2] == (1600, 1280)
    assert image[..., :3].std() > 0.05  # not a blank page


# ---------------------------------------------------------------------------------------
# Content


def test_tables_show_undefined_values_with_their_reason(dom, report):
    text = " ".join(dom.text)
    results = report[1]
    assert UNDEFINED_REASON in text
    assert f"undefined: {UNDEFINED_REASON}" in text
    # hospital_c's test row: n and events, then dashes.
    html = report[0].read_text()
    row = re.search(r"<tr class=\"undefined[^\"]*\"><td class=\"l\">hospital_c</td>.*?</tr>", html)
    assert row and row.group(0).count("—") >= 6
    assert f'title="{UNDEFINED_REASON}"' in row.group(0)
    # A formatted AUC with its CI.
    m = results["performance"]["nomogram"]["hospital_a"]["test"]
    assert f"{m['auc']:.3f} [{m['auc_ci'][0]:.3f}, {m['auc_ci'][1]:.3f}]" in text


def test_pooled_rows_are_marked_approximate(report):
    html = report[0].read_text()
    assert html.count('<sup class="approx"') >= 6  # AUC of 3 models x 2 splits at least
    assert "auc: pairs across sites compared on the 0.01 probability grid" in html
    assert "hl: 10 fixed-width risk bins, not deciles of risk" in html
    assert html.count("auc_ci: Hanley-McNeil") == 3  # once per model


def test_external_validation_lists_the_failed_site(dom):
    text = " ".join(dom.text)
    assert "hospital_b" in text and FAILED_REASON in text
    assert "Models fitted on hospital_b, hospital_c; evaluated on all 80 patients" in text
    assert "Models fitted on hospital_a, hospital_b, hospital_c; evaluated" in text  # hospital_d
    assert "31.0 %" in text and "DerSimonian-Laird" in text


def test_models_delong_rounds_and_equivalence(dom, report):
    text = " ".join(dom.text)
    fit = report[1]["models"]["clinical"]["coefficients"]["age"]
    assert f"{fit['coef']:.4g}" in text
    assert "nomogram vs clinical" in text and "0.040" in text
    assert "Radscore = 0.069 + 0.088 * wavelet-HLH_glcm_ClusterShade" in text
    assert "Nomogram coefficients" in text and "ok" in text
    assert "lambda.min = 0.0213" in text
    assert "Youden on the pooled training data" in text


def test_text_is_escaped(report):
    html = report[0].read_text()
    assert "lumbar &lt;fasciitis&gt; &amp; co" in html
    assert "<fasciitis>" not in html


def test_older_results_and_skipped_external_render():
    results = make_results()
    results["schema"] = "radfed.results/1"
    for key in ("settings", "evaluation", "equivalence", "harmonization"):
        results.pop(key)
    results["external"].update(status="skipped", reason="fewer than 3 sites", held_out={}, meta={})
    page = render_report(results, {})
    assert "Study settings not recorded in this run." in page
    assert "Not run: fewer than 3 sites." in page
    assert "Validation site: hospital_d" in page  # validation-only sites still shown
    assert "Federated versus pooled equivalence" not in page
    assert 'id="figures"' not in page


def test_errors():
    with pytest.raises(ReportError, match="not a radfed results file"):
        render_report({"schema": "other"}, {})
    with pytest.raises(ReportError, match="cannot be read"):
        render_report(make_results(), {"roc/x/test": Path("/nonexistent/roc.png")})


def test_figures_from_dir_keys(tmp_path):
    (tmp_path / "roc" / "hospital_a").mkdir(parents=True)
    (tmp_path / "roc" / "hospital_a" / "test.png").write_bytes(b"png")
    (tmp_path / "lasso_cv.png").write_bytes(b"png")
    (tmp_path / "lasso_cv.svg").write_text("<svg/>")  # the same figure as SVG
    (tmp_path / "notes.txt").write_text("not a figure")
    assert figures_from_dir(tmp_path) == {
        "lasso_cv": tmp_path / "lasso_cv.png",
        "roc/hospital_a/test": tmp_path / "roc" / "hospital_a" / "test.png",
    }
    assert figures_from_dir(tmp_path / "missing") == {}


def test_report_from_mlflow_run(report, tmp_path):
    from mlflow.tracking import MlflowClient

    _, results, figures = report
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("report-test", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp, tags={"radfed.kind": "study"}, run_name="demo-inprocess")
    rid = run.info.run_id
    (tmp_path / "results.json").write_text(json.dumps(results))
    client.log_artifact(rid, str(tmp_path / "results.json"))
    for key, fig in figures.items():  # as figures/roc/hospital_a/test.png
        target = tmp_path / "figs" / f"{key}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(fig, target)
    client.log_artifacts(rid, str(tmp_path / "figs"), "figures")
    child = client.create_run(exp, tags={"mlflow.parentRunId": rid, "radfed.kind": "external"})
    client.set_terminated(rid)

    out = report_from_run(rid, uri, tmp_path)
    assert out == tmp_path / f"report-{rid[:8]}.html"
    page = out.read_text()
    assert page.count("<img ") == 3 and 'id="fig-roc"' in page
    with pytest.raises(ReportError, match="nested run of"):
        report_from_run(child.info.run_id, uri, tmp_path)
    with pytest.raises(ReportError, match="no MLflow run"):
        report_from_run("0" * 32, uri, tmp_path)


def test_in_memory_results_with_numpy_values_and_nan():
    """Results built in memory (before results.json) hold NumPy scalars and NaN."""
    results = make_results()
    row = results["performance"]["clinical"]["hospital_a"]["test"]
    row["n"], row["events"] = np.int64(24), np.int64(9)
    row["auc"], row["auc_ci"] = float("nan"), np.array([np.nan, np.nan])
    row["brier"] = np.float64(0.1234)
    coef = results["models"]["nomogram"]["coefficients"]["age"]
    coef["coef_per_unit"] = 800.0  # a separated fit: exp overflows
    results["external"]["meta"]["clinical"] = {"k": 1, "reason": "needs two sites"}
    page = render_report(results)
    assert "not estimated: needs two sites" in page
    assert '<td>24</td><td>9</td><td><span class="na">—</span></td><td>0.123</td>' in page


def test_kept_out_features_are_listed_with_their_reason():
    results = make_results()
    results["harmonization"].update(
        harmonised=["glcm_contrast"],
        kept_out={
            "fbs": "binary: every value at every training site is 0 or 1",
            "code<1>": "named",
        },
    )
    page = render_report(results, {})
    assert "1 features harmonised; 2 kept out of ComBat" in page
    assert "<code>fbs</code>" in page and "every value at every training site is 0 or 1" in page
    assert "code&lt;1&gt;" in page  # names are escaped like every other text
    results["harmonization"].pop("kept_out")
    assert "kept out of ComBat" not in render_report(results, {})
