"""Reproducibility of features across readers: the coordinator half of a federated ICC.

From the sites' sums (:mod:`radfed.shared.reproducibility_stats`) the coordinator
rebuilds the pooled two-way ANOVA of subjects x raters exactly, per feature:

    N = sum of n_s;  M = sum of n_s m_s / N                      (grand mean)
    SS_total = sum_s [ss_s + n_s k (m_s - M)^2]
    SS_rows  = sum_s [row_ss_s + n_s k^2 (m_s - M)^2] / k        (subjects)
    SS_cols  = sum_j (sum_s [col_dev_sj + n_s (m_s - M)])^2 / N  (raters)
    SS_error = SS_total - SS_rows - SS_cols

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

ICC_TYPES = ("ICC2", "ICC3")


@dataclass(frozen=True)
class Anova:
    """The pooled two-way ANOVA of one comparison, per feature."""

    n: int
    k: int
    ss_rows: np.ndarray
    ss_cols: np.ndarray
    ss_error: np.ndarray

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

    Raises
    ------
    FederationError
        The sites sent sums of different shapes, or fewer than two subjects in all.
    """
    parts = [p for p in parts if int(p["n"]) > 0]
    if not parts:
        return None
    shapes = {np.shape(p["col_dev"]) for p in parts}
    if len(shapes) != 1:
        raise FederationError(f"reproducibility sums of different shapes: {sorted(shapes)}")
    ((_, k),) = shapes
    n = np.array([int(p["n"]) for p in parts], dtype=float)
    means = np.array([np.asarray(p["mean"], dtype=float) for p in parts])  # (S, p)
    total = int(n.sum())
    if total < 2 or k < 2:
        raise FederationError(
            f"an ICC needs at least two subjects and two raters (got {total} and {k})"
        )
    grand = (n[:, None] * means).sum(axis=0) / total
    shift = means - grand  # (S, p)
    ss_total = sum(np.asarray(p["ss"], dtype=float) for p in parts) + k * (
        n[:, None] * shift**2
    ).sum(axis=0)
    ss_rows = (
        sum(np.asarray(p["row_ss"], dtype=float) for p in parts)
        + k**2 * (n[:, None] * shift**2).sum(axis=0)
    ) / k
    col = sum(
        np.asarray(p["col_dev"], dtype=float) + ni * s[:, None]
        for p, ni, s in zip(parts, n, shift, strict=True)
    )  # (p, k)
    ss_cols = (col**2).sum(axis=1) / total
    return Anova(total, k, ss_rows, ss_cols, ss_total - ss_rows - ss_cols)


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
            {key: reply[f"{name}_{key}"] for key in ("n", "mean", "col_dev", "ss", "row_ss")}
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
