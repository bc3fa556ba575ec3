"""What every study run leaves in its output folder: results.json, figures, the report."""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from radfed.server.results import POOLED, StudyResult
from radfed.server.stats.axis_ranges import drawn_model
from radfed.shared.errors import RadfedError

if TYPE_CHECKING:
    from radfed.server.outputs.nomogram import NomogramScales

log = logging.getLogger(__name__)

RESULTS = "results.json"
FIGURES = "figures"
REPORT = "report.html"
#: Resolution of the run's PNG figures (sharp on screen; the nomogram is also SVG).
REPORT_DPI = 110
#: In an output root: the link to (or, where links are not allowed, a file naming)
#: the newest run's folder.
LATEST = "latest"


class OutputError(RadfedError):
    """An output folder or file cannot be written."""


def check_writable(folder: str | Path, what: str = "output folder") -> Path:
    """Create ``folder`` (and its parents) and prove a file can be written in it.

    Raises
    ------
    OutputError
        With the folder and the system's reason (read-only file system, permission
        denied, no space left, not a folder).
    """
    folder = Path(folder).expanduser().absolute()
    blocker = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise OutputError(f"cannot write to the {what} {folder}: {blocker} is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".radfed-write-test-") as probe:
            probe.write(b"x")
            probe.flush()
    except OSError as exc:
        raise OutputError(f"cannot write to the {what} {folder}: {_reason(exc)}") from exc
    return folder


def _reason(exc: OSError) -> str:
    return exc.strerror or errno.errorcode.get(exc.errno or 0, "") or str(exc)


def run_folder_name(when: datetime | None = None, run_id: str | None = None) -> str:
    """``YYYYMMDD-HHMMSS-<8 hex>``: sorts by time, unique by the short run id."""
    when = when or datetime.now()
    return f"{when:%Y%m%d-%H%M%S}-{run_id or secrets.token_hex(4)}"


def new_run_folder(root: str | Path) -> Path:
    """Create a new, empty folder for one run under the output ``root``.

    Never reuses a folder: every run of a study keeps its own results, figures and
    report. Once the run is recorded, ``root/latest`` points at it (see
    :func:`point_latest`); a failed run's folder holds :data:`FAILURE` instead.

    Raises
    ------
    OutputError
        When ``root`` cannot be written.
    """
    root = check_writable(root)
    for _ in range(100):
        folder = root / run_folder_name()
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot create {folder}: {_reason(exc)}") from exc
        return folder
    raise OutputError(f"could not create a new run folder in {root}")


#: Written into a run's folder when the run failed before its results were recorded.
FAILURE = "failure.json"


def record_failure(folder: Path, study: str, transport: str, exc: BaseException) -> Path | None:
    """Write ``folder/failure.json``: which run failed, when, and the error (one line).

    Returns None (and logs) when even that cannot be written.
    """
    error = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
    record = {
        "study": study,
        "transport": transport,
        "failed": datetime.now(UTC).isoformat(timespec="seconds"),
        "error": error,
    }
    path = Path(folder) / FAILURE
    try:
        path.write_text(json.dumps(record, indent=2) + "\n")
    except OSError as err:
        log.warning("could not record the failure in %s: %s", path, _reason(err))
        return None
    return path


def point_latest(root: Path, folder: Path) -> Path:
    """Make ``root/latest`` a relative symbolic link to ``folder`` (replaced atomically);
    where links are not allowed, ``root/latest`` is a text file holding the folder name."""
    link = root / LATEST
    tmp = root / f".{LATEST}-{secrets.token_hex(4)}"
    try:
        os.symlink(folder.name, tmp, target_is_directory=True)
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)
        if link.is_symlink() or link.is_file():
            link.unlink()
        if not link.exists():
            link.write_text(folder.name + "\n")
    return link


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
    from radfed.server.outputs import plots
    from radfed.server.outputs.nomogram import save_nomogram

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
    scales = nomogram_scales(result)
    figures["nomogram"] = save_nomogram(scales, folder / "nomogram")[0]
    return figures


def nomogram_scales(result: StudyResult) -> NomogramScales:
    """The scales of the run's nomogram chart: the nomogram model, else the first,
    with the study's display names, each categorical variable as one axis and the
    numeric axes over ``evaluation["nomogram_ranges"]`` (mean ± 2 SD where a column
    has no range)."""
    from radfed.server.outputs.nomogram import NomogramScales

    data = result.to_dict()
    chart = drawn_model(result.models)
    fit = result.models[chart]
    display = data.get("nomogram_display") or {}  # the study's [nomogram] names
    # Categorical clinical variables: one axis per variable, over its dummy columns.
    levels = (data.get("clinical_screening") or {}).get("levels") or {}
    categories = {k: v for k, v in levels.items() if f"{k}={v[-1]}" in fit.columns}
    names = set(fit.columns) | set(categories)
    # Numeric axes over the federated 5th-95th percentiles; a column without usable
    # counts (low None) keeps mean ± 2 SD, as results.json says.
    found = data.get("evaluation", {}).get("nomogram_ranges") or {}
    ranges = {
        k: (v["low"], v["high"])
        for k, v in found.items()
        if k in fit.columns and v.get("low") is not None and v.get("high") is not None
    }
    return NomogramScales.from_fit(
        fit,
        ranges=ranges,
        outcome=result.outcome,
        labels={k: v for k, v in display.get("labels", {}).items() if k in names},
        levels={k: v for k, v in display.get("levels", {}).items() if k in names},
        categories=categories,
    )


def write_outputs(result: StudyResult, out_dir: Path) -> dict[str, Path]:
    """Write results.json, the figures and the self-contained HTML report.

    Returns
    -------
    dict
        ``results``, ``figures`` (the folder) and ``report`` paths.
    """
    from radfed.server.outputs.report import write_report

    out_dir = Path(out_dir)
    # results.json first, so what was computed is kept whatever fails after it.
    paths = {"results": write_results(result, out_dir)}
    figures: dict[str, Path] = {}
    try:
        figures = write_figures(result, out_dir / FIGURES)
        paths["figures"] = out_dir / FIGURES
    except Exception as exc:  # recorded in results.json and logged
        record_error(result, "figures", exc)
    try:
        paths["report"] = write_report(result.to_dict(), figures, out_dir / REPORT)
        log.info("report written to %s", paths["report"])
    except Exception as exc:  # recorded in results.json and logged
        record_error(result, "report", exc)
    if result.federation.get(ERRORS):
        write_results(result, out_dir)
    return paths


#: ``federation`` key of results.json listing what could not be recorded.
ERRORS = "errors"


def record_error(result: StudyResult, step: str, exc: BaseException) -> str:
    """Note in ``result`` (``federation["errors"]``) that ``step`` failed, and log it."""
    message = f"{step}: {type(exc).__name__}: {exc}".splitlines()[0]
    result.federation.setdefault(ERRORS, []).append(message)
    log.error("%s (the run's other results are kept)", message)
    log.debug("where %s failed", step, exc_info=exc)
    return message


def write_results(result: StudyResult, out_dir: Path) -> Path:
    """Write ``results.json``; an unwritable folder is an :class:`OutputError`."""
    try:
        return result.write_json(Path(out_dir) / RESULTS)
    except OSError as exc:
        raise OutputError(f"cannot write {Path(out_dir) / RESULTS}: {_reason(exc)}") from exc
