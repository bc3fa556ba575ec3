"""Reading and validating a site's ``manifest.csv``.

A site folder holds one ``manifest.csv`` with one row per patient::

    patient_id,image,mask,outcome,age
    A001,images/A001.nii.gz,masks/A001.nii.gz,1,63
    A002,images/A002.nii.gz,masks/A002.nii.gz,0,57

``image`` and ``mask`` are paths relative to the site folder (absolute paths are allowed).
``image`` may be a folder holding a DICOM series. Optional columns: ``series_uid`` (the
series of an image folder holding several), ``label`` (a whole number: the label of a
label map, or the segment number of a DICOM-SEG), ``roi`` (an RTSTRUCT ROI, DICOM-SEG
segment or Slicer segment name), and ``mask_reader2`` / ``mask_repeat`` (a second
reader's mask and the same reader's repeat, may be empty; they use the same ``label`` /
``roi``). See :mod:`radfed.client.masks` for the accepted masks.
The file may be comma- or semicolon-separated (spreadsheet exports in many European locales
use ``;``); a UTF-8 byte-order mark is ignored.

A problem with the file as a whole (missing file, missing column) raises
:class:`~radfed.shared.errors.SiteDataError`. A problem with a single row keeps that row
out of the analysis and is reported as a :class:`RowProblem` naming the line, the patient
and the file concerned; a row with several problems gets one ``RowProblem`` per problem.
Nothing is dropped silently.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from radfed.shared.errors import SiteDataError

MANIFEST_NAME = "manifest.csv"
#: Optional mask columns for reproducibility: a second reader, and the first reader again.
READER_COLUMNS = ("mask_reader2", "mask_repeat")

# Cell values read as "missing" in the outcome and numeric columns.
MISSING_TOKENS = frozenset({"", "na", "n/a", "nan", "null", "none", "?", ".", "-"})


@dataclass(frozen=True)
class RowProblem:
    """One bad manifest row (or one bad case), kept out of the analysis with its reason.

    Attributes
    ----------
    row : int
        Line number in ``manifest.csv`` (header = line 1, first data row = line 2).
    patient_id : str or None
        The row's patient identifier, ``None`` when it is empty.
    file : str
        The file concerned: ``manifest.csv`` itself, or the image/mask path as written
        in the manifest.
    reason : str
        Human-readable reason, e.g. ``"mask is empty (no voxel with label 1)"``.
    """

    row: int
    patient_id: str | None
    file: str
    reason: str

    def __str__(self) -> str:
        who = f" (patient {self.patient_id})" if self.patient_id else ""
        where = "" if self.file == MANIFEST_NAME else f"{self.file}: "
        return f"{MANIFEST_NAME} line {self.row}{who}: {where}{self.reason}"


@dataclass
class Manifest:
    """A site's manifest after validation.

    Attributes
    ----------
    site_dir : Path
        Absolute path of the site folder.
    rows : pandas.DataFrame
        The valid rows; index ``patient_id`` (str); the file's columns (outcome as int,
        numeric columns as float64, the rest as str) plus ``line`` (int) and, when images
        are required, absolute paths in ``image_path`` and ``mask_path``.
    problems : list of RowProblem
        Every problem found, in line order.
    """

    site_dir: Path
    rows: pd.DataFrame
    problems: list[RowProblem]


def read_manifest(
    site_dir: str | Path,
    outcome: str | None = None,
    numeric: Sequence[str] = (),
    require_images: bool = True,
) -> Manifest:
    """Read and validate ``SITE_DIR/manifest.csv``.

    Parameters
    ----------
    site_dir : str or Path
        The site folder.
    outcome : str, optional
        Name of the binary outcome column. Only ``0`` and ``1`` are accepted (numeric
        spellings such as ``1.0`` too); ``yes``/``no`` or ``true``/``false`` are reported
        as problems rather than guessed.
    numeric : sequence of str
        Columns that must hold a finite number in every row (decimal point, not comma).
    require_images : bool
        Require ``image`` and ``mask`` columns whose files exist.

    Returns
    -------
    Manifest
        Valid rows and the problems of the others.

    Raises
    ------
    SiteDataError
        The folder or manifest is missing or unreadable, has no data row, or lacks a
        required column.
    """
    site = Path(site_dir).expanduser().resolve()
    header, records = _read_records(site)
    required = ["patient_id"]
    if require_images:
        required += ["image", "mask"]
    if outcome is not None:
        required.append(outcome)
    required += [c for c in numeric if c not in required]
    _check_columns(header, required)

    problems: list[RowProblem] = []
    good: list[dict] = []
    for line, cells in records:
        if len(cells) > len(header) and not any(c.strip() for c in cells[len(header) :]):
            cells = cells[: len(header)]  # trailing separators, as spreadsheets write them
        if len(cells) != len(header):
            problems.append(_problem(line, cells, header, _field_count_reason(cells, header)))
            continue
        record = dict(zip(header, (c.strip() for c in cells), strict=True))
        row_problems = _check_row(site, line, record, outcome, numeric, require_images)
        problems.extend(row_problems)
        if not row_problems:
            good.append(record | {"line": line})

    problems.extend(_duplicate_problems(records, header))
    duplicated = {p.patient_id for p in problems if p.reason.startswith("patient_id is duplicated")}
    good = [r for r in good if r["patient_id"] not in duplicated]
    problems.sort(key=lambda p: p.row)
    rows = _to_frame(site, good, header, outcome, numeric, require_images)
    return Manifest(site, rows, problems)


def _read_records(site: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Return the stripped header and ``(line number, cells)`` of every non-blank row."""
    if not site.is_dir():
        raise SiteDataError(f"site folder {site} does not exist or is not a folder")
    path = site / MANIFEST_NAME
    if not path.is_file():
        raise SiteDataError(
            f"no {MANIFEST_NAME} in site folder {site}: it must contain {MANIFEST_NAME} with "
            "one row per patient and the columns patient_id, image, mask (paths relative to "
            "the folder) plus the study's outcome and clinical variables"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SiteDataError(f"cannot read {path}: {exc}") from exc

    first = text.split("\n", 1)[0]
    delimiter = ";" if first.count(";") > first.count(",") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    records: list[tuple[int, list[str]]] = []
    try:
        start = 1
        for cells in reader:
            if any(c.strip() for c in cells):  # blank lines are layout, not rows
                if header is None:
                    header = [c.strip() for c in cells]
                else:
                    records.append((start, cells))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise SiteDataError(
            f"{path} is not a valid CSV file (line {reader.line_num}): {exc}"
        ) from exc

    if header is None:
        raise SiteDataError(f"{path} is empty: it needs a header line and one row per patient")
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise SiteDataError(f"{path}: column(s) {', '.join(dupes)} appear more than once")
    if not records:
        raise SiteDataError(f"{path} has a header but no patient rows")
    return header, records


def _check_columns(header: Sequence[str], required: Iterable[str]) -> None:
    missing = [c for c in required if c not in header]
    if missing:
        raise SiteDataError(
            f"{MANIFEST_NAME} lacks column(s) {', '.join(missing)}; "
            f"available columns: {', '.join(header)}"
        )


def _problem(line: int, cells: Sequence[str], header: Sequence[str], reason: str) -> RowProblem:
    pid = (
        cells[header.index("patient_id")].strip() if len(cells) > header.index("patient_id") else ""
    )
    return RowProblem(line, pid or None, MANIFEST_NAME, reason)


def _field_count_reason(cells: Sequence[str], header: Sequence[str]) -> str:
    return f"row has {len(cells)} fields but the header has {len(header)}"


def _check_row(
    site: Path,
    line: int,
    record: dict[str, str],
    outcome: str | None,
    numeric: Sequence[str],
    require_images: bool,
) -> list[RowProblem]:
    """Return every problem of one row (empty list for a good row)."""
    pid = record["patient_id"] or None
    found: list[RowProblem] = []

    def add(reason: str, file: str = MANIFEST_NAME) -> None:
        found.append(RowProblem(line, pid, file, reason))

    if pid is None:
        add("patient_id is empty")
    if require_images:
        for column in ("image", "mask"):
            text = record[column]
            reason = (
                _file_reason(site, text, folder_ok=column == "image")
                if text
                else f"{column} path is empty"
            )
            if reason:
                add(reason, text or MANIFEST_NAME)
        for column in READER_COLUMNS:
            text = record.get(column, "")
            reason = _file_reason(site, text) if text else None
            if reason:
                add(f"{column}: {reason}", text)
        label = record.get("label", "")
        if label and not re.fullmatch(r"\d+", label):
            add(f"label must be a whole number (a label value or segment number), got '{label}'")
    if outcome is not None:
        reason = _outcome_reason(record[outcome], outcome)
        if reason:
            add(reason)
    for column in numeric:
        if column != outcome:
            reason = _numeric_reason(record[column], column)
            if reason:
                add(reason)
    return found


def resolve_path(site: Path, text: str) -> Path:
    """Resolve a manifest path: relative to the site folder unless absolute."""
    path = Path(text).expanduser()
    return path if path.is_absolute() else site / path


def _file_reason(site: Path, text: str, folder_ok: bool = False) -> str | None:
    path = resolve_path(site, text)
    try:
        if not path.exists():
            return "file not found"
    except OSError as exc:  # a name too long for the file system, a permission
        return f"cannot check the file: {exc.strerror or exc}"
    if folder_ok and path.is_dir():
        return None
    if not path.is_file():
        return "not a file (a folder?)"
    return None


def _outcome_reason(text: str, column: str) -> str | None:
    if text.lower() in MISSING_TOKENS:
        return f"outcome '{column}' is missing"
    value = _parse_number(text)
    if value not in (0.0, 1.0):
        return f"outcome '{column}' must be 0 or 1, got '{text}'"
    return None


def _numeric_reason(text: str, column: str) -> str | None:
    if text.lower() in MISSING_TOKENS:
        return f"'{column}' is missing"
    if _parse_number(text) is None:
        hint = " (use a decimal point)" if _parse_number(text.replace(",", ".")) is not None else ""
        return f"'{column}' is not a number: '{text}'{hint}"
    return None


def _parse_number(text: str) -> float | None:
    """Return the finite float written in ``text``, or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _duplicate_problems(
    records: Sequence[tuple[int, list[str]]], header: Sequence[str]
) -> list[RowProblem]:
    """One problem per occurrence of a patient_id used more than once.

    Every occurrence is excluded: nothing tells which of the rows is the right one.
    """
    col = header.index("patient_id")
    lines: dict[str, list[int]] = {}
    for line, cells in records:
        pid = cells[col].strip() if len(cells) > col else ""
        if pid:
            lines.setdefault(pid, []).append(line)
    problems = []
    for pid, where in lines.items():
        for line in where if len(where) > 1 else ():
            others = ", ".join(str(o) for o in where if o != line)
            problems.append(
                RowProblem(
                    line, pid, MANIFEST_NAME, f"patient_id is duplicated (also on line {others})"
                )
            )
    return problems


def _to_frame(
    site: Path,
    good: list[dict],
    header: Sequence[str],
    outcome: str | None,
    numeric: Sequence[str],
    require_images: bool,
) -> pd.DataFrame:
    """Build the valid-rows table with typed columns and absolute paths."""
    frame = pd.DataFrame(good, columns=[*header, "line"]).astype({c: str for c in header})
    frame["line"] = frame["line"].astype(int)
    for column in numeric:
        frame[column] = frame[column].astype(float)
    if outcome is not None:
        frame[outcome] = frame[outcome].astype(float).astype(int)
    if require_images:
        for column in ("image", "mask"):
            frame[f"{column}_path"] = [str(resolve_path(site, t).resolve()) for t in frame[column]]
        for column in READER_COLUMNS:
            if column in frame.columns:
                frame[f"{column}_path"] = [
                    str(resolve_path(site, t).resolve()) if t else "" for t in frame[column]
                ]
    return frame.set_index("patient_id", drop=True)
