"""Property-based tests (hypothesis) of what a user feeds radfed: manifests, feature
tables and study files (issue 12, item 6).

The properties: every bad input gives radfed's own error (``RadfedError``: a
``SiteDataError`` or ``StudyConfigError`` with a one-line message), never a raw
``TypeError``, ``KeyError``, ``UnicodeDecodeError`` or pandas error; rows are reported,
never dropped silently (the counts add up); valid inputs round-trip. Deterministic
(``derandomize``) so CI is not flaky; see tests/test_fuzz_site.py for the sites'
statistics.
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from radfed.client.data import TableSpec, load_site_table
from radfed.client.manifest import read_manifest
from radfed.client.validate import validate_site
from radfed.shared.config import StudyConfig, load_study, parse_study
from radfed.shared.errors import RadfedError, StudyConfigError

#: Examples per property; RADFED_FUZZ_EXAMPLES=2000 searches deeper (locally, not in CI).
EXAMPLES = int(os.environ.get("RADFED_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def outcome_of(call: Callable[[], Any]) -> Any:
    """``call()``'s value, or the RadfedError it raised (checked: one line, not empty).
    Any other exception fails the test with its type (the property)."""
    try:
        return call()
    except RadfedError as exc:
        message = str(exc).strip()
        assert message, f"{type(exc).__name__} without a message"
        assert "\n" not in message, f"a message of several lines: {message!r}"
        return exc


# ----------------------------------------------------------------------- building blocks

#: Cells a spreadsheet export or a careless hand might write.
HOSTILE_CELLS = [
    "",
    " ",
    "NA",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "1e400",
    "0,5",
    "1.0",
    "0",
    "1",
    "2",
    "-1",
    "yes",
    "true",
    "abc",
    '"',
    '""',
    "a,b",
    "a;b",
    "x\ny",
    "\x00",
    "\ufeff",
    "ü",
    "../../etc/passwd",
    "/dev/null",
    "img.nii",
    "mask.nii",
    "1" * 400,
]

cells = st.one_of(
    st.sampled_from(HOSTILE_CELLS),
    st.text(max_size=12),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**20), 10**20).map(str),
)
column_names = st.one_of(
    st.sampled_from(["patient_id", "image", "mask", "y", "age", "f1", "f2", "scanner", ""]),
    st.text(min_size=0, max_size=6),
)


def csv_text(header: list[str], rows: list[list[str]], delimiter: str = ",") -> str:
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


@st.composite
def hostile_tables(draw, required: list[str]) -> bytes:
    """A CSV file's bytes: a header that mostly holds ``required``, rows of junk cells of
    any length, sometimes raw bytes or another separator."""
    kind = draw(st.sampled_from(["csv", "csv", "csv", "bytes", "semicolon", "empty"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "empty":
        return draw(st.sampled_from([b"", b"\n", b"\xef\xbb\xbf", b"patient_id\n"]))
    header = [c for c in required if draw(st.booleans()) or draw(st.booleans())]
    header += draw(st.lists(column_names, max_size=3))
    width = len(header)
    rows = draw(
        st.lists(
            st.lists(cells, min_size=max(0, width - 1), max_size=width + 1), min_size=0, max_size=6
        )
    )
    text = csv_text(header, rows, ";" if kind == "semicolon" else ",")
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16"]))
    return text.encode(encoding, errors="replace")


def site_folder(root: Path) -> Path:
    site = root / "site"
    site.mkdir()
    (site / "img.nii").write_bytes(b"")
    (site / "mask.nii").write_bytes(b"")
    return site


def study_config(root: Path, features: list[str] | None = None) -> StudyConfig:
    data = {
        "study": {"name": "s", "outcome": "y", "clinical": ["age"]},
        "sites": [{"name": "a", "path": "site"}],
    }
    if features:
        data["study"]["features"] = features
    return parse_study(data, root)


def data_rows(text: str) -> int:
    """Rows of a manifest as radfed counts them (not blank, minus the header)."""
    reader = csv.reader(io.StringIO(text, newline=""))
    return sum(1 for r in reader if any(c.strip() for c in r)) - 1


# ------------------------------------------------------------------------ (a) manifests


@FUZZ
@given(content=hostile_tables(["patient_id", "image", "mask", "y", "age"]))
def test_a_hostile_manifest_gives_a_site_data_error_or_rows_that_add_up(content):
    with tempfile.TemporaryDirectory() as tmp:
        site = site_folder(Path(tmp))
        (site / "manifest.csv").write_bytes(content)
        manifest = outcome_of(lambda: read_manifest(site, outcome="y", numeric=["age"]))
        validation = outcome_of(lambda: validate_site(site, study_config(Path(tmp))))
        if isinstance(manifest, RadfedError):
            return
        # Every row is kept or reported, never dropped silently.
        reported = {p.row for p in manifest.problems}
        assert not reported & set(manifest.rows["line"])
        if not isinstance(validation, RadfedError):
            assert len(validation.kept) + len(validation.excluded) == validation.n_rows
            assert set(validation.kept) == set(manifest.rows.index.astype(str))


patient_ids = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=["Cs", "Cc", "Zs", "Zl", "Zp"]),
    min_size=1,
    max_size=8,
).filter(lambda s: s.strip() == s and s.lower() not in {"na", "nan", "n/a", "none", "null"})
finite = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_subnormal=False)


@FUZZ
@given(
    ids=st.lists(patient_ids, min_size=1, max_size=8, unique=True),
    data=st.data(),
)
def test_a_valid_manifest_keeps_every_row_and_its_values(ids, data):
    ys = data.draw(st.lists(st.sampled_from([0, 1]), min_size=len(ids), max_size=len(ids)))
    ages = data.draw(st.lists(finite, min_size=len(ids), max_size=len(ids)))
    rows = [
        [i, "img.nii", "mask.nii", str(y), repr(a)] for i, y, a in zip(ids, ys, ages, strict=False)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        site = site_folder(Path(tmp))
        (site / "manifest.csv").write_text(
            csv_text(["patient_id", "image", "mask", "y", "age"], rows), encoding="utf-8"
        )
        manifest = read_manifest(site, outcome="y", numeric=["age"])
        assert manifest.problems == []
        assert list(manifest.rows.index) == ids
        assert manifest.rows["y"].astype(float).tolist() == [float(y) for y in ys]
        assert manifest.rows["age"].astype(float).tolist() == ages
        validation = validate_site(site, study_config(Path(tmp)))
        assert validation.kept == ids and validation.excluded == []


# ------------------------------------------------------------------ (b) feature tables

SPEC = TableSpec(outcome="y", clinical=("age",), features=("f*",))


@FUZZ
@given(content=hostile_tables(["patient_id", "y", "age", "f1", "f2"]))
def test_a_hostile_feature_csv_gives_a_site_data_error_or_rows_that_add_up(content):
    with tempfile.TemporaryDirectory() as tmp:
        site = site_folder(Path(tmp))
        (site / "features.csv").write_bytes(content)
        table = outcome_of(lambda: load_site_table(site, SPEC))
        validation = outcome_of(lambda: validate_site(site, study_config(Path(tmp), ["f*"])))
        if isinstance(table, RadfedError):
            return
        values = table.frame.to_numpy(dtype=float)
        assert np.isfinite(values).all(), "a kept row holds a missing or infinite value"
        assert set(table.frame[SPEC.outcome]) <= {0.0, 1.0}
        if not isinstance(validation, RadfedError):
            assert len(validation.kept) + len(validation.excluded) == validation.n_rows
            n_rows = len(table.frame) + len({p.row for p in table.problems})
            assert n_rows == validation.n_rows, "the site and radfed validate count differently"


@st.composite
def hostile_frames(draw) -> pd.DataFrame:
    """A feature table as a program might write it to parquet: columns of any dtype."""
    n = draw(st.integers(0, 6))
    column = st.one_of(
        st.lists(st.floats(), min_size=n, max_size=n),
        st.lists(st.integers(-(2**63), 2**63 - 1), min_size=n, max_size=n),
        st.lists(st.booleans(), min_size=n, max_size=n),
        st.lists(st.one_of(st.none(), cells), min_size=n, max_size=n),
    )
    names = draw(st.lists(st.sampled_from(["y", "age", "f1", "f2", "scanner"]), unique=True))
    frame = pd.DataFrame({name: draw(column) for name in names}, index=range(n))
    ids = draw(st.one_of(st.lists(cells, min_size=n, max_size=n), st.just(list(range(n)))))
    if draw(st.booleans()):
        frame.insert(0, "patient_id", ids)
    elif draw(st.booleans()):
        frame.index = pd.Index(ids, name="patient_id")
    return frame


@FUZZ
@given(frame=hostile_frames())
def test_a_hostile_feature_parquet_gives_a_site_data_error_or_rows_that_add_up(frame):
    with tempfile.TemporaryDirectory() as tmp:
        site = site_folder(Path(tmp))
        try:
            frame.to_parquet(site / "features.parquet")
        except Exception:  # pyarrow cannot store this mix: no such file to read
            return
        table = outcome_of(lambda: load_site_table(site, SPEC))
        validation = outcome_of(lambda: validate_site(site, study_config(Path(tmp), ["f*"])))
        if isinstance(table, RadfedError):
            return
        assert np.isfinite(table.frame.to_numpy(dtype=float)).all()
        assert len(table.frame) + len({p.row for p in table.problems}) == len(frame)
        if not isinstance(validation, RadfedError):
            assert len(validation.kept) + len(validation.excluded) == validation.n_rows


@FUZZ
@given(
    ids=st.lists(patient_ids, min_size=1, max_size=8, unique=True),
    parquet=st.booleans(),
    data=st.data(),
)
def test_a_valid_feature_table_round_trips(ids, parquet, data):
    n = len(ids)
    numbers = st.lists(finite, min_size=n, max_size=n)
    frame = pd.DataFrame(
        {
            "patient_id": ids,
            "y": data.draw(st.lists(st.sampled_from([0, 1]), min_size=n, max_size=n)),
            "age": data.draw(numbers),
            "f1": data.draw(numbers),
            "f2": data.draw(numbers),
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        site = site_folder(Path(tmp))
        if parquet:
            frame.to_parquet(site / "features.parquet", index=False)
        else:
            (site / "features.csv").write_text(
                csv_text(list(frame.columns), [[*map(str, r)] for r in frame.itertuples(False)])
            )
        table = load_site_table(site, SPEC)
        assert table.problems == [] and table.features == ["f1", "f2"]
        expected = frame.set_index("patient_id").astype(float)
        pd.testing.assert_frame_equal(
            table.frame[["y", "age", "f1", "f2"]], expected, check_names=False, rtol=0, atol=0
        )
        validation = validate_site(site, study_config(Path(tmp), ["f*"]))
        assert validation.kept == ids and validation.excluded == []


# --------------------------------------------------------------------- (c) study files

VALID_STUDY: dict[str, Any] = {
    "study": {"name": "s", "outcome": "y", "clinical": ["age"], "features": ["f*"], "seed": 1},
    "split": {"test_fraction": 0.3},
    "extraction": {"params": "fast"},
    "harmonization": {"covariates": ["age"], "categorical": [], "parametric": True},
    "selection": {"mrmr_k": 4, "folds": 5, "n_lambdas": 20, "rule": "lambda.min"},
    "privacy": {"min_cell": 3, "max_param_fraction": 0.3},
    "models": {"univariable_p": 0.05},
    "validation": {"leave_one_site_out": "auto"},
    "federation": {"timeout": 10, "round_timeout": 5},
    "tracking": {"enabled": False, "uri": "sqlite:///mlflow.db", "experiment": "e"},
    "sites": [{"name": "a", "path": "a"}, {"name": "b", "path": "b", "role": "validation"}],
}
SELECTION_KEYS = ["lambda_min_ratio", "icc_threshold", "icc_type"]

#: What TOML can hold (and what tomllib gives back), nested.
toml_values = st.recursive(
    st.one_of(
        st.booleans(),
        st.integers(-(2**63), 2**63 - 1),
        st.floats(),
        st.text(max_size=8),
        st.sampled_from(["", "..", "/", "\x00", "a/b", "auto", "lambda.min", "ICC2", "site"]),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def mutated_studies(draw) -> dict[str, Any]:
    """The valid study with one to three values replaced by junk, keys removed or added."""
    import copy

    data = copy.deepcopy(VALID_STUDY)
    for _ in range(draw(st.integers(1, 3))):
        section = draw(st.sampled_from([*sorted(data), "junk"]))
        if section == "junk" or draw(st.integers(0, 9)) == 0:
            data[section] = draw(toml_values)
            continue
        table = data[section]
        if section == "sites":
            table = draw(st.sampled_from(table)) if table and isinstance(table, list) else None
        if not isinstance(table, dict):
            continue
        keys = sorted(table) + (SELECTION_KEYS if section == "selection" else [])
        if not keys:
            continue
        key = draw(st.sampled_from(keys))
        if draw(st.integers(0, 5)) == 0:
            table.pop(key, None)
        else:
            table[key] = draw(toml_values)
    return data


@FUZZ
@given(data=mutated_studies())
def test_a_hostile_study_gives_a_study_config_error(data):
    with tempfile.TemporaryDirectory() as tmp:
        config = outcome_of(lambda: parse_study(data, Path(tmp)))
        if isinstance(config, StudyConfig):
            # Accepted: its settings are what the rest of radfed relies on.
            assert 0 < config.test_fraction < 1 and config.privacy.min_cell >= 1
            assert config.selection.folds >= 2 and config.training_sites
            config.protocol()
            config.as_params()


def toml_text(data: dict[str, Any]) -> str:
    def value(v: Any) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = []
    for section, table in data.items():
        for entry in table if isinstance(table, list) else [table]:
            lines.append(f"[[{section}]]" if isinstance(table, list) else f"[{section}]")
            lines += [f"{k} = {value(v)}" for k, v in entry.items()]
    return "\n".join(lines) + "\n"


@FUZZ
@given(content=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_a_study_file_of_junk_gives_a_study_config_error(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "study.toml"
        path.write_bytes(content)
        config = outcome_of(lambda: load_study(path))
        assert isinstance(config, (StudyConfig, RadfedError))


names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,12}", fullmatch=True)


@FUZZ
@given(
    name=names,
    outcome=patient_ids.filter(lambda s: "\\" not in s and '"' not in s),
    clinical=st.lists(names, min_size=1, max_size=4, unique=True),
    seed=st.integers(0, 2**31),
    fraction=st.floats(0.01, 0.99),
    min_cell=st.integers(1, 50),
    folds=st.integers(2, 20),
    sites=st.lists(names, min_size=1, max_size=4, unique=True),
)
def test_a_valid_study_round_trips(name, outcome, clinical, seed, fraction, min_cell, folds, sites):
    clinical = [c for c in clinical if c != outcome] or ["x" + outcome]
    data = {
        "study": {"name": name, "outcome": outcome, "clinical": clinical, "seed": seed},
        "split": {"test_fraction": fraction},
        "privacy": {"min_cell": min_cell},
        "selection": {"folds": folds},
        "sites": [{"name": s, "path": f"sites/{s}"} for s in sites],
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "study.toml"
        path.write_text(toml_text(data))
        config = load_study(path)
        assert (config.name, config.outcome, list(config.clinical)) == (name, outcome, clinical)
        assert (config.seed, config.test_fraction) == (seed, fraction)
        assert (config.privacy.min_cell, config.selection.folds) == (min_cell, folds)
        assert [s.name for s in config.sites] == sites
        assert [s.path for s in config.sites] == [Path(tmp).resolve() / "sites" / s for s in sites]
        assert math.isfinite(config.test_fraction)


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("selection", "icc_type", ["ICC2"], r"icc_type must be 'ICC2' or 'ICC3', got \['ICC2'\]"),
        ("sites", "role", ["training"], "role must be one of"),
        ("sites", "path", "a\x00b", r"path 'a\\x00b' holds a NUL character"),
        ("extraction", "params", "p\x00.yaml", "holds a NUL character"),
        ("tracking", "uri", "sqlite:///m\x00.db", "holds a NUL character"),
    ],
)
def test_study_values_that_crashed_the_parser(section, key, value, message, tmp_path):
    """Values that raised TypeError or ValueError (embedded null byte) before."""
    import copy

    data = copy.deepcopy(VALID_STUDY)
    table = data[section][0] if section == "sites" else data[section]
    table[key] = value
    with pytest.raises(StudyConfigError, match=message):
        parse_study(data, tmp_path)


def test_a_study_file_not_in_utf8_is_a_study_config_error(tmp_path):
    (tmp_path / "study.toml").write_bytes(b"[study]\nname = '\xe9'\n")
    with pytest.raises(StudyConfigError, match="not UTF-8 text"):
        load_study(tmp_path / "study.toml")
