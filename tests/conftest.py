"""Shared fixtures: real multi-centre data (UCI heart disease) as radfed sites."""

from __future__ import annotations

from pathlib import Path

import pytest

from radfed.experiments.heart_disease import shared_data_dir, write_sites
from radfed.shared.config import StudyConfig, load_study

HEART_CLINICAL = ["age", "sex", "cp", "trestbps", "thalach", "exang", "oldpeak"]


def heart_study_text(sites: list[str], min_cell: int = 3) -> str:
    tables = "\n".join(f'[[sites]]\nname = "{s}"\npath = "sites/{s}"\n' for s in sites)
    return f"""
[study]
name = "heart"
outcome = "disease"
clinical = {HEART_CLINICAL!r}
seed = 7

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
