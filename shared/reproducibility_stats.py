"""Reproducibility of features across readers: the site half of a federated ICC.

The intraclass correlation of a feature comes from the two-way ANOVA of the ratings
``x[i, j]`` (subject ``i``, rater ``j``). Subjects are nested in sites; the raters
(first reader, second reader, or the first reader's repeat) are the same at every site.
Each site sends, per feature, aggregates of fixed shape (features, or features x
raters), centred on its own grand mean so that the coordinator's sums of squares keep
their precision:

- ``n``: subjects with every rating of the comparison;
- ``mean``: the site's grand mean of the feature (over subjects and raters);
- ``col_dev``: per rater, the sum over subjects of ``x - mean`` (features x raters);
- ``ss``: the sum of ``(x - mean)^2`` over subjects and raters;
- ``row_ss``: the sum over subjects of ``(sum over raters of (x - mean))^2``.

No per-subject value leaves the site. :mod:`radfed.server.stats.reproducibility` turns the
sums of all sites into the pooled ANOVA exactly.
"""

from __future__ import annotations

import numpy as np

#: Comparisons a study may compute: name -> the manifest mask columns of the raters.
COMPARISONS = {
    "inter_reader": ("mask", "mask_reader2"),
    "intra_reader": ("mask", "mask_repeat"),
}
SUMS = ("n", "mean", "col_dev", "ss", "row_ss")


def site_icc_sums(ratings: np.ndarray) -> dict[str, np.ndarray | int]:
    """The aggregates one site sends for one comparison.

    Parameters
    ----------
    ratings : ndarray of shape (n_subjects, n_raters, n_features)
        Complete ratings (no NaN): every subject rated by every rater.

    Returns
    -------
    dict
        ``n`` (int), ``mean`` (p,), ``col_dev`` (p, k), ``ss`` (p,), ``row_ss`` (p,);
        zeros when there is no subject.
    """
    x = np.asarray(ratings, dtype=float)
    if x.ndim != 3:
        raise ValueError(f"ratings must be subjects x raters x features, got shape {x.shape}")
    n, k, p = x.shape
    if not np.all(np.isfinite(x)):
        raise ValueError("ratings must be finite: keep only subjects with every rating")
    if n == 0:
        return {
            "n": 0,
            "mean": np.zeros(p),
            "col_dev": np.zeros((p, k)),
            "ss": np.zeros(p),
            "row_ss": np.zeros(p),
        }
    mean = x.mean(axis=(0, 1))
    centred = x - mean
    return {
        "n": n,
        "mean": mean,
        "col_dev": centred.sum(axis=0).T,
        "ss": (centred**2).sum(axis=(0, 1)),
        "row_ss": (centred.sum(axis=1) ** 2).sum(axis=0),
    }


def complete_ratings(tables: list[np.ndarray]) -> np.ndarray:
    """Stack one (subjects x features) table per rater; keep subjects rated finitely by all.

    Parameters
    ----------
    tables : list of ndarray, each (n_subjects, n_features)
        The same subjects in the same order (NaN where a rating is missing).

    Returns
    -------
    ndarray of shape (n_complete, n_raters, n_features)
    """
    x = np.stack([np.asarray(t, dtype=float) for t in tables], axis=1)
    keep = np.isfinite(x).all(axis=(1, 2))
    return x[keep]
