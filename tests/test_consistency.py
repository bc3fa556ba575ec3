"""The coordinator refuses sites whose extraction settings or variables differ."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from radfed.server.federation.inprocess import InProcessTransport
from radfed.server.study.driver import FederatedStudy, check_consistency
from radfed.shared.config import load_study
from radfed.shared.errors import FederationError
from radfed.tests.conftest import heart_study_text


def describe(**overrides):
    base = {
        "site": "a",
        "features": ["f1", "f2"],
        "clinical": ["age"],
        "settings_hash": "abc",
        "pyradiomics_version": "3.0.1",
        "radfed_version": "0.1.0",
    }
    return base | overrides


def test_consistent_sites_pass():
    shared = check_consistency({"a": describe(), "b": describe(site="b")})
    assert shared["features"] == ["f1", "f2"] and shared["settings_hash"] == "abc"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"settings_hash": "xyz"}, "b differs from a in settings_hash: 'xyz' vs 'abc'"),
        ({"pyradiomics_version": "3.1.0"}, "b differs from a in pyradiomics_version"),
        (
            {"features": ["f1", "f3"]},
            r"b differs from a in features: extra \['f3'\], lacking \['f2'\]",
        ),
        ({"features": ["f2", "f1"]}, "different order"),
    ],
)
def test_mismatched_site_is_refused(override, message):
    with pytest.raises(FederationError, match=message):
        check_consistency({"a": describe(), "b": describe(site="b", **override)})


def test_site_with_other_extraction_settings_is_refused_end_to_end(heart_dir):
    """A site whose sidecar says it extracted with other settings stops the study."""
    for site, digest in (("cleveland", "aaa"), ("hungarian", "aaa"), ("va", "bbb")):
        table = heart_dir / "sites" / site / "features.csv"
        meta = {"settings_hash": digest, "pyradiomics_version": "3.0.1"}
        table.with_name("features.csv.meta.json").write_text(json.dumps(meta))
    (heart_dir / "study.toml").write_text(heart_study_text(["cleveland", "hungarian", "va"]))
    config = load_study(heart_dir / "study.toml")
    with pytest.raises(FederationError, match="va differs from cleveland in settings_hash"):
        FederatedStudy(config, InProcessTransport.from_study(config)).run()


def test_missing_variable_at_one_site_names_the_site(heart_dir):
    path = heart_dir / "sites" / "va" / "features.csv"
    pd.read_csv(path).drop(columns=["oldpeak"]).to_csv(path, index=False)
    (heart_dir / "study.toml").write_text(heart_study_text(["cleveland", "hungarian", "va"]))
    config = load_study(heart_dir / "study.toml")
    with pytest.raises(FederationError, match=r"va: .*missing column\(s\) \['oldpeak'\]"):
        FederatedStudy(config, InProcessTransport.from_study(config)).run()
