"""The study file: which sites, which outcome, which variables, how to split and track.

A study file is TOML::

    [study]
    name = "lumbar-fasciitis"
    outcome = "fasciitis"
    clinical = ["age", "sex", "cobb_angle", "fat_thickness"]
    features = ["original_firstorder_Mean", "original_glcm_*"]   # names or glob patterns
    seed = 42

    [split]
    test_fraction = 0.3

    [extraction]
    params = "default"          # "default", "fast" or a parameter file path

    [tracking]
    uri = "sqlite:///mlflow.db"  # relative to the study file; $RADFED_TRACKING_URI overrides
    experiment = "lumbar-fasciitis"

    [privacy]
    min_cell = 3

    [validation]
    leave_one_site_out = "auto"  # "auto": with three or more training sites; true; false

    [[sites]]
    name = "hospital_a"
    path = "sites/hospital_a"

    [[sites]]
    name = "hospital_d"
    path = "sites/hospital_d"
    role = "validation"          # external validation only: never used to fit

Relative paths are resolved against the folder of the study file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from radfed.shared.errors import StudyConfigError
from radfed.shared.privacy import PrivacyPolicy

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
KNOWN = {
    "study": {"name", "outcome", "clinical", "features", "seed"},
    "harmonization": {"method", "batch", "covariates", "categorical", "parametric", "mean_only"},
    "selection": {"mrmr_k", "folds", "n_lambdas", "lambda_min_ratio", "rule"},
    "models": {"univariable_p"},
    "split": {"test_fraction"},
    "extraction": {"params"},
    "tracking": {"uri", "experiment", "enabled"},
    "privacy": {"min_cell", "max_param_fraction"},
    "validation": {"leave_one_site_out"},
    "sites": {"name", "path", "role"},
}
#: Overrides ``[tracking] uri`` of every study file (set by the coordinator image).
TRACKING_URI_ENV = "RADFED_TRACKING_URI"
ROLES = ("training", "validation")
LOSO_CHOICES = ("auto", True, False)


@dataclass(frozen=True)
class SiteConfig:
    """One hospital of the study, as the coordinator knows it."""

    name: str
    path: Path
    role: str = "training"


@dataclass(frozen=True)
class HarmonizationConfig:
    """ComBat settings. ``batch`` is ``"site"`` or a column of the site tables (for
    example a scanner column: a batch may then span sites). ``covariates`` are the
    biological covariates to preserve (never the outcome); those also named in
    ``categorical`` are one-hot encoded with the federation's levels."""

    method: str = "combat"  # "combat" or "none"
    batch: str = "site"
    covariates: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    parametric: bool = True
    mean_only: bool = False


@dataclass(frozen=True)
class SelectionConfig:
    """Radiomics feature selection: mRMR to ``mrmr_k``, then LASSO with K-fold CV."""

    mrmr_k: int = 30
    folds: int = 10
    n_lambdas: int = 100
    lambda_min_ratio: float | None = None  # glmnet's default: 0.01 if N > p else 1e-4
    rule: str = "lambda.min"  # seed 000's rule; or "lambda.1se"


@dataclass(frozen=True)
class StudyConfig:
    """A parsed study file. See the module docstring for the format."""

    name: str
    outcome: str
    clinical: tuple[str, ...]
    features: tuple[str, ...]
    sites: tuple[SiteConfig, ...]
    seed: int = 42
    test_fraction: float = 0.3
    extraction_params: str = "default"
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment: str = ""
    tracking_enabled: bool = True
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    harmonization: HarmonizationConfig = field(default_factory=HarmonizationConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    univariable_p: float = 0.05
    leave_one_site_out: str | bool = "auto"
    source: Path | None = None

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

    @property
    def training_sites(self) -> list[str]:
        return [s.name for s in self.sites if s.role == "training"]

    @property
    def validation_sites(self) -> list[str]:
        return [s.name for s in self.sites if s.role == "validation"]

    @property
    def runs_leave_one_site_out(self) -> bool:
        """Whether each training site is also held out in turn (``"auto"``: three or more)."""
        if self.leave_one_site_out == "auto":
            return len(self.training_sites) >= 3
        return bool(self.leave_one_site_out)

    def protocol(self) -> dict[str, Any]:
        """What every site needs to know to answer: sent with every request.

        It holds no paths: a site finds its own data.
        """
        return {
            "study": self.name,
            "outcome": self.outcome,
            "clinical": list(self.clinical),
            "features": list(self.features),
            "seed": self.seed,
            "test_fraction": self.test_fraction,
            "extraction_params": self.extraction_params,
            "batch": self.harmonization.batch,
            "covariates": list(self.harmonization.covariates),
            "categorical": list(self.harmonization.categorical),
            "folds": self.selection.folds,
        }

    def protocol_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.protocol(), sort_keys=True).encode()).hexdigest()

    def as_params(self) -> dict[str, str]:
        """Flat settings for tracking (MLflow parameters)."""
        nested = {"privacy", "harmonization", "selection"}
        flat = {k: v for k, v in asdict(self).items() if k not in {"sites", "source", *nested}}
        for section in nested:
            flat.update({f"{section}.{k}": v for k, v in asdict(getattr(self, section)).items()})
        flat["sites"] = self.training_sites
        flat["validation_sites"] = self.validation_sites
        return {
            k: json.dumps(v) if isinstance(v, (list, tuple)) else str(v) for k, v in flat.items()
        }


def _require(table: dict[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in table:
        raise StudyConfigError(f"{where}: missing required key {key!r}")
    value = table[key]
    if not isinstance(value, kind):
        raise StudyConfigError(f"{where}: {key!r} must be a {kind.__name__}, got {value!r}")
    return value


def _string_list(table: dict[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise StudyConfigError(f"{where}: {key!r} must be a list of non-empty strings")
    if len(set(value)) != len(value):
        raise StudyConfigError(f"{where}: {key!r} lists a name twice")
    return tuple(value)


def _check_keys(table: dict[str, Any], section: str) -> None:
    unknown = set(table) - KNOWN[section]
    if unknown:
        raise StudyConfigError(
            f"[{section}]: unknown key(s) {sorted(unknown)}; known: {sorted(KNOWN[section])}"
        )


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def _tracking_uri(uri: str, base: Path) -> str:
    # A relative SQLite path would depend on the working directory: anchor it to the file.
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(_resolve(uri.removeprefix(prefix), base))
    if "://" not in uri:
        return str(_resolve(uri, base))
    return uri


def parse_study(data: dict[str, Any], base: Path, source: Path | None = None) -> StudyConfig:
    """Build a :class:`StudyConfig` from parsed TOML, resolving paths against ``base``."""
    unknown = set(data) - set(KNOWN)
    if unknown:
        raise StudyConfigError(f"unknown section(s) {sorted(unknown)}; known: {sorted(KNOWN)}")
    study = _require(data, "study", dict, "study file")
    _check_keys(study, "study")
    name = _require(study, "name", str, "[study]")
    outcome = _require(study, "outcome", str, "[study]")
    clinical = _string_list(study, "clinical", "[study]")
    features = _string_list(study, "features", "[study]")
    if not clinical and not features:
        raise StudyConfigError("[study]: name at least one clinical variable or feature")
    seed = study.get("seed", 42)
    if not isinstance(seed, int):
        raise StudyConfigError(f"[study]: 'seed' must be an integer, got {seed!r}")

    split = data.get("split", {})
    _check_keys(split, "split")
    test_fraction = split.get("test_fraction", 0.3)
    if not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise StudyConfigError(f"[split]: test_fraction must be in (0, 1), got {test_fraction!r}")

    extraction = data.get("extraction", {})
    _check_keys(extraction, "extraction")
    params = extraction.get("params", "default")
    if params not in {"default", "fast"}:
        params = str(_resolve(params, base))

    tracking = data.get("tracking", {})
    _check_keys(tracking, "tracking")
    # A coordinator's deployment may point every study at its tracking server.
    uri = os.environ.get(TRACKING_URI_ENV) or tracking.get("uri", "sqlite:///mlflow.db")
    uri = _tracking_uri(uri, base)

    privacy_table = data.get("privacy", {})
    _check_keys(privacy_table, "privacy")
    try:
        privacy = PrivacyPolicy(**privacy_table)
    except (TypeError, ValueError) as exc:
        raise StudyConfigError(f"[privacy]: {exc}") from exc

    harmonization = _harmonization(data.get("harmonization", {}))
    selection = _selection(data.get("selection", {}))
    models = data.get("models", {})
    _check_keys(models, "models")
    univariable_p = models.get("univariable_p", 0.05)
    if not isinstance(univariable_p, (int, float)) or not 0 < univariable_p <= 1:
        raise StudyConfigError(f"[models]: univariable_p must be in (0, 1], got {univariable_p!r}")

    raw_sites = data.get("sites", [])
    if not isinstance(raw_sites, list) or not raw_sites:
        raise StudyConfigError("study file: add at least one [[sites]] table with name and path")
    sites = []
    for i, raw in enumerate(raw_sites, start=1):
        where = f"[[sites]] #{i}"
        _check_keys(raw, "sites")
        site_name = _require(raw, "name", str, where)
        if not SITE_NAME.match(site_name):
            raise StudyConfigError(
                f"{where}: site name {site_name!r} may hold only letters, digits, '_' and '-'"
            )
        role = raw.get("role", "training")
        if role not in ROLES:
            raise StudyConfigError(f"{where}: role must be one of {list(ROLES)}, got {role!r}")
        path = _resolve(_require(raw, "path", str, where), base)
        sites.append(SiteConfig(site_name, path, role))
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise StudyConfigError(f"study file: site names must be unique, got {names}")
    if not any(s.role == "training" for s in sites):
        raise StudyConfigError("study file: at least one site must have role 'training'")

    validation = data.get("validation", {})
    _check_keys(validation, "validation")
    loso = validation.get("leave_one_site_out", "auto")
    if loso not in LOSO_CHOICES or (isinstance(loso, int) and not isinstance(loso, bool)):
        raise StudyConfigError(
            f'[validation]: leave_one_site_out must be "auto", true or false, got {loso!r}'
        )

    return StudyConfig(
        name=name,
        outcome=outcome,
        clinical=clinical,
        features=features,
        sites=tuple(sites),
        seed=seed,
        test_fraction=float(test_fraction),
        extraction_params=params,
        tracking_uri=uri,
        experiment=tracking.get("experiment", name),
        tracking_enabled=bool(tracking.get("enabled", True)),
        privacy=privacy,
        harmonization=harmonization,
        selection=selection,
        univariable_p=float(univariable_p),
        leave_one_site_out=loso,
        source=source,
    )


def _harmonization(table: dict[str, Any]) -> HarmonizationConfig:
    _check_keys(table, "harmonization")
    method = table.get("method", "combat")
    if method not in {"combat", "none"}:
        raise StudyConfigError(
            f"[harmonization]: method must be 'combat' or 'none', got {method!r}"
        )
    batch = table.get("batch", "site")
    if not isinstance(batch, str) or not batch:
        raise StudyConfigError("[harmonization]: batch must be 'site' or a column name")
    covariates = _string_list(table, "covariates", "[harmonization]")
    categorical = _string_list(table, "categorical", "[harmonization]")
    stray = [c for c in categorical if c not in covariates]
    if stray:
        raise StudyConfigError(f"[harmonization]: categorical {stray} must also be covariates")
    flags = {k: table.get(k, d) for k, d in (("parametric", True), ("mean_only", False))}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise StudyConfigError(f"[harmonization]: {key} must be true or false, got {value!r}")
    return HarmonizationConfig(method, batch, covariates, categorical, **flags)


def _selection(table: dict[str, Any]) -> SelectionConfig:
    _check_keys(table, "selection")
    cfg = SelectionConfig(**table)
    for key, low in (("mrmr_k", 1), ("folds", 2), ("n_lambdas", 2)):
        value = getattr(cfg, key)
        if not isinstance(value, int) or value < low:
            raise StudyConfigError(f"[selection]: {key} must be an integer >= {low}, got {value!r}")
    ratio = cfg.lambda_min_ratio
    if ratio is not None and (not isinstance(ratio, (int, float)) or not 0 < ratio < 1):
        raise StudyConfigError(f"[selection]: lambda_min_ratio must be in (0, 1), got {ratio!r}")
    if cfg.rule not in {"lambda.min", "lambda.1se"}:
        raise StudyConfigError(
            f"[selection]: rule must be 'lambda.min' or 'lambda.1se', got {cfg.rule!r}"
        )
    return cfg


def load_study(path: str | Path) -> StudyConfig:
    """Read a study file.

    Raises
    ------
    StudyConfigError
        When the file is missing, is not valid TOML, or its content is inconsistent.
    """
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise StudyConfigError(f"study file not found: {path}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise StudyConfigError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return parse_study(data, path.parent, source=path)
    except StudyConfigError as exc:
        raise StudyConfigError(f"{path}: {exc}") from exc
