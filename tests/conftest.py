"""Shared fixtures: real multi-centre data (UCI heart disease) as radfed sites."""

from __future__ import annotations

from pathlib import Path

import pytest

from radfed.experiments.heart_disease import shared_data_dir, write_sites
from radfed.shared.config import StudyConfig, load_study

HEART_CLINICAL = ["age", "sex", "cp", "trestbps", "thalach", "exang", "oldpeak"]
PIPELINE_CLINICAL = ["age", "sex", "trestbps"]
PIPELINE_FEATURES = ["cp", "thalach", "exang", "oldpeak", "chol"]


def heart_study_text(sites: list[str], min_cell: int = 3, pipeline: bool = False) -> str:
    """A heart-disease study: clinical variables only, or (``pipeline``) the whole
    radiomics pipeline with tabular variables standing in for features."""
    tables = "\n".join(f'[[sites]]\nname = "{s}"\npath = "sites/{s}"\n' for s in sites)
    if pipeline:
        variables = f"""clinical = {PIPELINE_CLINICAL!r}
features = {PIPELINE_FEATURES!r}

[harmonization]
covariates = ["age", "sex"]
categorical = ["sex"]

[selection]
mrmr_k = 4
folds = 5
n_lambdas = 20
"""
    else:
        variables = f"clinical = {HEART_CLINICAL!r}\n"
    return f"""
[study]
name = "heart"
outcome = "disease"
seed = 7
{variables}
[tracking]
uri = "sqlite:///mlflow.db"
experiment = "heart-tests"

[privacy]
min_cell = {min_cell}

{tables}
""".replace("'", '"')


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.fail(
            f"the project's shared data is missing at {path}: clone with ../shared beside it"
        )
    return path


@pytest.fixture
def heart_dir(tmp_path: Path, shared_data: Path) -> Path:
    write_sites(tmp_path / "sites", shared_data / "heart_disease")
    return tmp_path


@pytest.fixture
def heart_study(heart_dir: Path) -> StudyConfig:
    """Three heart-disease hospitals (Switzerland has too few healthy patients to split)."""
    path = heart_dir / "study.toml"
    path.write_text(heart_study_text(["cleveland", "hungarian", "va"]))
    return load_study(path)


@pytest.fixture
def pipeline_study(heart_dir: Path) -> StudyConfig:
    """The whole pipeline (ComBat, mRMR, LASSO CV, clinical screening, nomogram) on three
    real hospitals."""
    path = heart_dir / "study.toml"
    path.write_text(heart_study_text(["cleveland", "hungarian", "va"], pipeline=True))
    return load_study(path)
