"""Figures of a study's evaluation: ROC, calibration, decision curves, the LASSO CV curve,
the Radscore's coefficients and the external-validation forest plot.

Every function reads the evaluation schema of ``results.json`` (``performance[model]
[site][split]`` metrics dicts and ``external``) and returns a
:class:`matplotlib.figure.Figure` built without pyplot: no global figure registry and no
GUI backend, so figures can be made in servers and worker threads. Write them with
:func:`save_figure`.

A metrics dict whose ``status`` is not ``"ok"`` (a class missing, a privacy refusal) is
not drawn; its model still gets a legend entry that says why, so a missing curve is
never silent. A metrics dict without ``status`` (older results) counts as ``"ok"``.
Each model keeps its colour in every figure (:func:`model_color`).
"""

from __future__ import annotations

import math
import sys
import textwrap
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Polygon

from radfed.server.results import INTERCEPT, POOLED

Metrics = Mapping[str, Any]
Performance = Mapping[str, Mapping[str, Mapping[str, Metrics]]]

#: The study's three models in Okabe-Ito colours (distinguishable with colour blindness).
MODEL_COLORS = {"radiomics": "#0072B2", "clinical": "#009E73", "nomogram": "#D55E00"}
_SPARE_COLORS = ("#CC79A7", "#56B4E9", "#E69F00", "#882255", "#44AA99", "#999933")
TREAT_ALL_COLOR = "0.55"
NOTE_COLOR = "0.35"

_SPLITS = {"train": "training split", "test": "test split", "external": "external validation"}
_LEGEND_WIDTH = 58  # characters before a legend entry wraps


def model_color(model: str) -> str:
    """The colour of ``model`` in every figure.

    The three study models have fixed colours; any other name gets a spare colour chosen
    from a checksum of the name, so it is the same in every figure and every run.
    """
    if model in MODEL_COLORS:
        return MODEL_COLORS[model]
    return _SPARE_COLORS[zlib.crc32(model.encode()) % len(_SPARE_COLORS)]


def save_figure(
    fig: Figure,
    path_without_suffix: str | Path,
    formats: Iterable[str] = ("png",),
    dpi: int = 150,
) -> list[Path]:
    """Write ``fig`` once per format (PNG at ``dpi``) and close it.

    Parameters
    ----------
    fig : Figure
    path_without_suffix : str or Path
        ``"out/roc_pooled_test"`` writes ``out/roc_pooled_test.png`` (and ``.svg``); a dot
        in the name is kept, not taken for a suffix. Parent folders are created.
    formats : iterable of str
        Any of matplotlib's formats, e.g. ``("png", "svg")``.
    dpi : int
        Raster resolution (a run's report uses less: it embeds dozens of figures).

    Returns
    -------
    list of Path
        The files written, in the order of ``formats``.

    Notes
    -----
    SVG text stays text (``svg.fonttype = "none"``), so labels can be searched and edited
    in a vector editor; the reader's fonts then render it.
    """
    base = Path(path_without_suffix)
    base.parent.mkdir(parents=True, exist_ok=True)
    written = []
    with mpl.rc_context({"svg.fonttype": "none"}):
        for fmt in formats:
            fmt = fmt.lower().lstrip(".")
            path = base.with_name(f"{base.name}.{fmt}")
            fig.savefig(path, format=fmt, dpi=dpi, bbox_inches="tight")
            written.append(path)
    # Only a figure made through pyplot is registered anywhere; ours are plain Figures.
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close(fig)
    return written


# --------------------------------------------------------------------------- metrics


def roc_figure(
    performance: Performance, site: str, split: str, models: Sequence[str] | None = None
) -> Figure:
    """ROC curves of the models at one site and split.

    Parameters
    ----------
    performance : mapping
        ``performance[model][site][split]`` metrics dicts.
    site : str
        A hospital name or ``"pooled"``.
    split : {"train", "test", "external"}
    models : sequence of str, optional
        Models to draw, in legend order; all of ``performance`` by default.

    Returns
    -------
    Figure
        One panel. The legend gives each model's exact AUC (Mann-Whitney) with its 95% CI
        from the metrics dict; the curve joins (0, 0), the threshold-grid points and
        (1, 1), so its area can differ slightly from that AUC (a footnote says so).
    """
    models = list(performance) if models is None else list(models)
    fig = Figure(figsize=(6.4, 6.4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1, label="Chance")
    shown, grid, approximate = [], 0, {}
    for model in models:
        color = model_color(model)
        m, why = _lookup(performance, model, site, split)
        roc = m.get("roc") if m is not None and _is_map(m.get("roc")) else {}
        fpr, tpr = _array(roc.get("fpr")), _array(roc.get("tpr"))
        if m is not None and (fpr is None or tpr is None or fpr.shape != tpr.shape):
            m, why = None, "no ROC points in the metrics"
        if m is None:
            _missing_entry(ax, model, why, color)
            continue
        keep = np.isfinite(fpr) & np.isfinite(tpr)
        grid = max(grid, len(fpr))
        points = np.vstack([[0.0, 0.0], np.column_stack([fpr[keep], tpr[keep]]), [1.0, 1.0]])
        points = points[np.lexsort((points[:, 1], points[:, 0]))]
        approx = _approximate(m, ("auc", "roc"))
        approximate.update({f"{model} {k}": v for k, v in approx.items()})
        label = f"{model}: {'≈' if approx else ''}AUC {_ci_text(m.get('auc'), m.get('auc_ci'))}"
        ax.plot(points[:, 0], points[:, 1], color=color, linewidth=2, label=label)
        shown.append(m)
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), aspect="equal")
    ax.set_xlabel("1 − specificity (false-positive rate)")
    ax.set_ylabel("Sensitivity (true-positive rate)")
    ax.set_title(_title("ROC curves", site, split, shown))
    ax.grid(color="0.92")
    ax.legend(loc="lower right", fontsize=8, title="AUC (95% CI)", title_fontsize=8)
    note = (
        f"Curves join (0, 0), the points at the {grid or 'shared'}-threshold probability grid, "
        "and (1, 1); the legend's AUCs are exact, not the area under these polylines."
    )
    _footnote(fig, note, approximate)
    return fig


def calibration_figure(
    performance: Performance, site: str, split: str, models: Sequence[str] | None = None
) -> Figure:
    """Calibration plot: observed event rate against predicted risk.

    Where ``calibration["curve"]`` holds a fitted smooth curve (pooled rows, external
    sites) it is drawn with its pointwise 95% band. Each non-empty (merged) bin of
    ``calibration["bins"]`` is a point at (expected / n, observed / n) with its marker
    area proportional to its patients. The legend gives the calibration intercept and
    slope and the Hosmer-Lemeshow statistic and p-value.

    Parameters
    ----------
    performance, site, split, models
        As :func:`roc_figure`.
    """
    models = list(performance) if models is None else list(models)
    fig = Figure(figsize=(6.4, 6.4), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="Ideal")
    cal_list = []
    for model in models:
        m, why = _lookup(performance, model, site, split)
        if m is not None and _is_map(m.get("calibration")):
            cal_list.append((model, m, m["calibration"]))
            continue
        _missing_entry(ax, model, why or "no calibration in the metrics", model_color(model))
    largest = max((_bin_counts(c)[0].max(initial=0) for _, _, c in cal_list), default=0) or 1
    shown, approximate = [], {}
    for model, m, cal in cal_list:
        color = model_color(model)
        n, observed, expected = _bin_counts(cal)
        full = n > 0
        x, y = expected[full] / n[full], observed[full] / n[full]
        keep = np.isfinite(x) & np.isfinite(y)
        approx = _approximate(m, ("calibration", "hl", "intercept", "slope"))
        approximate.update({f"{model} {k}": v for k, v in approx.items()})
        hl = f"HL χ²({_fmt(cal.get('hl_df'), 'd')}) = {_fmt(cal.get('hl_statistic'), '.2f')}"
        label = (
            f"{model}: {'≈ ' if approx else ''}intercept {_fmt(cal.get('intercept'), '.2f')}, "
            f"slope {_fmt(cal.get('slope'), '.2f')}, {hl}, p = {_p(cal.get('hl_p'))}"
        )
        curve = cal.get("curve") if _is_map(cal.get("curve")) else {}
        if curve.get("status") == "ok":
            # The smooth curve (polynomial recalibration) with its pointwise 95% band; the
            # merged bins stay as points.
            px, py = _array(curve.get("predicted")), _array(curve.get("observed"))
            ax.fill_between(
                px, _array(curve.get("lower")), _array(curve.get("upper")), color=color, alpha=0.15
            )
            ax.plot(px, py, color=color, linewidth=1.8, label=label)
        else:
            if not keep.any():
                label += " (no bins to draw)"
            ax.plot(x[keep], y[keep], color=color, linewidth=1.2, alpha=0.8, label=label)
        ax.scatter(
            x[keep],
            y[keep],
            s=15 + 235 * n[full][keep] / largest,
            color=color,
            alpha=0.75,
            edgecolors="white",
            linewidths=0.6,
            zorder=3,
        )
        shown.append(m)
    ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal")
    ax.set_xlabel("Mean predicted probability")
    ax.set_ylabel("Observed event rate")
    ax.set_title(_title("Calibration", site, split, shown))
    ax.grid(color="0.92")
    ax.legend(loc="upper left", fontsize=7.5)
    note = (
        "Lines: logistic recalibration on a cubic polynomial of logit p with its "
        "95% band, where fitted; points: risk bins, merged by each site until every bin "
        "holds at least its minimum cell size (marker area ∝ patients). Intercept and "
        "slope: logistic recalibration (ideal 0 and 1); HL: Hosmer-Lemeshow test."
    )
    _footnote(fig, note, approximate)
    return fig


def decision_curve_figure(
    performance: Performance,
    thresholds: Sequence[float],
    site: str,
    split: str,
    models: Sequence[str] | None = None,
) -> Figure:
    """Decision curves: net benefit of each model, of treating all and of treating none.

    The y-axis runs from -5% to 100% of the largest prevalence (events / n) among the
    models drawn, as dcurves' plot does; net benefit can never exceed the prevalence.

    Parameters
    ----------
    performance, site, split, models
        As :func:`roc_figure`.
    thresholds : sequence of float
        The shared threshold grid ``net_benefit`` and ``treat_all`` are evaluated at. A
        model whose ``net_benefit`` does not have one value per threshold is not drawn
        (its legend entry says so).
    """
    models = list(performance) if models is None else list(models)
    t = np.asarray(thresholds, dtype=float)
    fig = Figure(figsize=(7.2, 5.0), layout="constrained")
    ax = fig.add_subplot()
    shown, treat_all, approximate = [], None, {}
    for model in models:
        color = model_color(model)
        m, why = _lookup(performance, model, site, split)
        nb = _array(m.get("net_benefit")) if m is not None else None
        if m is not None and nb is None:
            m, why = None, "no net benefit in the metrics"
        elif m is not None and nb.shape != t.shape:
            m, why = None, f"{nb.size} net-benefit values for {t.size} thresholds"
        if m is None:
            _missing_entry(ax, model, why, color)
            continue
        approx = _approximate(m, ("net_benefit", "treat_all"))
        approximate.update({f"{model} {k}": v for k, v in approx.items()})
        label = f"{model}{' (≈)' if approx else ''}"
        if not np.isfinite(nb).any():
            label += ": no finite net benefit"
        ax.plot(t, nb, color=color, linewidth=2, label=label)
        all_nb = _array(m.get("treat_all"))
        if treat_all is None and all_nb is not None and np.isfinite(all_nb).any():
            treat_all = all_nb
        shown.append(m)
    if treat_all is not None and treat_all.shape == t.shape:
        ax.plot(t, treat_all, color=TREAT_ALL_COLOR, linewidth=1.5, label="Treat all")
    else:
        _missing_entry(ax, "Treat all", "not available", TREAT_ALL_COLOR)
    ax.axhline(0, color="black", linewidth=1.2, label="Treat none")
    prevalence = [_num(m.get("events")) / _num(m.get("n")) for m in shown if _num(m.get("n"))]
    prevalence = [p for p in prevalence if math.isfinite(p) and p > 0]
    if prevalence:
        top = max(prevalence)
        # A hair above the prevalence so the treat-all curve's start is not clipped.
        ax.set_ylim(-0.05 * top, top * 1.02)
    ax.set_xlim(0, 1 if t.size == 0 else min(1.0, float(np.nanmax(t)) + 0.01))
    ax.set_xlabel("Threshold probability")
    ax.set_ylabel("Net benefit")
    ax.set_title(_title("Decision curves", site, split, shown))
    ax.grid(color="0.92")
    ax.legend(loc="upper right", fontsize=8)
    note = "Net benefit = TP/n − FP/n · pt/(1 − pt) at threshold probability pt."
    _footnote(fig, note, approximate)
    return fig


# --------------------------------------------------------------------------- selection


def lasso_cv_figure(lasso: Mapping[str, Any]) -> Figure:
    """The LASSO cross-validation curve, as ``plot(cv.glmnet(...))`` draws it.

    Mean CV binomial deviance ± 1 SE against log(λ), with dotted vertical lines at
    λ.min and λ.1se; the legend marks the rule the Radscore used.

    Parameters
    ----------
    lasso : mapping
        ``details["selection"]["lasso"]`` of results.json: ``lambdas``, ``cvm``,
        ``cvsd``, ``lambda_min``, ``lambda_1se``, ``rule``, ``n_folds``.
    """
    lambdas = _array(lasso.get("lambdas"))
    cvm, cvsd = _array(lasso.get("cvm")), _array(lasso.get("cvsd"))
    fig = Figure(figsize=(7.2, 5.0), layout="constrained")
    ax = fig.add_subplot()
    if lambdas is None or cvm is None or cvm.shape != lambdas.shape:
        ax.text(0.5, 0.5, "No LASSO CV curve in the results", ha="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    cvsd = np.zeros_like(cvm) if cvsd is None or cvsd.shape != cvm.shape else cvsd
    keep = np.isfinite(cvm) & (lambdas > 0)
    x = np.log(lambdas[keep])
    ax.errorbar(
        x,
        cvm[keep],
        yerr=np.nan_to_num(cvsd[keep]),
        fmt="o",
        color="#C0392B",
        markersize=4,
        ecolor="0.65",
        elinewidth=1,
        capsize=2,
        label="Mean CV deviance ± 1 SE",
    )
    rule = str(lasso.get("rule") or "")
    for name, key, style in (("λ.min", "lambda_min", ":"), ("λ.1se", "lambda_1se", "--")):
        value = _num(lasso.get(key))
        if math.isfinite(value) and value > 0:
            used = " — Radscore" if rule.replace(".", "_") == key else ""
            log_value = f"{math.log(value):.2f}".replace("-", "−")
            label = f"{name} = {value:.4g} (log {log_value}){used}"
            ax.axvline(math.log(value), color="0.2", linestyle=style, linewidth=1, label=label)
    folds = lasso.get("n_folds")
    ax.set_title(f"LASSO logistic: {folds}-fold cross-validation" if folds else "LASSO CV")
    ax.set_xlabel("log(λ)")
    ax.set_ylabel("Binomial deviance")
    ax.grid(color="0.92")
    ax.legend(fontsize=8)
    return fig


def radscore_coefficients_figure(lasso: Mapping[str, Any]) -> Figure:
    """Horizontal bars of the Radscore's non-zero LASSO coefficients, sorted by value.

    Coefficients are per SD of the standardised feature, so bar lengths are comparable.
    The intercept is left out.

    Parameters
    ----------
    lasso : mapping
        ``details["selection"]["lasso"]``; reads ``coef`` and ``rule``.
    """
    coef = lasso.get("coef") if _is_map(lasso.get("coef")) else {}
    items = [
        (name, _num(value))
        for name, value in coef.items()
        if name != INTERCEPT and math.isfinite(_num(value)) and _num(value) != 0
    ]
    items.sort(key=lambda item: item[1])
    fig = Figure(figsize=(7.2, 1.6 + 0.32 * max(len(items), 2)), layout="constrained")
    ax = fig.add_subplot()
    rule = lasso.get("rule") or "the chosen λ"
    ax.set_title(f"Radscore: {len(items)} non-zero LASSO coefficients at {rule}")
    if not items:
        ax.text(0.5, 0.5, "No non-zero coefficients", ha="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    names, values = zip(*items, strict=True)
    y = np.arange(len(items))
    colors = ["#D55E00" if v > 0 else "#0072B2" for v in values]
    ax.set_axisbelow(True)  # grid behind the bars
    ax.barh(y, values, color=colors, height=0.65)
    ax.set_yticks(y, names, fontsize=8)
    ax.axvline(0, color="black", linewidth=0.8)
    span = max(abs(v) for v in values)
    for yi, v in zip(y, values, strict=True):
        ax.text(
            v + math.copysign(0.02 * span, v),
            yi,
            f"{v:.3f}",
            va="center",
            ha="left" if v > 0 else "right",
            fontsize=7.5,
        )
    ax.set_xlim(-1.25 * span if min(values) < 0 else 0, 1.25 * span if max(values) > 0 else 0)
    ax.set_xlabel("Coefficient per SD of the standardised feature")
    ax.grid(axis="x", color="0.92")
    return fig


# --------------------------------------------------------------------------- external


def forest_figure(external: Mapping[str, Any], models: Sequence[str] | None = None) -> Figure:
    """Forest plot of the leave-one-site-out external AUCs and their random-effects summary.

    One block per model: a row per held-out site (AUC with 95% CI), then a diamond for the
    random-effects meta-analytic AUC with its CI, k and I². Sites whose hold-out failed are
    listed with their reason under the plot; a model undefined at a site gets a row that
    says why.

    Parameters
    ----------
    external : mapping
        ``{"held_out": {site: {"status", "reason", "metrics": {model: metrics}}},
        "meta": {model: {"auc", "ci", "tau2", "i2", "q", "q_p", "k", "method"}}}``.
        ``i2`` is read as a proportion (0-1) and shown in percent; a value above 1 is
        taken to be a percentage already.
    models : sequence of str, optional
        Models to show, in order; every model met in ``external`` by default.
    """
    held_out = external.get("held_out") if _is_map(external.get("held_out")) else {}
    meta = external.get("meta") if _is_map(external.get("meta")) else {}
    ok_sites = {s: e for s, e in held_out.items() if _is_map(e) and e.get("status") == "ok"}
    failed = {s: e for s, e in held_out.items() if s not in ok_sites}
    if models is None:
        models = []
        for entry in ok_sites.values():
            metrics = entry.get("metrics") if _is_map(entry.get("metrics")) else {}
            models += [m for m in metrics if m not in models]
        models += [m for m in meta if m not in models]

    # Rows from the top: (left label, right label, kind, model, payload).
    rows: list[tuple[str, str, str, str, Any]] = []
    for model in models:
        rows.append((model, "AUC (95% CI)", "header", model, None))
        for site, entry in ok_sites.items():
            metrics = entry.get("metrics") if _is_map(entry.get("metrics")) else {}
            m = metrics.get(model)
            if not _is_map(m):
                rows.append((f"  {site}", "not evaluated", "note", model, None))
                continue
            left = f"  {site} (n = {_fmt(m.get('n'), 'd')}, events = {_fmt(m.get('events'), 'd')})"
            auc, ci = _num(m.get("auc")), _pair(m.get("ci") or m.get("auc_ci"))
            if m.get("status", "ok") != "ok" or not math.isfinite(auc):
                why = f"{m.get('status', 'undefined')}: {m.get('reason') or 'AUC not defined'}"
                rows.append((left, _shorten(why, 48), "note", model, None))
            else:
                rows.append((left, _ci_text(auc, ci), "site", model, (auc, *ci)))
        summary = meta.get(model)
        if _is_map(summary) and math.isfinite(_num(summary.get("auc"))):
            auc, ci = _num(summary.get("auc")), _pair(summary.get("ci"))
            method = f" ({summary['method']})" if summary.get("method") else ""
            left = (
                f"  Random effects{method}, k = {_fmt(summary.get('k'), 'd')}, "
                f"I² = {_i2(summary.get('i2'))}"
            )
            rows.append((left, _ci_text(auc, ci), "summary", model, (auc, *ci)))
        else:
            rows.append(("  Random effects", "summary not available", "note", model, None))

    fig = Figure(figsize=(9.0, 1.9 + 0.3 * max(len(rows), 3)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(rows))[::-1].astype(float)
    lows = []
    for yi, (_, _, kind, model, payload) in zip(y, rows, strict=True):
        color = model_color(model)
        if kind == "site":
            auc, lo, hi = payload
            ax.plot([lo, hi], [yi, yi], color=color, linewidth=1.5)
            ax.plot(auc, yi, "s", color=color, markersize=6)
            lows.append(lo)
        elif kind == "summary":
            auc, lo, hi = payload
            lo, hi = (auc if math.isnan(lo) else lo), (auc if math.isnan(hi) else hi)
            diamond = [(lo, yi), (auc, yi + 0.3), (hi, yi), (auc, yi - 0.3)]
            ax.add_patch(Polygon(diamond, closed=True, color=color, alpha=0.85))
            lows.append(lo)
    lows = [v for v in lows if math.isfinite(v)]
    ax.set_xlim(max(0.0, min([0.5, *lows]) - 0.05), 1.0)
    ax.set_ylim(-0.8, len(rows) - 0.2)
    ax.axvline(0.5, color="0.6", linestyle=":", linewidth=1)
    ax.set_yticks(y, [r[0] for r in rows], fontsize=8)
    right = ax.twinx()
    right.set_ylim(ax.get_ylim())
    right.set_yticks(y, [r[1] for r in rows], fontsize=8)
    for axis in (ax, right):
        axis.tick_params(axis="y", length=0)
        for label, row in zip(axis.get_yticklabels(), rows, strict=True):
            if row[2] == "header":
                label.set(fontweight="bold", color=model_color(row[3]))
            elif row[2] == "note":
                label.set(color=NOTE_COLOR, style="italic")
    for spine in ("left", "right", "top"):
        ax.spines[spine].set_visible(False)
        right.spines[spine].set_visible(False)
    ax.set_xlabel("External AUC (95% CI)")
    ax.set_axisbelow(True)
    ax.grid(axis="x", color="0.92")
    ax.set_title("External validation: each site held out in turn")
    if not rows:
        ax.text(0.5, 0.5, "No external validation results", ha="center", transform=ax.transAxes)
    if failed:
        lines = [
            f"{site}: {(e.get('reason') if _is_map(e) else None) or 'no reason given'}"
            for site, e in failed.items()
        ]
        _footnote(fig, "Held-out sites that failed (not shown) — " + "; ".join(lines), {})
    return fig


# --------------------------------------------------------------------------- helpers


def _is_map(value: Any) -> bool:
    return isinstance(value, Mapping)


def _lookup(
    performance: Performance, model: str, site: str, split: str
) -> tuple[Metrics | None, str]:
    """The metrics dict if it can be drawn, else None and the reason it cannot."""
    per_site = performance.get(model)
    splits = per_site.get(site) if _is_map(per_site) else None
    m = splits.get(split) if _is_map(splits) else None
    if not _is_map(m):
        return None, f"no {split} results at {site}"
    status = m.get("status", "ok")
    if status != "ok":
        reason = m.get("reason")
        return None, f"{status}: {reason if isinstance(reason, str) and reason else 'no reason'}"
    return m, ""


def _missing_entry(ax: Any, model: str, why: str, color: str) -> None:
    """A legend entry (no data) saying why a model is not drawn."""
    ax.add_line(
        Line2D([], [], color=color, linestyle=":", label=_wrap(f"{model}: not shown ({why})"))
    )


def _num(value: Any) -> float:
    """A finite-or-NaN float from a metrics value (None, NaN and non-numbers give NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
        return float("nan")
    return float(value)


def _array(value: Any) -> np.ndarray | None:
    """A float array from a JSON list (None entries become NaN); None if not a list."""
    if isinstance(value, np.ndarray):
        return value.astype(float)
    if not isinstance(value, (list, tuple)):
        return None
    return np.array([_num(v) for v in value], dtype=float)


def _bin_counts(cal: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    bins = cal.get("bins") if _is_map(cal.get("bins")) else {}
    n = _array(bins.get("n"))
    if n is None:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    n = np.nan_to_num(n)
    observed, expected = _array(bins.get("observed")), _array(bins.get("expected"))
    if observed is None or observed.shape != n.shape:
        observed = np.full_like(n, np.nan)
    if expected is None or expected.shape != n.shape:
        expected = np.full_like(n, np.nan)
    return n, observed, expected


def _pair(value: Any) -> tuple[float, float]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return _num(value[0]), _num(value[1])
    return float("nan"), float("nan")


def _fmt(value: Any, spec: str) -> str:
    v = _num(value)
    if not math.isfinite(v):
        return "n/a"
    return format(round(v), spec) if spec == "d" else format(v, spec)


def _p(value: Any) -> str:
    v = _num(value)
    if not math.isfinite(v):
        return "n/a"
    return "< 0.001" if v < 0.001 else f"{v:.3f}"


def _i2(value: Any) -> str:
    v = _num(value)
    if not math.isfinite(v):
        return "n/a"
    return f"{v if v > 1 else 100 * v:.0f}%"


def _ci_text(estimate: Any, ci: Any) -> str:
    lo, hi = _pair(ci)
    text = _fmt(estimate, ".3f")
    if math.isfinite(lo) and math.isfinite(hi):
        return f"{text} ({lo:.3f}–{hi:.3f})"
    return f"{text} (CI n/a)"


def _approximate(m: Metrics, prefixes: tuple[str, ...]) -> dict[str, str]:
    """The pooled metrics' approximation notes that concern this figure."""
    notes = m.get("approximate")
    if not _is_map(notes):
        return {}
    return {str(k): str(v) for k, v in notes.items() if str(k).startswith(prefixes)}


def _title(what: str, site: str, split: str, shown: list[Metrics]) -> str:
    where = "all sites pooled" if site == POOLED else site
    title = f"{what} — {where}, {_SPLITS.get(split, split)}"
    sizes = {(_fmt(m.get("n"), "d"), _fmt(m.get("events"), "d")) for m in shown}
    if len(sizes) == 1:
        n, events = sizes.pop()
        title += f"\nn = {n}, events = {events}"
    elif not shown:
        title += "\nno model could be drawn"
    return title


def _wrap(text: str, width: int = _LEGEND_WIDTH) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


def _shorten(text: str, width: int) -> str:
    return textwrap.shorten(text, width, placeholder="…")


def _footnote(fig: Figure, note: str, approximate: Mapping[str, str]) -> None:
    """Small print under the axes (supxlabel, so constrained layout makes room)."""
    parts = [note]
    if approximate:
        parts.append(
            "≈ approximate (pooled): " + "; ".join(f"{k}: {v}" for k, v in approximate.items())
        )
    text = "\n".join(_wrap(part, 110) for part in parts)
    fig.supxlabel(text, x=0.01, ha="left", fontsize=7, color=NOTE_COLOR)
