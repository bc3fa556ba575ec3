"""A site's analysis table: outcome, clinical variables and radiomics features per patient.

A site folder holds either

- ``manifest.csv`` with images and masks: features are extracted with pyradiomics
  (served from the cache when already computed), then joined to the manifest's outcome
  and clinical columns; or
- ``features.csv`` (or ``features.parquet``) of already extracted features, with a
  ``patient_id`` column, the outcome and the clinical columns.

Missing-value rule: a patient with a missing or non-numeric value in any variable the
study uses (outcome, clinical variables, selected features) is kept out of the analysis
and reported with its reason. Nothing is imputed and nothing is dropped silently.
"""

from __future__ import annotations

import fnmatch
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from radfed.client.manifest import MISSING_TOKENS, RowProblem, read_manifest
from radfed.shared.errors import SiteDataError

log = logging.getLogger(__name__)

FEATURE_FILES = ("features.parquet", "features.csv")
MANIFEST = "manifest.csv"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class TableSpec:
    """Which columns a study needs from a site table.

    ``features`` are names or glob patterns; ``numeric`` other numeric columns (for
    example ComBat covariates that are not clinical variables); ``labels`` text columns
    (a batch column, categorical covariates, categorical clinical variables), kept as
    strings; ``categorical`` the clinical variables read as labels, not numbers.
    """

    outcome: str
    clinical: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    numeric: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()

    @property
    def numeric_columns(self) -> list[str]:
        """Outcome, numeric clinical and extra numeric columns, each once, in order."""
        clinical = [c for c in self.clinical if c not in self.categorical]
        return list(dict.fromkeys([self.outcome, *clinical, *self.numeric]))


@dataclass
class SiteTable:
    """The rows a site analyses, with what it kept out and how features were made."""

    frame: pd.DataFrame  # index patient_id; outcome, clinical, extra numeric and features: float
    outcome: str
    clinical: list[str]
    features: list[str]
    labels: pd.DataFrame = field(default_factory=pd.DataFrame)  # text columns (batch, categories)
    problems: list[RowProblem] = field(default_factory=list)
    settings_hash: str = UNKNOWN
    pyradiomics_version: str = UNKNOWN
    # Features on the other masks of a case (second reader, repeat), by manifest column:
    # the study's features of the kept patients that have that mask.
    readers: dict[str, pd.DataFrame] = field(default_factory=dict)

    @property
    def y(self) -> np.ndarray:
        return self.frame[self.outcome].to_numpy(dtype=float)

    def matrix(self, columns: list[str]) -> np.ndarray:
        missing = [c for c in columns if c not in self.frame.columns]
        if missing:
            raise SiteDataError(f"the site has no column(s) {missing}")
        return self.frame[columns].to_numpy(dtype=float)


def resolve_features(patterns: list[str], available: list[str]) -> list[str]:
    """Expand feature names and glob patterns against the available features, in order.

    Raises
    ------
    SiteDataError
        When a name or pattern matches no available feature.
    """
    chosen: list[str] = []
    for pattern in patterns:
        matches = [f for f in available if fnmatch.fnmatchcase(f, pattern)]
        if not matches:
            raise SiteDataError(
                f"feature {pattern!r} matches none of the site's {len(available)} features"
            )
        chosen.extend(m for m in matches if m not in chosen)
    return chosen


def _numeric_column(frame: pd.DataFrame, column: str) -> pd.Series:
    return pd.to_numeric(frame[column], errors="coerce")


def _keep_complete(
    frame: pd.DataFrame, columns: list[str], lines: pd.Series, file: str
) -> tuple[pd.DataFrame, list[RowProblem]]:
    """Keep rows with every column numeric and finite; report the others."""
    numeric = frame[columns].apply(pd.to_numeric, errors="coerce").astype(float)
    bad = ~np.isfinite(numeric.to_numpy()).all(axis=1)
    problems = []
    for pid in frame.index[bad]:
        row = numeric.loc[pid]
        missing = [c for c in columns if not np.isfinite(row[c])]
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        problems.append(
            RowProblem(
                int(lines.loc[pid]), str(pid), file, f"missing or non-numeric value in {shown}"
            )
        )
    return numeric.loc[~bad], problems


def _check_outcome(
    frame: pd.DataFrame, outcome: str, lines: pd.Series, file: str
) -> list[RowProblem]:
    values = _numeric_column(frame, outcome)
    bad = values.notna() & ~values.isin([0, 1])
    return [
        RowProblem(
            int(lines.loc[pid]),
            str(pid),
            file,
            f"outcome {outcome!r} must be 0 or 1, got {frame.at[pid, outcome]!r}",
        )
        for pid in frame.index[bad]
    ]


MISSING = ["", "NA", "N/A", "NaN", "nan", "?"]


def _read_feature_file(path: Path) -> pd.DataFrame:
    try:
        frame = _read_frame(path)
    except (OSError, ValueError) as exc:  # pandas/pyarrow parser errors, bad encodings
        raise SiteDataError(f"cannot read {path}: {' '.join(str(exc).split())}") from exc
    if "patient_id" not in frame.columns:
        if frame.index.name == "patient_id":
            frame = frame.reset_index()
        else:
            raise SiteDataError(
                f"{path}: no 'patient_id' column (columns: {list(frame.columns)[:10]}...)"
            )
    frame["patient_id"] = frame["patient_id"].astype(str)
    # Line numbers of the file, for messages (header = line 1).
    frame["line"] = np.arange(2, len(frame) + 2)
    dup = frame["patient_id"].duplicated(keep=False)
    if dup.any():
        raise SiteDataError(
            f"{path}: duplicated patient_id(s) {sorted(set(frame.loc[dup, 'patient_id']))[:5]}"
        )
    return frame.set_index("patient_id")


def _read_frame(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    # Missing-value markers apply to data columns only: a patient called "NA" stays
    # "NA"; floats are read exactly as written.
    header = pd.read_csv(path, nrows=0).columns
    return pd.read_csv(
        path,
        dtype={"patient_id": str},
        keep_default_na=False,
        na_values={c: MISSING for c in header if c != "patient_id"},
        float_precision="round_trip",
    )


def load_feature_site(site_dir: Path, spec: TableSpec) -> SiteTable:
    """Load a site that ships a feature table instead of images."""
    path = next((site_dir / f for f in FEATURE_FILES if (site_dir / f).is_file()), None)
    if path is None:
        raise SiteDataError(f"{site_dir}: no {MANIFEST} and no {' or '.join(FEATURE_FILES)}")
    frame = _read_feature_file(path)
    missing = [c for c in [*spec.numeric_columns, *spec.labels] if c not in frame.columns]
    if missing:
        raise SiteDataError(f"{path}: missing column(s) {missing}")
    non_feature = {"line", *spec.numeric_columns, *spec.labels}
    available = [c for c in frame.columns if c not in non_feature]
    text = text_columns(frame, available)
    if text:
        # A text column (a scanner name, a note) is no feature: one a pattern such as
        # "*" matches is left out and said; one named as a feature is an error.
        named = [c for c in spec.features if c in text]
        if named:
            raise SiteDataError(f"{path.name}: feature(s) {named} hold text, not numbers")
        log.warning(
            "%s: column(s) %s hold text, not numbers: not used as features", path.name, text
        )
    chosen = resolve_features(list(spec.features), [c for c in available if c not in text])
    return _assemble(frame, frame["line"], path.name, spec, chosen, [], _sidecar(path))


def text_columns(frame: pd.DataFrame, columns: list[str]) -> list[str]:
    """Columns none of whose present values is a number, even read with a decimal comma
    (a column with no value at all is not text: its patients are reported as missing)."""
    out = []
    for column in columns:
        values = frame[column]
        if pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
            continue
        present = values.dropna().astype(str).str.strip()
        present = present[~present.str.lower().isin(MISSING_TOKENS)]
        numbers = pd.to_numeric(present.str.replace(",", ".", regex=False), errors="coerce")
        if len(present) and numbers.isna().all():
            out.append(column)
    return out


def _sidecar(path: Path) -> dict:
    """The extraction metadata ``radfed extract`` writes beside a table ({} if none)."""
    meta = Path(f"{path}.meta.json")
    return json.loads(meta.read_text()) if meta.is_file() else {}


def canonical_text(column: pd.Series) -> pd.Series:
    """Labels as text that is the same at every site: numeric codes are written
    without a trailing ``.0`` (a column read as float at one site and as int at another
    must give the same levels)."""
    numbers = pd.to_numeric(column, errors="coerce")
    if numbers.notna().sum() == column.notna().sum():
        return numbers.map(lambda v: pd.NA if pd.isna(v) else f"{v:g}").astype("string")
    return column.astype("string")


def _labels(frame: pd.DataFrame, columns: tuple[str, ...], lines: pd.Series, file: str):
    """Text columns as strings; rows with a missing label are reported."""
    text = frame[list(columns)].apply(canonical_text)
    bad = text.isna().any(axis=1) | (text.apply(lambda c: c.str.strip()) == "").any(axis=1)
    problems = [
        RowProblem(int(lines.loc[pid]), str(pid), file, f"missing value in {list(columns)}")
        for pid in frame.index[bad.to_numpy()]
    ]
    return text.loc[~bad.to_numpy()].astype(str), problems


def _assemble(
    frame: pd.DataFrame,
    lines: pd.Series,
    file: str,
    spec: TableSpec,
    features: list[str],
    problems: list[RowProblem],
    meta: dict,
) -> SiteTable:
    problems = list(problems)
    bad_outcome = _check_outcome(frame, spec.outcome, lines, file)
    problems += bad_outcome
    frame = frame.drop(index=[p.patient_id for p in bad_outcome])
    labels, unlabelled = _labels(frame, spec.labels, lines, file)
    problems += unlabelled
    frame = frame.loc[labels.index]
    kept, incomplete = _keep_complete(frame, [*spec.numeric_columns, *features], lines, file)
    problems += incomplete
    return SiteTable(
        frame=kept,
        outcome=spec.outcome,
        clinical=list(spec.clinical),
        features=features,
        labels=labels.loc[kept.index],
        problems=problems,
        settings_hash=meta.get("settings_hash", UNKNOWN),
        pyradiomics_version=meta.get("pyradiomics_version", UNKNOWN),
    )


def load_image_site(
    site_dir: Path,
    spec: TableSpec,
    params: str,
    cache_dir: Path | None,
    jobs: int,
    progress: bool,
) -> SiteTable:
    """Load a site with images: extract (or fetch from the cache), then join the manifest."""
    from radfed.client.extraction import extract_site, load_params

    outcome = spec.outcome
    manifest = read_manifest(site_dir, outcome=outcome, numeric=spec.numeric_columns[1:])
    result = extract_site(
        site_dir,
        load_params(params),
        jobs=jobs,
        cache_dir=cache_dir,
        progress=progress,
        outcome=outcome,
    )
    seen = {(p.row, p.file, p.reason) for p in manifest.problems}
    problems = manifest.problems + [
        p for p in result.problems if (p.row, p.file, p.reason) not in seen
    ]
    rows = manifest.rows.loc[manifest.rows.index.intersection(result.features.index)]
    # Scanner labels derived from DICOM headers; a manifest column of the same name wins.
    derived = [c for c in result.labels.columns if c not in rows.columns]
    if derived:
        rows = rows.join(result.labels[derived])
    missing = [c for c in spec.labels if c not in rows.columns]
    if missing:
        raise SiteDataError(f"{site_dir / MANIFEST}: missing column(s) {missing}")
    chosen = resolve_features(list(spec.features), list(result.features.columns))
    frame = rows[[*spec.numeric_columns, *spec.labels]].join(result.features[chosen])
    meta = {
        "settings_hash": result.settings_hash,
        "pyradiomics_version": result.pyradiomics_version,
    }
    table = _assemble(frame, rows["line"], MANIFEST, spec, chosen, problems, meta)
    table.readers = {
        role: readers.loc[readers.index.intersection(table.frame.index), chosen]
        for role, readers in result.readers.items()
    }
    return table


def load_site_table(
    site_dir: str | Path,
    spec: TableSpec,
    params: str = "default",
    cache_dir: Path | None = None,
    jobs: int = 1,
    progress: bool = False,
) -> SiteTable:
    """Load a site folder for a study (images + manifest, or a feature table)."""
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        raise SiteDataError(f"site folder not found: {site_dir}")
    if (site_dir / MANIFEST).is_file():
        return load_image_site(site_dir, spec, params, cache_dir, jobs, progress)
    return load_feature_site(site_dir, spec)
