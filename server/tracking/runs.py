"""MLflow tracking of study runs, named so that MLflow's run comparison and search work.

One **parent run** per study run (tag ``radfed.kind = "study"``) and one **nested run**
per held-out site of leave-one-site-out validation (``radfed.kind = "external"``,
``radfed.held_out = SITE``, run name ``external-SITE``).

Metric keys ``{model}/{split}/{metric}/{site}``:

- ``model``: ``radiomics``, ``clinical``, ``nomogram``;
- ``split``: ``train``, ``test``, ``external`` (all patients of a site not used to fit);
- ``metric``: ``auc``, ``auc_ci_low``, ``auc_ci_high``, ``brier``, ``accuracy``,
  ``sensitivity``, ``specificity``, ``cal_intercept``, ``cal_slope``, ``hl_p``, and rms
  ``val.prob``'s ``dxy``, ``dxy_ci_low``, ``dxy_ci_high``, ``r2`` (Nagelkerke),
  ``brier_scaled`` (Brier / (ē (1 - ē))), ``ici``, ``e50``, ``e90``, ``emax``
  (approximate where results.json says so);
- ``site``: a hospital, or ``pooled`` (all training sites together).

Also ``{model}/external/auc/random_effects`` and ``{model}/external/i2/random_effects``
(the meta-analysis of held-out AUCs), ``{a}_vs_{b}/{split}/delong_p/{site}`` (paired
DeLong tests), ``site/{site}/{split}/n`` and ``.../events``, ``rounds/{phase}``, and
with ``[validation] bootstrap``, ``bootstrap.{model}.{metric}_{apparent|optimism|corrected}``
(e.g. ``bootstrap.nomogram.auc_within_site_corrected``).
A metric that is undefined at a site (one class only, refused) is not logged.

Parameters: every study setting. Tags: ``radfed.study``, ``radfed.transport``,
``radfed.sites``, ``radfed.settings_hash`` and the radfed, Flower and pyradiomics
versions. Artifacts: ``results.json``, ``report.html``, ``figures/``; the fitted
pipeline is logged as the MLflow model ``model`` and registered as ``radfed-{study}``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from radfed.server.results import StudyResult
from radfed.shared.config import StudyConfig

log = logging.getLogger(__name__)

SCALARS = {
    "auc": ("auc",),
    "auc_ci_low": ("auc_ci", 0),
    "auc_ci_high": ("auc_ci", 1),
    "brier": ("brier",),
    "accuracy": ("accuracy",),
    "sensitivity": ("sensitivity",),
    "specificity": ("specificity",),
    "cal_intercept": ("calibration", "intercept"),
    "cal_slope": ("calibration", "slope"),
    "hl_p": ("calibration", "hl_p"),
    "dxy": ("dxy",),
    "dxy_ci_low": ("dxy_ci", 0),
    "dxy_ci_high": ("dxy_ci", 1),
    "r2": ("r2",),
    "brier_scaled": ("brier_scaled",),
    "ici": ("calibration", "ici"),
    "e50": ("calibration", "e50"),
    "e90": ("calibration", "e90"),
    "emax": ("calibration", "emax"),
}


def metric_key(model: str, split: str, metric: str, site: str) -> str:
    return f"{model}/{split}/{metric}/{site}"


def registered_model_name(study: str) -> str:
    return f"radfed-{study}"


def _lookup(metrics: Mapping[str, Any], path: tuple) -> float | None:
    value: Any = metrics
    for key in path:
        if value is None:
            return None
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def metric_values(model: str, split: str, site: str, metrics: Mapping[str, Any]) -> dict:
    """The logged scalars of one metrics entry (undefined ones left out)."""
    if metrics.get("status", "ok") != "ok":
        return {}
    out = {}
    for name, path in SCALARS.items():
        value = _lookup(metrics, path)
        if value is not None:
            out[metric_key(model, split, name, site)] = value
    return out


def study_metrics(result: StudyResult) -> dict[str, float]:
    """The flat metric dict of a study run's parent run."""
    metrics: dict[str, float] = {}
    for model, per_site in result.performance.items():
        for site, splits in per_site.items():
            for split, values in splits.items():
                metrics.update(metric_values(model, split, site, values))
    comparisons = result.details.get("evaluation", {}).get("comparisons", {})
    for site, splits in comparisons.items():
        for split, tests in splits.items():
            for t in tests:
                a, b = t["models"]
                if t.get("p") is not None and math.isfinite(t["p"]):
                    metrics[f"{a}_vs_{b}/{split}/delong_p/{site}"] = float(t["p"])
    external = result.details.get("external", {})
    for kind in ("validation", "held_out"):
        for site, entry in external.get(kind, {}).items():
            for model, values in entry.get("metrics", {}).items():
                metrics.update(metric_values(model, "external", site, values))
    for model, meta in external.get("meta", {}).items():
        for name in ("auc", "i2", "tau2"):
            if isinstance(meta.get(name), (int, float)) and math.isfinite(meta[name]):
                metrics[metric_key(model, "external", name, "random_effects")] = float(meta[name])
    for site, info in result.sites.items():
        for split in ("train", "test"):
            metrics[f"site/{site}/{split}/n"] = float(info[split]["n"])
            metrics[f"site/{site}/{split}/events"] = float(info[split]["events"])
    metrics.update({f"rounds/{phase}": float(n) for phase, n in result.rounds.items()})
    # Harrell's optimism correction: bootstrap.{model}.{metric}_{apparent|optimism|corrected}.
    boot = result.details.get("evaluation", {}).get("bootstrap") or {}
    for model, entries in (boot.get("models") or {}).items():
        for name, entry in entries.items():
            for kind in ("apparent", "optimism", "corrected"):
                value = entry.get(kind)
                if isinstance(value, (int, float)) and math.isfinite(value):
                    metrics[f"bootstrap.{model}.{name}_{kind}"] = float(value)
    metrics.update(classifier_metrics(result.details.get("classifiers") or {}))
    if result.details.get("reproducibility"):
        from radfed.server.stats.reproducibility import reproducibility_metrics

        metrics.update(reproducibility_metrics(result.details["reproducibility"]))
    return metrics


def classifier_metrics(entry: Mapping[str, Any]) -> dict[str, float]:
    """Seed 000's Table 3: ``classifier.{name}.{site}.{split}.{metric}`` (site-local
    classifiers under their names too; results.json says which they are)."""
    metrics: dict[str, float] = {}
    for site, splits in (entry.get("sites") or {}).items():
        for split, by_name in splits.items():
            for name, values in by_name.items():
                for metric in ("auc", "sensitivity", "specificity", "accuracy"):
                    value = values.get(metric)
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        metrics[f"classifier.{name}.{site}.{split}.{metric}"] = float(value)
    return metrics


def held_out_metrics(site: str, entry: Mapping[str, Any]) -> dict[str, float]:
    """A nested run's metrics: the held-out site, and the internal fit without it."""
    metrics: dict[str, float] = {}
    for model, values in entry.get("metrics", {}).items():
        metrics.update(metric_values(model, "external", site, values))
    for model, per_site in entry.get("internal", {}).items():
        for training_site, splits in per_site.items():
            for split, values in splits.items():
                metrics.update(metric_values(model, split, training_site, values))
    return metrics


def tags_of(result: StudyResult) -> dict[str, str]:
    fed = result.federation
    # Sites that stopped answering (on_site_failure): "site (phase, round N)", ...
    dropped = ", ".join(
        f"{d['site']} ({d['phase']}, round {d['round']})" for d in fed.get("dropped_sites", [])
    )
    return {
        **({"radfed.dropped_sites": dropped} if dropped else {}),
        "radfed.kind": "study",
        "radfed.study": result.study,
        "radfed.transport": result.transport,
        "radfed.sites": ",".join(result.sites),
        "radfed.validation_sites": ",".join(fed.get("validation_sites", [])),
        "radfed.settings_hash": str(fed.get("settings_hash", "")),
        "radfed.version": str(fed.get("radfed_version", "")),
        "radfed.flwr_version": str(fed.get("flwr_version", "")),
        "radfed.pyradiomics_version": str(fed.get("pyradiomics_version", "")),
    }


#: Folder beside a SQLite tracking database that holds its runs' artifacts.
ARTIFACTS = "mlartifacts"


def local_store(uri: str) -> Path | None:
    """The file of a ``sqlite:///`` store, the folder of a file store; None when remote."""
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        return None if path in ("", ":memory:") else Path("/" + path.lstrip("/"))
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if "://" not in uri:
        return Path(uri)
    return None


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment of a SQLite store keeps its artifacts: beside the
    database, ``mlartifacts/<experiment>``, never ``./mlruns`` of the working folder.

    None for other stores (a file store keeps artifacts in itself; a tracking server
    has its own artifact root).
    """
    if not uri.startswith("sqlite:///"):
        return None
    db = local_store(uri)
    if db is None:
        return None
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", experiment) or "default"
    return (db.parent / ARTIFACTS / safe).as_uri()


def check_tracking_store(config: StudyConfig) -> None:
    """Before any round: a local MLflow store (and its artifact folder) must be writable.

    An unwritable ``mlflow.db`` would otherwise fail only after the study was fitted,
    after MLflow's retries. Remote stores (a tracking server, PostgreSQL) are not checked.

    Raises
    ------
    OutputError
        Naming the database or folder and the system's reason.
    """
    from radfed.server.outputs.run_folder import OutputError, check_writable

    path = local_store(config.tracking_uri)
    if path is None:
        return
    what = "MLflow tracking store"
    if config.tracking_uri.startswith("sqlite:///"):
        if path.is_dir():
            raise OutputError(f"the {what} {path} is a folder, not a SQLite database file")
        if path.exists() and not os.access(path, os.R_OK | os.W_OK):
            raise OutputError(
                f"cannot write to the {what} {path}: permission denied "
                "(use --no-track, or [tracking] uri / $RADFED_TRACKING_URI to choose another)"
            )
        # SQLite writes its journal beside the database; artifacts go there too.
        check_writable(path.parent, f"folder of the {what}")
        location = artifact_location(config.tracking_uri, config.experiment or config.name)
        if location is not None:
            check_writable(Path(unquote(urlparse(location).path)), "MLflow artifact folder")
    else:
        check_writable(path, what)


def _use_experiment(config: StudyConfig) -> None:
    """Select the study's experiment, creating it with its artifacts beside the store."""
    import mlflow

    name = config.experiment or config.name
    if mlflow.get_experiment_by_name(name) is None:
        location = artifact_location(config.tracking_uri, name)
        try:
            mlflow.create_experiment(name, artifact_location=location)
        except mlflow.exceptions.MlflowException:
            if mlflow.get_experiment_by_name(name) is None:  # not a concurrent creation
                raise
    mlflow.set_experiment(name)


def log_study(result: StudyResult, config: StudyConfig, out_dir: Path) -> tuple[str, str]:
    """Log a study run to MLflow: parent run, nested held-out runs, artifacts, model.

    Writes ``results.json`` (with the run id), the figures and the report into
    ``out_dir`` first, then logs them.

    Returns
    -------
    (run_id, tracking_uri)
    """
    import mlflow

    from radfed.server.outputs.run_folder import write_outputs
    from radfed.server.stats.reproducibility import icc_rows

    # Quiet MLflow's own start-up chatter (database migrations) on first use of a store.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(config.tracking_uri)
    _use_experiment(config)
    out_dir = Path(out_dir)
    params = config.as_params()
    tags = tags_of(result)
    with mlflow.start_run(run_name=f"{config.name}-{result.transport}", tags=tags) as run:
        mlflow.log_params(params)
        mlflow.log_metrics(study_metrics(result))
        result.federation["mlflow_run_id"] = run.info.run_id
        result.federation["mlflow_uri"] = config.tracking_uri
        _log_model(result, out_dir, config)
        for path in write_outputs(result, out_dir).values():
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=path.name)
            else:
                mlflow.log_artifact(str(path))
        rows = icc_rows(result.details.get("reproducibility") or {})
        if rows:  # the ICC table, one row per feature
            mlflow.log_table({k: [r[k] for r in rows] for k in rows[0]}, "reproducibility/icc.json")
        exclusions = {
            s: i.get("exclusions") for s, i in result.sites.items() if i.get("exclusions")
        }
        if exclusions:  # patients kept out per site and kind of reason
            mlflow.log_dict(exclusions, "exclusions.json")
        equivalence = result.details.get("equivalence") or []
        if equivalence:  # --pooled: the federated-versus-pooled table, and its verdict
            keys = ("estimate", "max_abs_diff", "tolerance", "ok")
            mlflow.log_table({k: [r[k] for r in equivalence] for k in keys}, "equivalence.json")
            verdict = "ok" if all(r["ok"] for r in equivalence) else "differs"
            mlflow.set_tag("radfed.pooled_equivalence", verdict)
        errors = result.federation.get("errors")
        if errors:  # a figure or the report could not be made: the run says so
            mlflow.set_tag("radfed.errors", "; ".join(errors)[:5000])
        for site, entry in result.details.get("external", {}).get("held_out", {}).items():
            nested_tags = {**tags, "radfed.kind": "external", "radfed.held_out": site}
            nested_tags["radfed.status"] = str(entry.get("status"))
            with mlflow.start_run(run_name=f"external-{site}", nested=True, tags=nested_tags):
                mlflow.log_params({**params, "held_out": site})
                mlflow.log_metrics(held_out_metrics(site, entry))
    log.info("MLflow run %s in %s", run.info.run_id, config.tracking_uri)
    return run.info.run_id, config.tracking_uri


#: Fragments of MLflow log messages about the pipeline model that need no action.
MLFLOW_NOISE = ("CloudPickle", "Failed to infer model signature")


class _DropMessages(logging.Filter):
    """Send records whose message holds one of ``fragments`` to the debug log instead."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if any(f in message for f in self.fragments):
            log.debug("MLflow: %s", message.splitlines()[0])
            return False
        return True


def _log_model(result: StudyResult, out_dir: Path, config: StudyConfig) -> None:
    from radfed.server.tracking.pipeline_model import log_pipeline_model

    name = registered_model_name(config.name)
    # MLflow's notes a user cannot act on: the model is radfed's own class (pickled by
    # design) and has no signature on purpose (see log_pipeline_model); its registry
    # prints "already exists" / "Created version" itself. Kept at debug level.
    quiet = _DropMessages(*MLFLOW_NOISE)
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    pyfunc_log.addFilter(quiet)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            info = log_pipeline_model(result.to_dict(), out_dir / "model", name)
    except Exception as exc:  # the study is recorded even if the model cannot be
        log.error("could not log the fitted pipeline as an MLflow model: %s", exc)
        return
    finally:
        pyfunc_log.removeFilter(quiet)
        if printed.getvalue().strip():
            log.debug("MLflow: %s", printed.getvalue().strip())
    result.federation["mlflow_model_uri"] = info.model_uri
    version = getattr(info, "registered_model_version", None)
    log.info(
        "fitted pipeline logged as %s (registered %s, version %s)", info.model_uri, name, version
    )
