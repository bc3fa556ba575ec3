"""Features ComBat keeps out: binary ones, found without a patient's value leaving a site.

ComBat models each feature as a location and scale per batch around a covariate fit; a
0/1 feature (a finding present or absent) does not follow that model, and harmonising
it turns its 0s and 1s into other numbers that no patient has. Such features are kept
out of ComBat and pass through unchanged: standardisation, mRMR, the LASSO and the
Radscore see the sites' own values. A study may keep out more features by name
(``[harmonization] exclude``: categorical codes such as 0/1/2).

One federated step, a pair of pure functions:

1. :func:`site_binary_features` (site): the names of the features whose every value at
   the site is 0 or 1, over all of the site's rows of the study (its pinned analysis
   table, never a subset a request names): one yes or no per feature, no count.
2. :func:`solve_kept_out` (coordinator): a feature is binary when every site says so;
   the binary and the declared features are kept out, each with its reason.

The site statistic travels in the ``describe`` reply, so detection costs no round.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from radfed.harmonization.design import ArrayLike, Reply

__all__ = ["BINARY", "DECLARED", "KEY", "site_binary_features", "solve_kept_out"]

#: The reply field of :func:`site_binary_features`.
KEY = "binary_features"
#: Why a feature is kept out of ComBat (results.json's ``harmonization.kept_out``).
BINARY = "binary: every value at every training site is 0 or 1"
DECLARED = "declared in [harmonization] exclude"


def site_binary_features(Y: ArrayLike, feature_names: Sequence[str]) -> dict[str, list[str]]:
    """**Site.** The features whose every value at the site is 0 or 1.

    Parameters
    ----------
    Y : array-like, shape (n, p)
        All of the site's rows of the study (missing values count as not 0 or 1).
    feature_names : sequence of str, length p

    Returns
    -------
    dict
        ``binary_features``: the names, in the order given. A site with a feature all 0
        (or all 1) reports it too: a yes or no per feature, never a count.
    """
    names = [str(n) for n in feature_names]
    Y = np.asarray(Y, dtype=float)
    if Y.ndim != 2 or Y.shape[1] != len(names):
        raise ValueError(f"Y must have one column per feature name ({len(names)})")
    binary = ((Y == 0) | (Y == 1)).all(axis=0)
    return {KEY: [name for name, b in zip(names, binary, strict=True) if b]}


def solve_kept_out(
    replies: Sequence[Reply], features: Sequence[str], exclude: Sequence[str] = ()
) -> dict[str, Any]:
    """**Coordinator.** Which features ComBat harmonises and which it keeps out, and why.

    A feature is binary when every site reports it among its ``binary_features`` (a
    site that sends no such field, such as an older radfed, counts as "not binary":
    harmonising is the old behaviour). Features named in ``exclude`` are kept out too;
    names not among ``features`` (e.g. dropped by the reproducibility filter) are
    ignored.

    Returns
    -------
    dict
        ``harmonised``: the features for ComBat, in the order of ``features``;
        ``kept_out``: {feature: reason} for the others, in the same order.
    """
    declared = set(exclude)
    reported = [_names(r.get(KEY)) for r in replies]
    binary = set.intersection(*reported) if reported else set()
    kept_out = {
        f: DECLARED if f in declared else BINARY for f in features if f in declared or f in binary
    }
    return {"harmonised": [f for f in features if f not in kept_out], "kept_out": kept_out}


def _names(value: Any) -> set[str]:
    """A reply's list of names; anything else (absent, malformed) names none."""
    if not isinstance(value, (list, tuple)):
        return set()
    return {v for v in value if isinstance(v, str)}
