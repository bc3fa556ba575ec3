"""Categorical clinical variables (``[study] categorical``), one-hot encoded with the
federation's levels, on three real hospitals (UCI heart disease, chest-pain type ``cp``).

VA has 3 patients with typical angina (cp = 1) among its complete cases: its training
split may hold fewer than min_cell = 3, and VA would refuse. The three-hospital study
merges typical and atypical angina (``merge_levels``, reference "1-2"); the four raw
levels are checked on Cleveland and Hungary.

The references are independent: pandas' ``get_dummies`` on the pooled rows and
statsmodels' Logit (coefficients, standard errors, the likelihood-ratio statistic
``llr`` and the Wald test of the dummies).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm

from radfed.client.site import Site, SiteSettings, SiteWorker, stratified_split
from radfed.client.site_state import protocol_hash, read_audit
from radfed.server.federation.inprocess import InProcessTransport
from radfed.server.outputs.nomogram import NomogramScales, save_nomogram
from radfed.server.study.driver import FederatedStudy
from radfed.shared.config import load_study, parse_study
from radfed.shared.errors import FederationError, PrivacyRefusal, RadfedError, StudyConfigError
from radfed.shared.privacy import PrivacyPolicy
from radfed.tests.reference import (
    assert_matches_logit,
    feature_tables,
    pooled_logit,
    pooled_training_rows,
)

SITES = ["cleveland", "hungarian", "va"]
CLINICAL = ["age", "sex", "trestbps", "cp"]
CP_NAMES = {"1-2": "angina", "3": "non-anginal", "4": "asymptomatic"}
MERGE = 'merge_levels = { cp = { "1-2" = ["1", "2"] } }'
ANGINA = {"1": "1-2", "2": "1-2"}


def study_text(merge: str = MERGE, sites: list[str] = SITES) -> str:
    sites = "".join(f'[[sites]]\nname = "{s}"\npath = "sites/{s}"\n\n' for s in sites)
    return f"""
[study]
name = "heart-categorical"
outcome = "disease"
clinical = {CLINICAL!r}
categorical = ["cp"]
{merge}
seed = 11

[tracking]
enabled = false

[validation]
leave_one_site_out = false

{sites}""".replace("'", '"')


@pytest.fixture
def study(heart_dir: Path):
    path = heart_dir / "study.toml"
    path.write_text(study_text())
    return load_study(path)


@pytest.fixture
def result(study):
    return FederatedStudy(study, InProcessTransport.from_study(study)).run()


def pooled_with_dummies(study, merge: dict[str, str] | None = ANGINA) -> pd.DataFrame:
    """The pooled training rows with pandas' own dummies of cp (sorted levels, the first
    dropped), named as radfed names them."""
    rows = pooled_training_rows(study, feature_tables(study))
    cp = rows["cp"].map(lambda v: f"{v:g}").replace(merge or {})
    dummies = pd.get_dummies(cp, prefix="cp", prefix_sep="=", drop_first=True, dtype=float)
    return pd.concat([rows, dummies], axis=1)


def test_clinical_model_equals_statsmodels_with_the_same_dummies(study, result):
    rows = pooled_with_dummies(study)
    screening = result.details["clinical_screening"]
    assert screening["levels"] == {"cp": ["1-2", "3", "4"]}
    assert screening["merge_levels"] == {"cp": {"1-2": ["1", "2"]}}
    assert screening["retained_variables"] == CLINICAL  # every variable passes p < 0.05
    model = result.to_dict()["models"]["clinical"]
    assert model["columns"] == ["age", "sex", "trestbps", "cp=3", "cp=4"]
    assert model["n"] == len(rows)
    assert_matches_logit(model, pooled_logit(rows, study.outcome, model["columns"]), tol=1e-6)
    # Per level, on the variables' own scale: statsmodels on the raw dummies.
    X = sm.add_constant(rows[model["columns"]].to_numpy(dtype=float))
    raw = sm.Logit(rows[study.outcome].to_numpy(float), X).fit(method="newton", tol=1e-12, disp=0)
    fit = result.models["clinical"]
    np.testing.assert_allclose(fit.coef_per_unit, raw.params, rtol=0, atol=1e-6)
    np.testing.assert_allclose(fit.se_per_unit, raw.bse, rtol=0, atol=1e-6)


def test_screening_is_one_likelihood_ratio_test_equal_to_the_pooled_one(study, result):
    rows = pooled_with_dummies(study)
    y = rows[study.outcome].to_numpy(float)
    univariable = result.details["clinical_screening"]["univariable"]
    cp = univariable["cp"]
    dummies = ["cp=3", "cp=4"]
    ref = sm.Logit(y, sm.add_constant(rows[dummies].to_numpy(float))).fit(
        method="newton", tol=1e-12, disp=0
    )
    assert cp["test"] == "likelihood ratio" and cp["df"] == 2 and cp["reference"] == "1-2"
    assert cp["statistic"] == pytest.approx(ref.llr, abs=1e-6)
    assert cp["p"] == pytest.approx(ref.llr_pvalue, rel=1e-6, abs=1e-300)
    assert cp["deviance"] == pytest.approx(-2 * ref.llf, abs=1e-6)
    assert cp["null_deviance"] == pytest.approx(-2 * ref.llnull, abs=1e-6)
    wald = ref.wald_test(np.eye(3)[1:], scalar=True)
    assert cp["wald_statistic"] == pytest.approx(float(wald.statistic), abs=1e-6)
    for column in dummies:
        j = 1 + dummies.index(column)
        assert cp["coefficients"][column]["coef_per_unit"] == pytest.approx(ref.params[j], abs=1e-6)
    # Numeric variables keep their Wald z-test.
    for name in ("age", "sex", "trestbps"):
        fit = sm.Logit(y, sm.add_constant(rows[[name]].to_numpy(float))).fit(disp=0, tol=1e-12)
        assert univariable[name]["p"] == pytest.approx(fit.pvalues[1], rel=1e-6, abs=1e-12)
    print(
        f"cp: LR {cp['statistic']:.6f} (statsmodels {ref.llr:.6f}), Wald {cp['wald_statistic']:.4f}"
    )


def test_pooled_reference_run_uses_the_same_dummies(study, result):
    from radfed.server.study.pooled import equivalence

    rows = {r.estimate: r for r in equivalence(study, result)}
    assert all(r.ok for r in rows.values()), [r.to_dict() for r in rows.values() if not r.ok]
    assert rows["screening likelihood-ratio statistics (categorical)"].max_abs_diff < 1e-6
    assert rows["clinical model standard errors"].max_abs_diff < 1e-6


def test_four_raw_levels_on_two_hospitals(heart_dir):
    path = heart_dir / "study.toml"
    path.write_text(study_text(merge="", sites=["cleveland", "hungarian"]))
    study = load_study(path)
    result = FederatedStudy(study, InProcessTransport.from_study(study)).run()
    screening = result.details["clinical_screening"]
    assert screening["levels"] == {"cp": ["1", "2", "3", "4"]}
    rows = pooled_with_dummies(study, merge=None)
    model = result.to_dict()["models"]["clinical"]
    assert model["columns"][-3:] == ["cp=2", "cp=3", "cp=4"]
    assert_matches_logit(model, pooled_logit(rows, study.outcome, model["columns"]), tol=1e-6)
    cp = screening["univariable"]["cp"]
    y = rows[study.outcome].to_numpy(float)
    ref = sm.Logit(y, sm.add_constant(rows[["cp=2", "cp=3", "cp=4"]].to_numpy(float))).fit(
        method="newton", tol=1e-12, disp=0
    )
    assert cp["df"] == 3 and cp["statistic"] == pytest.approx(ref.llr, abs=1e-6)


def test_nomogram_draws_a_categorical_predictor_as_one_axis(study, result, tmp_path):
    fit = result.models["clinical"]
    levels = result.details["clinical_screening"]["levels"]
    scales = NomogramScales.from_fit(
        fit, categories=levels, levels={"cp": CP_NAMES}, labels={"cp": "Chest pain"}
    )
    # The numeric variables screening retained (trestbps is near p = 0.05: some splits
    # drop it), then cp as one axis where its first dummy stands.
    numeric = [c for c in fit.columns if not c.startswith("cp=")]
    assert fit.columns[len(numeric) :] == ["cp=3", "cp=4"] and {"age", "sex"} <= set(numeric)
    assert [v.name for v in scales.variables] == [*numeric, "cp"]
    cp = scales.variable("cp")
    assert cp.tick_labels() == list(CP_NAMES.values()) and cp.label == "Chest pain"
    # Reading a patient off the chart gives the model's prediction, whatever the level.
    beta = fit.coef_per_unit
    values = {"age": 55, "sex": 1, "trestbps": 130}
    for level in ("1-2", "3", 4):
        patient = {**{c: values[c] for c in numeric}, "cp": level}
        dummies = [float(str(level) == lv) for lv in ("3", "4")]
        lp = beta[0] + beta[1:] @ np.array([*(values[c] for c in numeric), *dummies])
        total = scales.points(patient)
        assert scales.probability_from_points(total) == pytest.approx(1 / (1 + np.exp(-lp)))
    assert min(cp.tick_points()) == pytest.approx(0)
    assert "asymptomatic" in scales.table()
    (png, _svg) = save_nomogram(scales, tmp_path / "nomogram")
    assert png.stat().st_size > 10_000
    with pytest.raises(KeyError, match="level '5'"):
        scales.points({**{c: values[c] for c in numeric}, "cp": "5"})


def test_the_logged_pipeline_builds_the_dummies(study, result):
    from radfed.server.tracking.pipeline_model import FittedPipeline

    pipeline = FittedPipeline(result.to_dict())
    assert pipeline.input_columns_ == CLINICAL
    patients = pd.DataFrame({"age": [50, 61], "sex": [1, 0], "trestbps": [120, 140], "cp": [4, 2]})
    fit = result.models["clinical"]
    X = np.column_stack([patients[["age", "sex", "trestbps"]], [[0, 1], [0, 0]]])
    expected = 1 / (1 + np.exp(-(fit.coef_per_unit[0] + X @ fit.coef_per_unit[1:])))
    np.testing.assert_allclose(pipeline.predict(patients)["clinical"], expected, rtol=1e-12)
    with pytest.raises(ValueError, match=r"level\(s\) \['7'\] were not in the federation"):
        pipeline.predict(patients.assign(cp=[7, 2]))


# ------------------------------------------------------------------------------ privacy


def _va(study, min_cell: int, state_dir: Path | None = None) -> Site:
    va = next(s for s in study.sites if s.name == "va")
    policy = PrivacyPolicy(min_cell=min_cell)
    return Site(SiteSettings("va", va.path, policy, state_dir=state_dir), study.protocol())


def test_a_level_rarer_than_min_cell_is_never_published(study, tmp_path):
    """VA holds few patients with typical angina: with min_cell above their number in
    its training split, no mean or Hessian of cp's dummies leaves the site, and the
    refusal names the variable, not the level or the count."""
    site = _va(study, 3)
    train = site.table.frame.index[~site.test_mask]
    counts = pd.Series(site.levels_of("cp", train)).value_counts()
    rare = int(counts.min())
    assert rare >= 3  # at min_cell 3 VA answers (the study above ran)
    described = site.handle("describe", {})
    assert described["levels"]["cp"] == ["1-2", "3", "4"]  # names, never counts

    request = {"columns": ["age", "cp=3", "cp=4"], "subset": "train"}
    answered = site.handle("moments", request)
    np.testing.assert_allclose(answered["mean"][1:] * answered["n"], counts.loc[["3", "4"]])

    # A minimum cell size above the level's count over all VA's patients: no split the
    # site can draw keeps that level out of the training split or at min_cell there.
    strict_cell = int(pd.Series(site.levels_of("cp")).value_counts().min()) + 1
    strict = _va(study, strict_cell, tmp_path / "strict")  # no set answered before
    strict_train = strict.table.frame.index[~strict.test_mask]
    held = int(pd.Series(strict.levels_of("cp", strict_train)).value_counts().min())
    with pytest.raises(PrivacyRefusal, match=r"min-cell rule.*categorical variable 'cp'") as err:
        strict.handle("moments", request)
    assert str(held) not in str(err.value).replace(str(strict_cell), "")
    logistic = {
        "models": ["m"],
        "m_columns": ["cp=3", "cp=4"],
        "m_center": np.full(2, 0.3),
        "m_scale": np.full(2, 0.45),
        "m_beta": np.zeros(3),
    }
    with pytest.raises(PrivacyRefusal, match="min-cell"):
        strict.handle("logistic", logistic)
    # Only the variable's dummies are guarded: a fit without them is answered.
    strict.handle("moments", {"columns": ["age"], "subset": "train"})
    # Over other patient sets, the difference with the training set's counts would be
    # the test split's: dummies are answered over the training patients only.
    for subset in ("test", "all"):
        with pytest.raises(PrivacyRefusal, match=r"differencing rule.*training patients only"):
            site.handle("moments", {**request, "subset": subset})
        with pytest.raises(PrivacyRefusal, match="differencing rule"):
            site.handle("logistic", {**logistic, "subset": subset})


def test_the_site_draws_a_split_in_which_no_level_is_rare(study):
    """VA's merged angina level (8 of its complete cases) split at random leaves 1 or 2
    of them in the test split for many secrets, and VA would then refuse every model with
    cp on that split and on all its patients (external validation). The site redraws
    until each level is absent from a split or held by at least min_cell of it; the
    outcome stratification is unchanged."""
    site = _va(study, 3)
    levels, y = site.levels_of("cp"), site.table.y
    frac, seed = site.protocol["test_fraction"], site.protocol["seed"]
    assert np.array_equal(
        site.test_mask,
        stratified_split(y, frac, seed, "va", site.state.secret(), levels=[levels], min_cell=3),
    )

    def rare(test: np.ndarray) -> bool:
        counts = [np.unique(levels[rows], return_counts=True)[1] for rows in (test, ~test)]
        return bool(np.any(np.concatenate(counts) < 3))

    plain_rare = 0
    for k in range(40):
        secret = bytes([k]) * 32
        plain = stratified_split(y, frac, seed, "va", secret)
        test = stratified_split(y, frac, seed, "va", secret, levels=[levels], min_cell=3)
        plain_rare += rare(plain)
        assert not rare(test), k
        for cls in (0, 1):
            assert test[y == cls].sum() == plain[y == cls].sum() == round(frac * (y == cls).sum())
    assert plain_rare >= 5  # the premise: without redraws, many secrets give a rare level
    # Without levels (or with no qualifying draw) the first draw is the split.
    assert np.array_equal(
        stratified_split(y, frac, seed, "va", b"s" * 32),
        stratified_split(y, frac, seed, "va", b"s" * 32, levels=[levels], min_cell=len(y)),
    )


def test_the_levels_that_decide_the_split_are_pinned(study):
    """The variables and merges that decide the split's redraws are part of the pinned
    protocol: a coordinator cannot get a second split of the same study by changing
    them. A protocol without them keeps the hash its sites approved before."""
    _va(study, 3)  # pins the study
    va = next(s for s in study.sites if s.name == "va")
    protocol = study.protocol()
    for change in ({"merge_levels": {}}, {"clinical_categorical": []}):
        key = next(iter(change))
        with pytest.raises(PrivacyRefusal, match=rf"pinned-study rule.*changes {key}"):
            Site(SiteSettings("va", va.path, PrivacyPolicy(min_cell=3)), {**protocol, **change})
    plain = {k: v for k, v in protocol.items() if k not in ("merge_levels", "clinical_categorical")}
    old_keys = ["study", "outcome", "clinical", "features", "seed", "test_fraction", "folds"]
    old_keys += ["batch", "covariates", "categorical", "extraction_params"]
    before = hashlib.sha256(
        json.dumps({k: plain.get(k) for k in old_keys}, sort_keys=True).encode()
    ).hexdigest()
    assert protocol_hash(plain) == before != protocol_hash(protocol)


def test_a_pinned_split_moves_neither_with_min_cell_nor_for_an_older_pin(study, tmp_path):
    """The pin keeps how the split is drawn: a site whose IT later raises min_cell keeps
    the study's split (else two splits of one study could be differenced), and a study
    pinned before redraws existed keeps its first draw."""
    state = tmp_path / "state"
    first = _va(study, 3, state)
    assert np.array_equal(_va(study, 6, state).test_mask, first.test_mask)
    pins_file = next(state.rglob("pins.json"))
    pins = json.loads(pins_file.read_text())
    assert pins[first.study]["split"] == {"rule": 2, "min_cell": 3}
    del pins[first.study]["split"]
    pins_file.write_text(json.dumps(pins))
    old = _va(study, 3, state)
    y, protocol = old.table.y, old.protocol
    plain = stratified_split(
        y, protocol["test_fraction"], protocol["seed"], "va", old.state.secret()
    )
    assert np.array_equal(old.test_mask, plain)


def test_a_refused_level_stops_the_screening_and_sends_nothing(study):
    """The screening's standardisation round meets VA's refusal (VA's split counts are
    not asked: at this minimum cell size they could be refused first)."""
    from radfed.server.study.phases import screen_clinical

    # Above the rarest level's count over all VA's patients: no split escapes the rule.
    rarest = int(pd.Series(_va(study, 3).levels_of("cp")).value_counts().min())
    strict = dataclasses.replace(study, privacy=PrivacyPolicy(min_cell=rarest + 1))
    transport = InProcessTransport.from_study(strict)
    transport.protocol, transport.sites = strict.protocol(), list(strict.training_sites)
    with pytest.raises(FederationError, match=r"va: moments: refused by the min-cell rule"):
        screen_clinical(transport, list(strict.clinical), strict.outcome, 0.05)
    worker: SiteWorker = transport.workers["va"]
    audit = read_audit(worker.settings.state_dir)
    refused = [e for e in audit if e["outcome"] == "refused" and e["task"] == "moments"]
    assert refused and all(e["counts_sent"] == {} for e in refused)
    assert "describe" in {e["task"] for e in audit if e["outcome"] == "answered"}


def test_a_level_the_federation_lacks_is_not_scored_as_the_reference(study):
    site = _va(study, 3)
    frame = site.table.frame
    request = {"clinical_levels": {"cp": ["3", "4"]}}
    with pytest.raises(RadfedError, match=r"level\(s\) \['1-2'\] at this site"):
        site._dummy(request, frame, "cp=3")
    ones = site._dummy({"clinical_levels": {"cp": ["1-2", "3", "4"]}}, frame, "cp=3")
    assert ones.sum() == (site.table.labels["cp"] == "3").sum()


# ------------------------------------------------------------------------------- config


def _parse(tmp_path: Path, study: dict, **sections) -> object:
    data = {
        "study": {"name": "s", "outcome": "y", "clinical": ["age", "cp"], **study},
        "sites": [{"name": "a", "path": "a"}],
        **sections,
    }
    return parse_study(data, tmp_path)


def test_config_declares_categorical_clinical_variables(tmp_path):
    config = _parse(
        tmp_path,
        {"categorical": ["cp"], "merge_levels": {"cp": {"1-2": ["1", "2"]}}},
        nomogram={"levels": {"cp": {"1-2": "angina"}}},
    )
    assert config.clinical_categorical == ("cp",)
    assert config.merge_levels == {"cp": {"1-2": ("1", "2")}}
    assert config.nomogram_levels == {"cp": {"1-2": "angina"}}
    protocol = config.protocol()
    assert protocol["clinical_categorical"] == ["cp"]
    assert protocol["merge_levels"] == {"cp": {"1-2": ["1", "2"]}}
    # A study without categorical variables keeps its protocol (and pinned hash).
    plain = _parse(tmp_path, {})
    assert "clinical_categorical" not in plain.protocol()


@pytest.mark.parametrize(
    ("study", "sections", "message"),
    [
        (
            {"categorical": ["weight"]},
            {},
            r"\[study\]: categorical \['weight'\] are not clinical variables; the clinical",
        ),
        (
            {"categorical": ["chol"], "features": ["chol"]},
            {},
            r"\['chol'\] are features: only clinical variables are one-hot encoded",
        ),
        ({"categorical": ["y"]}, {}, r"categorical \['y'\] are not clinical variables"),
        ({"categorical": ["cp", "cp"]}, {}, r"'categorical' lists a name twice"),
        ({"categorical": "cp"}, {}, r"'categorical' must be a list of non-empty strings"),
        (
            {"clinical": ["a=b"], "categorical": ["a=b"]},
            {},
            r"categorical variable\(s\) \['a=b'\] hold '='",
        ),
        (
            {"clinical": ["cp", "cp=2"], "categorical": ["cp"]},
            {},
            r"\['cp=2'\] are named like the dummy columns",
        ),
        (
            {"categorical": ["cp"]},
            {"harmonization": {"covariates": ["cp"]}},
            r"covariate\(s\) \['cp'\] are categorical clinical variables",
        ),
        (
            {"categorical": ["cp"], "merge_levels": {"age": {"x": ["1", "2"]}}},
            {},
            r"merge_levels.age: 'age' is not in \[study\] categorical",
        ),
        (
            {"categorical": ["cp"], "merge_levels": {"cp": {"x": ["1"]}}},
            {},
            r"merge_levels.cp.x must list two or more levels",
        ),
        (
            {"categorical": ["cp"], "merge_levels": {"cp": {"x": ["1", "2"], "z": ["2", "3"]}}},
            {},
            r"level\(s\) \['2'\] are merged twice",
        ),
        (
            {"categorical": ["cp"], "merge_levels": {"cp": {"x": ["1", "2"]}}},
            {"harmonization": {"covariates": ["cp"], "categorical": ["cp"]}},
            r"also a categorical ComBat covariate",
        ),
        (
            {"categorical": ["cp"]},
            {"nomogram": {"levels": {"cp": ["a", "b"]}}},
            r"levels.cp of a categorical variable must be a table of level",
        ),
    ],
)
def test_config_errors_are_one_line(tmp_path, study, sections, message):
    with pytest.raises(StudyConfigError, match=message) as err:
        _parse(tmp_path, study, **sections)
    assert "\n" not in str(err.value)


def test_unknown_study_key_suggests_categorical(tmp_path):
    with pytest.raises(StudyConfigError, match="did you mean 'categorical'"):
        _parse(tmp_path, {"categorial": ["cp"]})
