"""MLflow tracking of study runs.

Naming (so that MLflow's run comparison and search work):

- metrics ``{model}/{split}/auc/{site}``, e.g. ``logistic/test/auc/hospital_a``;
  counts ``site/{site}/{split}/n`` and ``site/{site}/{split}/events``;
  rounds ``rounds/{phase}``;
- parameters: every study setting (``outcome``, ``clinical``, ``features``,
  ``test_fraction``, ``seed``, ``extraction_params``, ``privacy.min_cell``, ...);
- tags ``radfed.transport``, ``radfed.sites``, ``radfed.settings_hash`` and the
  versions of radfed, Flower and pyradiomics;
- artifact ``results.json``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from radfed.server.results import StudyResult
from radfed.shared.config import StudyConfig

log = logging.getLogger(__name__)


def metric_key(model: str, split: str, metric: str, site: str) -> str:
    return f"{model}/{split}/{metric}/{site}"


def study_metrics(result: StudyResult) -> dict[str, float]:
    """The flat metric dict logged for a study run (undefined metrics left out)."""
    metrics: dict[str, float] = {}
    for model, per_site in result.performance.items():
        for site, splits in per_site.items():
            for split, values in splits.items():
                value = values.get("auc")
                if value is not None and math.isfinite(value):
                    metrics[metric_key(model, split, "auc", site)] = float(value)
    for site, info in result.sites.items():
        for split in ("train", "test"):
            metrics[f"site/{site}/{split}/n"] = float(info[split]["n"])
            metrics[f"site/{site}/{split}/events"] = float(info[split]["events"])
    metrics.update({f"rounds/{phase}": float(n) for phase, n in result.rounds.items()})
    return metrics


def log_study(result: StudyResult, config: StudyConfig, out_dir: Path) -> tuple[str, str]:
    """Log a study run to MLflow and write its ``results.json`` as an artifact.

    Returns
    -------
    (run_id, tracking_uri)
    """
    import mlflow

    # Quiet MLflow's own start-up chatter (database migrations) on first use of a store.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    mlflow.set_tracking_uri(config.tracking_uri)
    mlflow.set_experiment(config.experiment or config.name)
    fed = result.federation
    tags = {
        "radfed.transport": result.transport,
        "radfed.sites": ",".join(result.sites),
        "radfed.settings_hash": str(fed.get("settings_hash", "")),
        "radfed.version": str(fed.get("radfed_version", "")),
        "radfed.flwr_version": str(fed.get("flwr_version", "")),
        "radfed.pyradiomics_version": str(fed.get("pyradiomics_version", "")),
    }
    with mlflow.start_run(run_name=f"{config.name}-{result.transport}", tags=tags) as run:
        mlflow.log_params(config.as_params())
        mlflow.log_metrics(study_metrics(result))
        result.federation["mlflow_run_id"] = run.info.run_id
        result.federation["mlflow_uri"] = config.tracking_uri
        path = result.write_json(Path(out_dir) / "results.json")
        mlflow.log_artifact(str(path))
    log.info("MLflow run %s in %s", run.info.run_id, config.tracking_uri)
    return run.info.run_id, config.tracking_uri
