"""Reproducibility of features across readers: the site half of a federated ICC.

The intraclass correlation of a feature comes from the two-way ANOVA of the ratings
``x[i, j]`` (subject ``i``, rater ``j``). Subjects are nested in sites; the raters
(first reader, second reader, or the first reader's repeat) are the same at every site.
Each site sends, per feature, aggregates of fixed shape (features, or features x
raters), centred on its own grand mean so that the coordinator's sums of squares keep
their precision, and scaled by a power of two ``2**exponent`` so that no square
overflows (features of magnitude 1e154 and beyond):

- ``n``: subjects with every rating of the comparison;
- ``mean``: the site's grand mean of the feature (over subjects and raters), unscaled;
- ``exponent``: per feature, the integer ``e`` with ``2**(e-1) <= rms < 2**e`` for the
  root mean square ``rms`` of ``x - mean`` over subjects and raters (``e`` of the
  largest ``|x|`` when the feature is constant, which its mean then states anyway);
- ``col_dev``: per rater, the sum over subjects of ``(x - mean) / 2**e`` (features x
  raters);
- ``ss``: the sum of ``((x - mean) / 2**e)^2`` over subjects and raters;
- ``row_ss``: the sum over subjects of ``(sum over raters of (x - mean) / 2**e)^2``.

The exponent tells the coordinator nothing that ``n`` and the unscaled ``ss`` would
not: it is the magnitude of ``sqrt(ss / (n * raters))``, an aggregate, never of one
subject's value. Scaling by a power of two is exact, so the sums are the unscaled
ones times ``2**-e`` (``2**-2e`` for squares) to the last bit. No per-subject value
leaves the site. :mod:`radfed.server.stats.reproducibility` turns the sums of all
sites into the pooled ANOVA exactly.
"""

from __future__ import annotations

import numpy as np

#: Comparisons a study may compute: name -> the manifest mask columns of the raters.
COMPARISONS = {
    "inter_reader": ("mask", "mask_reader2"),
    "intra_reader": ("mask", "mask_repeat"),
}
SUMS = ("n", "mean", "col_dev", "ss", "row_ss", "exponent")


def site_icc_sums(ratings: np.ndarray) -> dict[str, np.ndarray | int]:
    """The aggregates one site sends for one comparison.

    Parameters
    ----------
    ratings : ndarray of shape (n_subjects, n_raters, n_features)
        Complete ratings (no NaN): every subject rated by every rater.

    Returns
    -------
    dict
        ``n`` (int), ``mean`` (p,), ``col_dev`` (p, k), ``ss`` (p,), ``row_ss`` (p,)
        and ``exponent`` (p,, whole numbers as floats); zeros when there is no subject.
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
            "exponent": np.zeros(p),
        }
    # First in units of 2**top (kept here), |x| < 2**top: no sum can overflow.
    top = np.frexp(np.abs(x).max(axis=(0, 1)))[1]
    scaled = np.ldexp(x, -top)
    mean = scaled.mean(axis=(0, 1))
    centred = scaled - mean
    ss = (centred**2).sum(axis=(0, 1))
    # Then in units of 2**exponent, the magnitude of the root mean square deviation.
    rms = np.frexp(np.sqrt(ss / (n * k)))[1]  # 0 for a constant feature
    return {
        "n": n,
        "mean": np.ldexp(mean, top),
        "col_dev": np.ldexp(centred.sum(axis=0).T, -rms[:, None]),
        "ss": np.ldexp(ss, -2 * rms),
        "row_ss": np.ldexp((centred.sum(axis=1) ** 2).sum(axis=0), -2 * rms),
        "exponent": (top + rms).astype(float),
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
