"""Per-site and pooled evaluation equals the reference formulas on the pooled rows.

The study is the clinical heart-disease study on three real hospitals. The reference
model is statsmodels' Logit on the pooled training rows; its predictions on each site's
rows feed independent oracles: pROC's DeLong formulas written out, statsmodels for
calibration, ResourceSelection's Hosmer-Lemeshow transcribed, dcurves for net benefit,
scipy for the exact binomial interval and a brute-force Youden search.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from scipy import stats
from scipy.special import expit

from radfed.server.federation.inprocess import InProcessTransport
from radfed.server.study.driver import FederatedStudy
from radfed.tests.reference import (
    delong_oracle,
    feature_tables,
    hoslem_oracle,
    pooled_logit,
    pooled_rows,
)

GRID = np.round(np.arange(1, 100) / 100, 2)
TOL = 1e-8


@pytest.fixture
def evaluated(heart_study):
    return FederatedStudy(heart_study, InProcessTransport.from_study(heart_study)).run()


@pytest.fixture
def reference(heart_study, evaluated):
    """Rows of every site and split with the reference model's linear predictor."""
    tables = feature_tables(heart_study)
    train = pooled_rows(heart_study, tables, "train")
    test = pooled_rows(heart_study, tables, "test")
    columns = evaluated.models["clinical"].columns
    fit = pooled_logit(train, heart_study.outcome, columns)
    mean, sd = train[columns].mean(), train[columns].std(ddof=0)
    rows = []
    for split, frame in (("train", train), ("test", test)):
        z = ((frame[columns] - mean) / sd).to_numpy()
        lp = fit.params[0] + z @ fit.params[1:]
        rows.append(frame.assign(split=split, lp=lp, p=expit(lp)))
    return pd.concat(rows, ignore_index=True)


def _calibration(y: np.ndarray, lp: np.ndarray) -> np.ndarray:
    return sm.Logit(y, sm.add_constant(lp)).fit(disp=0, tol=1e-12).params


def _net_benefit(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    import dcurves

    frame = pd.DataFrame({"y": y, "p": p})
    curve = dcurves.dca(data=frame, outcome="y", modelnames=["p"], thresholds=GRID)
    return curve[curve["model"] == "p"].sort_values("threshold")["net_benefit"].to_numpy()


def test_site_metrics_equal_the_reference_formulas(heart_study, evaluated, reference):
    outcome = heart_study.outcome
    for site in heart_study.training_sites:
        for split in ("train", "test"):
            rows = reference[(reference["site"] == site) & (reference["split"] == split)]
            y, lp, p = rows[outcome].to_numpy(), rows["lp"].to_numpy(), rows["p"].to_numpy()
            m = evaluated.performance["clinical"][site][split]
            assert m["status"] == "ok" and m["n"] == len(y) and m["events"] == y.sum()
            auc, cov = delong_oracle(y, lp[:, None])
            assert m["auc"] == pytest.approx(auc[0], abs=TOL)
            assert m["auc_se"] == pytest.approx(np.sqrt(cov[0, 0]), abs=TOL)
            half = stats.norm.ppf(0.975) * np.sqrt(cov[0, 0])
            np.testing.assert_allclose(
                m["auc_ci"], np.clip([auc[0] - half, auc[0] + half], 0, 1), atol=TOL
            )
            assert m["brier"] == pytest.approx(np.mean((p - y) ** 2), abs=TOL)
            cal = m["calibration"]
            intercept, slope = _calibration(y, lp)
            assert cal["intercept"] == pytest.approx(intercept, abs=1e-6)
            assert cal["slope"] == pytest.approx(slope, abs=1e-6)
            chisq, df = hoslem_oracle(y, p)
            # ResourceSelection's g - 2 df where the model was fitted; g on the test split.
            df = df + 2 if split == "test" else df
            assert cal["hl_statistic"] == pytest.approx(chisq, rel=1e-7)
            assert cal["hl_df"] == df
            assert cal["hl_p"] == pytest.approx(stats.chi2.sf(chisq, df), rel=1e-6)
            _assert_merged_bins(cal["bins"], y, p)
            # Decision curves: exact wherever the site sent its exact count (it merges
            # threshold cells until every count passes its minimum cell size).
            exact = np.asarray(m["thresholds_exact"])
            np.testing.assert_allclose(
                np.asarray(m["net_benefit"])[exact], _net_benefit(y, p)[exact], atol=1e-9
            )
            # Events and non-events are merged separately: each exact where its own
            # cells were not merged.
            ev, nev = np.asarray(m["events_exact"]), np.asarray(m["nonevents_exact"])
            assert ev.any() and nev.any() and np.array_equal(exact, ev & nev)
            tp = np.array([(p[y == 1] >= t).sum() for t in GRID])
            fp = np.array([(p[y == 0] >= t).sum() for t in GRID])
            np.testing.assert_allclose(np.asarray(m["roc"]["tpr"])[ev] * y.sum(), tp[ev], atol=1e-9)
            np.testing.assert_allclose(
                np.asarray(m["roc"]["fpr"])[nev] * (1 - y).sum(), fp[nev], atol=1e-9
            )


def _assert_merged_bins(bins: dict, y: np.ndarray, p: np.ndarray, min_cell: int = 3) -> None:
    """Each merged risk bin (its totals at its first 0.1-wide bin) holds what a histogram
    of the predictions puts in its range, and passes the minimum cell size."""
    edges = np.linspace(0, 1, 11)
    hist_n, hist_events = np.histogram(p, edges)[0], np.histogram(p[y == 1], edges)[0]
    n, observed = np.asarray(bins["n"]), np.asarray(bins["observed"])
    starts = np.flatnonzero(n > 0)
    assert n.sum() == len(y) and observed.sum() == y.sum()
    for a, b in zip(starts, [*starts[1:], len(n)], strict=True):
        assert n[a] == hist_n[a:b].sum() and observed[a] == hist_events[a:b].sum()
        assert n[a + 1 : b].sum() == 0
    for v in (n, observed, n - observed):
        assert np.all((v == 0) | (v >= min_cell))


def test_pooled_metrics_equal_the_reference_on_pooled_rows(heart_study, evaluated, reference):
    from sklearn.metrics import roc_auc_score

    outcome = heart_study.outcome
    for split in ("train", "test"):
        rows = reference[reference["split"] == split]
        y, lp, p = rows[outcome].to_numpy(), rows["lp"].to_numpy(), rows["p"].to_numpy()
        m = evaluated.performance["clinical"]["pooled"][split]
        assert m["n"] == len(y) and m["events"] == y.sum()
        assert m["brier"] == pytest.approx(np.mean((p - y) ** 2), abs=TOL)
        intercept, slope = _calibration(y, lp)
        assert m["calibration"]["intercept"] == pytest.approx(intercept, abs=1e-6)
        assert m["calibration"]["slope"] == pytest.approx(slope, abs=1e-6)
        _assert_within_merged_bounds(evaluated, split, m, y, p, rows["site"].to_numpy())
        # Pairs across sites are compared on the sites' merged threshold counts:
        # approximate, and says so.
        assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=0.05)
        assert "auc" in m["approximate"] and "hl" in m["approximate"]


def _assert_within_merged_bounds(evaluated, split, m, y, p, sites) -> None:
    """Pooled net benefit: the truth and the federated value both lie in the band that
    the sites' merged threshold cells leave open."""
    lo_tp = np.zeros(len(GRID))
    hi_tp, lo_fp, hi_fp = lo_tp.copy(), lo_tp.copy(), lo_tp.copy()
    for site in np.unique(sites):
        s = evaluated.performance["clinical"][site][split]
        exact = np.asarray(s["thresholds_exact"])
        events, nonevents = s["events"], s["n"] - s["events"]
        tp = np.round(np.asarray(s["roc"]["tpr"]) * events)
        fp = np.round(np.asarray(s["roc"]["fpr"]) * nonevents)
        # A threshold in a merged cell [t_a, t_b): the count lies between those at t_b
        # (the next exact threshold, 0 past the last) and at t_a (what the site sent).
        for i in range(len(GRID)):
            nxt = np.flatnonzero(exact[i + 1 :])
            b = i + 1 + nxt[0] if len(nxt) else None
            hi_tp[i] += tp[i]
            hi_fp[i] += fp[i]
            lo_tp[i] += tp[b] if b is not None and not exact[i] else (tp[i] if exact[i] else 0)
            lo_fp[i] += fp[b] if b is not None and not exact[i] else (fp[i] if exact[i] else 0)
    n, w = len(y), GRID / (1 - GRID)
    low, high = lo_tp / n - hi_fp / n * w, hi_tp / n - lo_fp / n * w
    truth = _net_benefit(y, p)
    nb = np.asarray(m["net_benefit"])
    assert np.all((truth >= low - 1e-9) & (truth <= high + 1e-9))
    assert np.all((nb >= low - 1e-9) & (nb <= high + 1e-9))


def test_cutoff_is_youden_on_pooled_training_data(heart_study, evaluated, reference):
    outcome = heart_study.outcome
    train = reference[reference["split"] == "train"]
    y, p = train[outcome].to_numpy(), train["p"].to_numpy()
    youden = np.array([np.mean(p[y == 1] >= t) + np.mean(p[y == 0] < t) - 1 for t in GRID])
    cut = evaluated.details["evaluation"]["cutoffs"]["clinical"]
    # Searched on the sites' merged counts: the cut-off's true Youden index is within a
    # few patients' worth of the best one.
    assert youden[np.flatnonzero(np.isclose(GRID, cut))[0]] >= youden.max() - 0.05
    for site in heart_study.training_sites:
        rows = reference[(reference["site"] == site) & (reference["split"] == "test")]
        y, p = rows[outcome].to_numpy(), rows["p"].to_numpy()
        m = evaluated.performance["clinical"][site]["test"]
        predicted = p >= cut
        assert m["cutoff"] == cut
        if not m["thresholds_exact"][int(np.flatnonzero(np.isclose(GRID, cut))[0])]:
            assert "sensitivity" in m["approximate"]
            continue
        assert m["sensitivity"] == pytest.approx(predicted[y == 1].mean(), abs=1e-12)
        assert m["specificity"] == pytest.approx((~predicted[y == 0]).mean(), abs=1e-12)
        correct = int((predicted == (y == 1)).sum())
        assert m["accuracy"] == pytest.approx(correct / len(y), abs=1e-12)
        ci = stats.binomtest(correct, len(y)).proportion_ci(method="exact")
        np.testing.assert_allclose(m["accuracy_ci"], [ci.low, ci.high], atol=1e-9)


def test_evaluation_replies_are_aggregates(heart_study):
    """Every array an evaluate reply holds is sized by the request: models x thresholds
    (99) or risk bins (10), or the drawn model's numeric columns x the sites' value grid
    (the nomogram's axis ranges), never by the number of patients."""
    from radfed.shared.evaluation_stats import VALUE_GRID
    from radfed.shared.messages import from_record

    transport = InProcessTransport.from_study(heart_study)
    exchange = transport._exchange
    replies: list[dict] = []

    def spy(requests):
        out = exchange(requests)
        if from_record(next(iter(requests.values())))["task"] == "evaluate":
            replies.extend(from_record(r) for r in out.values())
        return out

    transport._exchange = spy
    result = FederatedStudy(heart_study, transport).run()
    k = len(result.models)
    shapes = {v.shape for r in replies for v in r.values() if isinstance(v, np.ndarray)}
    c = len(result.details["evaluation"]["nomogram_ranges"])
    assert shapes == {(k,), (k, k), (k, 99), (k, 10), (c, len(VALUE_GRID))}


def test_pooled_auc_is_exact_within_sites_and_near_across(heart_study, evaluated, reference):
    """The pooled AUC: pairs within a site exact (the sites' DeLong AUCs), pairs across
    sites from their merged threshold counts; within 0.05 of the pooled rows' AUC at
    min_cell 3 (what the sites' merging costs; 0.03 seen)."""
    from sklearn.metrics import roc_auc_score

    outcome = heart_study.outcome
    for split in ("train", "test"):
        rows = reference[reference["split"] == split]
        y, p = rows[outcome].to_numpy(), rows["p"].to_numpy()
        m = evaluated.performance["clinical"]["pooled"][split]
        assert m["auc"] == pytest.approx(roc_auc_score(y, p), abs=0.05)
        assert "auc" in m["approximate"]
