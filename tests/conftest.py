"""Shared fixtures: real multi-centre data (UCI heart disease) as radfed sites."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from radfed.experiments.heart_disease import shared_data_dir, write_sites
from radfed.shared.config import StudyConfig, load_study

# Sites keep their state (secret, pinned studies, answered patient sets, audit log) in
# one folder per site and data folder: a private root for the test session, inherited
# by the Flower processes the tests start.
os.environ.setdefault("RADFED_SITE_STATE", tempfile.mkdtemp(prefix="radfed-site-state-"))

HEART_CLINICAL = ["age", "sex", "cp", "trestbps", "thalach", "exang", "oldpeak"]
PIPELINE_CLINICAL = ["age", "sex", "trestbps"]
PIPELINE_FEATURES = ["cp", "thalach", "exang", "oldpeak", "chol"]


def heart_study_text(
    sites: list[str],
    min_cell: int = 3,
    pipeline: bool = False,
    loso: bool = False,
    validation: tuple[str, ...] = (),
) -> str:
    """A heart-disease study: clinical variables only, or (``pipeline``) the whole
    radiomics pipeline with tabular variables standing in for features. Leave-one-site-out
    validation is off unless ``loso``; ``validation`` names validation-only sites."""
    tables = "\n".join(f'[[sites]]\nname = "{s}"\npath = "sites/{s}"\n' for s in sites)
    tables += "\n".join(
        f'\n[[sites]]\nname = "{s}"\npath = "sites/{s}"\nrole = "validation"\n' for s in validation
    )
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

[validation]
leave_one_site_out = {str(loso).lower()}

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
def heart_pipeline_study(heart_dir: Path) -> StudyConfig:
    """The whole pipeline (ComBat, mRMR, LASSO CV, clinical screening, nomogram) on three
    real hospitals."""
    path = heart_dir / "study.toml"
    path.write_text(heart_study_text(["cleveland", "hungarian", "va"], pipeline=True))
    return load_study(path)


SYNTH_STUDY = """
[study]
name = "synthetic"
outcome = "fasciitis"
clinical = ["age", "sex", "cobb_angle", "fat_thickness"]
features = ["original_*"]
seed = 3

[extraction]
params = "fast"

[harmonization]
covariates = ["age", "sex"]

[selection]
# 3 folds of ~8 training patients and 4 features: a fold must hold min_cell events and
# non-events, and a fold fit at most a third of its rows in parameters.
mrmr_k = 4
folds = 3
n_lambdas = 20

[tracking]
enabled = false

[validation]
leave_one_site_out = false

[[sites]]
name = "hospital_a"
path = "sites/hospital_a"

[[sites]]
name = "hospital_b"
path = "sites/hospital_b"

[[sites]]
name = "hospital_c"
path = "sites/hospital_c"
"""


@pytest.fixture(scope="session")
def synthetic_cohort(tmp_path_factory) -> Path:
    """Three synthetic hospitals (36 patients each), extracted once with the fast
    parameters into a private cache, with features.parquet written at each site."""
    from radfed.client.extraction import extract_site, load_params, write_features
    from radfed.experiments.synth import write_cohort

    root = tmp_path_factory.mktemp("synthetic")
    cache = root / "cache"
    for site in write_cohort(root / "sites", sites=3, patients=36, seed=11, progress=False):
        result = extract_site(site, load_params("fast"), jobs=2, cache_dir=cache, progress=False)
        write_features(result, site / "features.parquet")
    (root / "study.toml").write_text(SYNTH_STUDY)
    return root


@pytest.fixture
def synthetic_study(synthetic_cohort: Path, monkeypatch) -> StudyConfig:
    # Sites read the extraction cache the fixture filled (the site-level cache setting).
    monkeypatch.setenv("RADFED_CACHE", str(synthetic_cohort / "cache"))
    return load_study(synthetic_cohort / "study.toml")
