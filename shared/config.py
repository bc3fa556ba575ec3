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
    uri = "sqlite:///mlflow.db"  # relative paths are relative to the study file
    experiment = "lumbar-fasciitis"

    [privacy]
    min_cell = 3

    [[sites]]
    name = "hospital_a"
    path = "sites/hospital_a"

Relative paths are resolved against the folder of the study file.
"""

from __future__ import annotations

import hashlib
import json
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
    "split": {"test_fraction"},
    "extraction": {"params"},
    "tracking": {"uri", "experiment", "enabled"},
    "privacy": {"min_cell", "max_param_fraction"},
    "sites": {"name", "path"},
}


@dataclass(frozen=True)
class SiteConfig:
    """One hospital of the study, as the coordinator knows it."""

    name: str
    path: Path


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
    source: Path | None = None

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]

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
        }

    def protocol_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.protocol(), sort_keys=True).encode()).hexdigest()

    def as_params(self) -> dict[str, str]:
        """Flat settings for tracking (MLflow parameters)."""
        flat = {k: v for k, v in asdict(self).items() if k not in {"sites", "privacy", "source"}}
        flat.update({f"privacy.{k}": v for k, v in asdict(self.privacy).items()})
        flat["sites"] = [s.name for s in self.sites]
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
    uri = _tracking_uri(tracking.get("uri", "sqlite:///mlflow.db"), base)

    privacy_table = data.get("privacy", {})
    _check_keys(privacy_table, "privacy")
    try:
        privacy = PrivacyPolicy(**privacy_table)
    except (TypeError, ValueError) as exc:
        raise StudyConfigError(f"[privacy]: {exc}") from exc

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
        sites.append(SiteConfig(site_name, _resolve(_require(raw, "path", str, where), base)))
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise StudyConfigError(f"study file: site names must be unique, got {names}")

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
        source=source,
    )


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
