"""``[selection] mrmr_in_folds``: mRMR inside each LASSO CV fold, against pooled oracles.

On the heart-disease pipeline study (three hospitals, ComBat, mRMR to 2 of the 5 tabular
stand-in features, 5-fold LASSO CV), each fold's federated picks equal
``mrmr.mrmr_classif`` on that fold's pooled training rows (neuroCombat-harmonised), in
order, and each fold's held-out deviance curve equals scikit-learn's L1 logistic fits
on those picks only (glmnet's objective: C = 1/(N λ), intercept unpenalised), with the
full-data standardisation and the λ sequence of the full-data fit on the ordinary
picks. The oracles share no code with radfed's statistics. The fold of each row is the
one the site wrote to its assignment file.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from radfed.client.site_state import default_state_dir
from radfed.server.federation.inprocess import InProcessTransport
from radfed.server.study.driver import FederatedStudy
from radfed.shared.config import load_study
from radfed.shared.messages import roundtrip
from radfed.tests.conftest import heart_study_text
from radfed.tests.reference import (
    complete_rows,
    expand_features,
    feature_tables,
    glmnet_deviance,
    pooled_combat,
    pooled_training_rows,
    site_folds,
    sklearn_l1,
)


def _study(heart_dir, line: str, k: int = 4):
    """The heart pipeline study with ``line`` added to its [selection] table and mRMR
    to ``k`` features."""
    text = heart_study_text(["cleveland", "hungarian", "va"], pipeline=True)
    text = text.replace("n_lambdas = 20\n", f"n_lambdas = 20\n{line}\n")
    text = text.replace("mrmr_k = 4\n", f"mrmr_k = {k}\n")
    path = heart_dir / "study.toml"
    path.write_text(text)
    return load_study(path)


#: The sites' secrets are fixed here (a site draws its split and folds with its own
#: secret, random by default) so that, with mRMR to 2 of the 5 features, some folds
#: pick a feature the full data does not and the LASSO's per-fit exclusion is exercised.
SECRET = "mrmr-folds-0"


def _fix_secrets(config) -> None:
    for site in config.sites:
        folder = default_state_dir(site.name, site.path)
        folder.mkdir(parents=True, exist_ok=True)
        key = hashlib.sha256(f"{SECRET}/{site.name}".encode()).digest()
        (folder / "secret.key").write_bytes(key)


def _run(config):
    _fix_secrets(config)
    transport = InProcessTransport.from_study(config)
    return FederatedStudy(config, transport).run(), transport


@pytest.fixture
def in_folds(heart_dir):
    config = _study(heart_dir, "mrmr_in_folds = true", k=2)
    result, transport = _run(config)
    return config, result, transport


def _training_folds(config, tables: dict[str, pd.DataFrame]) -> np.ndarray:
    """The CV fold of every pooled training row, in reference.pooled_rows' order."""
    folds = []
    for name, table in tables.items():
        complete, test = complete_rows(config, name, table)
        folds.append(site_folds(config, name, table.loc[complete.index[~test]]))
    return np.concatenate(folds)


def test_fold_picks_and_fold_curves_equal_pooled_oracles(in_folds):
    from mrmr import mrmr_classif

    config, result, _ = in_folds
    tables = feature_tables(config)
    config = expand_features(config, tables)
    rows = pooled_training_rows(config, tables)
    harmonised = pooled_combat(rows, config)
    y = rows[config.outcome].to_numpy()
    folds = _training_folds(config, tables)
    K, k = config.selection.folds, config.selection.mrmr_k
    selection = result.details["selection"]
    mrmr, lasso = selection["mrmr"], selection["lasso"]
    assert "inside each fold" in mrmr["placement"]
    assert mrmr["selected"] == mrmr_classif(
        X=harmonised, y=rows[config.outcome], K=k, show_progress=False, n_jobs=1
    )
    assert [f["fold"] for f in mrmr["folds"]] == list(range(K))
    picks = []
    for f in range(K):
        train = folds != f
        expected = mrmr_classif(
            X=harmonised[train].reset_index(drop=True),
            y=rows.loc[train, config.outcome].reset_index(drop=True),
            K=k,
            show_progress=False,
            n_jobs=1,
        )
        assert mrmr["folds"][f]["selected"] == expected, f
        picks.append(expected)
    # The option matters here: some folds pick features the full data does not, so
    # the LASSO runs on their union with each fit held to its own picks.
    assert any(set(p) != set(mrmr["selected"]) for p in picks)

    # The full-data fit (λ sequence, Radscore) stays on the ordinary picks.
    assert lasso["features"] == mrmr["selected"]
    Z_all = (harmonised - harmonised.mean()) / harmonised.std(ddof=0)
    Z_full = Z_all[mrmr["selected"]].to_numpy()
    lambdas = np.array(lasso["lambdas"])
    assert lambdas[0] == pytest.approx(np.abs(Z_full.T @ (y - y.mean())).max() / len(y))

    # Each fold's held-out curve: L1 fits on the fold's own picks, full standardisation.
    means = np.empty((K, len(lambdas)))
    for f in range(K):
        train, test = folds != f, folds == f
        Z = Z_all[picks[f]].to_numpy()
        for i, lam in enumerate(lambdas):
            b = sklearn_l1(Z[train], y[train], lam)
            means[f, i] = glmnet_deviance(b[0] + Z[test] @ b[1:], y[test]).mean()
    np.testing.assert_allclose(np.array(lasso["fold_deviance"]), means, atol=1e-4)
    n_k = np.bincount(folds, minlength=K).astype(float)
    cvm = n_k @ means / n_k.sum()
    cvsd = np.sqrt(n_k @ (means - cvm) ** 2 / n_k.sum() / (K - 1))
    np.testing.assert_allclose(lasso["cvm"], cvm, atol=1e-4)
    np.testing.assert_allclose(lasso["cvsd"], cvsd, atol=1e-4)
    i_min = int(np.argmin(cvm))
    assert lasso["lambda_min"] == lambdas[i_min]


def test_option_off_changes_nothing(heart_dir):
    """``mrmr_in_folds = false`` is the study without the key, result for result."""
    plain, _ = _run(_study(heart_dir, ""))
    off, _ = _run(_study(heart_dir, "mrmr_in_folds = false"))
    assert off.details["selection"] == plain.details["selection"]
    assert off.rounds == plain.rounds
    assert "folds" not in plain.details["selection"]["mrmr"]
    assert "fold_deviance" not in plain.details["selection"]["lasso"]


def test_fold_selections_share_rounds(in_folds, heart_dir):
    """The K + 1 mRMR selections cost no more rounds than the slowest of them."""
    _, result, _ = in_folds
    mrmr = result.details["selection"]["mrmr"]
    slowest = max([mrmr["rounds"], *(f["rounds"] for f in mrmr["folds"])])
    assert result.rounds["mrmr"] == slowest


def test_site_refuses_folds_it_lacks_and_ignores_row_sets(in_folds):
    """A hostile coordinator can name only a fold the site has: another fold number, a
    fold of the wrong type, or a step other than mRMR's is refused; row sets it sends
    along are not read (the reply is the one without them)."""
    config, _, transport = in_folds
    worker = next(iter(transport.workers.values()))
    protocol = config.protocol()
    features = list(expand_features(config, feature_tables(config)).features)
    base = {
        **transport.context,
        "task": "select",
        "protocol": protocol,
        "step": "mrmr_moments",
        "classes": [0, 1],
        "select_columns": features,
    }

    def ask(**extra):
        return worker.handle(roundtrip({**base, **extra}))

    ok = ask(without_fold=0)
    assert "error" not in ok, ok
    for bad in (config.selection.folds, -1, 1.5, "0", [0, 1]):
        reply = ask(without_fold=bad)
        assert "error" in reply, bad
    lasso = ask(
        without_fold=0,
        step="lasso_irls",
        problem_folds=np.array([0]),
        beta=np.zeros((1, len(features) + 1)),
        center=np.zeros(len(features)),
        scale=np.ones(len(features)),
    )
    assert "error" in lasso
    # Crafted row sets ride along unread: the reply is the plain fold reply.
    crafted = ask(without_fold=0, rows=[0, 1, 2], row_mask=np.ones(3, dtype=bool))
    assert "error" not in crafted, crafted
    for key in ("n", "sum", "sumsq"):
        np.testing.assert_array_equal(crafted[key], ok[key])
    # The fold's reply is over fewer rows than the whole training split.
    whole = ask()
    assert np.sum(ok["n"]) < np.sum(whole["n"])


def test_config_rejects_a_non_boolean(heart_dir):
    from radfed.shared.errors import StudyConfigError

    with pytest.raises(StudyConfigError, match="mrmr_in_folds must be true or false"):
        _study(heart_dir, 'mrmr_in_folds = "yes"')
    assert _study(heart_dir, "").selection.mrmr_in_folds is False
