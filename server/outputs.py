"""What every study run leaves in its output folder: results.json, figures, the report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from radfed.server.results import POOLED, StudyResult

log = logging.getLogger(__name__)

RESULTS = "results.json"
FIGURES = "figures"
REPORT = "report.html"
#: Resolution of the run's PNG figures (sharp on screen; the nomogram is also SVG).
REPORT_DPI = 110


def external_performance(external: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """External metrics re-keyed as ``performance[model][site]["external"]`` for plots."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for kind in ("validation", "held_out"):
        for site, entry in external.get(kind, {}).items():
            for model, metrics in entry.get("metrics", {}).items():
                out.setdefault(model, {})[site] = {"external": metrics}
    return out


def write_figures(result: StudyResult, folder: Path) -> dict[str, Path]:
    """Draw every figure of a run into ``folder``; keys name kind, site and split.

    ROC, calibration and decision curves: each site's test split, the pooled train and
    test splits, and every externally validated site; the LASSO CV curve, the Radscore
    coefficients, the forest plot of external AUCs and the nomogram (PNG and SVG).
    """
    import matplotlib

    matplotlib.use("Agg")
    from radfed.server import plots
    from radfed.server.nomogram import NomogramScales, save_nomogram

    data = result.to_dict()
    thresholds = data.get("evaluation", {}).get("thresholds", [])
    figures: dict[str, Path] = {}

    def save(key: str, fig: Any) -> None:
        paths = plots.save_figure(fig, folder / key, dpi=REPORT_DPI)
        figures[key] = paths[0]

    panels = [(site, "test") for site in result.sites] + [(POOLED, "train"), (POOLED, "test")]
    sets = [(result.performance, panels)]
    external = external_performance(data.get("external", {}))
    if external:
        # Sites where no model could be evaluated have nothing to draw (the report says why).
        sites = sorted(
            {
                s
                for per_site in external.values()
                for s, splits in per_site.items()
                if splits["external"].get("status") == "ok"
            }
        )
        sets.append((external, [(s, "external") for s in sites]))
    for performance, where in sets:
        for site, split in where:
            save(f"roc/{site}/{split}", plots.roc_figure(performance, site, split))
            save(f"calibration/{site}/{split}", plots.calibration_figure(performance, site, split))
            save(
                f"decision/{site}/{split}",
                plots.decision_curve_figure(performance, thresholds, site, split),
            )
    lasso = data.get("selection", {}).get("lasso")
    if lasso:
        save("lasso_cv", plots.lasso_cv_figure(lasso))
        save("radscore", plots.radscore_coefficients_figure(lasso))
    if data.get("external", {}).get("held_out") or data.get("external", {}).get("validation"):
        save("forest", plots.forest_figure(data["external"]))
    chart = "nomogram" if "nomogram" in result.models else next(iter(result.models))
    scales = NomogramScales.from_fit(result.models[chart], outcome=result.outcome)
    figures["nomogram"] = save_nomogram(scales, folder / "nomogram")[0]
    return figures


def write_outputs(result: StudyResult, out_dir: Path) -> dict[str, Path]:
    """Write results.json, the figures and the self-contained HTML report.

    Returns
    -------
    dict
        ``results``, ``figures`` (the folder) and ``report`` paths.
    """
    from radfed.server.report import write_report

    out_dir = Path(out_dir)
    results = result.write_json(out_dir / RESULTS)
    figures = write_figures(result, out_dir / FIGURES)
    report = write_report(result.to_dict(), figures, out_dir / REPORT)
    log.info("report written to %s", report)
    return {"results": results, "figures": out_dir / FIGURES, "report": report}
