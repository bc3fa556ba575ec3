"""The fitted pipeline as one model: raw features and clinical values in, probabilities out.

:class:`FittedPipeline` rebuilds, from a run's results.json, what every site applied to
its own rows: ComBat with the federation's estimates (the patient's batch must be one
the federation fitted), the Radscore (standardised with the pooled mean and SD), and
the three logistic models. :class:`PipelinePyfunc` wraps it as an MLflow ``pyfunc``
model so that the registry serves it; :func:`log_pipeline_model` logs and registers it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from radfed.client.data import canonical_text
from radfed.server.results import LogisticFit
from radfed.shared.config import SITE_BATCH
from radfed.shared.logistic import design
from radfed.shared.messages import RADSCORE

log = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.json"


class FittedPipeline:
    """Predict each model's probability for patients, from their raw values.

    Parameters
    ----------
    results : dict
        A run's results.json content (schema radfed.results/2).

    Attributes
    ----------
    models_ : dict of str to LogisticFit
    input_columns_ : list of str
        The columns :meth:`predict` needs: the batch column (``site`` unless the study
        harmonised by another column) and ComBat covariates when harmonised, the
        Radscore's features and the models' clinical variables.
    """

    def __init__(self, results: dict[str, Any]) -> None:
        self.results = results
        self.models_ = {
            name: LogisticFit.from_dict(fit, results["outcome"])
            for name, fit in results["models"].items()
        }
        harmonization = results.get("harmonization")
        self.combat_ = None
        if harmonization and "estimates" in harmonization:
            from radfed.harmonization.estimates import ComBatEstimates

            # ComBatEstimates shapes its arrays from the JSON lists (null -> NaN).
            self.combat_ = ComBatEstimates.from_payload(harmonization["estimates"])
            self.batch_ = harmonization.get("batch", SITE_BATCH)
            categorical = results.get("settings", {}).get("harmonization.categorical", "[]")
            self.categorical_ = json.loads(categorical)
            numeric = json.loads(results.get("settings", {}).get("harmonization.covariates", "[]"))
            self.numeric_ = [c for c in numeric if c not in self.categorical_]
            self.levels_ = harmonization.get("levels", {})
        # Categorical clinical variables: the models hold their dummy columns
        # ("name=level"), built here from the patient's level as the sites build them.
        screening = results.get("clinical_screening") or {}
        self.clinical_levels_ = screening.get("levels") or {}
        self.merged_ = {
            c: {old: new for new, olds in groups.items() for old in olds}
            for c, groups in (screening.get("merge_levels") or {}).items()
        }
        self.dummies_ = {
            f"{c}={lv}": (c, lv) for c, levels in self.clinical_levels_.items() for lv in levels[1:]
        }
        radscore = results.get("selection", {}).get("radscore")
        self.radscore_ = (
            {k: np.asarray(v) if k != "columns" else list(v) for k, v in radscore.items()}
            if radscore
            else None
        )

    @property
    def input_columns_(self) -> list[str]:
        cols: list[str] = []
        if self.combat_ is not None and self.radscore_ is not None:
            cols += [self.batch_, *self.numeric_, *self.categorical_]
        if self.radscore_ is not None:
            cols += self.radscore_["columns"]
        for fit in self.models_.values():
            cols += [self.dummies_.get(c, (c,))[0] for c in fit.columns if c != RADSCORE]
        return list(dict.fromkeys(cols))

    def _with_dummies(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``frame`` with the models' dummy columns; a level the federation did not
        have is an error (the patient would count as the reference level)."""
        used = {c for c, _ in self.dummies_.values() if c in frame.columns}
        for name in used:
            levels = (
                frame[name].pipe(canonical_text).astype(str).replace(self.merged_.get(name, {}))
            )
            unknown = sorted(set(levels) - set(self.clinical_levels_[name]))
            if unknown:
                raise ValueError(
                    f"{name}: level(s) {unknown} were not in the federation "
                    f"(known: {self.clinical_levels_[name]})"
                )
            for column, (variable, level) in self.dummies_.items():
                if variable == name:
                    frame[column] = (levels == level).astype(float).to_numpy()
        return frame

    def radscore(self, frame: pd.DataFrame) -> np.ndarray:
        """The Radscore of each patient, after ComBat when the study harmonised."""
        if self.radscore_ is None:
            raise ValueError("this study has no Radscore (no radiomics features)")
        columns = self.radscore_["columns"]
        x = frame[columns].to_numpy(dtype=float)
        if self.combat_ is not None:
            x = self._harmonise(frame, columns, x)
        return design(x, self.radscore_["center"], self.radscore_["scale"]) @ self.radscore_["beta"]

    def _harmonise(self, frame: pd.DataFrame, columns: list[str], x: np.ndarray) -> np.ndarray:
        from radfed.harmonization.combat import apply_combat, encode_covariates

        est = self.combat_
        names = list(est.feature_names)
        # Features ComBat kept out (binary, or excluded by the study) pass unchanged.
        mine = [j for j, c in enumerate(columns) if c in names]
        if not mine:
            return x
        where = [names.index(columns[j]) for j in mine]
        batch = frame[self.batch_].astype(str).to_numpy(dtype=object)
        unknown = sorted(set(batch) - set(est.batch_levels))
        if unknown:
            raise ValueError(
                f"batch {unknown} was not in the federation (known: {list(est.batch_levels)}); "
                "a new hospital must first estimate its batch effects "
                "(radfed.harmonization.combat.estimate_new_batch)"
            )
        # Category labels as the sites wrote them (a code 1.0 is the level "1").
        cats = frame[self.categorical_].apply(canonical_text).astype(str)
        cov_frame = pd.concat([frame[self.numeric_], cats], axis=1)
        levels = {c: self.levels_[c] for c in self.categorical_}
        cov, _ = encode_covariates(cov_frame, self.numeric_, levels)
        # ComBat adjusts each feature on its own: the Radscore's features are enough.
        full = np.zeros((len(frame), len(names)))
        full[:, where] = x[:, mine]
        out = x.copy()
        out[:, mine] = apply_combat(est, full, batch, cov)[:, where]
        return out

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Probability of the outcome under each model (and the Radscore), per patient.

        Raises
        ------
        ValueError
            For a missing column, a missing value, or a batch the federation never saw.
        """
        missing = [c for c in self.input_columns_ if c not in frame.columns]
        if missing:
            raise ValueError(f"input lacks column(s) {missing}; needs {self.input_columns_}")
        incomplete = frame[self.input_columns_].isna().any(axis=1)
        if incomplete.any():
            raise ValueError(f"rows {list(frame.index[incomplete])[:10]} have missing values")
        frame = frame.copy()
        out = pd.DataFrame(index=frame.index)
        if self.radscore_ is not None:
            frame[RADSCORE] = out[RADSCORE] = self.radscore(frame)
        frame = self._with_dummies(frame)
        for name, fit in self.models_.items():
            X = design(frame[fit.columns].to_numpy(dtype=float), fit.center, fit.scale)
            out[name] = 1 / (1 + np.exp(-(X @ fit.coef)))
        return out

    def example(self) -> pd.DataFrame:
        """One made-up patient at the pooled means (never a real row), for signatures."""
        values: dict[str, Any] = {}
        for fit in self.models_.values():
            values.update(dict(zip(fit.columns, fit.center.tolist(), strict=True)))
        for column, (variable, _) in self.dummies_.items():
            values.pop(column, None)
            values[variable] = self.clinical_levels_[variable][0]
        if self.radscore_ is not None:
            cols, center = self.radscore_["columns"], self.radscore_["center"].tolist()
            values.update(dict(zip(cols, center, strict=True)))
        if self.combat_ is not None and self.radscore_ is not None:
            values[self.batch_] = self.combat_.batch_levels[0]
            for c in self.numeric_:
                values.setdefault(c, 0.0)
            for c in self.categorical_:
                level = self.levels_[c][0]
                # A category that is also a model's numeric predictor stays a number.
                values[c] = float(level) if isinstance(values.get(c), float) else level
        values.pop(RADSCORE, None)
        return pd.DataFrame([values])[self.input_columns_]


def pyfunc_class() -> type:
    """The MLflow PythonModel class (built lazily: MLflow is a coordinator dependency)."""
    import mlflow.pyfunc

    class PipelinePyfunc(mlflow.pyfunc.PythonModel):
        """MLflow wrapper of :class:`FittedPipeline` (artifact ``pipeline``: results.json)."""

        def load_context(self, context: Any) -> None:
            results = json.loads(Path(context.artifacts["pipeline"]).read_text())
            self.pipeline = FittedPipeline(results)

        def predict(self, context: Any, model_input: pd.DataFrame, params: Any = None) -> Any:
            return self.pipeline.predict(model_input)

    return PipelinePyfunc


def log_pipeline_model(results: dict[str, Any], work_dir: Path, registered_name: str) -> Any:
    """Log the fitted pipeline to the active MLflow run and register it.

    Returns
    -------
    mlflow.models.model.ModelInfo
    """
    import mlflow

    path = Path(work_dir) / PIPELINE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results))
    pipeline = FittedPipeline(results)
    pipeline.predict(pipeline.example())  # fail here, not in the registry, if it cannot
    # No MLflow signature: its schema enforcement refuses integer columns (ages, codes)
    # for a float schema. The columns are in the model's metadata instead, and
    # FittedPipeline.predict checks them with clear errors.
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=pyfunc_class()(),
        artifacts={"pipeline": str(path)},
        metadata={"input_columns": pipeline.input_columns_, "outputs": list(pipeline.models_)},
        registered_model_name=registered_name,
        pip_requirements=["radfed", "mlflow", "numpy", "pandas"],
    )
