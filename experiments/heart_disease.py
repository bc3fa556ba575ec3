"""The UCI Heart Disease hospitals as radfed feature-table sites.

Four real hospitals (Cleveland, Budapest, Zurich/Basel, Long Beach VA); the outcome
``disease`` is ``num > 0``. Each becomes a site folder with a ``features.csv`` (no
images: every variable is tabular). Missing values (``NA``/``?``, and a cholesterol of
0, UCI's code for "not measured") stay missing in the files; at the site, a patient with
a missing value in any variable the study uses is kept out and reported (radfed's
documented rule), so each study chooses its variables knowing what that costs per
hospital. ``slope``, ``ca`` and ``thal`` are missing for most patients outside Cleveland,
so the packaged study (``experiments/studies/heart_disease.toml``) leaves them out.

Data: Janosi, Steinbrunn, Pfisterer, Detrano (1988), UCI ML repository, CC BY 4.0.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = [
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num",
]  # fmt: skip
HOSPITALS = {
    "cleveland": "processed.cleveland.data",
    "hungarian": "processed.hungarian.data",
    "switzerland": "processed.switzerland.data",
    "va": "processed.va.data",
}
OUTCOME = "disease"


def shared_data_dir() -> Path:
    """The project's shared real data: ``$RADFED_SHARED_DATA``, else ``../shared/data``
    beside the source checkout."""
    env = os.environ.get("RADFED_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def read_hospital(name: str, source: Path | None = None) -> pd.DataFrame:
    """One hospital's rows with named columns, ``patient_id`` and the 0/1 outcome."""
    path = (source or shared_data_dir() / "heart_disease") / HOSPITALS[name]
    if not path.is_file():
        raise FileNotFoundError(f"heart-disease data not found: {path} (set RADFED_SHARED_DATA)")
    frame = pd.read_csv(path, header=None, names=COLUMNS, na_values=["NA", "?"])
    frame.insert(0, "patient_id", [f"{name}-{i + 1:03d}" for i in range(len(frame))])
    frame[OUTCOME] = (frame.pop("num") > 0).astype(int)
    # A serum cholesterol of 0 is UCI's code for "not measured" (172 rows, mostly Zurich/Basel).
    frame.loc[frame["chol"] == 0, "chol"] = np.nan
    return frame


def write_sites(
    out: str | Path, source: Path | None = None, hospitals: tuple[str, ...] = tuple(HOSPITALS)
) -> list[Path]:
    """Write one ``features.csv`` site folder per hospital under ``out``."""
    out = Path(out)
    folders = []
    for name in hospitals:
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        read_hospital(name, source).to_csv(folder / "features.csv", index=False, na_rep="NA")
        folders.append(folder)
    return folders


def write_study(out: str | Path, source: Path | None = None) -> Path:
    """Write the four hospitals and the packaged heart-disease study file under ``out``."""
    out = Path(out)
    write_sites(out / "sites", source)
    study = out / "study.toml"
    study.write_text(STUDY_FILE.read_text())
    return study


STUDY_FILE = Path(__file__).parent / "studies" / "heart_disease.toml"
