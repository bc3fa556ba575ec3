"""Discrimination metrics computed at a site from its own predictions."""

from __future__ import annotations

import numpy as np


def auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n1 n0)), ties counted one half.

    Returns NaN when only one class is present.
    """
    y = np.asarray(y).astype(bool)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    # Imported here: scipy.stats costs a second at start-up of every Flower ClientApp
    # process, and most site tasks never need it.
    from scipy.stats import rankdata

    ranks = rankdata(score)
    return float((ranks[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))
