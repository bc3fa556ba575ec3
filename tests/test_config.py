"""Study files: every mistake gets a message that says what and where."""

from __future__ import annotations

import pytest

from radfed.shared.config import load_study
from radfed.shared.errors import StudyConfigError

GOOD = """
[study]
name = "s"
outcome = "y"
clinical = ["age"]
[[sites]]
name = "a"
path = "a"
"""


def write(tmp_path, text):
    path = tmp_path / "study.toml"
    path.write_text(text)
    return path


def test_defaults_and_relative_paths(tmp_path):
    config = load_study(write(tmp_path, GOOD))
    assert config.test_fraction == 0.3 and config.seed == 42 and config.privacy.min_cell == 3
    assert config.sites[0].path == tmp_path / "a"
    assert config.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert config.experiment == "s"
    assert "path" not in str(config.protocol())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[study\n", "not valid TOML"),
        ('[study]\nname = "s"\n', "missing required key 'outcome'"),
        (
            GOOD.replace('clinical = ["age"]', "clinical = []"),
            "at least one clinical variable or feature",
        ),
        (GOOD.replace('clinical = ["age"]', 'clinical = ["age", "age"]'), "lists a name twice"),
        (GOOD + "[split]\ntest_fraction = 1.5\n", "test_fraction must be in"),
        (GOOD + "[privacy]\nmin_cell = 0\n", "min_cell must be at least 1"),
        (GOOD + "[tracking]\nurl = 'x'\n", r"unknown key\(s\) \['url'\]"),
        (GOOD + "[extra]\n", r"unknown section\(s\)"),
        (GOOD + '[[sites]]\nname = "a"\npath = "b"\n', "site names must be unique"),
        (GOOD.replace('name = "a"', 'name = "a b"'), "may hold only letters"),
        (GOOD.split("[[sites]]")[0], r"at least one \[\[sites\]\]"),
    ],
)
def test_bad_study_files(tmp_path, text, message):
    with pytest.raises(StudyConfigError, match=message):
        load_study(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(StudyConfigError, match="study file not found"):
        load_study(tmp_path / "nope.toml")
