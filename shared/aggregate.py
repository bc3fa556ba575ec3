"""Adding the sites' replies: the one way the coordinator combines site aggregates.

Every federated step is exact because its site statistics are sums; the coordinator's
first move is always the same addition, field by field, refusing replies that do not
fit together (a site that sent other fields or other shapes).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np


def sum_replies(
    replies: Iterable[Mapping[str, Any]], keys: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Add site replies key by key (arrays elementwise, counts as numbers).

    Parameters
    ----------
    replies : iterable of mapping
        One reply per site.
    keys : sequence of str, optional
        The fields to add; default: every field, and every reply must have the same.

    Raises
    ------
    ValueError
        No reply; replies with different fields (``keys`` not given); a field of
        different shapes at different sites.
    """
    replies = list(replies)
    if not replies:
        raise ValueError("no site replied")
    if keys is None:
        keys = sorted(replies[0])
        for r in replies[1:]:
            if set(r) != set(keys):
                raise ValueError(f"site replies disagree on their keys: {keys} vs {sorted(r)}")
    total = {}
    for key in keys:
        arrays = [np.asarray(r[key], dtype=float) for r in replies]
        shapes = {a.shape for a in arrays}
        if len(shapes) != 1:
            raise ValueError(f"sites sent {key!r} of different shapes {sorted(shapes)}")
        total[key] = np.sum(arrays, axis=0)
    return total
