"""Comparing study runs read back from a real MLflow SQLite store."""

from __future__ import annotations

import math
import time
from datetime import UTC, datetime

import matplotlib.image
import pandas as pd
import pytest

from radfed.server.outputs.compare import (
    ComparisonError,
    compare_runs,
    format_comparison,
    sort_comparison,
    write_comparison,
)

EXPERIMENT = "heart-tests"
DAY = 24 * 3600 * 1000
T0 = int(datetime(2026, 1, 1, 10, 0, tzinfo=UTC).timestamp() * 1000)

# Test AUCs per run (oldest first); None: not logged (undefined in that run).
AUC = {
    "nomogram": {
        "cleveland": (0.80, 0.83, 0.86),
        "hungarian": (0.75, None, 0.79),
        "pooled": (0.78, 0.80, 0.83),
    },
    "clinical": {
        "cleveland": (0.70, 0.72, 0.71),
        "hungarian": (0.72, 0.70, 0.69),
        "pooled": (0.71, 0.71, 0.70),
    },
    "radiomics": {"cleveland": (0.65, 0.66, 0.90), "hungarian": (0.60, 0.62, 0.64)},
}


def _log(client, run_id: str, metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Three study runs (the oldest from before the ``radfed.kind`` tag), a nested
    external run of the newest, a legacy nested run, an empty and an unrelated experiment."""
    from mlflow.tracking import MlflowClient

    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    client = MlflowClient(uri)
    art = (tmp / "artifacts").as_uri()
    exp = client.create_experiment(EXPERIMENT, artifact_location=art)
    client.create_experiment("empty", artifact_location=art)
    other = client.create_experiment("other", artifact_location=art)

    ids = []
    for k in range(3):
        tags = {"radfed.study": "heart", "radfed.transport": "inprocess"}
        if k:  # the oldest run predates the radfed.kind tag
            tags["radfed.kind"] = "study"
        run = client.create_run(exp, start_time=T0 + k * DAY, tags=tags, run_name="heart-inprocess")
        metrics = {
            f"{model}/test/auc/{site}": values[k]
            for model, sites in AUC.items()
            for site, values in sites.items()
            if values[k] is not None
        }
        metrics |= {
            "nomogram/train/auc/cleveland": 0.90,
            "nomogram/test/brier/cleveland": 0.15 + k / 100,
            "nomogram_vs_clinical/test/delong_p/cleveland": 0.04,
            "site/cleveland/test/n": 60.0,
            "rounds/lasso": 8.0,
        }
        _log(client, run.info.run_id, metrics)
        client.set_terminated(run.info.run_id, end_time=T0 + k * DAY + 60_000)
        ids.append(run.info.run_id)

    newest = ids[-1]
    _log(client, newest, {"nomogram/external/auc/random_effects": 0.76})
    child = client.create_run(
        exp,
        start_time=T0 + 2 * DAY + 1000,
        run_name="external-cleveland",
        tags={
            "mlflow.parentRunId": newest,
            "radfed.kind": "external",
            "radfed.held_out": "cleveland",
        },
    )
    _log(client, child.info.run_id, {"nomogram/external/auc/cleveland": 0.74})
    legacy_child = client.create_run(
        exp, start_time=T0 + 3 * DAY, tags={"mlflow.parentRunId": ids[0]}
    )
    _log(client, legacy_child.info.run_id, {"nomogram/test/auc/cleveland": 0.10})
    unrelated = client.create_run(other, start_time=T0, tags={"radfed.kind": "study"})
    _log(client, unrelated.info.run_id, {"nomogram/test/auc/cleveland": 0.99})
    return {"uri": uri, "ids": ids, "child": child.info.run_id, "tmp": tmp}


def _labels(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if not c.startswith("Δ")]


def test_table_has_one_column_per_study_run_and_differences(store):
    df = compare_runs(EXPERIMENT, store["uri"])
    labels = _labels(df)
    assert labels == [
        "heart-inprocess 2026-01-01 10:00",
        "heart-inprocess 2026-01-02 10:00",
        "heart-inprocess 2026-01-03 10:00",
    ]
    assert list(df.columns[3:]) == [f"Δ {labels[1]}", f"Δ {labels[2]}"]
    assert df.attrs["runs"] == dict(zip(labels, store["ids"], strict=True))
    assert df.attrs["baseline"] == labels[0]  # the oldest run, logged before the kind tag
    assert df.index.names == ["model", "split", "site"]
    # Models in the study's order, hospitals alphabetically, pooled last.
    assert list(df.index) == [
        ("radiomics", "test", "cleveland"),
        ("radiomics", "test", "hungarian"),
        ("clinical", "test", "cleveland"),
        ("clinical", "test", "hungarian"),
        ("clinical", "test", "pooled"),
        ("nomogram", "test", "cleveland"),
        ("nomogram", "test", "hungarian"),
        ("nomogram", "test", "pooled"),
    ]  # not nomogram_vs_clinical: its delong_p is another metric
    for model, sites in AUC.items():
        for site, values in sites.items():
            for label, value in zip(labels, values, strict=True):
                got = df.loc[(model, "test", site), label]
                assert math.isnan(got) if value is None else got == pytest.approx(value)
    row = df.loc[("radiomics", "test", "cleveland")]
    assert row[f"Δ {labels[2]}"] == pytest.approx(0.90 - 0.65)
    assert math.isnan(df.loc[("nomogram", "test", "hungarian"), f"Δ {labels[1]}"])
    # The legacy nested run (0.10) and the other experiment (0.99) are not in the table.
    assert df.loc[("nomogram", "test", "cleveland"), labels[0]] == pytest.approx(0.80)


def test_filters_baseline_and_other_metrics(store):
    ids = store["ids"]
    df = compare_runs(EXPERIMENT, store["uri"], models=["nomogram"], last=2)
    assert set(df.index.get_level_values("model")) == {"nomogram"}
    assert _labels(df) == ["heart-inprocess 2026-01-02 10:00", "heart-inprocess 2026-01-03 10:00"]

    df = compare_runs(EXPERIMENT, store["uri"], run_ids=[ids[2][:10], ids[0]], baseline=ids[2])
    labels = _labels(df)
    assert [df.attrs["runs"][label] for label in labels] == [ids[0], ids[2]]  # oldest first
    assert df.attrs["baseline"] == labels[1]
    assert df.loc[("clinical", "test", "pooled"), f"Δ {labels[0]}"] == pytest.approx(0.71 - 0.70)

    brier = compare_runs(EXPERIMENT, store["uri"], metric="brier")
    assert brier.loc[("nomogram", "test", "cleveland")].iloc[:3].tolist() == pytest.approx(
        [0.15, 0.16, 0.17]
    )
    delong = compare_runs(EXPERIMENT, store["uri"], metric="delong_p")
    assert list(delong.index) == [("nomogram_vs_clinical", "test", "cleveland")]


def test_external_metrics_come_from_nested_runs(store):
    df = compare_runs(EXPERIMENT, store["uri"], split="external")
    newest = _labels(df)[0]
    assert _labels(df) == ["heart-inprocess 2026-01-03 10:00"]  # only this run logged it
    assert df.attrs["skipped"] == store["ids"][:2]
    assert df.loc[("nomogram", "external", "cleveland"), newest] == pytest.approx(0.74)
    assert df.loc[("nomogram", "external", "random_effects"), newest] == pytest.approx(0.76)
    assert list(df.index.get_level_values("site")) == ["cleveland", "random_effects"]


def test_sorting(store):
    df = compare_runs(EXPERIMENT, store["uri"])
    newest = _labels(df)[2]
    by_label = compare_runs(EXPERIMENT, store["uri"], sort_by=newest, ascending=False)
    assert by_label[newest].tolist() == sorted(df[newest].tolist(), reverse=True)
    by_id = sort_comparison(df, store["ids"][1][:8])
    values = by_id[_labels(df)[1]].tolist()
    assert math.isnan(values[-1]) and values[:-1] == sorted(values[:-1])  # NaN last
    by_diff = sort_comparison(df, "Δ " + store["ids"][2][:8], ascending=False)
    assert by_diff.index[0] == ("radiomics", "test", "cleveland")  # +0.25, the largest
    assert sort_comparison(df, "Δ#3", ascending=False).index.equals(by_diff.index)
    assert sort_comparison(df, "#2").index.equals(by_id.index)
    by_site = sort_comparison(df, "site")
    assert list(by_site.index.get_level_values("site"))[:3] == ["cleveland"] * 3
    assert by_site.attrs == df.attrs
    with pytest.raises(ComparisonError, match="cannot sort by 'nonsense'"):
        sort_comparison(df, "nonsense")


def test_format_comparison(store):
    df = compare_runs(EXPERIMENT, store["uri"])
    text = format_comparison(df, sort_by="site")
    lines = text.splitlines()
    assert lines[0] == "auc (test) — experiment 'heart-tests'"
    assert lines[1].split() == ["model", "split", "site", "#1", "#2", "#3", "Δ#2", "Δ#3"]
    row = next(line for line in lines if line.startswith("nomogram   test   hungarian"))
    assert row.split()[3:] == ["0.750", "—", "0.790", "—", "+0.040"]
    assert f"#1 = heart-inprocess 2026-01-01 10:00  [{store['ids'][0]}]  (baseline)" in text
    assert "Δ#k = #k − #1" in text
    external = format_comparison(compare_runs(EXPERIMENT, store["uri"], split="external"))
    assert "2 older study run(s) without auc (external) left out" in external
    assert "Δ#k" not in external


def test_write_comparison(store, tmp_path):
    df = compare_runs(EXPERIMENT, store["uri"])
    csv_path, png_path = write_comparison(df, tmp_path / "out")
    assert (csv_path, png_path) == (
        tmp_path / "out/comparison.csv",
        tmp_path / "out/comparison.png",
    )
    back = pd.read_csv(csv_path).set_index(["model", "split", "site"])
    assert list(back.columns) == list(df.columns)
    pd.testing.assert_frame_equal(back, df, check_exact=False, check_dtype=False)
    image = matplotlib.image.imread(png_path)
    assert image.shape[0] > 300 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05


def test_errors(store, tmp_path):
    uri = store["uri"]
    with pytest.raises(ComparisonError, match=r"no MLflow experiment 'nope'.*heart-tests"):
        compare_runs("nope", uri)
    with pytest.raises(ComparisonError, match="'empty' has no study runs"):
        compare_runs("empty", uri)
    with pytest.raises(ComparisonError, match=r"'sensitivity' of split 'test' is not logged"):
        compare_runs(EXPERIMENT, uri, metric="sensitivity")
    with pytest.raises(ComparisonError, match=r"logged: .*auc \(test\)"):
        compare_runs(EXPERIMENT, uri, split="validation")
    with pytest.raises(ComparisonError, match=r"model\(s\) lasso have no auc"):
        compare_runs(EXPERIMENT, uri, models=["lasso"])
    with pytest.raises(ComparisonError, match="run 'ffff' is not a study run"):
        compare_runs(EXPERIMENT, uri, run_ids=["ffff"])
    with pytest.raises(ComparisonError, match="is not a study run"):
        compare_runs(EXPERIMENT, uri, run_ids=[store["child"]])  # a nested run
    with pytest.raises(ComparisonError, match="no MLflow store at"):
        compare_runs(EXPERIMENT, f"sqlite:///{tmp_path / 'missing.db'}")
    assert not (tmp_path / "missing.db").exists()
    with pytest.raises(ComparisonError, match="last must be at least 1"):
        compare_runs(EXPERIMENT, uri, last=0)


def test_module_is_quick_to_import():
    # compare is imported by the command line: MLflow and matplotlib load lazily.
    import subprocess
    import sys

    code = "import sys, radfed.server.outputs.compare; print('mlflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
