"""Binary and declared features are kept out of ComBat, and reach selection unchanged.

ComBat's location and scale model is wrong for a 0/1 feature: harmonising one turns
its 0s and 1s into other numbers. Each site names its features whose every value is 0
or 1 (over all of its patients, never over rows a request names); a feature every
training site names is kept out, as are those of ``[harmonization] exclude``. The
pooled reference here finds the binary columns with pandas and runs neuroCombat on the
others, with no radfed code; the attacks play a hostile coordinator against a real site.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from radfed.client.site import Site, SiteSettings, SiteWorker
from radfed.harmonization.binary import (
    BINARY,
    DECLARED,
    site_binary_features,
    solve_kept_out,
)
from radfed.shared.config import load_study
from radfed.shared.errors import StudyConfigError
from radfed.shared.messages import RADSCORE, roundtrip
from radfed.shared.privacy import PrivacyPolicy
from radfed.tests.conftest import PIPELINE_FEATURES
from radfed.tests.reference import feature_tables, pooled_rows

nc = pytest.importorskip("neuroCombat")

SITES = ["cleveland", "hungarian", "va"]


# -- the pair of pure functions ------------------------------------------------------


def test_a_site_names_the_features_whose_every_value_is_zero_or_one():
    Y = np.array(
        [
            [0, 1, 0, 2, 0.5, 1],
            [1, 1, 0, 0, 1.0, 0],
            [1, 1, 0, 1, 0.0, np.nan],  # a missing value is not 0 or 1
        ]
    )
    names = ["flag", "ones", "zeros", "code", "fraction", "gappy"]
    assert site_binary_features(Y, names) == {"binary_features": ["flag", "ones", "zeros"]}
    with pytest.raises(ValueError, match="one column per feature"):
        site_binary_features(Y, names[:2])


def test_the_coordinator_keeps_out_features_binary_at_every_site_and_declared_ones():
    replies = [
        {"binary_features": ["a", "b", "d"]},
        {"binary_features": ["a", "d"]},
        {"binary_features": ["a", "b", "d"]},
    ]
    solved = solve_kept_out(replies, ["a", "b", "c", "d", "e"], exclude=["e", "gone"])
    # b is 0/1 at two sites only: harmonised. "gone" is no feature (e.g. ICC-filtered).
    assert solved == {
        "harmonised": ["b", "c"],
        "kept_out": {"a": BINARY, "d": BINARY, "e": DECLARED},
    }
    # A site that does not say (an older radfed) or says nonsense: nothing is binary.
    for odd in ({}, {"binary_features": "a"}, {"binary_features": [1, None]}):
        assert solve_kept_out([replies[0], odd], ["a", "b"])["kept_out"] == {}
    assert solve_kept_out([], ["a"]) == {"harmonised": ["a"], "kept_out": {}}


# -- the study setting ---------------------------------------------------------------

STUDY = """
[study]
name = "s"
outcome = "y"
clinical = ["age"]
features = {features}

[harmonization]
exclude = {exclude}

[[sites]]
name = "a"
path = "a"
"""


def _load(tmp_path, features, exclude):
    path = tmp_path / "study.toml"
    text = STUDY.format(features=features, exclude=exclude).replace("'", '"')
    path.write_text(text)
    return load_study(path)


def test_exclude_names_study_features_or_is_a_one_line_error(tmp_path):
    config = _load(tmp_path, ["restecg", "original_glcm_*"], ["restecg", "original_glcm_Id"])
    assert config.harmonization.exclude == ("restecg", "original_glcm_Id")
    assert config.as_params()["harmonization.exclude"] == '["restecg", "original_glcm_Id"]'
    with pytest.raises(StudyConfigError, match=r"exclude names \['restcg'\]") as caught:
        _load(tmp_path, ["restecg", "chol"], ["restcg"])
    assert "\n" not in str(caught.value)
    with pytest.raises(StudyConfigError, match="list of non-empty strings"):
        _load(tmp_path, ["chol"], '"chol"')
    # A pattern would pass the name check against a feature pattern and exclude nothing.
    with pytest.raises(StudyConfigError, match=r"names, not patterns: \['original_glcm_\*'\]"):
        _load(tmp_path, ["original_glcm_*"], ["original_glcm_*"])


# -- exactness: neuroCombat on the pooled rows, binary columns found with pandas -----


def _pooled_reference(config, kept_out_declared=()):
    """Training rows of every site, neuroCombat on the columns that are not 0/1 over all
    of the sites' complete rows (pandas) and not declared; the others as they are."""
    tables = feature_tables(config)
    train = pooled_rows(config, tables, "train")
    everyone = pd.concat([train, pooled_rows(config, tables, "test")])
    features = list(config.features)
    binary = [f for f in features if everyone[f].isin([0, 1]).all()]
    harmonised = [f for f in features if f not in binary and f not in kept_out_declared]
    out = nc.neuroCombat(
        dat=train[harmonised].to_numpy(dtype=float).T,
        covars=train[["age", "sex"]].assign(batch=train["site"].to_numpy()),
        batch_col="batch",
        categorical_cols=["sex"],
        continuous_cols=["age"],
    )
    reference = train[features].astype(float).copy()
    reference[harmonised] = out["data"].T
    return train, reference, binary, harmonised, out["estimates"]


@pytest.mark.parametrize("exclude", [[], ["cp"]], ids=["binary", "binary+declared"])
def test_kept_features_equal_neurocombat_without_the_kept_out_ones(heart_pipeline_study, exclude):
    from radfed.api import ComBat, Federation

    federation = Federation.from_study(heart_pipeline_study)
    combat = ComBat(exclude=exclude).fit(federation)
    harmonised = federation.with_pipeline(combat)
    train, reference, binary, columns, estimates = _pooled_reference(heart_pipeline_study, exclude)

    assert binary == ["exang"]
    assert combat.kept_out_ == {"exang": BINARY, **dict.fromkeys(exclude, DECLARED)}
    assert combat.feature_names_ == columns
    assert combat.estimates_.feature_names == tuple(columns)
    np.testing.assert_allclose(combat.gamma_star_, estimates["gamma.star"], atol=1e-6)
    np.testing.assert_allclose(combat.delta_star_, estimates["delta.star"], atol=1e-6)
    scale = reference[columns].std(ddof=0).to_numpy()
    for site in SITES:
        mine = harmonised.rows(site, "train")
        theirs = reference[train["site"] == site]
        assert len(mine) == len(theirs)
        got = mine[columns].to_numpy()
        np.testing.assert_allclose((got - theirs[columns].to_numpy()) / scale, 0, atol=1e-6)
        # Kept out: exactly the site's own values, the binary ones still 0 and 1.
        for f in [*binary, *exclude]:
            np.testing.assert_array_equal(mine[f].to_numpy(), theirs[f].to_numpy())
        assert set(np.unique(mine["exang"])) <= {0.0, 1.0}
        # and ComBat did change the others.
        assert not np.allclose(got, federation.rows(site, "train")[columns].to_numpy())


def test_binary_features_reach_standardisation_mrmr_and_lasso_unchanged(
    heart_pipeline_study, monkeypatch
):
    from radfed.server.federation.inprocess import InProcessTransport
    from radfed.server.study.driver import FederatedStudy
    from radfed.server.tracking.pipeline_model import FittedPipeline

    seen = []
    original = Site._data

    def spy(self, request, columns, subset):
        x, y = original(self, request, columns, subset)
        seen.append((self, str(request.get("step", "moments")), list(columns), subset, x))
        return x, y

    monkeypatch.setattr(Site, "_data", spy)
    transport = InProcessTransport.from_study(heart_pipeline_study)
    result = FederatedStudy(heart_pipeline_study, transport).run()

    record = result.to_dict()["harmonization"]
    kept = [f for f in PIPELINE_FEATURES if f != "exang"]
    assert record["harmonised"] == kept
    assert record["kept_out"] == {"exang": BINARY}
    assert "0 or 1" in record["kept_out_rule"] and "exclude" in record["kept_out_rule"]
    assert np.shape(record["gamma_star"]) == (len(SITES), len(kept))
    assert record["estimates"]["combat_feature_names"] == kept

    steps = set()
    for site, step, columns, subset, x in seen:
        if "exang" not in columns:
            continue
        raw = site.table.frame.loc[site.rows(subset), "exang"].to_numpy()
        np.testing.assert_array_equal(x[:, columns.index("exang")], raw)
        assert set(np.unique(raw)) <= {0.0, 1.0}
        steps.add(step)
    assert {"moments", "mrmr_moments"} <= steps  # standardisation and mRMR
    if "exang" in result.details["selection"]["mrmr"]["selected"]:
        assert "lasso_irls" in steps

    # The logged pipeline model harmonises raw rows as the sites did (exang unchanged).
    pipeline = FittedPipeline(result.to_dict())
    request = {"protocol": heart_pipeline_study.protocol(), **transport.context}
    for name, worker in transport.workers.items():
        site = worker.site(heart_pipeline_study.protocol())
        raw = site.table.frame.loc[site.rows("train")].assign(site=name)
        np.testing.assert_allclose(
            pipeline.radscore(raw), site.view(request, "train")[RADSCORE], atol=1e-9
        )


# -- a hostile coordinator -------------------------------------------------------------


def _ask(worker: SiteWorker, protocol: dict, task: str, **payload) -> dict:
    return worker.handle(roundtrip({"task": task, "protocol": protocol, **payload}))


def test_the_binary_report_cannot_be_steered_by_the_request(heart_pipeline_study, tmp_path):
    """Request fields naming rows, subsets or features change nothing: the report is
    over all of the site's patients of the pinned study."""
    site = heart_pipeline_study.sites[0]
    worker = SiteWorker(
        SiteSettings(site.name, site.path, PrivacyPolicy(min_cell=5), state_dir=tmp_path / "s")
    )
    protocol = heart_pipeline_study.protocol()
    honest = _ask(worker, protocol, "describe")
    assert honest["binary_features"] == ["exang"]
    hostile = _ask(
        worker,
        protocol,
        "describe",
        subset="test",
        columns=["thalach"],
        features=["thalach"],
        combat_features=["thalach"],
        select_columns=["thalach"],
        rows=[0, 1, 2],
        binary_features=["thalach"],
    )
    assert hostile["binary_features"] == honest["binary_features"]
    # Another feature list is another protocol: refused (the study is pinned).
    moved = {**protocol, "features": ["thalach"]}
    assert _ask(worker, moved, "describe").get("error_kind") == "privacy"


def _flag_site(root):
    """40 patients, ``flag`` 0/1 for all but P39 (0.5), who alone lacks ``z``."""
    n = 40
    frame = pd.DataFrame(
        {
            "patient_id": [f"P{i:02d}" for i in range(n)],
            "y": np.arange(n) % 2,
            "age": 40.0 + np.arange(n),
            "z": np.r_[np.arange(n - 1) % 3, np.nan],
            "flag": np.r_[np.arange(n - 1) % 2, 0.5],
        }
    )
    (root / "site").mkdir(parents=True)
    frame.to_csv(root / "site" / "features.csv", index=False)


def _flag_study(root, name, clinical):
    (root / f"{name}.toml").write_text(
        f'[study]\nname = "{name}"\noutcome = "y"\nclinical = {clinical}\n'.replace("'", '"')
        + 'features = ["flag"]\n\n[selection]\nfolds = 2\n\n'
        + '[[sites]]\nname = "h"\npath = "site"\n'
    )
    return load_study(root / f"{name}.toml").protocol()


def test_two_studies_differing_by_one_patient_cannot_reveal_its_value(tmp_path):
    """Study B adds a clinical column only P39 lacks: its describe would say ``flag`` is
    binary where study A's said not, so P39's flag is not 0 or 1. The site refuses B's
    describe (the differencing rule), since its patients differ from A's by one."""
    _flag_site(tmp_path)
    study_a = _flag_study(tmp_path, "a", ["age"])
    study_b = _flag_study(tmp_path, "b", ["age", "z"])

    def worker(state: str) -> SiteWorker:
        policy = PrivacyPolicy(min_cell=3)
        return SiteWorker(SiteSettings("h", tmp_path / "site", policy, state_dir=tmp_path / state))

    # Asked alone, each study answers, and the difference would tell.
    assert _ask(worker("fresh-a"), study_a, "describe")["binary_features"] == []
    assert _ask(worker("fresh-b"), study_b, "describe")["binary_features"] == ["flag"]

    site = worker("state")
    assert _ask(site, study_a, "describe")["binary_features"] == []
    reply = _ask(site, study_b, "describe")
    assert reply.get("error_kind") == "privacy"
    assert "differencing" in reply["error"]
    assert "binary_features" not in reply


def test_pooled_check_with_a_site_of_an_older_radfed_fails_a_row_not_the_run(
    heart_pipeline_study, monkeypatch
):
    """A site without ``binary_features`` in its reply (an older radfed) makes the
    federation harmonise exang, which the pooled reference keeps out: the equivalence
    table says so in its own row, and the ComBat rows cannot match, instead of crashing."""
    from radfed.server.federation.inprocess import InProcessTransport
    from radfed.server.study.driver import FederatedStudy
    from radfed.server.study.pooled import equivalence

    original = Site.describe

    def older(self, request):
        reply = dict(original(self, request))
        if self.settings.name == "va":
            reply.pop("binary_features")
        return reply

    monkeypatch.setattr(Site, "describe", older)
    transport = InProcessTransport.from_study(heart_pipeline_study)
    result = FederatedStudy(heart_pipeline_study, transport).run()
    assert result.details["harmonization"]["kept_out"] == {}  # exang harmonised

    rows = {r.estimate: r for r in equivalence(heart_pipeline_study, result)}
    assert not rows["ComBat harmonised features (0 = same features)"].ok
    assert all(not rows[f"ComBat {k}"].ok for k in ("gamma_star", "delta_star", "var_pooled"))
    assert any(name.endswith("model coefficients") for name in rows)  # the check went on
