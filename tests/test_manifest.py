"""Tests of reading and validating a site's manifest.csv."""

from __future__ import annotations

from pathlib import Path

import pytest

from radfed.client.manifest import MANIFEST_NAME, RowProblem, read_manifest
from radfed.shared.errors import SiteDataError


def _site(tmp_path: Path, text: str, files: tuple[str, ...] = ("a.nii.gz", "b.nii.gz")) -> Path:
    """A site folder with the given manifest text and (empty) image files."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name in files:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / MANIFEST_NAME).write_text(text, encoding="utf-8")
    return tmp_path


def _reasons(manifest) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for p in manifest.problems:
        found.setdefault(p.row, []).append(p.reason)
    return found


def test_good_manifest_types_and_paths(tmp_path):
    site = _site(
        tmp_path,
        "patient_id,image,mask,outcome,age,sex\n"
        "007,a.nii.gz,b.nii.gz,1,63.5,F\n"
        f"008,{tmp_path / 'a.nii.gz'},sub/b.nii.gz,0.0,57,M\n",
        files=("a.nii.gz", "b.nii.gz", "sub/b.nii.gz"),
    )
    m = read_manifest(site, outcome="outcome", numeric=["age"])
    assert m.problems == []
    assert list(m.rows.index) == ["007", "008"]  # ids stay strings: no "7"
    assert m.rows.index.name == "patient_id"
    assert m.rows["outcome"].tolist() == [1, 0]
    assert m.rows["outcome"].dtype.kind == "i"
    assert m.rows["age"].tolist() == [63.5, 57.0]
    assert m.rows["sex"].tolist() == ["F", "M"]
    assert m.rows["line"].tolist() == [2, 3]
    assert m.rows.loc["007", "image_path"] == str((tmp_path / "a.nii.gz").resolve())
    assert m.rows.loc["008", "mask_path"] == str((tmp_path / "sub/b.nii.gz").resolve())
    assert Path(m.rows.loc["008", "image_path"]).is_absolute()


def test_missing_site_folder_and_manifest(tmp_path):
    with pytest.raises(SiteDataError, match="does not exist"):
        read_manifest(tmp_path / "nowhere")
    with pytest.raises(SiteDataError) as info:
        read_manifest(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "manifest.csv" in message
    assert "patient_id" in message and "image" in message and "mask" in message


def test_empty_manifest_and_header_only(tmp_path):
    _site(tmp_path, "")
    with pytest.raises(SiteDataError, match="empty"):
        read_manifest(tmp_path)
    _site(tmp_path, "patient_id,image,mask\n")
    with pytest.raises(SiteDataError, match="no patient rows"):
        read_manifest(tmp_path)


def test_missing_column_lists_available_columns(tmp_path):
    site = _site(tmp_path, "patient_id,image,mask,age\nP1,a.nii.gz,b.nii.gz,50\n")
    with pytest.raises(SiteDataError) as info:
        read_manifest(site, outcome="relapse")
    assert "relapse" in str(info.value)
    assert "available columns: patient_id, image, mask, age" in str(info.value)
    with pytest.raises(SiteDataError, match="bmi"):
        read_manifest(site, numeric=["age", "bmi"])
    # without images, image/mask columns are not required
    site2 = _site(tmp_path / "t", "patient_id,age\nP1,50\n", files=())
    assert read_manifest(site2, numeric=["age"], require_images=False).rows["age"].iloc[0] == 50
    with pytest.raises(SiteDataError, match="image, mask"):
        read_manifest(site2)


def test_duplicated_and_empty_ids(tmp_path):
    site = _site(
        tmp_path,
        "patient_id,image,mask\n"
        "P1,a.nii.gz,b.nii.gz\n"
        "P2,a.nii.gz,b.nii.gz\n"
        "P1,a.nii.gz,b.nii.gz\n"
        " ,a.nii.gz,b.nii.gz\n",
    )
    m = read_manifest(site)
    assert list(m.rows.index) == ["P2"]  # both P1 rows are out: which one is right?
    reasons = _reasons(m)
    assert reasons[2] == ["patient_id is duplicated (also on line 4)"]
    assert reasons[4] == ["patient_id is duplicated (also on line 2)"]
    assert reasons[5] == ["patient_id is empty"]
    assert str(m.problems[-1]) == "manifest.csv line 5: patient_id is empty"


def test_missing_files_name_the_file(tmp_path):
    site = _site(
        tmp_path,
        "patient_id,image,mask\n"
        "A012,images/A012.nii.gz,b.nii.gz\n"
        "A013,a.nii.gz,\n"
        "A014,a.nii.gz,.\n",
    )
    m = read_manifest(site)
    assert m.rows.empty
    first, second, third = m.problems
    assert first == RowProblem(2, "A012", "images/A012.nii.gz", "file not found")
    assert str(first) == "manifest.csv line 2 (patient A012): images/A012.nii.gz: file not found"
    assert (second.row, second.file, second.reason) == (3, "manifest.csv", "mask path is empty")
    assert third.reason.startswith("not a file")


def test_non_numeric_clinical_value(tmp_path):
    site = _site(
        tmp_path,
        "patient_id,image,mask,age,bmi\n"
        "P1,a.nii.gz,b.nii.gz,abc,22\n"
        "P2,a.nii.gz,b.nii.gz,61,\n"
        'P3,a.nii.gz,b.nii.gz,"3,5",NA\n'
        "P4,a.nii.gz,b.nii.gz,inf,20\n"
        "P5,a.nii.gz,b.nii.gz,1e2,20.5\n",
    )
    m = read_manifest(site, numeric=["age", "bmi"])
    reasons = _reasons(m)
    assert reasons[2] == ["'age' is not a number: 'abc'"]
    assert reasons[3] == ["'bmi' is missing"]
    assert reasons[4] == ["'age' is not a number: '3,5' (use a decimal point)", "'bmi' is missing"]
    assert reasons[5] == ["'age' is not a number: 'inf'"]
    assert list(m.rows.index) == ["P5"]
    assert m.rows.loc["P5", "age"] == 100.0
    assert all(p.file == "manifest.csv" for p in m.problems)


def test_outcome_must_be_0_or_1(tmp_path):
    site = _site(
        tmp_path,
        "patient_id,image,mask,y\n"
        "P1,a.nii.gz,b.nii.gz,1\n"
        "P2,a.nii.gz,b.nii.gz,0\n"
        "P3,a.nii.gz,b.nii.gz,2\n"
        "P4,a.nii.gz,b.nii.gz,yes\n"
        "P5,a.nii.gz,b.nii.gz,\n"
        "P6,a.nii.gz,b.nii.gz,true\n"
        "P7,a.nii.gz,b.nii.gz,1.0\n",
    )
    m = read_manifest(site, outcome="y")
    reasons = _reasons(m)
    assert reasons == {
        4: ["outcome 'y' must be 0 or 1, got '2'"],
        5: ["outcome 'y' must be 0 or 1, got 'yes'"],
        6: ["outcome 'y' is missing"],
        7: ["outcome 'y' must be 0 or 1, got 'true'"],
    }
    assert m.rows["y"].to_dict() == {"P1": 1, "P2": 0, "P7": 1}


def test_one_row_with_several_problems_reports_each(tmp_path):
    site = _site(tmp_path, "patient_id,image,mask,y,age\nP1,nope.nii.gz,gone.nii.gz,,x\n")
    m = read_manifest(site, outcome="y", numeric=["age"])
    assert [(p.file, p.reason) for p in m.problems] == [
        ("nope.nii.gz", "file not found"),
        ("gone.nii.gz", "file not found"),
        ("manifest.csv", "outcome 'y' is missing"),
        ("manifest.csv", "'age' is not a number: 'x'"),
    ]
    assert {p.row for p in m.problems} == {2}


def test_semicolons_bom_blank_lines_and_field_counts(tmp_path):
    site = _site(
        tmp_path,
        "\ufeffpatient_id;image;mask;age\n"
        "P1;a.nii.gz;b.nii.gz;50\n"
        "\n"
        "P2;a.nii.gz;b.nii.gz;51;\n"  # trailing separator from a spreadsheet
        "P3;a.nii.gz;b.nii.gz\n",
    )
    m = read_manifest(site, numeric=["age"])
    assert list(m.rows.index) == ["P1", "P2"]
    assert m.rows.loc["P2", "line"] == 4  # the blank line still counts
    (problem,) = m.problems
    assert (problem.row, problem.patient_id) == (5, "P3")
    assert problem.reason == "row has 3 fields but the header has 4"


def test_duplicated_column_is_an_error(tmp_path):
    site = _site(tmp_path, "patient_id,image,mask,age,age\nP1,a.nii.gz,b.nii.gz,1,2\n")
    with pytest.raises(SiteDataError, match="age"):
        read_manifest(site)
