"""``radfed validate SITE_DIR [--study FILE]``: every problem of a site's data, at the site.

The check a hospital runs before joining a study (patient ids never leave it): the site
table (``manifest.csv`` with images, or ``features.csv`` / ``features.parquet``) is read
row by row and every problem is listed with its file, line and reason, **one line per
patient listing all of its reasons**. The totals add up to the file: rows = kept +
excluded, each excluded patient counted once, and every reason counted (a patient with
three problems adds one to each of three reasons).

Without a study file only what every table needs is checked (patient ids, files named
by the manifest). With ``--study``, the study's outcome (0/1), clinical variables, ComBat
covariates, batch and categorical columns and, for a feature table, the features (names
or glob patterns) are checked too. Problems of a whole column are reported once:
a text column a feature pattern such as ``"*"`` matches (named, and left out of the
features), decimal commas, a semicolon-separated file.

Images themselves (empty masks, geometry) are checked when features are extracted
(``radfed extract`` lists those per case).
"""

from __future__ import annotations

import csv
import fnmatch
import io
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from radfed.client.data import FEATURE_FILES, MANIFEST, TableSpec, text_columns
from radfed.client.manifest import MISSING_TOKENS, RowProblem, _numeric_reason, read_manifest
from radfed.shared.config import SITE_BATCH, StudyConfig
from radfed.shared.errors import SiteDataError


@dataclass
class PatientProblems:
    """Every reason one row (patient) is kept out, in the order found."""

    row: int
    patient_id: str | None
    file: str
    reasons: list[str] = field(default_factory=list)
    #: Each reason without the row's own values or file names (for the counts).
    kinds: list[str] = field(default_factory=list)

    def add(self, reason: str, kind: str | None = None) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)
            self.kinds.append(reason_kind(kind or reason))

    def __str__(self) -> str:
        who = f" (patient {self.patient_id})" if self.patient_id else ""
        return f"{self.file} line {self.row}{who}: " + "; ".join(self.reasons)


@dataclass
class SiteValidation:
    """What ``radfed validate`` found at one site.

    Attributes
    ----------
    site_dir : Path
    file : str
        The table checked (``manifest.csv``, ``features.csv`` or ``features.parquet``).
    n_rows : int
        Patient rows in the file (blank lines are not rows).
    kept : list of str
        Patient ids kept for the analysis.
    excluded : list of PatientProblems
        One entry per excluded row, with all of its reasons.
    column_notes : list of str
        Problems of whole columns (reported once, not per patient).
    """

    site_dir: Path
    file: str
    n_rows: int
    kept: list[str]
    excluded: list[PatientProblems]
    column_notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.excluded and not self.column_notes

    def reason_counts(self) -> Counter[str]:
        """Patients per kind of reason (values left out, so alike reasons group)."""
        counts: Counter[str] = Counter()
        for patient in self.excluded:
            counts.update(dict.fromkeys(patient.kinds, 1))
        return counts

    def summary(self) -> str:
        """The totals: rows = kept + excluded, then every reason with its count."""
        assert len(self.kept) + len(self.excluded) == self.n_rows, "totals must add up"
        lines = [
            f"{self.file}: {self.n_rows} rows: {len(self.kept)} kept, {len(self.excluded)} excluded"
        ]
        counts = self.reason_counts()
        if counts:
            several = sum(1 for p in self.excluded if len(p.reasons) > 1)
            note = f" ({several} with several reasons, counted under each)" if several else ""
            lines.append(f"excluded patients per reason{note}:")
            width = len(str(max(counts.values())))
            lines += [f"  {n:>{width}}  {kind}" for kind, n in counts.most_common()]
        return "\n".join(lines)

    def report(self) -> str:
        """The full report: column problems, one line per excluded patient, totals."""
        lines = [f"site folder {self.site_dir}"]
        lines += [f"column problem: {note}" for note in self.column_notes]
        lines += [str(p) for p in self.excluded]
        lines.append(self.summary())
        return "\n".join(lines)


_VALUE_TAIL = re.compile(r"(, got .*|: '.*'.*| \(also on line .*\)| \(use a decimal point\))$")


def reason_kind(reason: str) -> str:
    """A reason without the row's own value: ``"'age' is not a number: '6,5'"`` ->
    ``"'age' is not a number"``; ``"patient_id is duplicated (also on line 4)"`` ->
    ``"patient_id is duplicated"``."""
    return _VALUE_TAIL.sub("", reason)


def study_spec(config: StudyConfig) -> TableSpec:
    """The columns a study needs from a site table (as the site derives them)."""
    h = config.harmonization
    labels = ([] if h.batch == SITE_BATCH else [h.batch]) + list(h.categorical)
    labels += list(config.clinical_categorical)
    return TableSpec(
        outcome=config.outcome,
        clinical=tuple(config.clinical),
        features=tuple(config.features),
        numeric=tuple(c for c in h.covariates if c not in h.categorical),
        labels=tuple(dict.fromkeys(labels)),
        categorical=tuple(config.clinical_categorical),
    )


def validate_site(site_dir: str | Path, config: StudyConfig | None = None) -> SiteValidation:
    """Check a site folder (for a study, when ``config`` is given).

    Raises
    ------
    SiteDataError
        The folder or its table cannot be read at all, or lacks a column the study needs.
    """
    site = Path(site_dir).expanduser().resolve()
    if not site.is_dir():
        raise SiteDataError(f"site folder {site} does not exist or is not a folder")
    spec = study_spec(config) if config is not None else None
    if (site / MANIFEST).is_file():
        return _validate_manifest(site, spec)
    path = next((site / f for f in FEATURE_FILES if (site / f).is_file()), None)
    if path is None:
        raise SiteDataError(
            f"{site}: no {MANIFEST} (images) and no {' or '.join(FEATURE_FILES)} (features)"
        )
    return _validate_features(site, path, spec)


# --------------------------------------------------------------------- manifest.csv


def _count_manifest_rows(site: Path) -> int:
    text = (site / MANIFEST).read_text(encoding="utf-8-sig")
    first = text.split("\n", 1)[0]
    delimiter = ";" if first.count(";") > first.count(",") else ","
    rows = [r for r in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)]
    return sum(1 for r in rows if any(c.strip() for c in r)) - 1  # minus the header


def _validate_manifest(site: Path, spec: TableSpec | None) -> SiteValidation:
    numeric = spec.numeric_columns[1:] if spec else []
    manifest = read_manifest(site, outcome=spec.outcome if spec else None, numeric=numeric)
    problems = list(manifest.problems)
    rows = manifest.rows
    notes: list[str] = []
    if spec is not None:
        for column in [c for c in spec.labels if c not in rows.columns]:
            notes.append(
                f"no column '{column}' in {MANIFEST} (the study's ComBat batch or a categorical "
                "covariate): it must then come from the images' DICOM headers"
            )
        for column in [c for c in spec.labels if c in rows.columns]:
            empty = rows[column].astype(str).str.strip().str.lower().isin(MISSING_TOKENS)
            problems += [
                RowProblem(int(rows.at[pid, "line"]), str(pid), MANIFEST, f"'{column}' is missing")
                for pid in rows.index[empty.to_numpy()]
            ]
    excluded = _group(problems)
    lines = {p.row for p in excluded}
    kept = [
        str(pid) for pid, line in zip(rows.index, rows["line"], strict=True) if line not in lines
    ]
    n_rows = _count_manifest_rows(site)
    return SiteValidation(site, MANIFEST, n_rows, kept, excluded, notes)


def reason_counts(problems: list[RowProblem]) -> Counter[str]:
    """Patients per kind of reason (values left out), each patient once per reason."""
    counts: Counter[str] = Counter()
    for patient in _group(problems):
        counts.update(dict.fromkeys(patient.kinds, 1))
    return counts


def _group(problems: list[RowProblem]) -> list[PatientProblems]:
    """One entry per row, all of its reasons (a file's name prefixed when not the table)."""
    by_row: dict[int, PatientProblems] = {}
    for p in sorted(problems, key=lambda p: p.row):
        entry = by_row.setdefault(p.row, PatientProblems(p.row, p.patient_id, MANIFEST))
        entry.add(p.reason if p.file == MANIFEST else f"{p.file}: {p.reason}", p.reason)
    return list(by_row.values())


# ------------------------------------------------------------- features.csv / .parquet


def _read_table(path: Path) -> pd.DataFrame:
    """The table as text cells (what was written), ``patient_id`` first."""
    if path.suffix == ".parquet":
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # any reader error: the file as a whole is unusable
            raise SiteDataError(f"cannot read {path}: {exc}") from exc
        if "patient_id" not in frame.columns and frame.index.name == "patient_id":
            frame = frame.reset_index()
        return frame
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SiteDataError(f"cannot read {path}: {exc}") from exc
    first = text.split("\n", 1)[0]
    if first.count(";") > first.count(","):
        raise SiteDataError(
            f"{path} is separated by ';' (a spreadsheet export?): save it comma-separated, "
            "with decimal points"
        )
    try:
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, ValueError) as exc:
        raise SiteDataError(f"{path} is not a valid CSV file: {exc}") from exc


def _number(value: object) -> float | None:
    """The finite number a cell holds, or None (missing, text, infinite)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value) if math.isfinite(value) else None
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _cell_reason(value: object, column: str) -> str | None:
    """Why a cell of a numeric column is unusable (None when it is a number)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"'{column}' is missing"
    if isinstance(value, (int, float)) and math.isfinite(value):
        return None
    # The manifest reader's rule, so validate and the site agree on every cell.
    return _numeric_reason(str(value).strip(), column)


def _decimal_commas(values: pd.Series) -> bool:
    return any(
        _number(v) is None and _number(str(v).replace(",", ".")) is not None
        for v in values
        if isinstance(v, str)
    )


def _validate_features(site: Path, path: Path, spec: TableSpec | None) -> SiteValidation:
    frame = _read_table(path)
    file = path.name
    if "patient_id" not in frame.columns:
        raise SiteDataError(f"{path}: no 'patient_id' column (columns: {list(frame.columns)[:10]})")
    notes: list[str] = []
    numeric: list[str] = []
    labels: list[str] = []
    features: list[str] = []
    if spec is not None:
        needed = [*spec.numeric_columns, *spec.labels]
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise SiteDataError(f"{path}: missing column(s) {missing}")
        numeric, labels = spec.numeric_columns, list(spec.labels)
        features, notes = _resolve_features(frame, spec, set(needed), file)
    for column in [*numeric, *features]:
        if _decimal_commas(frame[column]):
            notes.append(f"'{column}' is written with decimal commas: use decimal points")

    ids = frame["patient_id"].map(lambda v: "" if v is None else str(v).strip())
    seen = Counter(i for i in ids if i)
    excluded: list[PatientProblems] = []
    kept: list[str] = []
    for i, pid in enumerate(ids):
        line = i + 2  # header = line 1
        reasons = []
        if not pid:
            reasons.append("patient_id is empty")
        elif seen[pid] > 1:
            reasons.append("patient_id is duplicated")
        if spec is not None:
            value = frame.at[frame.index[i], spec.outcome]
            reason = _cell_reason(value, spec.outcome)
            if reason is None and _number(value) not in (0.0, 1.0):
                reason = f"outcome '{spec.outcome}' must be 0 or 1, got '{value}'"
            elif reason is not None:
                reason = reason.replace(f"'{spec.outcome}'", f"outcome '{spec.outcome}'", 1)
            reasons += [reason] if reason else []
            for column in [*numeric[1:], *features]:
                reason = _cell_reason(frame.at[frame.index[i], column], column)
                reasons += [reason] if reason else []
            for column in labels:
                value = frame.at[frame.index[i], column]
                if value is None or str(value).strip().lower() in MISSING_TOKENS:
                    reasons.append(f"'{column}' is missing")
        if reasons:
            entry = PatientProblems(line, pid or None, file)
            for reason in reasons:
                entry.add(reason)
            excluded.append(entry)
        else:
            kept.append(pid)
    return SiteValidation(site, file, len(frame), kept, excluded, notes)


def _resolve_features(
    frame: pd.DataFrame, spec: TableSpec, not_features: set[str], file: str
) -> tuple[list[str], list[str]]:
    """Expand the study's feature names and patterns as the site does: a text column a
    pattern matches is named in a note and not used; one named as a feature is an error."""
    available = [c for c in frame.columns if c not in not_features | {"patient_id", "line"}]
    text = set(text_columns(frame, available))
    named = [c for c in spec.features if c in text]
    if named:
        raise SiteDataError(f"{file}: feature(s) {named} hold text, not numbers")
    chosen: list[str] = []
    notes: list[str] = []
    noted: set[str] = set()
    for pattern in spec.features:
        matches = [c for c in available if fnmatch.fnmatchcase(c, pattern)]
        if not matches:
            raise SiteDataError(
                f"feature {pattern!r} matches none of the site's {len(available)} columns"
            )
        for column in matches:
            if column in chosen or column in noted:
                continue
            if column in text:
                noted.add(column)
                example = next(
                    str(v) for v in frame[column] if str(v).strip().lower() not in MISSING_TOKENS
                )
                notes.append(
                    f"column '{column}' holds text, not numbers (e.g. '{example}'): it matches "
                    f"the feature pattern {pattern!r} but is not used as a feature"
                )
            else:
                chosen.append(column)
    return chosen, notes
