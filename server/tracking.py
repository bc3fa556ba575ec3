"""MLflow tracking of study runs, named so that MLflow's run comparison and search work.

One **parent run** per study run (tag ``radfed.kind = "study"``) and one **nested run**
per held-out site of leave-one-site-out validation (``radfed.kind = "external"``,
``radfed.held_out = SITE``, run name ``external-SITE``).

Metric keys ``{model}/{split}/{metric}/{site}``:

- ``model``: ``radiomics``, ``clinical``, ``nomogram``;
- ``split``: ``train``, ``test``, ``external`` (all patients of a site not used to fit);
- ``metric``: ``auc``, ``auc_ci_low``, ``auc_ci_high``, ``brier``, ``accuracy``,
  ``sensitivity``, ``specificity``, ``cal_intercept``, ``cal_slope``, ``hl_p``;
- ``site``: a hospital, or ``pooled`` (all training sites together).

Also ``{model}/external/auc/random_effects`` and ``{model}/external/i2/random_effects``
(the meta-analysis of held-out AUCs), ``{a}_vs_{b}/{split}/delong_p/{site}`` (paired
DeLong tests), ``site/{site}/{split}/n`` and ``.../events``, ``rounds/{phase}``.
A metric that is undefined at a site (one class only, refused) is not logged.

Parameters: every study setting. Tags: ``radfed.study``, ``radfed.transport``,
``radfed.sites``, ``radfed.settings_hash`` and the radfed, Flower and pyradiomics
versions. Artifacts: ``results.json``, ``report.html``, ``figures/``; the fitted
pipeline is logged as the MLflow model ``model`` and registered as ``radfed-{study}``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
    return {
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


def log_study(result: StudyResult, config: StudyConfig, out_dir: Path) -> tuple[str, str]:
    """Log a study run to MLflow: parent run, nested held-out runs, artifacts, model.

    Writes ``results.json`` (with the run id), the figures and the report into
    ``out_dir`` first, then logs them.

    Returns
    -------
    (run_id, tracking_uri)
    """
    import mlflow

    from radfed.server.outputs import write_outputs

    # Quiet MLflow's own start-up chatter (database migrations) on first use of a store.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(config.tracking_uri)
    mlflow.set_experiment(config.experiment or config.name)
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
        for site, entry in result.details.get("external", {}).get("held_out", {}).items():
            nested_tags = {**tags, "radfed.kind": "external", "radfed.held_out": site}
            nested_tags["radfed.status"] = str(entry.get("status"))
            with mlflow.start_run(run_name=f"external-{site}", nested=True, tags=nested_tags):
                mlflow.log_params({**params, "held_out": site})
                mlflow.log_metrics(held_out_metrics(site, entry))
    log.info("MLflow run %s in %s", run.info.run_id, config.tracking_uri)
    return run.info.run_id, config.tracking_uri


def _log_model(result: StudyResult, out_dir: Path, config: StudyConfig) -> None:
    from radfed.server.pipeline_model import log_pipeline_model

    name = registered_model_name(config.name)
    try:
        info = log_pipeline_model(result.to_dict(), out_dir / "model", name)
    except Exception as exc:  # the study is recorded even if the model cannot be
        log.error("could not log the fitted pipeline as an MLflow model: %s", exc)
        return
    result.federation["mlflow_model_uri"] = info.model_uri
    version = getattr(info, "registered_model_version", None)
    log.info(
        "fitted pipeline logged as %s (registered %s, version %s)", info.model_uri, name, version
    )
