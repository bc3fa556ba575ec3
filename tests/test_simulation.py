"""The Flower Simulation Engine gives the pooled statsmodels fit, as in-process does."""

from __future__ import annotations

import pytest

from radfed.server.federation.inprocess import InProcessTransport
from radfed.server.federation.simulation import run_in_simulation
from radfed.server.study.driver import FederatedStudy
from radfed.tests.reference import (
    assert_matches_logit,
    assert_same_results,
    feature_tables,
    pooled_logit,
    pooled_training_rows,
)


@pytest.mark.slow
def test_simulation_engine_equals_in_process_and_statsmodels(heart_pipeline_study):
    heart_study = heart_pipeline_study
    result = run_in_simulation(heart_study)
    assert result.transport == "simulation"
    rows = pooled_training_rows(heart_study, feature_tables(heart_study))
    columns = result.models["clinical"].columns
    reference = pooled_logit(rows, heart_study.outcome, columns)
    assert_matches_logit(result.to_dict()["models"]["clinical"], reference, tol=1e-6)
    assert set(result.performance["clinical"]) == {"cleveland", "hungarian", "va", "pooled"}
    in_process = FederatedStudy(heart_study, InProcessTransport.from_study(heart_study)).run()
    assert_same_results(result.to_dict(), in_process.to_dict(), tol=1e-9)
