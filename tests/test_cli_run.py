"""`radfed run` end to end: results.json and a real MLflow SQLite store."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from radfed.tests.conftest import heart_study_text


def radfed(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "radfed", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_run_writes_results_and_tracks_in_mlflow(heart_study, heart_dir):
    out = heart_dir / "out"
    proc = radfed("run", "study.toml", "--out", str(out), cwd=heart_dir)
    assert proc.returncode == 0, proc.stderr
    assert "Federated logistic regression" in proc.stdout
    assert "cleveland" in proc.stdout and "MLflow run" in proc.stdout
    # MLflow's notes nobody can act on stay out of the terminal (issue 12).
    for noise in ("CloudPickle", "Failed to infer model signature", "Created version"):
        assert noise not in proc.stderr, noise

    # Each run writes into a new folder of its own under --out; latest points at it.
    folder = out / "latest"
    assert folder.resolve().parent == out.resolve() and folder.resolve() != out.resolve()
    assert f"results.json: {folder.resolve() / 'results.json'}" in proc.stdout
    results = json.loads((folder / "results.json").read_text())
    assert results["schema"] == "radfed.results/2"
    assert results["federation"]["output_dir"] == str(folder.resolve())
    assert results["transport"] == "inprocess"
    assert set(results["sites"]) == {"cleveland", "hungarian", "va"}
    for site, info in results["sites"].items():
        assert info["train"]["n"] + info["test"]["n"] == info["n"]
        perf = results["performance"]["clinical"][site]
        assert 0.5 < perf["test"]["auc"] <= 1.0
    assert results["rounds"]["models"] == 1 + results["models"]["clinical"]["iterations"]

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{heart_dir}/mlflow.db")
    run = mlflow.get_run(results["federation"]["mlflow_run_id"])
    metrics = run.data.metrics
    for site in ("cleveland", "hungarian", "va"):
        assert metrics[f"clinical/test/auc/{site}"] == pytest.approx(
            results["performance"]["clinical"][site]["test"]["auc"]
        )
    assert run.data.params["outcome"] == "disease"
    assert run.data.tags["radfed.transport"] == "inprocess"
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)]
    assert "results.json" in artifacts and "report.html" in artifacts


@pytest.mark.slow
def test_report_and_compare_read_runs_back_from_mlflow(heart_dir):
    """Two runs of a study with leave-one-site-out: `radfed report RUN_ID` rebuilds the
    report from MLflow (checked in a real browser) and `radfed compare` tabulates the
    per-site AUCs of both runs with their differences."""
    import pandas as pd

    from radfed.tests.test_report import dump_dom

    text = heart_study_text(["cleveland", "hungarian", "va"], loso=True)
    (heart_dir / "study.toml").write_text(text)
    runs = []
    for _ in range(2):  # into the same output root: the second run keeps the first
        assert radfed("-q", "run", "study.toml", "--out", "out", cwd=heart_dir).returncode == 0
        runs.append(json.loads((heart_dir / "out" / "latest" / "results.json").read_text()))
    folders = sorted(p for p in (heart_dir / "out").iterdir() if not p.is_symlink())
    assert [str(f) for f in folders] == sorted(r["federation"]["output_dir"] for r in runs)
    assert all((f / "results.json").is_file() and (f / "report.html").is_file() for f in folders)
    assert runs[0]["federation"]["mlflow_run_id"] != runs[1]["federation"]["mlflow_run_id"]
    uri = f"sqlite:///{heart_dir}/mlflow.db"
    run_id = runs[0]["federation"]["mlflow_run_id"]

    proc = radfed("report", run_id, "--tracking-uri", uri, "--out", "r.html", cwd=heart_dir)
    assert proc.returncode == 0, proc.stderr
    dom = dump_dom(heart_dir / "r.html", heart_dir / "chromium")
    assert dom.body.get("data-broken-images") == "0"
    assert int(dom.body.get("data-images", "0")) >= 10
    titles = " ".join(dom.headings["h2"])
    for section in ("Discrimination", "Calibration", "External validation", "Figures"):
        assert section in titles

    proc = radfed("compare", "study.toml", "--out", "cmp", cwd=heart_dir)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(heart_dir / "cmp" / "comparison.csv")
    pooled = table[(table["site"] == "pooled") & (table["model"] == "clinical")]
    assert len(pooled) == 1
    values = pooled.drop(columns=["model", "split", "site"]).iloc[0]
    auc = runs[0]["performance"]["clinical"]["pooled"]["test"]["auc"]
    assert values.iloc[0] == pytest.approx(auc)
    assert values.iloc[-1] == pytest.approx(0.0, abs=1e-12)  # same study: no difference
    assert (heart_dir / "cmp" / "comparison.png").stat().st_size > 10_000
    proc = radfed("compare", "study.toml", "--split", "external", cwd=heart_dir)
    assert proc.returncode == 0 and "random_effects" in proc.stdout


def test_bad_study_file_is_a_clear_error(tmp_path):
    (tmp_path / "study.toml").write_text("[study]\nname = 'x'\n")
    proc = radfed("run", "study.toml", cwd=tmp_path)
    assert proc.returncode == 2
    assert "radfed: error:" in proc.stderr and "missing required key 'outcome'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_site_folder_is_a_clear_error(heart_dir):
    (heart_dir / "study.toml").write_text(heart_study_text(["cleveland", "nowhere"]))
    proc = radfed("run", "study.toml", "--no-track", cwd=heart_dir)
    assert proc.returncode == 2
    assert "nowhere: site folder not found" in proc.stderr


@pytest.mark.slow
def test_heart_disease_study_with_pooled_equivalence(tmp_path, shared_data):
    """The packaged heart-disease study: federated equals pooled on every estimate."""
    assert radfed("heart-disease", "--out", "hd", cwd=tmp_path).returncode == 0
    proc = radfed("-q", "run", "hd/study.toml", "--pooled", "--no-track", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(
        (tmp_path / "hd" / "radfed-out" / "heart-disease" / "latest" / "results.json").read_text()
    )
    rows = results["equivalence"]
    assert {r["estimate"] for r in rows} >= {
        "ComBat gamma_star",
        "LASSO coefficients at lambda.min",
        "nomogram model coefficients",
    }
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    assert set(results["models"]) == {"clinical", "radiomics", "nomogram"}
    assert "Radscore = " in results["selection"]["radscore_formula"]
    assert "Federated versus pooled" in proc.stdout
    # Leave-one-site-out on the three training hospitals; Switzerland (validation only)
    # has no patient with a cholesterol value: not evaluated, and the report says why.
    external = results["external"]
    assert {s: e["status"] for s, e in external["held_out"].items()} == dict.fromkeys(
        ["cleveland", "hungarian", "va"], "ok"
    )
    swiss = external["validation"]["switzerland"]
    assert swiss["status"] == "failed" and "no patient with complete data" in swiss["reason"]
    report = (
        tmp_path / "hd" / "radfed-out" / "heart-disease" / "latest" / "report.html"
    ).read_text()
    assert "switzerland" in report and "no patient with complete data" in report
