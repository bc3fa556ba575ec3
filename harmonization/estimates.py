"""The fitted ComBat model: everything a site needs to harmonise its rows."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

PREFIX = "combat_"
PayloadValue = np.ndarray | list[str] | float | bool
_NAME_FIELDS = ("batch_levels", "feature_names", "covariate_names")
_FLAG_FIELDS = ("parametric", "mean_only")


@dataclass(frozen=True, eq=False)
class ComBatEstimates:
    """ComBat parameters fitted on the training rows of a federation (or a pooled set).

    With ``B`` batches, ``p`` features and ``c`` covariate columns:

    Attributes
    ----------
    batch_levels : tuple of str, length B
    feature_names : tuple of str, length p
    covariate_names : tuple of str, length c
        Design columns of the biological covariates, as :func:`encode_covariates` names
        them (the outcome is never one of them).
    beta_covariates : np.ndarray, shape (c, p)
        Covariate rows of the pooled regression coefficients B̂.
    grand_mean : np.ndarray, shape (p,)
        ``Σ_b (n_b / n) B̂_b``, neuroCombat's ``stand.mean``.
    var_pooled : np.ndarray, shape (p,)
        Pooled residual variance (1/n); 1.0 as a placeholder for unadjusted features.
    gamma_star, delta_star : np.ndarray, shape (B, p)
        Empirical Bayes batch location and scale (0 and 1 for unadjusted features).
    gamma_bar, tau2, a_prior, b_prior : np.ndarray, shape (B,)
        Each batch's hyper-priors across features (``a``, ``b`` are NaN in mean-only
        mode). :func:`estimate_new_batch` can use their mean as the prior of a new batch.
    n_per_batch : np.ndarray of int, shape (B,)
        Training rows of each batch.
    adjusted : np.ndarray of bool, shape (p,)
        False for features left unadjusted (zero residual variance over all data).
    parametric, mean_only : bool
        The ComBat mode the federation used; new batches are estimated the same way.
    """

    batch_levels: tuple[str, ...]
    feature_names: tuple[str, ...]
    covariate_names: tuple[str, ...]
    beta_covariates: np.ndarray
    grand_mean: np.ndarray
    var_pooled: np.ndarray
    gamma_star: np.ndarray
    delta_star: np.ndarray
    gamma_bar: np.ndarray
    tau2: np.ndarray
    a_prior: np.ndarray
    b_prior: np.ndarray
    n_per_batch: np.ndarray
    adjusted: np.ndarray
    parametric: bool = True
    mean_only: bool = False

    def __post_init__(self) -> None:
        for name in _NAME_FIELDS:
            names = getattr(self, name)
            try:
                if isinstance(names, (str, bytes)):
                    raise TypeError(name)
                names = tuple(str(v) for v in names)
            except TypeError:
                raise ValueError(f"ComBat estimates: {name} must be a list of names") from None
            object.__setattr__(self, name, names)
        for name in _FLAG_FIELDS:
            try:
                flag = np.asarray(getattr(self, name), dtype=float)
            except (TypeError, ValueError):
                flag = np.asarray(np.nan)
            if flag.size != 1 or flag.item() not in (0.0, 1.0):
                raise ValueError(f"ComBat estimates: {name} must be true or false")
            object.__setattr__(self, name, bool(flag.item()))
        n_b, p, c = len(self.batch_levels), len(self.feature_names), len(self.covariate_names)
        shapes = {
            "beta_covariates": (c, p),
            "grand_mean": (p,),
            "var_pooled": (p,),
            "gamma_star": (n_b, p),
            "delta_star": (n_b, p),
            "gamma_bar": (n_b,),
            "tau2": (n_b,),
            "a_prior": (n_b,),
            "b_prior": (n_b,),
            "n_per_batch": (n_b,),
            "adjusted": (p,),
        }
        for name, shape in shapes.items():
            dtype = {"n_per_batch": np.int64, "adjusted": bool}.get(name, float)
            try:
                value = np.array(getattr(self, name), dtype=float).reshape(shape)
            except (TypeError, ValueError, OverflowError):
                raise ValueError(
                    f"ComBat estimates: {name} must be {np.prod(shape, dtype=int)} numbers "
                    f"of shape {shape}"
                ) from None
            if dtype is not float:  # counts and flags: whole numbers (0 or 1), not NaN
                top = 1 if dtype is bool else 2**62
                if not np.all((value == np.round(value)) & (value >= 0) & (value <= top)):
                    raise ValueError(f"ComBat estimates: {name} must hold whole numbers")
                value = value.astype(dtype)
            value.setflags(write=False)  # frozen means frozen: no in-place edits either
            object.__setattr__(self, name, value)
        if len(set(self.batch_levels)) != n_b:
            raise ValueError(f"duplicate batch levels: {list(self.batch_levels)}")

    @property
    def n_batches(self) -> int:
        return len(self.batch_levels)

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    def batch_index(self, batch: Iterable[str]) -> np.ndarray:
        """Row index into ``gamma_star``/``delta_star`` for each batch label.

        Raises
        ------
        ValueError
            For a label the estimates do not know (a new batch: see
            :func:`radfed.harmonization.combat.estimate_new_batch`).
        """
        lookup = {level: i for i, level in enumerate(self.batch_levels)}
        labels = [str(b) for b in batch]
        unknown = sorted(set(labels) - lookup.keys())
        if unknown:
            raise ValueError(
                f"batch level(s) {unknown} were not in the ComBat fit (known: "
                f"{list(self.batch_levels)}); estimate them first with estimate_new_batch"
            )
        return np.array([lookup[b] for b in labels], dtype=np.intp)

    def training_priors(self) -> tuple[float, float, float, float]:
        """Mean of the training batches' hyper-priors ``(γ̄, τ², a, b)``."""
        return (
            float(np.mean(self.gamma_bar)),
            float(np.mean(self.tau2)),
            float(np.mean(self.a_prior)),
            float(np.mean(self.b_prior)),
        )

    def with_batches(
        self,
        levels: Sequence[str],
        gamma_star: np.ndarray,
        delta_star: np.ndarray,
        priors: Sequence[tuple[float, float, float, float]],
        n_per_batch: Sequence[int],
    ) -> ComBatEstimates:
        """A copy with extra batches appended (the federation's parameters unchanged)."""
        extra = np.asarray(priors, dtype=float).reshape(len(levels), 4)
        return replace(
            self,
            batch_levels=(*self.batch_levels, *levels),
            gamma_star=np.vstack([self.gamma_star, gamma_star]),
            delta_star=np.vstack([self.delta_star, delta_star]),
            gamma_bar=np.concatenate([self.gamma_bar, extra[:, 0]]),
            tau2=np.concatenate([self.tau2, extra[:, 1]]),
            a_prior=np.concatenate([self.a_prior, extra[:, 2]]),
            b_prior=np.concatenate([self.b_prior, extra[:, 3]]),
            n_per_batch=np.concatenate([self.n_per_batch, np.asarray(n_per_batch)]),
        )

    def to_payload(self) -> dict[str, PayloadValue]:
        """Flat message: arrays, lists of str and flags, each key prefixed ``combat_``."""
        payload: dict[str, PayloadValue] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _NAME_FIELDS:
                value = list(value)
            elif isinstance(value, np.ndarray):
                value = np.array(value)  # a writable copy, as transports expect
            payload[PREFIX + f.name] = value
        return payload

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> ComBatEstimates:
        """Rebuild from :meth:`to_payload`'s keys (other keys of the message are ignored).

        Raises
        ------
        ValueError
            When a key is missing or an array has the wrong shape.
        """
        missing = [PREFIX + f.name for f in fields(cls) if PREFIX + f.name not in payload]
        if missing:
            raise ValueError(f"ComBat payload lacks {missing}")
        return cls(**{f.name: payload[PREFIX + f.name] for f in fields(cls)})

    def equals(self, other: ComBatEstimates) -> bool:
        """Exact equality, arrays included (NaN equal to NaN)."""
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray):
                if a.shape != b.shape or not np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
                    return False
            elif a != b:
                return False
        return True
