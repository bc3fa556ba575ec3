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
        (GOOD + "[privacy]\nmin_cell = 0\n", "min_cell must be an integer >= 1"),
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


def test_every_known_key_is_accepted_where_it_belongs_and_pointed_to_elsewhere(tmp_path):
    """KNOWN is the one source of allowed keys: each key is known in its own section, and
    the same key in [models] (or [study]) is refused with a pointer to where it belongs."""
    from radfed.shared import config as cfg

    for section, keys in cfg.KNOWN.items():
        cfg._check_keys(dict.fromkeys(keys, 0), section)  # no error
        for key in keys - cfg.KNOWN["models"]:
            with pytest.raises(StudyConfigError, match=rf"'{key}' belongs in .*\[{section}\]"):
                cfg._check_keys({key: 0}, "models")


def test_sites_in_one_folder_through_a_link_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "a")
    text = GOOD + '[[sites]]\nname = "b"\npath = "link"\n'
    with pytest.raises(StudyConfigError, match="sites 'a' and 'b' point at the same folder"):
        load_study(write(tmp_path, text))


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("heart-disease", True),
        ("demo_2.1", True),
        ("..", False),
        (".hidden", False),
        ("a/b", False),
        ("x" * 101, False),
        ("", False),
    ],
)
def test_study_names_stay_one_folder(tmp_path, name, ok):
    text = GOOD.replace('name = "s"', f'name = "{name}"')
    if ok:
        assert load_study(write(tmp_path, text)).name == name
    else:
        with pytest.raises(StudyConfigError, match="may hold only letters"):
            load_study(write(tmp_path, text))
