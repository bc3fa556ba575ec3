"""The nomogram's axis ranges, from the sites' merged counts on their fixed value grid.

rms draws a nomogram's numeric axes over data quantiles; the coordinator never sees a
row. In the ``evaluate`` round that already carries the models (no extra round), each
training site counts, for each numeric predictor of the drawn model, its training
patients at or below each point of its own fixed grid
(:data:`~radfed.shared.evaluation_stats.VALUE_GRID`), merged until every cell holds 0
or at least its ``min_cell`` patients. The coordinator sums the counts and takes the
grid points bracketing the pooled 5th and 95th percentiles (:func:`pooled_ranges`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from radfed.server.results import LogisticFit
from radfed.shared.evaluation_stats import VALUE_GRID
from radfed.shared.messages import LINEAR_PREDICTOR as LP
from radfed.shared.messages import Payload

#: Share of the pooled patients the axis covers: from the 5th to the 95th percentile.
SHARE = 0.9
RULE = "federated 5th-95th percentile on the site-fixed grid"
_BINARY_TOL = 1e-9


def is_binary(center: float, scale: float) -> bool:
    """True if a pooled mean and 1/n SD are those of a 0/1 variable: SD² = p(1 - p)."""
    return 0 < center < 1 and abs(scale**2 - center * (1 - center)) <= _BINARY_TOL


def drawn_model(models: Mapping[str, Any]) -> str:
    """The model the nomogram chart draws: ``nomogram`` when fitted, else the first."""
    return "nomogram" if "nomogram" in models else next(iter(models))


def range_columns(fit: LogisticFit) -> list[str]:
    """The columns of ``fit`` that get a numeric axis: not a categorical dummy
    ("name=level"), not a derived column, not 0/1 (pooled SD² = mean (1 - mean), which
    the nomogram draws at 0 and 1)."""
    out = []
    for name, center, scale in zip(fit.columns, fit.center, fit.scale, strict=True):
        binary = is_binary(float(center), float(scale))
        if "=" not in name and not name.startswith(LP) and not binary:
            out.append(name)
    return out


def _bounds(le: np.ndarray, exact: np.ndarray, n: float) -> tuple[np.ndarray, np.ndarray]:
    """A site's patients at or below each grid point, as (lower, upper) bounds.

    At an exact point both are its count. At a point inside a merged cell the site sent
    the count at the cell's lower boundary: that is the lower bound, and the count at
    the next exact point (or all of its patients, past the last) the upper bound — as
    if the merged cell's patients all lay above, respectively at or below, the point.
    """
    lower = np.asarray(le, dtype=float)
    upper = np.full(len(lower), float(n))
    idx = np.flatnonzero(exact)
    # Index of the first exact point at or after each point.
    nxt = np.searchsorted(idx, np.arange(len(lower)), side="left")
    has = nxt < len(idx)
    upper[has] = lower[idx[nxt[has]]]
    return lower, upper


def pooled_ranges(
    replies: Mapping[str, Payload],
    columns: list[str],
    fit: LogisticFit,
    subset: str = "train",
    share: float = SHARE,
) -> dict[str, dict[str, Any]]:
    """Each column's axis range from the sites' counts on the value grid.

    ``low`` is the largest grid point at or below which at most ``k`` patients can lie
    (``k = floor(p (N - 1))``, ``p = (1 - share) / 2``; the upper bound of the count
    where a site merged), and ``high`` the smallest at or below which at least
    ``ceil((1 - p) (N - 1)) + 1`` surely lie (the lower bound): the range contains
    numpy's ``p`` and ``1 - p`` quantiles of the pooled patients, and reaches past
    them by about one grid step where no site merged near them.

    An end the counts cannot bound (the sites' merged tail cells together hold more
    than ``k`` patients: each site's first and last cells hold at least its
    ``min_cell``) is the grid point at or beyond the pooled mean ∓ 2 SD, and
    ``low_from`` / ``high_from`` say so. A column no site answered for gets ``low`` and
    ``high`` None: the nomogram draws it over mean ± 2 SD. ``covered`` is the share of
    patients surely inside (low, high].

    Parameters
    ----------
    replies : mapping of site to reply
        ``evaluate`` replies; sites without ``{subset}_range_le`` are left out.
    columns : list of str
        The columns asked for, in the request's order.
    fit : LogisticFit
        The drawn model (its pooled mean and SD give the fallback).
    """
    answered = [r for r in replies.values() if f"{subset}_range_le" in r]
    total = sum(float(r[f"{subset}_n"]) for r in answered)
    p = (1 - share) / 2
    out: dict[str, dict[str, Any]] = {}
    for j, name in enumerate(columns):
        k = fit.columns.index(name)
        mean, sd = float(fit.center[k]), float(fit.scale[k])
        if not answered or total < 2:
            out[name] = {
                "low": None,
                "high": None,
                "rule": "pooled mean ± 2 SD (no usable counts from the sites)",
            }
            continue
        lower = np.zeros(len(VALUE_GRID))
        upper = np.zeros(len(VALUE_GRID))
        for r in answered:
            lo, up = _bounds(
                np.asarray(r[f"{subset}_range_le"])[j],
                np.asarray(r[f"{subset}_range_exact"])[j] > 0.5,
                float(r[f"{subset}_n"]),
            )
            lower += lo
            upper += up
        lows = np.flatnonzero(upper <= math.floor(p * (total - 1)))
        highs = np.flatnonzero(lower >= math.ceil((1 - p) * (total - 1)) + 1)
        two_sd = (
            int(np.searchsorted(VALUE_GRID, mean - 2 * sd, side="right")) - 1,
            int(np.searchsorted(VALUE_GRID, mean + 2 * sd, side="left")),
        )
        a = int(lows[-1]) if len(lows) else max(two_sd[0], 0)
        b = int(highs[0]) if len(highs) else min(two_sd[1], len(VALUE_GRID) - 1)
        if a >= b:
            out[name] = {
                "low": None,
                "high": None,
                "rule": "pooled mean ± 2 SD (the sites' counts bracket no range)",
            }
            continue
        out[name] = {
            "low": float(VALUE_GRID[a]),
            "high": float(VALUE_GRID[b]),
            "rule": RULE,
            "low_from": "counts" if len(lows) else "pooled mean - 2 SD",
            "high_from": "counts" if len(highs) else "pooled mean + 2 SD",
            "covered": round(max(0.0, float((lower[b] - upper[a]) / total)), 4),
            "sites": len(answered),
        }
    return out
