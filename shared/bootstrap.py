"""Harrell's bootstrap optimism correction: the weights a site draws for a replicate.

Replicate ``b`` of a site is its training rows, each repeated ``w_i`` times, where
``w_i`` are Poisson(1) draws (the "Poisson bootstrap": independent per row, so each site
draws its own without knowing the others' sizes). The draw depends on the study's seed,
the site's name, the site's secret and ``b`` only: the site redraws the same weights in
every round of the replicate, and nobody without its secret can predict or steer them.
The weights never leave the site.

Integer weights make a replicate a plain data set (rows repeated), so every site
statistic and every pooled reference applies to it unchanged.
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np

#: Separates the bootstrap's random stream from the split's and the folds' (which use
#: the same seed, site name and secret).
STREAM = 0xB0075


def poisson_weights(n: int, seed: int, site: str, secret: bytes, b: int) -> np.ndarray:
    """The Poisson(1) weight of each of a site's ``n`` training rows in replicate ``b``.

    Parameters
    ----------
    n : int
        Number of the site's training rows (in the order of its analysis table).
    seed : int
        The study's seed.
    site : str
        The site's name.
    secret : bytes
        The site's own secret (:meth:`radfed.client.site_state.SiteState.secret`).
    b : int
        The replicate, 1 or more.

    Returns
    -------
    ndarray of shape (n,), int64
        How many times each row is in the replicate (0 for rows left out).
    """
    if isinstance(b, bool) or int(b) != b or b < 1:
        raise ValueError(f"a bootstrap replicate is a whole number >= 1, got {b!r}")
    words = np.frombuffer(hashlib.sha256(secret).digest(), dtype=np.uint32) if secret else []
    rng = np.random.default_rng(
        [int(seed), zlib.crc32(site.encode()), *map(int, words), STREAM, int(b)]
    )
    return rng.poisson(1.0, int(n)).astype(np.int64)
