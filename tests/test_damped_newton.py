"""Damped federated Newton: an iterate the sites refuse, or one that raises the
deviance, is halved back, and the fit still reaches the pooled maximum likelihood.

The data mimic a calibration curve on held-out patients: a cubic polynomial of a
linear predictor whose spread is twice the true one. From perfect calibration
(intercept 0, slope 1, no curvature), the full Newton step's linear predictor lies
beyond ±12 for most of a site's patients, which the saturation rule refuses; before
damping the fit failed there. In the first data the deviance check alone steers clear
of the refusal; in the second (a small high-risk site beside a large ordinary one) a
step lowers the summed deviance yet saturates the small site, and only halving on the
refusal rescues the fit. The reference is statsmodels on the pooled rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy.special import expit

from radfed.api import Federation
from radfed.server.federation.transport import SiteRefusal
from radfed.server.stats.solvers import LogisticSpec, fit_logistic_many
from radfed.shared.privacy import PrivacyPolicy

COLUMNS = ["x", "x2", "x3"]
START = np.array([0.0, 1.0, 0.0, 0.0])


def _frames(seed: int = 5) -> dict[str, pd.DataFrame]:
    """Two sites, heavy-tailed predictions twice as spread as the truth."""
    rng = np.random.default_rng(seed)
    frames = {}
    for site, n in (("north", 90), ("south", 110)):
        x = np.clip(rng.standard_t(4, n) * 2.5, -9, 9)
        y = (rng.random(n) < expit(0.3 + 0.5 * x)).astype(int)
        frames[site] = pd.DataFrame({"outcome": y, "x": x, "x2": x**2, "x3": x**3})
    return frames


def _high_risk_site_frames(seed: int = 25) -> dict[str, pd.DataFrame]:
    """A small site whose patients are mostly high-risk beside a large ordinary one: a
    step can lower the summed deviance yet saturate most of the small site's patients,
    so only the sites' refusal shows the step overshot."""
    rng = np.random.default_rng(seed)
    frames = {}
    for site, n, mu, sd in (
        ("clinic", 40, rng.uniform(4, 9), rng.uniform(0.5, 3)),
        ("hospital", 160, 0.0, rng.uniform(1, 4)),
    ):
        x = np.clip(rng.normal(mu, sd, n), -11, 11)
        eta = rng.uniform(-0.5, 0.5) + rng.uniform(0.2, 0.8) * x
        y = (rng.random(n) < expit(eta)).astype(int)
        frames[site] = pd.DataFrame({"outcome": y, "x": x, "x2": x**2, "x3": x**3})
    return frames


def _design(frame: pd.DataFrame) -> np.ndarray:
    return np.column_stack([np.ones(len(frame)), frame[COLUMNS].to_numpy(float)])


def _undamped_path_is_refused(frames: dict[str, pd.DataFrame]) -> bool:
    """Plain Newton on the pooled rows from START, each iterate judged by every site's
    saturation and concentration rules as the sites would (written here, not radfed's)."""
    policy = PrivacyPolicy()
    X = np.vstack([_design(f) for f in frames.values()])
    y = np.concatenate([f["outcome"].to_numpy(float) for f in frames.values()])
    beta = START.copy()
    for _ in range(50):
        for frame in frames.values():
            eta = _design(frame) @ beta
            w = expit(eta) * (1 - expit(eta))
            saturated = np.mean(np.abs(eta) > policy.saturation_logit) > 0.5
            if saturated or w.sum() ** 2 / (w**2).sum() < policy.min_cell:
                return True
        p = expit(X @ beta)
        step = np.linalg.solve(X.T @ (X * (p * (1 - p))[:, None]), X.T @ (y - p))
        beta = beta + step
        if np.abs(step).max() < 1e-10:
            return False
    return False


@pytest.fixture(scope="module")
def frames() -> dict[str, pd.DataFrame]:
    return _frames()


@pytest.mark.parametrize("make", [_frames, _high_risk_site_frames])
def test_the_undamped_path_overshoots_into_a_refusal(make):
    assert _undamped_path_is_refused(make())


@pytest.mark.parametrize(("make", "refusals"), [(_frames, False), (_high_risk_site_frames, True)])
def test_damped_newton_reaches_the_pooled_maximum_likelihood(make, refusals):
    """``refusals``: whether the damped path itself meets a refused iterate (the
    deviance check alone avoids it in the first data; in the second only the refusal
    shows the overshoot)."""
    frames = make()
    federation = Federation.from_frames(frames, "outcome", clinical=COLUMNS, min_cell=3)
    met: list[SiteRefusal] = []
    ask = federation.transport.ask

    def observed(*args, **kwargs):  # records what the sites answered; changes nothing
        try:
            return ask(*args, **kwargs)
        except SiteRefusal as exc:
            met.append(exc)
            raise

    federation.transport.ask = observed
    pooled = pd.concat(frames.values(), ignore_index=True)
    # Per SD of each column (sites refuse a centre or scale far from their data); the
    # same start in those units: eta = x = mean_x + sd_x z_x.
    center, scale = pooled[COLUMNS].mean().to_numpy(), pooled[COLUMNS].std(ddof=0).to_numpy()
    start = np.array([center[0], scale[0], 0.0, 0.0])
    spec = LogisticSpec(COLUMNS, center, scale, start=start)
    fit = fit_logistic_many(federation.transport, {"curve": spec}, subset="all")["curve"]
    assert fit.iterations > 1

    X, y = _design(pooled), pooled["outcome"].to_numpy(float)
    bfgs = sm.Logit(y, X).fit(method="bfgs", gtol=1e-10, maxiter=5000, disp=0)
    ref = sm.Logit(y, X).fit(start_params=bfgs.params, method="newton", tol=1e-12, disp=0)
    assert ref.mle_retvals["converged"]
    # Back to the raw columns: beta_k / sd_k, and the intercept less their centres.
    A = np.diag(np.r_[1.0, 1.0 / scale])
    A[0, 1:] = -center / scale
    np.testing.assert_allclose(A @ fit.coef, ref.params, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(np.sqrt(np.diag(A @ fit.cov @ A.T)), ref.bse, rtol=1e-6)
    assert fit.deviance == pytest.approx(-2 * ref.llf, rel=1e-10)
    assert fit.n == len(y)
    assert bool(met) == refusals
    assert all(exc.privacy_only for exc in met)


def test_a_fit_that_no_halving_rescues_fails_with_its_reason(frames):
    """Perfect separation: the deviance keeps falling while the coefficients grow until
    the sites refuse the steep model. The fit steps back once; refused again, it stops
    with the reason within a few rounds instead of crawling along the saturation
    rule's boundary for all of its 50."""
    from radfed.shared.errors import FederationError

    separated = {}
    for site, frame in frames.items():
        frame = frame.copy()
        frame["outcome"] = (frame["x"] > 0.1).astype(int)
        separated[site] = frame
    federation = Federation.from_frames(separated, "outcome", clinical=["x"], min_cell=3)
    x = pd.concat(separated.values())["x"]
    spec = LogisticSpec(["x"], np.array([x.mean()]), np.array([x.std(ddof=0)]))
    with pytest.raises(FederationError, match="optimum lies where the sites refuse"):
        fit_logistic_many(federation.transport, {"m": spec}, subset="all")
    assert sum(federation.rounds.values()) < 25
