"""The Flower Simulation Engine gives the pooled statsmodels fit, as in-process does."""

from __future__ import annotations

import pytest

from radfed.server.simulation import run_in_simulation
from radfed.tests.reference import (
    assert_matches_logit,
    feature_tables,
    pooled_logit,
    pooled_training_rows,
)


@pytest.mark.slow
def test_simulation_engine_equals_statsmodels(heart_study):
    result = run_in_simulation(heart_study)
    assert result.transport == "simulation"
    rows = pooled_training_rows(heart_study, feature_tables(heart_study))
    reference = pooled_logit(rows, heart_study.outcome, list(heart_study.clinical))
    assert_matches_logit(result.to_dict()["models"]["logistic"], reference, tol=1e-6)
    assert set(result.performance["logistic"]) == {"cleveland", "hungarian", "va"}
