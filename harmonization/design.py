"""Site data checks and the ComBat design: batch indicators, covariates, standardisation.

Shared by the site statistics, the coordinator solvers and the local adjustment of
:mod:`radfed.harmonization.combat`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

ArrayLike = Any
Reply = Mapping[str, Any]


def site_data(
    Y: ArrayLike,
    batch: ArrayLike,
    covariates: ArrayLike | None,
    n_features: int | None = None,
    n_covariates: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated float ``Y`` (n, p), str ``batch`` (n,) and float ``covariates`` (n, c).

    Batch labels are compared as strings (``str(label)``) with the federation's levels.
    """
    Y = _numbers(Y, "Y")
    if Y.ndim != 2:
        raise ValueError(f"Y must be 2-D (rows, features), got shape {Y.shape}")
    n = Y.shape[0]
    try:
        batch = np.asarray(batch).astype(str)
    except (TypeError, ValueError):
        raise ValueError(f"batch must have one label per row of Y ({n})") from None
    if batch.shape != (n,):
        raise ValueError(f"batch must have one label per row of Y ({n}), got shape {batch.shape}")
    cov = np.empty((n, 0)) if covariates is None else _numbers(covariates, "covariates")
    if cov.ndim == 1:
        cov = cov[:, None]
    if cov.ndim != 2 or cov.shape[0] != n:
        raise ValueError(f"covariates must have {n} rows (one per row of Y), got {cov.shape}")
    if n_features is not None and Y.shape[1] != n_features:
        raise ValueError(f"Y has {Y.shape[1]} features, the ComBat fit has {n_features}")
    if n_covariates is not None and cov.shape[1] != n_covariates:
        raise ValueError(f"covariates have {cov.shape[1]} columns, the fit has {n_covariates}")
    for name, array in (("Y", Y), ("covariates", cov)):
        if not np.isfinite(array).all():
            raise ValueError(f"{name} has missing or infinite values; drop incomplete rows first")
    return Y, batch, cov


def _numbers(value: ArrayLike, name: str) -> np.ndarray:
    """``value`` as a float array; a clear error for text, ragged lists or objects."""
    try:
        return np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must hold numbers only (a rectangular numeric table)") from None


def coefficients(
    value: ArrayLike, name: str, ndim: int, columns: int | None = None, positive: bool = False
) -> np.ndarray:
    """A coordinator's array, checked: finite numbers with ``ndim`` dimensions (and
    ``columns`` in the last, and all > 0 if ``positive``). An empty matrix may come
    flattened, as shape ``(0,)``; with ``columns`` given it is read as ``(0, columns)``.
    """
    array = _numbers(value, name)
    if array.shape == (0,) and ndim == 2 and columns is not None:
        array = array.reshape(0, columns)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    if columns is not None and array.shape[-1] != columns:
        raise ValueError(f"{name} has {array.shape[-1]} features, the site's data {columns}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} holds NaN or infinite values")
    if positive and not (array > 0).all():
        raise ValueError(f"{name} must be positive")
    return array


def batch_onehot(batch: np.ndarray, batch_levels: Sequence[str]) -> np.ndarray:
    """(n, B) indicator of each row's batch over the federation's levels."""
    try:
        if isinstance(batch_levels, (str, bytes)) or not isinstance(
            batch_levels, (Sequence, np.ndarray, pd.Index)
        ):
            raise TypeError(batch_levels)
        levels = [str(b) for b in batch_levels]  # a 0-d array raises TypeError here
    except TypeError:
        raise ValueError(
            f"batch_levels must be a list of labels, got {type(batch_levels).__name__}"
        ) from None
    if len(set(levels)) != len(levels):
        raise ValueError(f"duplicate batch levels: {levels}")
    unknown = sorted({str(b) for b in set(batch)} - set(levels))
    if unknown:
        raise ValueError(f"unknown batch level(s) {unknown}; the federation's levels are {levels}")
    return (batch[:, None] == np.asarray(levels)[None, :]).astype(float)


def design_matrix(batch: np.ndarray, cov: np.ndarray, batch_levels: Sequence[str]) -> np.ndarray:
    return np.hstack([batch_onehot(batch, batch_levels), cov])


def default_names(names: Sequence[str] | None, count: int, stem: str) -> list[str]:
    if names is None:
        return [f"{stem}_{i}" for i in range(count)]
    names = [str(n) for n in names]
    if len(names) != count:
        raise ValueError(f"{len(names)} {stem} names for {count} {stem}s")
    return names


def encode_covariates(
    frame: pd.DataFrame,
    numeric: Sequence[str] = (),
    categorical_levels: Mapping[str, Sequence[Any]] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Design columns of the biological covariates, identical at every site.

    Numeric columns are taken as floats; each categorical column becomes indicators of
    its levels after the first, which is the reference (neuroCombat drops the first of
    the sorted levels, so pass sorted levels to match it). The level lists are the
    federation's, so a site lacking a level still produces the same columns.

    Parameters
    ----------
    frame : pandas.DataFrame
        The site's rows (never the outcome).
    numeric : sequence of str
        Numeric covariate columns.
    categorical_levels : mapping of str to sequence
        For each categorical column, its federation-wide levels, reference first.

    Returns
    -------
    covariates : np.ndarray, shape (n, c)
    names : list of str
        ``numeric`` names, then ``"column=level"`` for each non-reference level.

    Raises
    ------
    ValueError
        For a missing column, a missing value, or a value outside the given levels.
    """
    categorical_levels = dict(categorical_levels or {})
    missing = [c for c in [*numeric, *categorical_levels] if c not in frame.columns]
    if missing:
        raise ValueError(f"covariate column(s) {missing} not in the data")
    columns, names = [], []
    for col in numeric:
        values = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=float)
        if not np.isfinite(values).all():
            raise ValueError(f"covariate {col!r} has missing or non-numeric values")
        columns.append(values)
        names.append(str(col))
    for col, levels in categorical_levels.items():
        if len(levels) < 2 or len(set(levels)) != len(levels):
            raise ValueError(f"covariate {col!r} needs at least 2 distinct levels, got {levels}")
        values = frame[col]
        matches = np.column_stack([(values == level).to_numpy() for level in levels])
        unknown = sorted({str(v) for v in values[~matches.any(axis=1)]})
        if unknown:
            raise ValueError(f"covariate {col!r} has values {unknown} outside levels {levels}")
        columns.extend(matches[:, 1:].T.astype(float))
        names.extend(f"{col}={level}" for level in levels[1:])
    covariates = np.column_stack(columns) if columns else np.empty((len(frame), 0))
    return covariates, names


def covariate_effects(cov: np.ndarray, beta_covariates: np.ndarray) -> np.ndarray:
    beta_covariates = _numbers(beta_covariates, "beta_covariates")
    rows = beta_covariates.shape[0] if beta_covariates.ndim else "no row"
    if beta_covariates.ndim != 2 or rows != cov.shape[1]:
        raise ValueError(f"{cov.shape[1]} covariate columns, the fit has {rows}")
    return cov @ beta_covariates


def standardize(
    Y: np.ndarray,
    cov: np.ndarray,
    beta_covariates: np.ndarray,
    grand_mean: np.ndarray,
    var_pooled: np.ndarray,
) -> np.ndarray:
    """``z = (Y − grand mean − covariate effects) / sqrt(var_pooled)``."""
    return (Y - grand_mean - covariate_effects(cov, beta_covariates)) / np.sqrt(var_pooled)
