"""MLflow as statisticians use it: parent and nested runs, metric names, artifacts, and
the fitted pipeline logged, registered and served as a model."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from radfed.server.study.runner import run_study
from radfed.shared.config import load_study
from radfed.tests.conftest import heart_study_text
from radfed.tests.reference import feature_tables, site_test_mask

SITES = ["cleveland", "hungarian", "va"]


def _client(config):
    import mlflow

    mlflow.set_tracking_uri(config.tracking_uri)
    return mlflow.MlflowClient()


def _site_rows(config, columns: list[str]) -> dict[str, tuple[pd.DataFrame, np.ndarray]]:
    """Each site's complete rows (as the site keeps them) and its test mask."""
    out = {}
    for name, table in feature_tables(config).items():
        cols = list(dict.fromkeys([config.outcome, *config.clinical, *config.features, *columns]))
        complete = table.dropna(subset=cols).assign(site=name)
        out[name] = (complete, site_test_mask(config, name, complete))
    return out


@pytest.fixture
def pipeline_run(heart_pipeline_study, heart_dir):
    result = run_study(heart_pipeline_study, out_dir=heart_dir / "out", track=True)
    return heart_pipeline_study, result


def test_registered_model_predicts_from_raw_features_as_the_sites_did(pipeline_run):
    """The registry's model (ComBat, Radscore, three models) scores each site's raw test
    rows exactly as the sites scored them in the federated evaluation."""
    import mlflow
    from sklearn.metrics import roc_auc_score

    config, result = pipeline_run
    client = _client(config)
    versions = client.search_model_versions("name='radfed-heart'")
    assert [str(v.version) for v in versions] == ["1"]
    model = mlflow.pyfunc.load_model("models:/radfed-heart/1")
    needed = model.metadata.metadata["input_columns"]
    assert {"site", "age", "sex", "trestbps"} <= set(needed)
    for site, (rows, test) in _site_rows(config, ["age", "sex"]).items():
        predicted = model.predict(rows[needed].iloc[np.flatnonzero(test)])
        y = rows[config.outcome].to_numpy()[test]
        for name in ("radiomics", "clinical", "nomogram"):
            auc = result.performance[name][site]["test"]["auc"]
            # Patients with the same covariates get probabilities a rounding error apart
            # here: a tie, which the sites count 1/2 (pROC's rule); so does sklearn once
            # the rounding is gone.
            tied = np.round(predicted[name].to_numpy(dtype=float), 9)
            assert roc_auc_score(y, tied) == pytest.approx(auc, abs=1e-12)


def test_pipeline_refuses_a_hospital_it_never_saw(pipeline_run):
    from radfed.server.tracking.pipeline_model import FittedPipeline

    config, result = pipeline_run
    pipeline = FittedPipeline(result.to_dict())
    rows, _ = _site_rows(config, ["age", "sex"])["va"]
    with pytest.raises(ValueError, match="estimate_new_batch"):
        pipeline.predict(rows.assign(site="elsewhere"))
    with pytest.raises(ValueError, match="lacks column"):
        pipeline.predict(rows.drop(columns=["oldpeak"]))


def test_parent_and_nested_runs_carry_named_metrics_and_artifacts(heart_dir):
    path = heart_dir / "study.toml"
    path.write_text(heart_study_text(SITES, loso=True))
    config = load_study(path)
    result = run_study(config, out_dir=heart_dir / "out", track=True)
    client = _client(config)
    parent = client.get_run(result.federation["mlflow_run_id"])
    assert parent.data.tags["radfed.kind"] == "study"
    metrics = parent.data.metrics
    data = json.loads((heart_dir / "out" / "latest" / "results.json").read_text())
    for site in [*SITES, "pooled"]:
        for split in ("train", "test"):
            m = data["performance"]["clinical"][site][split]
            assert metrics[f"clinical/{split}/auc/{site}"] == pytest.approx(m["auc"])
            assert metrics[f"clinical/{split}/brier/{site}"] == pytest.approx(m["brier"])
            assert metrics[f"clinical/{split}/cal_slope/{site}"] == pytest.approx(
                m["calibration"]["slope"]
            )
    meta = data["external"]["meta"]["clinical"]
    assert metrics["clinical/external/auc/random_effects"] == pytest.approx(meta["auc"])
    assert parent.data.params["leave_one_site_out"] == "True"

    nested = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    assert sorted(r.data.tags["radfed.held_out"] for r in nested) == SITES
    for run in nested:
        site = run.data.tags["radfed.held_out"]
        entry = data["external"]["held_out"][site]
        assert run.data.tags["radfed.kind"] == "external"
        assert run.info.run_name == f"external-{site}"
        assert run.data.metrics[f"clinical/external/auc/{site}"] == pytest.approx(
            entry["metrics"]["clinical"]["auc"]
        )
        # The model fitted without the site, evaluated on the sites it was fitted on.
        for other in entry["training_sites"]:
            assert f"clinical/test/auc/{other}" in run.data.metrics

    # Artifacts beside the study's tracking database, not in ./mlruns of the test's cwd.
    assert parent.info.artifact_uri.startswith((heart_dir / "mlartifacts").as_uri() + "/")
    top = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.json", "report.html", "figures"} <= top
    figures = {a.path for a in client.list_artifacts(parent.info.run_id, "figures")}
    assert {"figures/roc", "figures/calibration", "figures/decision", "figures/forest.png"} <= (
        figures
    )
    assert {"figures/nomogram.png", "figures/nomogram.svg"} <= figures
