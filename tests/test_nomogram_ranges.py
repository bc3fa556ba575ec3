"""The nomogram's axes over the federated 5th-95th percentiles (issue 14, item 4).

Sites count their training patients at or below each point of their own fixed value
grid, in the ``evaluate`` round, merged until every cell holds 0 or at least
``min_cell``; the coordinator brackets the pooled percentiles. The oracle is numpy's
percentiles of the pooled training rows (neuroCombat for the Radscore's features); the
attacks play a hostile coordinator against a real site worker.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from radfed.client.site import SiteSettings, SiteWorker
from radfed.server.federation.inprocess import InProcessTransport
from radfed.server.outputs.run_folder import nomogram_scales
from radfed.server.results import StudyResult
from radfed.server.stats.axis_ranges import RULE, _bounds, pooled_ranges
from radfed.server.stats.evaluation import evaluate_models
from radfed.server.study.driver import FederatedStudy
from radfed.shared import evaluation_stats as es
from radfed.shared.config import load_study
from radfed.shared.messages import RADSCORE, roundtrip
from radfed.shared.privacy import PrivacyPolicy
from radfed.tests.conftest import heart_study_text
from radfed.tests.reference import (
    expand_features,
    feature_tables,
    pooled_combat,
    pooled_training_rows,
)

GRID = es.VALUE_GRID


def _bracket(value: float) -> tuple[float, float]:
    """The grid points one step outside the grid cell holding ``value``: a range that
    reaches one grid step past a percentile ends within these."""
    below, above = GRID[GRID <= value], GRID[GRID >= value]
    return float(below[-2]), float(above[1])


def _cells_ok(at_or_below: np.ndarray, n: int, m: int) -> None:
    """Every count a site sent, every difference of two of them (the patients between
    two grid points) and both tails are 0 or at least ``m``."""
    values = np.unique(np.concatenate([[0], np.asarray(at_or_below, dtype=int), [n]]))
    cells = np.abs(values[:, None] - values[None, :])
    assert np.all((cells == 0) | (cells >= m)), values


# ------------------------------------------------------------ the heart-disease pipeline


@pytest.fixture
def run(heart_pipeline_study):
    transport = InProcessTransport.from_study(heart_pipeline_study)
    result = FederatedStudy(heart_pipeline_study, transport).run()
    tables = feature_tables(heart_pipeline_study)
    config = expand_features(heart_pipeline_study, tables)
    rows = pooled_training_rows(config, tables)
    return result, transport, config, rows


def _radscore(rows: pd.DataFrame, config, context: dict) -> np.ndarray:
    """The Radscore of every pooled training row, from neuroCombat's harmonised
    features and the coefficients the coordinator sent the sites."""
    harmonised = pooled_combat(rows, config)
    columns = list(context["radscore_columns"])
    z = (harmonised[columns].to_numpy() - context["radscore_center"]) / context["radscore_scale"]
    beta = np.asarray(context["radscore_beta"], dtype=float)
    return beta[0] + z @ beta[1:]


def test_federated_ranges_bracket_the_pooled_percentiles(run):
    result, transport, config, rows = run
    ranges = result.details["evaluation"]["nomogram_ranges"]
    fit = result.models["nomogram"]
    # Every numeric predictor of the drawn model, not the 0/1 one (sex).
    assert set(ranges) == {"age", "trestbps", RADSCORE} and "sex" in fit.columns
    values = {c: rows[c].to_numpy(float) for c in ("age", "trestbps")}
    values[RADSCORE] = _radscore(rows, config, transport.context)
    for column, x in values.items():
        entry = ranges[column]
        assert entry["rule"] == RULE and entry["sites"] == 3, (column, entry)
        assert entry["low"] in GRID and entry["high"] in GRID
        q05, q95 = np.percentile(x, [5, 95])
        j = fit.columns.index(column)
        mean, sd = float(fit.center[j]), float(fit.scale[j])
        # An end the merged counts bound contains the percentile and reaches at most one
        # grid step past the grid cell holding it; an end they cannot bound (every
        # site's merged tail together holds more than 5%) is the grid point at or past
        # mean -/+ 2 SD.
        if entry["low_from"] == "counts":
            assert _bracket(q05)[0] <= entry["low"] <= q05, (column, entry, q05)
        else:
            assert entry["low"] == GRID[GRID <= mean - 2 * sd][-1], (column, entry)
        if entry["high_from"] == "counts":
            assert q95 <= entry["high"] <= _bracket(q95)[1], (column, entry, q95)
        else:
            assert entry["high"] == GRID[GRID >= mean + 2 * sd][0], (column, entry)
        inside = np.mean((x > entry["low"]) & (x <= entry["high"]))
        assert entry["covered"] <= inside + 1e-9
        if entry["low_from"] == entry["high_from"] == "counts":
            assert entry["covered"] >= 0.9 - 2 / len(x)
    # The axes the counts bound on these hospitals: age and the Radscore, both ends.
    assert all(
        ranges[c][f"{e}_from"] == "counts" for c in ("age", RADSCORE) for e in ("low", "high")
    )


def test_the_ranges_need_no_extra_round(run):
    """The counts travel in the evaluate round the models need anyway."""
    result, transport, *_ = run
    rounds = []
    for chart in (None, "nomogram"):
        before = sum(transport.rounds.values())
        _, evaluation, _ = evaluate_models(
            transport, result.models, result.outcome, ranges_model=chart
        )
        rounds.append(sum(transport.rounds.values()) - before)
        assert ("nomogram_ranges" in evaluation) == (chart is not None)
    assert rounds[0] == rounds[1]


def test_the_nomogram_drawn_from_results_json_uses_the_ranges(run, tmp_path):
    result, _, _, rows = run
    path = result.write_json(tmp_path / "results.json")
    scales = nomogram_scales(StudyResult.read_json(path))
    ranges = result.details["evaluation"]["nomogram_ranges"]
    for column in ("age", "trestbps"):
        axis = scales.variable(column)
        assert (axis.ticks[0], axis.ticks[-1]) == (ranges[column]["low"], ranges[column]["high"])
    # The age axis spans the middle 90% of the patients.
    q05, q95 = np.percentile(rows["age"].to_numpy(float), [5, 95])
    age = scales.variable("age")
    assert age.ticks[0] <= q05 and age.ticks[-1] >= q95
    assert scales.variable("sex").ticks == (0.0, 1.0)


def test_a_column_without_counts_falls_back_to_two_sd(run, tmp_path):
    result, *_ = run
    fit = result.models["nomogram"]
    # No site answered with counts (say, every training split was refused).
    fallback = pooled_ranges({"a": {"train_n": 100}}, ["age"], fit)["age"]
    assert fallback["low"] is None and "2 SD" in fallback["rule"]
    evaluation = dict(result.details["evaluation"], nomogram_ranges={"age": fallback})
    changed = dataclasses.replace(result, details={**result.details, "evaluation": evaluation})
    axis = nomogram_scales(changed).variable("age")
    j = fit.columns.index("age")
    mean, sd = float(fit.center[j]), float(fit.scale[j])
    assert mean - 2 * sd <= axis.ticks[0] and axis.ticks[-1] <= mean + 2 * sd


# ----------------------------------------------------------------- a hostile coordinator


@pytest.fixture(params=[5, 10], ids=lambda m: f"min_cell={m}")
def min_cell(request) -> int:
    return request.param


def _protocol(heart_dir: Path) -> dict:
    (heart_dir / "study.toml").write_text(heart_study_text(["cleveland", "hungarian", "va"]))
    return load_study(heart_dir / "study.toml").protocol()


def _ask(heart_dir: Path, min_cell: int, site: str = "cleveland", **payload) -> dict:
    worker = SiteWorker(
        SiteSettings(
            site,
            heart_dir / "sites" / site,
            PrivacyPolicy(min_cell=min_cell),
            state_dir=heart_dir / f"state-{site}-{min_cell}",
        )
    )
    request = {"task": "evaluate", "protocol": _protocol(heart_dir), **payload}
    return worker.handle(roundtrip(request))


def _model(heart_dir: Path, columns: list[str], site: str = "cleveland") -> dict:
    table = pd.read_csv(heart_dir / "sites" / site / "features.csv")[columns].dropna()
    x = table.to_numpy(float)
    return {
        "models": ["m"],
        "subsets": ["train"],
        "m_columns": columns,
        "m_center": x.mean(0),
        "m_scale": x.std(0),
        "m_beta": np.r_[0.0, np.full(len(columns), 0.3)],
    }


def test_honest_counts_leave_no_small_cell(heart_dir, min_cell):
    for site in ("cleveland", "va"):
        model = _model(heart_dir, ["age", "trestbps", "thalach"], site)
        reply = _ask(
            heart_dir, min_cell, site, ranges_model="m", ranges=["age", "thalach"], **model
        )
        assert reply["train_status"] == "ok", reply
        assert reply["train_range_le"].shape == (2, len(GRID))
        for row in reply["train_range_le"]:
            _cells_ok(row, int(reply["train_n"]), min_cell)


def test_a_column_outside_the_model_or_the_table_is_refused(heart_dir, min_cell):
    model = _model(heart_dir, ["age", "trestbps"])
    for columns in (["chol"], ["no_such_column"], ["lp:m"], ["age", "disease"]):
        reply = _ask(heart_dir, min_cell, ranges_model="m", ranges=columns, **model)
        assert "error" in reply and "train_range_le" not in reply, (columns, reply)
    # The model must be one of the request's, and the column one of the site's table.
    reply = _ask(heart_dir, min_cell, ranges_model="other", ranges=["age"], **model)
    assert "error" in reply
    absent = {**model, "m_columns": ["age", "no_such_column"]}
    reply = _ask(heart_dir, min_cell, ranges_model="m", ranges=["no_such_column"], **absent)
    assert "error" in reply and "train_range_le" not in reply


def test_a_hostile_grid_is_ignored(heart_dir, min_cell):
    """Thresholds around every patient's age, in every field a request could name: the
    site counts on its own grid, so the reply is the honest one."""
    model = _model(heart_dir, ["age", "trestbps"])
    honest = _ask(heart_dir, min_cell, ranges_model="m", ranges=["age"], **model)
    ages = pd.read_csv(heart_dir / "sites" / "cleveland" / "features.csv")["age"].dropna()
    crafted = np.sort(np.r_[ages - 0.01, ages + 0.01])
    hostile = _ask(
        heart_dir,
        min_cell,
        ranges_model="m",
        ranges=["age"],
        value_grid=crafted,
        range_grid=crafted,
        grid=crafted,
        thresholds=crafted,
        ranges_thresholds=crafted,
        **model,
    )
    np.testing.assert_array_equal(hostile["train_range_le"], honest["train_range_le"])
    np.testing.assert_array_equal(hostile["train_range_exact"], honest["train_range_exact"])


def test_counts_are_sent_over_the_training_split_only(heart_dir, min_cell):
    model = {**_model(heart_dir, ["age", "trestbps"]), "subsets": ["test", "all"]}
    reply = _ask(heart_dir, min_cell, ranges_model="m", ranges=["age"], **model)
    assert "error" not in reply
    assert not any("range" in key for key in reply)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    st.lists(
        st.one_of(
            st.floats(-1e7, 1e7, allow_nan=False),
            st.sampled_from([float(g) for g in GRID[::7]]),  # ties with grid points
            st.integers(20, 90).map(float),
        ),
        min_size=1,
        max_size=80,
    ),
    st.integers(1, 12),
)
def test_every_derivable_cell_passes_min_cell(values, min_cell):
    x = np.asarray(values)
    reported, exact = es.value_counts_at_grid(x[:, None], min_cell)
    n = len(x)
    if n >= min_cell:
        _cells_ok(reported[0], n, min_cell)
    else:  # a split this small is refused before counting; nothing would be exact
        assert not exact.any() and not reported.any()
    truth = np.searchsorted(np.sort(x), GRID, side="right")
    assert np.array_equal(reported[0][exact[0]], truth[exact[0]])
    assert np.all(np.diff(reported[0]) >= 0)
    # The coordinator's bounds hold the true count at every point.
    lower, upper = _bounds(reported[0], exact[0], n)
    assert np.all(lower <= truth) and np.all(truth <= upper)
