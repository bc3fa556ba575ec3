"""Distributed ComBat against neuroCombat run on the pooled rows (real and synthetic data).

neuroCombat 0.2.12 is the oracle: its plain path (no ``ref_batch``) runs on numpy 2.
Expected values for held-out rows and new batches are computed here from neuroCombat's
fitted ``estimates`` dict and its own helper functions, not from radfed's code.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import logsumexp
from scipy.stats import norm

from radfed.harmonization.combat import (
    ComBat,
    ComBatEstimates,
    ComBatWarning,
    apply_combat,
    combat_in_memory,
    encode_covariates,
    estimate_new_batch,
    site_batch_moments,
    site_design_moments,
    site_residual_moments,
    solve_location,
    solve_pooled_variance,
)

nc = pytest.importorskip("neuroCombat.neuroCombat")

TOL = 1e-6
MODES = {
    "parametric": {"parametric": True, "mean_only": False},
    "nonparametric": {"parametric": False, "mean_only": False},
    "mean_only": {"parametric": True, "mean_only": True},
    "nonparametric_mean_only": {"parametric": False, "mean_only": True},
}
HEART_COLUMNS = [
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num",
]  # fmt: skip
HEART_FEATURES = ["trestbps", "chol", "thalach", "oldpeak"]


# -- data ---------------------------------------------------------------------------------


def heart_data(shared_data: Path, hospitals: list[str]) -> pd.DataFrame:
    """Complete rows of the features and covariates; chol = 0 is UCI's code for missing."""
    frames = []
    for name in hospitals:
        path = shared_data / "heart_disease" / f"processed.{name}.data"
        frame = pd.read_csv(path, header=None, names=HEART_COLUMNS, na_values=["NA", "?"])
        frame = frame[[*HEART_FEATURES, "age", "sex"]].dropna()
        frames.append(frame[frame["chol"] > 0].assign(hospital=name))
    return pd.concat(frames, ignore_index=True)


def synthetic_data(seed: int = 1, p: int = 120) -> pd.DataFrame:
    """Four scanners with strong additive and multiplicative effects, age and a group."""
    rng = np.random.default_rng(seed)
    sizes = {"A": 40, "B": 120, "C": 70, "D": 25}
    batch = np.repeat(list(sizes), list(sizes.values()))
    n = batch.size
    # neuroCombat reads numeric covariates as float32: make them exactly representable.
    age = rng.normal(60, 10, n).astype(np.float32).astype(float)
    group = rng.choice(["g1", "g2", "g3"], n)
    sd = rng.uniform(0.5, 3, p)
    Y = rng.normal(5, 2, p) + 0.04 * age[:, None] * rng.normal(size=p)
    Y = Y + 0.5 * (group == "g2")[:, None] - 0.3 * (group == "g3")[:, None]
    noise = rng.normal(size=(n, p))
    for b, level in enumerate(sizes):
        rows = batch == level
        scale = rng.uniform(0.6, 1.8, p)
        shift = rng.normal([-1.5, 0.0, 1.0, 2.0][b], 0.3, p)
        noise[rows] = noise[rows] * scale + shift
    Y = Y + sd * noise
    frame = pd.DataFrame(Y, columns=[f"f{j:03d}" for j in range(p)])
    return frame.assign(batch=batch, age=age, group=group)


def neurocombat(
    Y: np.ndarray, covars: pd.DataFrame, batch_col: str, categorical, continuous, **mode
) -> dict:
    """neuroCombat on pooled rows; Y is (n, p), returned ``data`` is (n, p) too."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = nc.neuroCombat(
            np.array(Y.T, dtype=float),
            covars.reset_index(drop=True),
            batch_col,
            categorical_cols=categorical,
            continuous_cols=continuous,
            **mode,
        )
    out["data"] = out["data"].T
    return out


def run_sites(sites_rows: list[np.ndarray], Y, batch, cov, n_rows: int, **kwargs):
    """Run the distributed protocol on row subsets; reassemble in pooled row order."""
    estimates, outs = combat_in_memory([(Y[r], batch[r], cov[r]) for r in sites_rows], **kwargs)
    pooled = np.full((n_rows, Y.shape[1]), np.nan)
    for rows, out in zip(sites_rows, outs, strict=True):
        pooled[rows] = out
    return estimates, pooled


def heart_sites(frame: pd.DataFrame) -> list[np.ndarray]:
    """Cleveland spans two sites; one site holds Hungarian and VA."""
    idx = np.arange(len(frame))
    cleveland = idx[frame["hospital"] == "cleveland"]
    return [cleveland[::2], cleveland[1::2], idx[frame["hospital"] != "cleveland"]]


def synthetic_sites(frame: pd.DataFrame) -> list[np.ndarray]:
    """Batch A spans two sites; one site holds A's rest and D; one holds B and C."""
    idx = np.arange(len(frame))
    a = idx[frame["batch"] == "A"]
    return [
        a[:15],
        np.concatenate([a[15:], idx[frame["batch"] == "D"]]),
        idx[frame["batch"].isin(["B", "C"])],
    ]


def encode_heart(frame: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    return encode_covariates(frame, ["age"], {"sex": [0.0, 1.0]})


def encode_synthetic(frame: pd.DataFrame) -> tuple[np.ndarray, list[str]]:
    return encode_covariates(frame, ["age"], {"group": ["g1", "g2", "g3"]})


@pytest.fixture(scope="module")
def heart(shared_data: Path) -> pd.DataFrame:
    return heart_data(shared_data, ["cleveland", "hungarian", "va"])


@pytest.fixture(scope="module")
def synth() -> pd.DataFrame:
    return synthetic_data()


def features(frame: pd.DataFrame) -> np.ndarray:
    cols = [c for c in frame.columns if c in HEART_FEATURES or c.startswith("f")]
    return frame[cols].to_numpy(dtype=float)


def batch_spread(Y: np.ndarray, batch: np.ndarray) -> float:
    """Mean over features of the range of the batch means."""
    return float(np.ptp([Y[batch == b].mean(0) for b in np.unique(batch)], axis=0).mean())


# -- exactness against neuroCombat ------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_heart_hospitals_match_neurocombat(heart: pd.DataFrame, mode: str) -> None:
    Y, batch = features(heart), heart["hospital"].to_numpy()
    cov, names = encode_heart(heart)
    ref = neurocombat(
        Y, heart[["hospital", "age", "sex"]], "hospital", ["sex"], ["age"], **MODES[mode]
    )
    assert np.isfinite(ref["data"]).all()
    estimates, out = run_sites(
        heart_sites(heart), Y, batch, cov, len(Y), covariate_names=names, **MODES[mode]
    )
    assert np.abs(out - ref["data"]).max() < TOL
    # the batches were really harmonised, not passed through
    assert np.abs(out - Y).max() > 1
    np.testing.assert_allclose(
        estimates.var_pooled, ref["estimates"]["var.pooled"][:, 0], rtol=1e-9
    )
    np.testing.assert_allclose(estimates.gamma_star, ref["estimates"]["gamma.star"], atol=1e-8)


@pytest.mark.parametrize("mode", MODES)
def test_synthetic_many_features_match_neurocombat(synth: pd.DataFrame, mode: str) -> None:
    Y, batch = features(synth), synth["batch"].to_numpy()
    cov, names = encode_synthetic(synth)
    ref = neurocombat(
        Y, synth[["batch", "age", "group"]], "batch", ["group"], ["age"], **MODES[mode]
    )
    assert np.isfinite(ref["data"]).all()
    estimates, out = run_sites(
        synthetic_sites(synth), Y, batch, cov, len(Y), covariate_names=names, **MODES[mode]
    )
    assert np.abs(out - ref["data"]).max() < TOL
    assert np.abs(out - Y).max() > 1
    np.testing.assert_allclose(estimates.delta_star, ref["estimates"]["delta.star"], rtol=1e-7)
    # the harmonised batch means are closer together than the raw ones
    assert batch_spread(out, batch) < 0.5 * batch_spread(Y, batch)


def test_priors_match_neurocombat(synth: pd.DataFrame) -> None:
    Y, batch = features(synth), synth["batch"].to_numpy()
    cov, names = encode_synthetic(synth)
    ref = neurocombat(Y, synth[["batch", "age", "group"]], "batch", ["group"], ["age"])["estimates"]
    estimates, _ = run_sites(synthetic_sites(synth), Y, batch, cov, len(Y), covariate_names=names)
    np.testing.assert_allclose(estimates.gamma_bar, ref["gamma_bar"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(estimates.tau2, ref["t2"], rtol=1e-9)
    np.testing.assert_allclose(estimates.a_prior, ref["a_prior"], rtol=1e-9)
    np.testing.assert_allclose(estimates.b_prior, ref["b_prior"], rtol=1e-9)
    np.testing.assert_allclose(estimates.grand_mean, ref["stand.mean"][:, 0], rtol=1e-12)


def test_nonparametric_stays_finite_where_neurocombat_underflows() -> None:
    """A batch of 900 rows: neuroCombat's (2πδ)^(-n/2)·exp(...) underflows to 0/0."""
    rng = np.random.default_rng(0)
    p, batch = 20, np.repeat(["A", "B"], [900, 100])
    Y = rng.normal(size=(batch.size, p)) + rng.normal(0, 3, p)
    Y[batch == "B"] += rng.normal(1, 1, p)
    ref = neurocombat(Y, pd.DataFrame({"batch": batch}), "batch", [], [], parametric=False)
    assert np.isnan(ref["data"]).any()  # the case this test is about
    estimates, (out,) = combat_in_memory([(Y, batch, None)], parametric=False)
    assert np.isfinite(out).all()
    # batch B (100 rows) is still fine in neuroCombat's estimates (its output is all NaN:
    # the NaN γ* of batch A enters every row through the design product)
    ref_gamma, ref_delta = ref["estimates"]["gamma.star"], ref["estimates"]["delta.star"]
    assert np.isnan(ref_gamma[0]).all() and np.isfinite(ref_gamma[1]).all()
    np.testing.assert_allclose(estimates.gamma_star[1], ref_gamma[1], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(estimates.delta_star[1], ref_delta[1], rtol=1e-8)
    # Independent oracle: int_eprior with row-level log-likelihoods, normalised in logs.
    z = (Y - estimates.grand_mean) / np.sqrt(estimates.var_pooled)
    for b, level in enumerate(estimates.batch_levels):
        s = z[batch == level]
        g_hat, d_hat = s.mean(0), s.var(0, ddof=1)
        for g in range(p):
            others = np.delete(np.arange(p), g)
            loglik = norm.logpdf(s[:, [g]], g_hat[others], np.sqrt(d_hat[others])).sum(0)
            w = np.exp(loglik - logsumexp(loglik))
            assert estimates.gamma_star[b, g] == pytest.approx(w @ g_hat[others], abs=1e-9)
            assert estimates.delta_star[b, g] == pytest.approx(w @ d_hat[others], rel=1e-9)


# -- fitted on training rows, applied to held-out rows -------------------------------------


def neurocombat_apply(ref: dict, Y: np.ndarray, batch, cov_train, cov_new) -> np.ndarray:
    """Harmonise new rows of known batches with neuroCombat's fitted estimates.

    neuroCombatFromTraining ignores covariates, so the covariate coefficients are
    recovered from the training ``mod.mean`` (= design without batch columns · B̂).
    """
    est = ref["estimates"]
    beta_cov = np.linalg.lstsq(cov_train, est["mod.mean"].T, rcond=None)[0]
    mean = est["stand.mean"][:, 0] + cov_new @ beta_cov
    sd = np.sqrt(est["var.pooled"][:, 0])
    idx = [list(est["batches"]).index(b) for b in batch]
    z = (Y - mean) / sd
    return (z - est["gamma.star"][idx]) / np.sqrt(est["delta.star"][idx]) * sd + mean


@pytest.mark.parametrize("mode", ["parametric", "nonparametric", "mean_only"])
def test_train_fit_applied_to_held_out_rows(heart: pd.DataFrame, mode: str) -> None:
    test = np.random.default_rng(3).random(len(heart)) < 0.3
    train, held = heart[~test].reset_index(drop=True), heart[test].reset_index(drop=True)
    cov_train, names = encode_heart(train)
    cov_held, _ = encode_heart(held)
    ref = neurocombat(
        features(train),
        train[["hospital", "age", "sex"]],
        "hospital",
        ["sex"],
        ["age"],
        **MODES[mode],
    )
    estimates, _ = run_sites(
        heart_sites(train),
        features(train),
        train["hospital"].to_numpy(),
        cov_train,
        len(train),
        covariate_names=names,
        **MODES[mode],
    )
    # the held-out rows arrive with covariates only: no outcome anywhere
    out = apply_combat(estimates, features(held), held["hospital"].to_numpy(), cov_held)
    expected = neurocombat_apply(ref, features(held), held["hospital"], cov_train, cov_held)
    assert np.abs(out - expected).max() < TOL


# -- a batch the federation never saw -----------------------------------------------------


def neurocombat_new_batch(ref: dict, Y, cov_train, cov_new, mode: dict) -> np.ndarray:
    """A new batch by neuroCombat's own functions, on rows standardised with ``ref``."""
    est = ref["estimates"]
    beta_cov = np.linalg.lstsq(cov_train, est["mod.mean"].T, rcond=None)[0]
    mean = est["stand.mean"][:, 0] + cov_new @ beta_cov
    sd = np.sqrt(est["var.pooled"][:, 0])
    s_data = ((Y - mean) / sd).T
    info = {"n_batch": 1, "batch_info": [list(range(len(Y)))], "ref_level": None}
    ls = nc.fit_LS_model_and_find_priors(s_data, np.ones((len(Y), 1)), info, mode["mean_only"])
    find = (
        nc.find_parametric_adjustments if mode["parametric"] else nc.find_non_parametric_adjustments
    )
    gamma, delta = find(s_data, ls, info, mode["mean_only"])
    return ((s_data.T - gamma[0]) / np.sqrt(delta[0].astype(float))) * sd + mean


@pytest.mark.parametrize("mode", ["parametric", "nonparametric", "mean_only"])
def test_new_batch_synthetic(synth: pd.DataFrame, mode: str) -> None:
    train, new = synth[synth["batch"] != "D"], synth[synth["batch"] == "D"]
    cov_train, names = encode_synthetic(train)
    cov_new, _ = encode_synthetic(new)
    ref = neurocombat(
        features(train),
        train[["batch", "age", "group"]],
        "batch",
        ["group"],
        ["age"],
        **MODES[mode],
    )
    estimates, outs = combat_in_memory(
        [(features(train), train["batch"], cov_train)], covariate_names=names, **MODES[mode]
    )
    Y_new, batch_new = features(new), new["batch"].to_numpy()
    with pytest.raises(ValueError, match="estimate_new_batch"):
        apply_combat(estimates, Y_new, batch_new, cov_new)
    extended = estimate_new_batch(estimates, Y_new, batch_new, cov_new)
    assert extended.batch_levels == (*estimates.batch_levels, "D")
    out = apply_combat(extended, Y_new, batch_new, cov_new)
    expected = neurocombat_new_batch(ref, Y_new, cov_train, cov_new, MODES[mode])
    assert np.isfinite(expected).all()
    assert np.abs(out - expected).max() < TOL
    # the federation's own batches are untouched
    again = apply_combat(extended, features(train), train["batch"], cov_train)
    np.testing.assert_array_equal(again, outs[0])


def test_new_hospital_heart(heart: pd.DataFrame) -> None:
    """VA held out: harmonised to Cleveland + Hungarian without refitting them."""
    train, new = heart[heart["hospital"] != "va"], heart[heart["hospital"] == "va"]
    cov_train, names = encode_heart(train)
    cov_new, _ = encode_heart(new)
    ref = neurocombat(
        features(train), train[["hospital", "age", "sex"]], "hospital", ["sex"], ["age"]
    )
    estimates, _ = combat_in_memory(
        [(features(train), train["hospital"], cov_train)], covariate_names=names
    )
    extended = estimate_new_batch(estimates, features(new), new["hospital"], cov_new)
    out = apply_combat(extended, features(new), new["hospital"], cov_new)
    expected = neurocombat_new_batch(ref, features(new), cov_train, cov_new, MODES["parametric"])
    assert np.abs(out - expected).max() < TOL


def test_new_batch_training_prior(synth: pd.DataFrame) -> None:
    train, new = synth[synth["batch"] != "D"], synth[synth["batch"] == "D"]
    estimates, _ = combat_in_memory([(features(train), train["batch"], None)])
    extended = estimate_new_batch(estimates, features(new), new["batch"], None, prior="training")
    gamma_bar, tau2, a, b = (
        np.mean(getattr(estimates, k)) for k in ("gamma_bar", "tau2", "a_prior", "b_prior")
    )
    s = (features(new) - estimates.grand_mean) / np.sqrt(estimates.var_pooled)
    g, d = nc.it_sol(s.T, s.mean(0), s.var(0, ddof=1), gamma_bar, tau2, a, b)
    np.testing.assert_allclose(extended.gamma_star[-1], g, rtol=1e-10)
    np.testing.assert_allclose(extended.delta_star[-1], d, rtol=1e-10)
    assert extended.gamma_bar[-1] == pytest.approx(gamma_bar)


# -- degenerate features ------------------------------------------------------------------


def test_constant_feature_left_unadjusted(synth: pd.DataFrame) -> None:
    Y, batch = features(synth), synth["batch"].to_numpy()
    cov, names = encode_synthetic(synth)
    Y_const = Y.copy()
    Y_const[:, 7] = 3.25
    with pytest.warns(ComBatWarning, match=r"f007.*left unadjusted"):
        estimates, out = run_sites(
            synthetic_sites(synth),
            Y_const,
            batch,
            cov,
            len(Y),
            covariate_names=names,
            feature_names=list(synth.columns[: Y.shape[1]]),
        )
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[:, 7], 3.25)
    assert not estimates.adjusted[7] and estimates.adjusted.sum() == Y.shape[1] - 1
    # the other features are neuroCombat's without the constant one (priors included)
    keep = np.arange(Y.shape[1]) != 7
    ref = neurocombat(Y[:, keep], synth[["batch", "age", "group"]], "batch", ["group"], ["age"])
    assert np.abs(out[:, keep] - ref["data"]).max() < TOL


@pytest.mark.parametrize("mode", ["parametric", "nonparametric"])
def test_feature_constant_within_a_batch(synth: pd.DataFrame, mode: str) -> None:
    Y, batch = features(synth), synth["batch"].to_numpy()
    Y[batch == "B", 4] = 0.1  # no covariates: z is then constant in batch B as well
    with pytest.warns(ComBatWarning, match=r"feature_4.*constant within batch 'B'"):
        estimates, (out,) = combat_in_memory([(Y, batch, None)], **MODES[mode])
    assert np.isfinite(out).all() and np.isfinite(estimates.delta_star).all()
    assert np.ptp(out[batch == "B", 4]) < 1e-9
    assert estimates.adjusted.all()


# -- privacy: what a site sends -----------------------------------------------------------


def test_site_statistics_do_not_depend_on_n() -> None:
    rng = np.random.default_rng(5)
    levels, p = ["A", "B", "C"], 30
    shapes = []
    for n, labels in ((6, ["A"] * 6), (600, ["B", "C"] * 300)):
        Y, cov = rng.normal(size=(n, p)), rng.normal(size=(n, 2))
        r1 = site_design_moments(Y, labels, cov, levels)
        beta = rng.normal(size=(5, p))
        r2 = site_residual_moments(Y, labels, cov, levels, beta)
        r3 = site_batch_moments(Y, labels, cov, levels, beta[3:], np.zeros(p), np.ones(p))
        sig = {}
        for round_, reply in enumerate((r1, r2, r3), start=1):
            for key, value in reply.items():
                sig[f"{round_}.{key}"] = np.shape(value)
                assert n not in np.shape(value)
        shapes.append(sig)
    assert shapes[0] == shapes[1]
    assert shapes[0] == {
        "1.xtx": (5, 5),
        "1.xty": (5, p),
        "1.n": (),
        "2.rss": (p,),
        "2.sumsq": (p,),
        "2.n": (),
        "3.n": (3,),
        "3.sum_z": (3, p),
        "3.sum_z2": (3, p),
    }


def test_estimates_payload_roundtrip(synth: pd.DataFrame) -> None:
    estimates, _ = combat_in_memory([(features(synth), synth["batch"], None)], mean_only=True)
    payload = estimates.to_payload()
    assert all(k.startswith("combat_") for k in payload)
    assert all(isinstance(v, np.ndarray | list | float | bool) for v in payload.values())
    assert ComBatEstimates.from_payload(payload).equals(estimates)
    messages = pytest.importorskip("radfed.shared.messages")
    back = ComBatEstimates.from_payload(messages.roundtrip({**payload, "task": "x"}))
    assert back.equals(estimates)
    Y = features(synth)[:10]
    np.testing.assert_array_equal(
        apply_combat(back, Y, synth["batch"][:10], None),
        apply_combat(estimates, Y, synth["batch"][:10], None),
    )
    with pytest.raises(ValueError, match="lacks"):
        ComBatEstimates.from_payload({k: v for k, v in payload.items() if "gamma" not in k})


# -- the pooled estimator -----------------------------------------------------------------


def test_combat_estimator_pooled(synth: pd.DataFrame) -> None:
    frame = synth[[c for c in synth.columns if c.startswith("f")]]
    cov, _ = encode_synthetic(synth)
    model = ComBat(parametric=False)
    assert model.get_params() == {"parametric": False, "mean_only": False}
    out = model.fit_transform(frame, synth["batch"], cov)
    assert isinstance(out, pd.DataFrame) and list(out.columns) == list(frame.columns)
    ref = neurocombat(
        frame.to_numpy(),
        synth[["batch", "age", "group"]],
        "batch",
        ["group"],
        ["age"],
        parametric=False,
    )
    assert np.abs(out.to_numpy() - ref["data"]).max() < TOL
    assert model.estimates_.feature_names == tuple(frame.columns)
    assert model.batch_levels_ == ["A", "B", "C", "D"] and model.n_features_in_ == 120
    with pytest.raises(ValueError, match="not fitted"):
        ComBat().transform(frame, synth["batch"], cov)


# -- input errors -------------------------------------------------------------------------


def test_bad_input_raises(synth: pd.DataFrame) -> None:
    Y, batch = features(synth), synth["batch"].to_numpy()
    levels = ["A", "B", "C", "D"]
    with pytest.raises(ValueError, match="one label per row"):
        site_design_moments(Y, batch[:-1], None, levels)
    with pytest.raises(ValueError, match="covariates must have"):
        site_design_moments(Y, batch, np.ones((3, 1)), levels)
    with pytest.raises(ValueError, match=r"unknown batch level\(s\) \['D'\]"):
        site_design_moments(Y, batch, None, levels[:3])
    Y_nan = Y.copy()
    Y_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="missing"):
        site_design_moments(Y_nan, batch, None, levels)
    confounded = (batch == "A").astype(float)[:, None]  # a covariate that is batch A
    with pytest.raises(ValueError, match=r"singular design.*batch=A.*covariate_0"):
        solve_location([site_design_moments(Y, batch, confounded, levels)], levels)
    with pytest.raises(ValueError, match=r"batch=E.*without rows"):
        solve_location([site_design_moments(Y, batch, None, [*levels, "E"])], [*levels, "E"])
    with pytest.raises(ValueError, match="different shapes"):
        solve_pooled_variance(
            [
                {"rss": np.ones(3), "sumsq": np.ones(3), "n": 5},
                {"rss": np.ones(4), "sumsq": np.ones(4), "n": 5},
            ]
        )
    estimates, _ = combat_in_memory([(Y, batch, None)])
    with pytest.raises(ValueError, match="features, the ComBat fit has 120"):
        apply_combat(estimates, Y[:, :5], batch, None)
    with pytest.raises(ValueError, match="covariates have 1 columns, the fit has 0"):
        apply_combat(estimates, Y, batch, np.ones((len(Y), 1)))


def test_encode_covariates(synth: pd.DataFrame) -> None:
    levels = {"group": ["g1", "g2", "g3"]}
    cov, names = encode_covariates(synth, ["age"], levels)
    assert names == ["age", "group=g2", "group=g3"]
    np.testing.assert_array_equal(cov[:, 0], synth["age"])
    np.testing.assert_array_equal(cov[:, 1], synth["group"] == "g2")
    # a site without level g3 still gets the federation's columns
    site = synth[synth["group"] != "g3"]
    site_cov, site_names = encode_covariates(site, ["age"], levels)
    assert site_names == names and site_cov.shape == (len(site), 3) and not site_cov[:, 2].any()
    with pytest.raises(ValueError, match=r"'group' has values \['g3'\] outside"):
        encode_covariates(synth, [], {"group": ["g1", "g2"]})
    with pytest.raises(ValueError, match="not in the data"):
        encode_covariates(synth, ["weight"], {})
