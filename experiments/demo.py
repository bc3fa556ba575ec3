"""The demo study: three synthetic hospitals, extracted and fitted in one command."""

from __future__ import annotations

import logging
from pathlib import Path

from radfed.server.results import StudyResult
from radfed.server.study.runner import run_study
from radfed.shared.config import load_study

log = logging.getLogger(__name__)

CLINICAL = ["age", "sex", "cobb_angle", "fat_thickness"]
# Every extracted feature is a candidate: ComBat, mRMR and LASSO choose the Radscore.
FEATURES = ["*"]
#: Patients per hospital whose ROI a second reader draws and the first reader redraws
#: (seed 000 measured reproducibility on a subset of its cases). 15 of 80 adds 30
#: extraction cases per site (+37 %); about 70 % of them fall in the training split,
#: where the ICC is computed (~30 subjects per comparison over three sites).
READERS = 15

STUDY_TEMPLATE = """\
# radfed demo study: written by `radfed demo`
[study]
name = "demo"
outcome = "fasciitis"
clinical = {clinical}
features = {features}
seed = {seed}

[split]
test_fraction = 0.3

[harmonization]
batch = "site"                  # each hospital's scanner is its own batch
covariates = ["age", "sex"]     # biology ComBat must preserve (age changes muscle texture)

[selection]
# Features whose ICC(2,1) across readers is below this are dropped before ComBat and
# mRMR (seed 000's threshold; the sites' second-reader and repeat masks give the ICC).
icc_threshold = 0.75
# mRMR keeps {mrmr_k} (seed 000 kept 30): a LASSO fold fit at a hospital of {patients} patients
# has about {fold_rows} training rows, and sites refuse fits with more parameters than a
# third of their rows.
mrmr_k = {mrmr_k}
# 5-fold CV (seed 000 used 10): a site sends each fold's events and non-events (they
# follow from its fit pieces), and with {patients} patients 10 folds would hold fewer than
# min_cell events, which the sites refuse.
folds = 5
# glmnet's ratio for N < p: the deep end of a 1e-4 path is nearly separable on cohorts
# this small, slow to fit and never chosen by CV.
lambda_min_ratio = 0.01

# Seed 000's Table 3: the Radscore fed to seven classifiers (XGBoost bagging, random
# forest, linear SVM and a small network federated; radial SVM and KNN site-local).
# A site whose training split is too small for the models' parameters refuses it, and
# results.json says so.
[classifiers]
compare = true

[extraction]
params = "{params}"

[tracking]
uri = "sqlite:///mlflow.db"
experiment = "radfed-demo"

{sites}"""


def mrmr_k_for(patients: int, test_fraction: float = 0.3, folds: int = 5) -> int:
    """The most features a LASSO fold fit at a site of ``patients`` may use under the
    default privacy rule (parameters <= rows / 3), capped at 15."""
    fold_rows = int(patients * (1 - test_fraction) * (1 - 1 / folds))
    return max(2, min(15, fold_rows // 3 - 1))


def write_study(out: Path, site_dirs: list[Path], params: str, seed: int, patients: int) -> Path:
    """Write the demo's study file naming the site folders."""
    sites = "\n".join(
        f'[[sites]]\nname = "{d.name}"\npath = "{d.relative_to(out)}"\n' for d in site_dirs
    )
    text = STUDY_TEMPLATE.format(
        clinical=_toml_list(CLINICAL),
        features=_toml_list(FEATURES),
        seed=seed,
        params=params,
        sites=sites,
        patients=patients,
        fold_rows=int(patients * 0.7 * 0.8),
        mrmr_k=mrmr_k_for(patients),
    )
    path = out / "study.toml"
    path.write_text(text)
    return path


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def run_demo(
    out: Path,
    sites: int = 3,
    patients: int = 80,
    seed: int = 0,
    params: str = "default",
    transport: str = "inprocess",
    jobs: int = 0,
    progress: bool = True,
    readers: int = READERS,
) -> tuple[StudyResult, Path]:
    """Synthesise ``sites`` hospitals, extract their features, run the study.

    ``readers`` patients per hospital (at most ``patients``) also get a second reader's
    mask and the first reader's repeat, so the study runs its reproducibility phase and
    drops the features whose ICC is below 0.75; 0 writes no reader mask (no ICC phase).

    Returns
    -------
    (StudyResult, Path)
        The result and the demo folder.
    """
    from radfed.client.extraction import extract_site, load_params, write_features
    from radfed.experiments.synth import SynthError, write_cohort

    out = Path(out).resolve()
    log.info("writing %d synthetic hospitals of %d patients to %s", sites, patients, out / "sites")
    if isinstance(readers, bool) or not isinstance(readers, int) or readers < 0:
        raise SynthError(f"readers must be a whole number >= 0, got {readers!r}")
    site_dirs = write_cohort(
        out / "sites",
        sites=sites,
        patients=patients,
        seed=seed,
        progress=progress,
        second_reader=readers > 0,
        reader_patients=min(readers, patients) or None,
    )
    loaded = load_params(params)
    for site_dir in site_dirs:
        # Each hospital extracts its own features; the study run reuses them from the cache.
        log.info("extracting %s with %s parameters", site_dir.name, loaded.name)
        result = extract_site(site_dir, loaded, jobs=jobs, progress=progress)
        write_features(result, site_dir / "features.parquet")
        for problem in result.problems:
            log.warning("%s: %s", site_dir.name, problem)
    study = write_study(out, site_dirs, params, seed, patients)
    result = run_study(load_study(study), transport=transport, out_dir=out / "results", jobs=jobs)
    return result, out
