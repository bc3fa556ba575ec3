"""Result objects people can print and read, and the results.json they are saved as."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA = "radfed.results/2"
INTERCEPT = "(Intercept)"
#: The "site" of metrics over all training sites together.
POOLED = "pooled"
DETAILS = (
    "settings",
    "harmonization",
    "reproducibility",
    "selection",
    "clinical_screening",
    "evaluation",
    "external",
    "equivalence",
    "classifiers",
)


@dataclass
class LogisticFit:
    """A logistic regression fitted on standardised columns, statsmodels-style.

    Attributes
    ----------
    columns : list of str
        Predictors, in order (the intercept comes first in ``coef``).
    coef, cov : ndarray
        Coefficients per standard deviation of each predictor and their covariance
        (the inverse of the summed Hessian: Wald standard errors).
    center, scale : ndarray
        Pooled mean and SD (1/n) used to standardise.
    gap : float or None
        For a smooth calibration curve ``c`` of a model's ``lp``: the sites' summed
        ``|c(lp) - expit(lp)|`` at the last iterate (the exact pooled ICI's numerator).
    """

    columns: list[str]
    coef: np.ndarray
    cov: np.ndarray
    center: np.ndarray
    scale: np.ndarray
    n: int
    deviance: float
    iterations: int
    converged: bool
    outcome: str = "outcome"
    n_sites: int = 0
    gap: float | None = None

    @property
    def names(self) -> list[str]:
        return [INTERCEPT, *self.columns]

    @property
    def se(self) -> np.ndarray:
        return np.sqrt(np.diag(self.cov))

    @property
    def zvalues(self) -> np.ndarray:
        return self.coef / self.se

    @property
    def pvalues(self) -> np.ndarray:
        from scipy import stats  # here: 3 s of imports that `radfed extract` never needs

        return 2 * stats.norm.sf(np.abs(self.zvalues))

    def conf_int(self, alpha: float = 0.05) -> np.ndarray:
        from scipy import stats

        q = stats.norm.ppf(1 - alpha / 2)
        return np.column_stack([self.coef - q * self.se, self.coef + q * self.se])

    def unit_transform(self) -> np.ndarray:
        """Matrix A with beta_per_unit = A @ beta_per_sd (intercept included)."""
        p = len(self.columns)
        A = np.eye(p + 1)
        A[1:, 1:] = np.diag(1 / self.scale)
        A[0, 1:] = -self.center / self.scale
        return A

    @property
    def coef_per_unit(self) -> np.ndarray:
        """Coefficients on the variables' own scales (per unit, not per SD)."""
        return self.unit_transform() @ self.coef

    @property
    def se_per_unit(self) -> np.ndarray:
        A = self.unit_transform()
        return np.sqrt(np.diag(A @ self.cov @ A.T))

    def to_dict(self) -> dict[str, Any]:
        ci = self.conf_int()
        table = {}
        for i, name in enumerate(self.names):
            table[name] = {
                "coef": float(self.coef[i]),
                "se": float(self.se[i]),
                "z": float(self.zvalues[i]),
                "p": float(self.pvalues[i]),
                "ci_low": float(ci[i, 0]),
                "ci_high": float(ci[i, 1]),
                "odds_ratio_per_sd": float(np.exp(self.coef[i])) if i else None,
                "odds_ratio_ci": [float(np.exp(ci[i, 0])), float(np.exp(ci[i, 1]))] if i else None,
                "odds_ratio_per_unit": float(np.exp(self.coef_per_unit[i])) if i else None,
                "coef_per_unit": float(self.coef_per_unit[i]),
                "se_per_unit": float(self.se_per_unit[i]),
            }
        return {
            "columns": self.columns,
            "center": self.center.tolist(),
            "scale": self.scale.tolist(),
            "coefficients": table,
            "covariance": self.cov.tolist(),
            "n": self.n,
            "deviance": self.deviance,
            "iterations": self.iterations,
            "converged": self.converged,
        }

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], outcome: str = "outcome", n_sites: int = 0
    ) -> LogisticFit:
        """Rebuild a fit from its :meth:`to_dict` form (as stored in results.json)."""
        names = [INTERCEPT, *data["columns"]]
        return cls(
            columns=list(data["columns"]),
            coef=np.array([data["coefficients"][n]["coef"] for n in names]),
            cov=np.array(data["covariance"]),
            center=np.array(data["center"]),
            scale=np.array(data["scale"]),
            n=data["n"],
            deviance=data["deviance"],
            iterations=data["iterations"],
            converged=data["converged"],
            outcome=outcome,
            n_sites=n_sites,
        )

    def summary(self) -> str:
        width = max(14, *(len(n) for n in self.names)) + 1
        rule = "=" * (width + 78)
        ci = self.conf_int()
        lines = [
            rule,
            "Federated logistic regression (Newton-Raphson on summed Hessians)".center(len(rule)),
            rule,
            f"Outcome: {self.outcome:<24} Patients: {self.n:<8} Sites: {self.n_sites:<5} "
            f"Deviance: {self.deviance:.4f}   Iterations: {self.iterations} "
            f"({'converged' if self.converged else 'NOT converged'})",
            "-" * len(rule),
            f"{'':<{width}}{'coef/SD':>10}{'std err':>10}{'z':>8}{'P>|z|':>8}"
            f"{'[0.025':>10}{'0.975]':>10}{'OR/SD':>9}{'coef/unit':>13}",
            "-" * len(rule),
        ]
        for i, name in enumerate(self.names):
            odds = f"{math.exp(self.coef[i]):9.3f}" if i else f"{'':>9}"
            lines.append(
                f"{name:<{width}}{self.coef[i]:10.4f}{self.se[i]:10.4f}{self.zvalues[i]:8.3f}"
                f"{self.pvalues[i]:8.3f}{ci[i, 0]:10.4f}{ci[i, 1]:10.4f}{odds}"
                f"{self.coef_per_unit[i]:13.5g}"
            )
        lines.append(rule)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


@dataclass
class StudyResult:
    """Everything a study run produced; saved as ``results.json``."""

    study: str
    outcome: str
    transport: str
    sites: dict[str, dict[str, Any]]
    models: dict[str, LogisticFit]
    performance: dict[str, dict[str, dict[str, dict[str, float | int | None]]]]
    rounds: dict[str, int]
    federation: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)  # harmonisation, selection, screening
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "study": self.study,
            "created": self.created,
            "outcome": self.outcome,
            "transport": self.transport,
            "federation": self.federation,
            "sites": self.sites,
            "models": {name: fit.to_dict() for name, fit in self.models.items()},
            "performance": self.performance,
            "rounds": self.rounds,
            **self.details,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StudyResult:
        """Rebuild a result from results.json content."""
        if data.get("schema") != SCHEMA:
            raise ValueError(
                f"not a radfed results file (schema {data.get('schema')!r}, expected {SCHEMA!r})"
            )
        n_sites = len(data["sites"])
        return cls(
            study=data["study"],
            outcome=data["outcome"],
            transport=data["transport"],
            sites=data["sites"],
            models={
                name: LogisticFit.from_dict(fit, data["outcome"], n_sites)
                for name, fit in data["models"].items()
            },
            performance=_nan(data["performance"]),
            rounds=data["rounds"],
            federation=data.get("federation", {}),
            details={k: data[k] for k in DETAILS if k in data},
            created=data.get("created", ""),
        )

    @classmethod
    def read_json(cls, path: str | Path) -> StudyResult:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_finite(self.to_dict()), indent=2) + "\n")
        return path

    def auc_table(self) -> str:
        """Per-site discrimination of every model, train and test, with DeLong CIs."""
        lines = []
        for model, per_site in self.performance.items():
            head = (
                f"{'site':<16}{'n':>5}{'ev':>4} {'AUC train [95% CI]':<22}"
                f"{'n':>5}{'ev':>4} {'AUC test [95% CI]':<22}{'Brier':>7}{'sens':>6}{'spec':>6}"
            )
            lines += [f"Model: {model}", head, "-" * len(head)]
            for site, splits in per_site.items():
                tr, te = splits["train"], splits["test"]
                lines.append(
                    f"{site:<16}{_int(tr.get('n')):>5}{_int(tr.get('events')):>4} "
                    f"{_auc_ci(tr):<22}{_int(te.get('n')):>5}{_int(te.get('events')):>4} "
                    f"{_auc_ci(te):<22}{_fmt(te.get('brier')):>7}"
                    f"{_fmt(te.get('sensitivity'), 2):>6}{_fmt(te.get('specificity'), 2):>6}"
                )
        cutoffs = self.details.get("evaluation", {}).get("cutoffs")
        if cutoffs:
            lines.append(
                "Cut-offs (Youden, pooled training): "
                + ", ".join(f"{m} {c:.2f}" for m, c in cutoffs.items())
            )
        return "\n".join(lines)

    def external_table(self) -> str:
        """External AUCs: validation-only sites and leave-one-site-out, with the summary."""
        ext = self.details.get("external")
        if not ext:
            return ""
        lines = []
        for kind, title in (
            ("validation", "Validation-only sites (study models)"),
            ("held_out", "Leave-one-site-out (pipeline fitted without the site)"),
        ):
            if not ext.get(kind):
                continue
            lines.append(title)
            for site, entry in ext[kind].items():
                if entry.get("status") != "ok":
                    lines.append(f"  {site:<16}not evaluated: {entry.get('reason')}")
                    continue
                cells = [
                    f"{m} {_auc_ci(metrics)}" for m, metrics in entry.get("metrics", {}).items()
                ]
                lines.append(f"  {site:<16}" + "   ".join(cells))
        if ext.get("status") == "skipped":
            lines.append(f"Leave-one-site-out skipped: {ext.get('reason')}")
        for model, meta in ext.get("meta", {}).items():
            if "auc" in meta:
                lines.append(
                    f"  random effects, {model}: AUC {_fmt(meta['auc'])} "
                    f"[{_fmt(meta['ci'][0])}, {_fmt(meta['ci'][1])}], "
                    f"I2 = {100 * meta['i2']:.0f}%, k = {meta['k']}"
                )
        return "\n".join(lines)

    def summary(self) -> str:
        parts = [f"Study {self.study!r} ({self.transport} transport)"]
        selection = self.details.get("selection")
        if selection:
            lasso = selection["lasso"]
            parts.append(
                f"mRMR: {len(selection['mrmr']['selected'])} features; "
                f"LASSO {lasso['n_folds']}-fold CV, "
                f"{lasso['rule']} = {lasso[lasso['rule'].replace('.', '_')]:.4g}, "
                f"{len(lasso['nonzero'])} non-zero\n{selection['radscore_formula']}"
            )
        screening = self.details.get("clinical_screening")
        if screening:
            rows = [
                f"  {name:<20} LR chi2 {u['statistic']:8.3f} ({u['df']} df, "
                f"{len(u['levels'])} levels)   p = {u['p']:.4g}"
                if u.get("categorical")
                else f"  {name:<20} OR/unit {u['odds_ratio_per_unit']:8.3f}   p = {u['p']:.4g}"
                for name, u in screening["univariable"].items()
            ]
            parts.append(
                f"Univariable screening (p < {screening['threshold']}):\n" + "\n".join(rows)
            )
        parts += [f"Model: {name}\n{fit.summary()}" for name, fit in self.models.items()]
        parts.append(self.auc_table())
        external = self.external_table()
        if external:
            parts.append(external)
        if "equivalence" in self.details:
            rows = [
                f"  {r['estimate']:<52}{r['max_abs_diff']:>12.3g}{r['tolerance']:>10.0e}  "
                f"{'ok' if r['ok'] else 'DIFFERS'}"
                for r in self.details["equivalence"]
            ]
            head = f"  {'estimate':<52}{'max |diff|':>12}{'tol':>10}"
            parts.append(
                "Federated versus pooled (reference libraries):\n" + head + "\n" + "\n".join(rows)
            )
        excluded = self.exclusion_table()
        if excluded:
            parts.append(excluded)
        parts.append("Federated rounds: " + ", ".join(f"{k}={v}" for k, v in self.rounds.items()))
        return "\n\n".join(parts)

    def exclusion_table(self) -> str:
        """Each site's patients kept out, per kind of reason ('' when none was)."""
        lines = []
        for site, info in self.sites.items():
            reasons = info.get("exclusions") or {}
            n = info.get("n_excluded")
            if not reasons and not n:
                continue
            total = f"{n} excluded" if n is not None else "fewer than the site's minimum cell"
            lines.append(f"  {site}: {total}")
            lines += [
                f"    {'<min_cell' if count < 0 else count:>9}  {reason}"
                for reason, count in by_count(reasons)
            ]
        if not lines:
            return ""
        return (
            "Patients kept out, per site and reason (a patient with several reasons is "
            "counted under each; the list of patients stays at the site: radfed validate):\n"
            + "\n".join(lines)
        )

    def __str__(self) -> str:
        return self.summary()


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _int(value: Any) -> str:
    missing = value is None or (isinstance(value, float) and not np.isfinite(value))
    return "-" if missing else str(value)


def _auc_ci(metrics: dict[str, Any]) -> str:
    """``0.812 [0.74, 0.88]``, or why the AUC is missing."""
    if metrics.get("status", "ok") != "ok":
        return str(metrics.get("status"))
    ci = metrics.get("auc_ci") or [None, None]
    return f"{_fmt(metrics.get('auc'))} [{_fmt(ci[0], 2)}, {_fmt(ci[1], 2)}]"


def _nan(obj: Any) -> Any:
    """Inverse of :func:`_finite` for metric tables: None back to NaN."""
    if obj is None:
        return float("nan")
    if isinstance(obj, dict):
        return {k: _nan(v) for k, v in obj.items()}
    return obj


def _finite(obj: Any) -> Any:
    """Replace NaN and infinities by None: results.json stays strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def by_count(counts: dict[str, int]) -> list[tuple[str, int]]:
    """Reasons by their count, largest first; a withheld count (-1) last."""
    return sorted(counts.items(), key=lambda kv: (kv[1] < 0, -kv[1], kv[0]))
