"""Reproducibility of features across readers: the coordinator half of a federated ICC.

From the sites' sums (:mod:`radfed.shared.reproducibility_stats`) the coordinator
rebuilds the pooled two-way ANOVA of subjects x raters exactly, per feature:

    N = sum of n_s;  M = sum of n_s m_s / N                      (grand mean)
    SS_rows   = sum_s [row_ss_s + n_s k^2 (m_s - M)^2] / k       (subjects)
    SS_cols   = sum_j (sum_s col_dev_sj)^2 / N                   (raters)
    SS_within = sum_s [ss_s - row_ss_s / k]                      (= SS_total - SS_rows)
    SS_error  = SS_within - SS_cols

(the raters' deviations need no site shift: ``sum_s n_s (m_s - M)`` is zero, and
leaving it out keeps its rounding out of SS_cols; nor does SS_within, so a large spread
of the site means cannot cancel away the raters' error). Each site's sums come in
units of its own power of two ``2**e_s`` (see the site module); the coordinator works
in the units ``2**E`` of the largest of them and of the spread of the site means, so
that no sum of squares overflows for features of any finite magnitude. Rescaling by
powers of two is exact, and the ICCs do not depend on the unit.

with mean squares MSR = SS_rows / (N - 1), MSC = SS_cols / (k - 1) and
MSE = SS_error / ((N - 1)(k - 1)), and (Shrout & Fleiss 1979; McGraw & Wong 1996):

- ICC(2,1), two-way random effects, absolute agreement, single rater:
  (MSR - MSE) / (MSR + (k - 1) MSE + k (MSC - MSE) / N);
- ICC(3,1), two-way mixed effects, consistency, single rater:
  (MSR - MSE) / (MSR + (k - 1) MSE).

A feature is kept when its ICC is at least the threshold in every comparison that has
subjects; a feature whose ICC is undefined (no variance) is dropped with that reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from radfed.shared.errors import FederationError
from radfed.shared.reproducibility_stats import SUMS

ICC_TYPES = ("ICC2", "ICC3")


@dataclass(frozen=True)
class Anova:
    """The pooled two-way ANOVA of one comparison, per feature.

    Sums of squares are in units of ``4**exponent`` per feature (``2**exponent`` for the
    ratings); the ICCs do not depend on the unit.
    """

    n: int
    k: int
    ss_rows: np.ndarray
    ss_cols: np.ndarray
    ss_error: np.ndarray
    exponent: np.ndarray | None = None

    @property
    def ms_rows(self) -> np.ndarray:
        return self.ss_rows / (self.n - 1)

    @property
    def ms_cols(self) -> np.ndarray:
        return self.ss_cols / (self.k - 1)

    @property
    def ms_error(self) -> np.ndarray:
        return self.ss_error / ((self.n - 1) * (self.k - 1))

    def icc(self, kind: str) -> np.ndarray:
        """ICC(2,1) (``"ICC2"``) or ICC(3,1) (``"ICC3"``) per feature (NaN if undefined)."""
        msr, msc, mse = self.ms_rows, self.ms_cols, self.ms_error
        with np.errstate(divide="ignore", invalid="ignore"):
            if kind == "ICC2":
                value = (msr - mse) / (msr + (self.k - 1) * mse + self.k * (msc - mse) / self.n)
            elif kind == "ICC3":
                value = (msr - mse) / (msr + (self.k - 1) * mse)
            else:
                raise ValueError(f"icc type must be one of {ICC_TYPES}, got {kind!r}")
        return np.where(np.isfinite(value), value, np.nan)


def pooled_anova(parts: Sequence[Mapping[str, object]]) -> Anova | None:
    """The pooled ANOVA from the sites' sums of one comparison (None without subjects).

    A part without ``exponent`` (a site of an earlier release) is in units of 1.

    Raises
    ------
    FederationError
        The sites sent sums of different shapes, non-finite sums or exponents that are
        not whole numbers, or fewer than two subjects in all.
    """
    parts = [p for p in parts if int(p["n"]) > 0]
    if not parts:
        return None
    shapes = {np.shape(p["col_dev"]) for p in parts}
    if len(shapes) != 1:
        raise FederationError(f"reproducibility sums of different shapes: {sorted(shapes)}")
    ((n_features, k),) = shapes
    n = np.array([int(p["n"]) for p in parts], dtype=float)
    total = int(n.sum())
    if total < 2 or k < 2:
        raise FederationError(
            f"an ICC needs at least two subjects and two raters (got {total} and {k})"
        )

    def stacked(key: str, shape: tuple[int, ...], default: float | None = None) -> np.ndarray:
        try:
            values = np.array(
                [
                    np.broadcast_to(np.asarray(p.get(key, default), dtype=float), shape)
                    for p in parts
                ]
            )
        except (TypeError, ValueError):
            raise FederationError(
                f"reproducibility sums: {key!r} must be {shape} numbers"
            ) from None
        if not np.all(np.isfinite(values)):
            raise FederationError(f"reproducibility sums: {key!r} holds NaN or infinity")
        return values

    means = stacked("mean", (n_features,))  # (S, p)
    col_dev = stacked("col_dev", (n_features, k))  # (S, p, k)
    ss, row_ss = stacked("ss", (n_features,)), stacked("row_ss", (n_features,))
    site_exp = stacked("exponent", (n_features,), 0.0)
    if np.any(site_exp != np.round(site_exp)) or np.any(np.abs(site_exp) > 4096):
        raise FederationError("reproducibility sums: 'exponent' must hold whole numbers")
    site_exp = site_exp.astype(np.int32)
    # The site means in units of 2**top (|m| < 2**top), exactly, and their shifts.
    top = np.frexp(np.abs(means).max(axis=0))[1]  # (p,)
    scaled = np.ldexp(means, -top)
    shift = scaled - (n[:, None] * scaled).sum(axis=0) / total  # (S, p), |shift| < 2
    # The common unit 2**E: the largest site unit, or that of the means' spread if larger.
    largest = np.abs(shift).max(axis=0)
    exponent = site_exp.max(axis=0)
    exponent = np.where(largest > 0, np.maximum(exponent, top + np.frexp(largest)[1]), exponent)
    to_common = site_exp - exponent  # (S, p), <= 0: no sum grows
    shift = np.ldexp(shift, top - exponent)
    between_sites = k * (n[:, None] * shift**2).sum(axis=0)
    ss_rows = np.ldexp(row_ss, 2 * to_common).sum(axis=0) / k + between_sites
    ss_within = np.ldexp(ss - row_ss / k, 2 * to_common).sum(axis=0)
    col = np.ldexp(col_dev, to_common[:, :, None]).sum(axis=0)  # (p, k)
    ss_cols = (col**2).sum(axis=1) / total
    return Anova(total, k, ss_rows, ss_cols, ss_within - ss_cols, exponent)


@dataclass
class ReproducibilityResult:
    """ICC per comparison and feature, and the features kept by the threshold."""

    features: list[str]
    icc_type: str
    threshold: float
    comparisons: dict[str, dict[str, object]] = field(default_factory=dict)
    kept: list[str] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # feature -> reason

    def to_dict(self) -> dict[str, object]:
        return {
            "icc_type": self.icc_type,
            "threshold": self.threshold,
            "comparisons": self.comparisons,
            "kept": self.kept,
            "dropped": self.dropped,
        }


def reproducibility(
    features: Sequence[str],
    replies: Mapping[str, Mapping[str, object]],
    comparisons: Sequence[str],
    icc_type: str = "ICC2",
    threshold: float = 0.75,
) -> ReproducibilityResult:
    """ICC tables from the sites' replies and the features that pass the threshold.

    Parameters
    ----------
    features : sequence of str
    replies : mapping of site -> reply
        Each reply holds ``{comparison}_{sum}`` for the sums of
        :func:`radfed.shared.reproducibility_stats.site_icc_sums`.
    comparisons : sequence of str
    icc_type : {"ICC2", "ICC3"}
        The ICC the threshold applies to (both are reported).
    threshold : float

    Returns
    -------
    ReproducibilityResult
        ``kept`` keeps the input order; a comparison no site has subjects for is
        reported with ``n = 0`` and filters nothing.
    """
    if icc_type not in ICC_TYPES:
        raise ValueError(f"icc type must be one of {ICC_TYPES}, got {icc_type!r}")
    result = ReproducibilityResult(list(features), icc_type, float(threshold))
    passes = np.ones(len(features), dtype=bool)
    reasons: dict[str, list[str]] = {}
    for name in comparisons:
        parts = [
            {key: reply[f"{name}_{key}"] for key in SUMS if f"{name}_{key}" in reply}
            for reply in replies.values()
        ]
        anova = pooled_anova(parts)
        per_site = {site: int(reply[f"{name}_n"]) for site, reply in replies.items()}
        if anova is None:
            result.comparisons[name] = {"n": 0, "n_per_site": per_site}
            continue
        icc = {kind: anova.icc(kind) for kind in ICC_TYPES}
        result.comparisons[name] = {
            "n": anova.n,
            "raters": anova.k,
            "n_per_site": per_site,
            "ICC2": dict(zip(features, _listed(icc["ICC2"]), strict=True)),
            "ICC3": dict(zip(features, _listed(icc["ICC3"]), strict=True)),
        }
        value = icc[icc_type]
        for j, f in enumerate(features):
            if not np.isfinite(value[j]):
                reasons.setdefault(f, []).append(f"{name} {icc_type} undefined (no variance)")
            elif value[j] < threshold:
                reasons.setdefault(f, []).append(
                    f"{name} {icc_type} {value[j]:.3f} < {threshold:g}"
                )
        passes &= np.isfinite(value) & (value >= threshold)
    result.kept = [f for f, ok in zip(features, passes, strict=True) if ok]
    result.dropped = {f: "; ".join(r) for f, r in reasons.items()}
    return result


def _listed(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in values]


def icc_rows(details: Mapping[str, object]) -> list[dict[str, object]]:
    """One row per feature of a results.json ``reproducibility`` entry: its ICCs per
    comparison (``{comparison} {type}`` columns), and whether it was kept (or why not).
    """
    comparisons = details.get("comparisons") or {}
    kept = set(details.get("kept") or [])
    dropped = details.get("dropped") or {}
    features: list[str] = []
    for table in comparisons.values():
        for f in table.get("ICC2") or {}:
            if f not in features:
                features.append(f)
    rows = []
    for f in features:
        row: dict[str, object] = {"feature": f}
        for name, table in comparisons.items():
            for kind in ICC_TYPES:
                row[f"{name} {kind}"] = (table.get(kind) or {}).get(f)
        row["kept"] = f in kept
        row["reason"] = dropped.get(f, "")
        rows.append(row)
    return rows


def reproducibility_metrics(details: Mapping[str, object]) -> dict[str, float]:
    """Flat numbers for tracking: subjects per comparison, features kept and dropped."""
    metrics = {
        "reproducibility/kept": float(len(details.get("kept") or [])),
        "reproducibility/dropped": float(len(details.get("dropped") or {})),
    }
    for name, table in (details.get("comparisons") or {}).items():
        metrics[f"reproducibility/{name}/n"] = float(table.get("n", 0))
    return metrics
