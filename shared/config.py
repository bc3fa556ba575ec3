"""The study file: which sites, which outcome, which variables, how to split and track.

A study file is TOML::

    [study]
    name = "lumbar-fasciitis"
    outcome = "fasciitis"
    clinical = ["age", "sex", "cobb_angle", "fat_thickness", "asa_class"]
    categorical = ["asa_class"]  # clinical variables one-hot encoded with the federation's
                                 # levels (the sorted union of the sites'; the first is
                                 # the reference): screened by one likelihood-ratio test
    merge_levels = { asa_class = { "3-4" = ["3", "4"] } }  # rare levels as one (optional)
    features = ["original_firstorder_Mean", "original_glcm_*"]   # names or glob patterns
    seed = 42

    [split]
    test_fraction = 0.3

    [extraction]
    params = "default"          # "default", "fast", "2d" or a parameter file path

    [tracking]
    uri = "sqlite:///mlflow.db"  # relative to the study file; $RADFED_TRACKING_URI overrides
    experiment = "lumbar-fasciitis"

    [privacy]
    min_cell = 3

    [validation]
    leave_one_site_out = "auto"  # "auto": with three or more training sites; true; false
    bootstrap = 0                # Harrell's optimism correction: B replicates (0: off)

    [federation]
    timeout = 3600               # seconds for a whole Flower run; default from the
                                 # expected rounds (see expected_rounds); 0: no limit
    round_timeout = 600          # seconds a round may wait for the sites' replies
    on_site_failure = "stop"     # a site that does not answer within round_timeout:
                                 # "stop" the run, or "drop" it (the fit restarts
                                 # without it, recorded in results.json and MLflow)

    [classifiers]                # seed 000's Table 3 on the Radscore (docs/classifiers.md)
    compare = false              # true: XGBoost, RF, SVMs, network, KNN beside the LASSO
    rounds = 5                   # federated training rounds (1..20), plus one evaluation
    trees_per_round = 1          # XGBoost trees each site boosts per round (1..3)
    forest_trees = 10            # random-forest trees each site grows (1..20)

    [nomogram]                   # how the chart names its predictors (optional)
    labels = { cobb_angle = "Cobb angle (deg)" }   # axis titles instead of column names
    levels = { sex = ["female", "male"] }          # a 0/1 predictor's two level names
    # (for a categorical variable, a table of level -> name: { asa_class = { "1" = "ASA I" } })

    [[sites]]
    name = "hospital_a"
    path = "sites/hospital_a"

    [[sites]]
    name = "hospital_d"
    path = "sites/hospital_d"
    role = "validation"          # external validation only: never used to fit

Relative paths are resolved against the folder of the study file.

Everything is checked before anything runs, each mistake a one-line
:class:`~radfed.shared.errors.StudyConfigError`: a section that is not a table (``split =
0.3``), unknown keys (with the closest spelling) and keys in the wrong section (with the
right one), types (``min_cell = true`` and ``enabled = "false"`` are refused), impossible
values, the outcome used as a predictor, a ComBat covariate or the batch, two sites
reading one folder, and study names that would leave the output folder. :data:`KNOWN`
is the one list of allowed keys.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from radfed.shared.errors import StudyConfigError
from radfed.shared.messages import RADSCORE
from radfed.shared.privacy import PrivacyPolicy

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
KNOWN = {
    "study": {"name", "outcome", "clinical", "categorical", "merge_levels", "features", "seed"},
    "harmonization": {
        "method",
        "batch",
        "covariates",
        "categorical",
        "parametric",
        "mean_only",
        "exclude",
    },
    "selection": {
        "mrmr_k",
        "folds",
        "n_lambdas",
        "lambda_min_ratio",
        "rule",
        "icc_threshold",
        "icc_type",
        "mrmr_in_folds",
    },
    "models": {"univariable_p"},
    "split": {"test_fraction"},
    "extraction": {"params"},
    "tracking": {"uri", "experiment", "enabled"},
    "privacy": {"min_cell", "max_param_fraction"},
    "validation": {"leave_one_site_out", "bootstrap"},
    "federation": {"timeout", "round_timeout", "on_site_failure"},
    "sites": {"name", "path", "role"},
    "nomogram": {"labels", "levels"},
    "classifiers": {"compare", "rounds", "trees_per_round", "forest_trees"},
}
#: The most bootstrap replicates a study may ask for (each site also has its own limit).
MAX_BOOTSTRAP = 1000
#: Overrides ``[tracking] uri`` of every study file (set by the coordinator image).
TRACKING_URI_ENV = "RADFED_TRACKING_URI"
ROLES = ("training", "validation")
#: ComBat's batch when the study names none: each site is one batch.
SITE_BATCH = "site"
LOSO_CHOICES = ("auto", True, False)
#: What a study does when a site stops answering (``[federation] on_site_failure``).
SITE_FAILURE_POLICIES = ("stop", "drop")
#: Training sites a fit needs; with fewer left, ``on_site_failure = "drop"`` stops.
MIN_TRAINING_SITES = 2


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
    ``categorical`` are one-hot encoded with the federation's levels. Features found
    binary (0/1 at every training site) are kept out of ComBat, and so are those named
    in ``exclude`` (categorical codes): they pass through unchanged."""

    method: str = "combat"  # "combat" or "none"
    batch: str = SITE_BATCH
    covariates: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    parametric: bool = True
    mean_only: bool = False
    exclude: tuple[str, ...] = ()


@dataclass(frozen=True)
class SelectionConfig:
    """Radiomics feature selection: mRMR to ``mrmr_k``, then LASSO with K-fold CV."""

    mrmr_k: int = 30
    folds: int = 10
    n_lambdas: int = 100
    lambda_min_ratio: float | None = None  # glmnet's default: 0.01 if N > p else 1e-4
    rule: str = "lambda.min"  # seed 000's rule; or "lambda.1se"
    # Reproducibility filter (when sites give second-reader or repeat masks): features
    # whose ICC is below the threshold are dropped before ComBat and mRMR.
    icc_threshold: float = 0.75
    icc_type: str = "ICC2"  # ICC(2,1) absolute agreement; or "ICC3" (consistency)
    # Re-run mRMR inside each LASSO CV fold, on that fold's training rows (the CV then
    # does not see a selection made with its held-out rows); false: once, as seed 000.
    mrmr_in_folds: bool = False


@dataclass(frozen=True)
class ClassifiersConfig:
    """Seed 000's classifier comparison on the Radscore (Table 3), opt-in: ``rounds``
    federated training rounds (plus one evaluation round), XGBoost trees each site
    boosts per round, random-forest trees each site grows. Each site caps these too."""

    compare: bool = False
    rounds: int = 5
    trees_per_round: int = 1
    forest_trees: int = 10


#: Bounds of ``[classifiers]`` (the sites' default caps: shared.classifier_stats).
CLASSIFIER_BOUNDS = {"rounds": (1, 20), "trees_per_round": (1, 3), "forest_trees": (1, 20)}


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
    classifiers: ClassifiersConfig = field(default_factory=ClassifiersConfig)
    univariable_p: float = 0.05
    leave_one_site_out: str | bool = "auto"
    #: Bootstrap replicates of Harrell's optimism correction (``[validation]
    #: bootstrap``; 0: none): each refits the whole pipeline.
    bootstrap: int = 0
    source: Path | None = None
    #: Seconds for a whole Flower run (None: from the expected rounds; 0: no limit).
    timeout: float | None = None
    #: Seconds one round may wait for the sites' replies (a per-round inactivity limit).
    round_timeout: float = 600.0
    #: A site silent for ``round_timeout``: "stop" the run, or "drop" the site (the
    #: whole fit restarts without it, and the run records it).
    on_site_failure: str = "stop"
    #: The nomogram's axis titles and level names (``[nomogram]``): two names (of 0 and
    #: 1) for a 0/1 predictor, {level: name} for a categorical one.
    nomogram_labels: dict[str, str] = field(default_factory=dict)
    nomogram_levels: dict[str, tuple[str, str] | dict[str, str]] = field(default_factory=dict)
    #: Clinical variables one-hot encoded with the federation's levels (``[study]
    #: categorical``): dummy columns "name=level" for every level but the first.
    clinical_categorical: tuple[str, ...] = ()
    #: Levels a site reads as one (``[study] merge_levels``): {variable: {new level:
    #: [levels]}}, applied at every site before the levels are reported or encoded.
    merge_levels: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict)

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
            # Only when declared: the protocols (and pinned hashes) of other studies stay.
            **(
                {"clinical_categorical": list(self.clinical_categorical)}
                if self.clinical_categorical
                else {}
            ),
            **(
                {
                    "merge_levels": {
                        c: {new: list(old) for new, old in groups.items()}
                        for c, groups in self.merge_levels.items()
                    }
                }
                if self.merge_levels
                else {}
            ),
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
        if not self.bootstrap:  # off: the settings of a study without the option
            flat.pop("bootstrap")
        classifiers = flat.pop("classifiers")
        if self.classifiers.compare:  # off: the settings of a study without the option
            flat.update({f"classifiers.{k}": v for k, v in classifiers.items()})
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


def _hint(key: str, choices: Iterable[str], section: str | None = None) -> str:
    """Where a stray key belongs, or the closest known spelling ('' when neither)."""
    homes = [s for s, keys in KNOWN.items() if key in keys and s != section]
    if homes:
        return f"{key!r} belongs in " + " or ".join(_header(s) for s in homes)
    if key in KNOWN and key != section:
        return f"{key!r} is a section: write it as its own {_header(key)} table"
    close = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return f"{key!r}: did you mean {close[0]!r}?" if close else ""


def _header(section: str) -> str:
    return f"[[{section}]]" if section == "sites" else f"[{section}]"


def _check_keys(table: Any, section: str) -> None:
    """Refuse a section that is not a table, and keys ``KNOWN`` does not list for it
    (naming the section a misplaced key belongs in, or the closest spelling)."""
    if not isinstance(table, dict):
        raise StudyConfigError(
            f"{_header(section)} must be a table of key = value lines, got {table!r}"
        )
    unknown = [k for k in table if k not in KNOWN[section]]
    if unknown:
        hints = [h for h in (_hint(k, KNOWN[section], section) for k in unknown) if h]
        why = f" ({'; '.join(hints)})" if hints else ""
        raise StudyConfigError(
            f"{_header(section)}: unknown key(s) {unknown}{why}; known: {sorted(KNOWN[section])}"
        )


def _check_sections(data: dict[str, Any]) -> None:
    """Every top-level name is a known section of the right shape."""
    for key, value in data.items():
        if key not in KNOWN:
            hint = _hint(key, KNOWN)
            if not hint or "belongs in" in hint:
                where = f"{key!r} is not a section" + (f" ({hint})" if hint else "")
            else:
                where = f"unknown section(s) [{key!r}] ({hint})"
            raise StudyConfigError(f"{where}; known sections: {sorted(KNOWN)}")
        if key == "sites":
            if isinstance(value, dict):
                raise StudyConfigError(
                    "write each site as a [[sites]] table (double brackets), not [sites]"
                )
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise StudyConfigError(
                    f"'sites' must be [[sites]] tables with name and path, got {value!r}"
                )
        elif not isinstance(value, dict):
            raise StudyConfigError(
                f"{key!r} must be a table: write [{key}] on its own line and its settings "
                f"below it (e.g. {_example(key)}), not {key} = {value!r}"
            )


def _example(section: str) -> str:
    examples = {"split": "test_fraction = 0.3", "privacy": "min_cell = 3"}
    keys = sorted(KNOWN[section])
    return examples.get(section, f"{keys[0]} = ..." if keys else "")


def _check_number(
    value: Any, key: str, where: str, low: float, high: float, kind: str = "number"
) -> None:
    """``value`` must be a number (an integer for ``kind="integer"``, never a boolean)
    in ``[low, high]``."""
    types = (int,) if kind == "integer" else (int, float)
    if isinstance(value, bool) or not isinstance(value, types) or not low <= value <= high:
        bounds = f">= {low:g}" if high == float("inf") else f"in [{low:g}, {high:g}]"
        article = "an" if kind == "integer" else "a"
        raise StudyConfigError(f"{where}: {key} must be {article} {kind} {bounds}, got {value!r}")


#: A study name becomes a folder, an MLflow experiment and a registered model name.
STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def _check_study_name(name: str) -> None:
    """A study name must stay one plain folder name inside the output folder."""
    if not STUDY_NAME.match(name) or ".." in name:
        raise StudyConfigError(
            f"[study]: name {name!r} may hold only letters, digits, '.', '_' and '-' "
            "(at most 100, starting with a letter or digit, no '..'): it names the "
            "output folder and the MLflow experiment"
        )


def _check_distinct_folders(sites: list[SiteConfig]) -> None:
    """Two sites reading the same folder would count its patients twice."""
    seen: dict[Path, str] = {}
    for site in sites:
        key = Path(os.path.realpath(site.path))
        if key in seen:
            raise StudyConfigError(
                f"sites {seen[key]!r} and {site.name!r} point at the same folder {site.path}: "
                "its patients would be counted twice"
            )
        seen[key] = site.name


def _check_outcome_use(
    outcome: str,
    clinical: tuple[str, ...],
    features: tuple[str, ...],
    harmonization: HarmonizationConfig,
) -> None:
    """The outcome is what the models predict: never a predictor nor a ComBat input."""
    uses = [
        ("[study] clinical", outcome in clinical),
        ("[study] features", outcome in features),
        ("[harmonization] covariates", outcome in harmonization.covariates),
        ("[harmonization] batch", harmonization.batch == outcome),
    ]
    wrong = [where for where, used in uses if used]
    if wrong:
        raise StudyConfigError(
            f"the outcome {outcome!r} is listed in {' and '.join(wrong)}: the outcome may "
            "not be a predictor, a ComBat covariate or the ComBat batch"
        )
    both = [c for c in clinical if c in features]
    if both:
        raise StudyConfigError(
            f"[study]: {both} listed both as clinical variables and as features: list each once"
        )


def _resolve(path: str, base: Path) -> Path:
    if "\x00" in path:
        raise StudyConfigError(f"path {path!r} holds a NUL character (\\x00)")
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
    _check_sections(data)
    study = _require(data, "study", dict, "study file")
    _check_keys(study, "study")
    name = _require(study, "name", str, "[study]")
    _check_study_name(name)
    outcome = _require(study, "outcome", str, "[study]")
    if not outcome.strip():
        raise StudyConfigError("[study]: 'outcome' must name the 0/1 outcome column")
    clinical = _string_list(study, "clinical", "[study]")
    features = _string_list(study, "features", "[study]")
    categorical = _string_list(study, "categorical", "[study]")
    if not clinical and not features:
        raise StudyConfigError("[study]: name at least one clinical variable or feature")
    seed = study.get("seed", 42)
    _check_number(seed, "seed", "[study]", 0, float("inf"), "integer")

    split = data.get("split", {})
    _check_keys(split, "split")
    test_fraction = split.get("test_fraction", 0.3)
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, (int, float))
        or not 0 < test_fraction < 1
    ):
        raise StudyConfigError(f"[split]: test_fraction must be in (0, 1), got {test_fraction!r}")

    extraction = data.get("extraction", {})
    _check_keys(extraction, "extraction")
    params = extraction.get("params", "default")
    if not isinstance(params, str) or not params:
        raise StudyConfigError(
            f'[extraction]: params must be "default", "fast", "2d" or a file path, got {params!r}'
        )
    if params not in {"default", "fast", "2d"}:
        params = str(_resolve(params, base))

    tracking = data.get("tracking", {})
    _check_keys(tracking, "tracking")
    # A coordinator's deployment may point every study at its tracking server.
    for key in ("uri", "experiment"):
        if key in tracking and (not isinstance(tracking[key], str) or not tracking[key]):
            raise StudyConfigError(
                f"[tracking]: {key} must be a non-empty string, got {tracking[key]!r}"
            )
    enabled = tracking.get("enabled", True)
    if not isinstance(enabled, bool):
        raise StudyConfigError(
            f"[tracking]: enabled must be true or false (without quotes), got {enabled!r}"
        )
    uri = os.environ.get(TRACKING_URI_ENV) or tracking.get("uri", "sqlite:///mlflow.db")
    uri = _tracking_uri(uri, base)

    privacy_table = data.get("privacy", {})
    _check_keys(privacy_table, "privacy")
    if "min_cell" in privacy_table:
        _check_number(
            privacy_table["min_cell"], "min_cell", "[privacy]", 1, float("inf"), "integer"
        )
    if "max_param_fraction" in privacy_table:
        _check_number(privacy_table["max_param_fraction"], "max_param_fraction", "[privacy]", 0, 1)
    try:
        privacy = PrivacyPolicy(**privacy_table)
    except (TypeError, ValueError) as exc:
        raise StudyConfigError(f"[privacy]: {exc}") from exc

    harmonization = _harmonization(data.get("harmonization", {}))
    selection = _selection(data.get("selection", {}))
    models = data.get("models", {})
    _check_keys(models, "models")
    univariable_p = models.get("univariable_p", 0.05)
    if (
        isinstance(univariable_p, bool)
        or not isinstance(univariable_p, (int, float))
        or not 0 < univariable_p <= 1
    ):
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
        raw_path = _require(raw, "path", str, where)
        if not raw_path.strip():
            raise StudyConfigError(f"{where}: 'path' is empty: give the site's data folder")
        path = _resolve(raw_path, base)
        sites.append(SiteConfig(site_name, path, role))
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise StudyConfigError(f"study file: site names must be unique, got {names}")
    if not any(s.role == "training" for s in sites):
        raise StudyConfigError("study file: at least one site must have role 'training'")
    _check_distinct_folders(sites)
    _check_outcome_use(outcome, clinical, features, harmonization)
    _check_categorical(categorical, clinical, features, harmonization)
    _check_exclude(features, harmonization)

    validation = data.get("validation", {})
    _check_keys(validation, "validation")
    loso = validation.get("leave_one_site_out", "auto")
    if loso not in LOSO_CHOICES or (isinstance(loso, int) and not isinstance(loso, bool)):
        raise StudyConfigError(
            f'[validation]: leave_one_site_out must be "auto", true or false, got {loso!r}'
        )
    bootstrap = validation.get("bootstrap", 0)
    _check_number(bootstrap, "bootstrap", "[validation]", 0, MAX_BOOTSTRAP, "integer")

    federation = data.get("federation", {})
    _check_keys(federation, "federation")
    limits = {k: federation[k] for k in ("timeout", "round_timeout") if k in federation}
    for key, value in limits.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise StudyConfigError(f"[federation]: {key} must be seconds >= 0, got {value!r}")
    if limits.get("round_timeout") == 0:
        raise StudyConfigError("[federation]: round_timeout must be > 0")
    on_failure = federation.get("on_site_failure", "stop")
    if not isinstance(on_failure, str) or on_failure not in SITE_FAILURE_POLICIES:
        raise StudyConfigError(
            f'[federation]: on_site_failure must be "stop" or "drop", got {on_failure!r}'
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
        classifiers=_classifiers(data.get("classifiers", {})),
        univariable_p=float(univariable_p),
        leave_one_site_out=loso,
        bootstrap=int(bootstrap),
        source=source,
        timeout=float(limits["timeout"]) if "timeout" in limits else None,
        round_timeout=float(limits.get("round_timeout", 600.0)),
        on_site_failure=on_failure,
        clinical_categorical=categorical,
        merge_levels=_merge_levels(
            study.get("merge_levels", {}), categorical, harmonization.categorical
        ),
        **_nomogram(data.get("nomogram", {}), [RADSCORE, *clinical], categorical),
    )


def _merge_levels(
    table: Any, categorical: tuple[str, ...], combat: tuple[str, ...] = ()
) -> dict[str, dict[str, tuple]]:
    """``[study] merge_levels``: per categorical variable, new level -> the levels it
    merges (each level in one group at most; not a ComBat covariate's, which ComBat
    encodes with the levels as written)."""
    example = '{ cp = { "1-2" = ["1", "2"] } }'
    if not isinstance(table, dict):
        raise StudyConfigError(f"[study]: merge_levels must be a table such as {example}")
    out: dict[str, dict[str, tuple]] = {}
    for name, groups in table.items():
        if name not in categorical:
            raise StudyConfigError(
                f"[study]: merge_levels.{name}: {name!r} is not in [study] categorical "
                f"{list(categorical)}"
            )
        if name in combat:
            raise StudyConfigError(
                f"[study]: merge_levels.{name}: {name!r} is also a categorical ComBat "
                "covariate, whose levels ComBat uses as written: merge them in the data"
            )
        if not isinstance(groups, dict) or not groups:
            raise StudyConfigError(
                f"[study]: merge_levels.{name} must be a table of new level = [levels], "
                f"e.g. {example}, got {groups!r}"
            )
        seen: list[str] = []
        for new, old in groups.items():
            if (
                not new.strip()
                or "=" in new
                or not isinstance(old, list)
                or len(old) < 2
                or not all(isinstance(v, str) and v.strip() for v in old)
            ):
                raise StudyConfigError(
                    f"[study]: merge_levels.{name}.{new} must list two or more levels "
                    f'(as text, e.g. ["1", "2"]) under a name without "=", got {old!r}'
                )
            twice = sorted(set(seen) & set(old))
            if twice:
                raise StudyConfigError(
                    f"[study]: merge_levels.{name}: level(s) {twice} are merged twice"
                )
            seen += old
        out[name] = {new: tuple(old) for new, old in groups.items()}
    return out


def _check_categorical(
    categorical: tuple[str, ...],
    clinical: tuple[str, ...],
    features: tuple[str, ...],
    harmonization: HarmonizationConfig,
) -> None:
    """``[study] categorical`` names clinical variables only, whose dummy columns
    ("name=level") no other clinical variable's name can be mistaken for."""
    stray = [c for c in categorical if c not in clinical]
    if stray:
        where = [c for c in stray if c in features]
        why = (
            f" ({where} are features: only clinical variables are one-hot encoded)" if where else ""
        )
        raise StudyConfigError(
            f"[study]: categorical {stray} are not clinical variables{why}; "
            f"the clinical variables are {list(clinical)}"
        )
    named = [c for c in categorical if "=" in c]
    if named:
        raise StudyConfigError(
            f"[study]: categorical variable(s) {named} hold '=', which names dummy columns "
            "(name=level): rename the column"
        )
    clash = [v for v in clinical if any(v.startswith(f"{c}=") for c in categorical)]
    if clash:
        raise StudyConfigError(
            f"[study]: clinical variable(s) {clash} are named like the dummy columns of a "
            "categorical variable (name=level): rename the column"
        )
    numeric = [
        c
        for c in categorical
        if c in harmonization.covariates and c not in harmonization.categorical
    ]
    if numeric:
        raise StudyConfigError(
            f"[harmonization]: covariate(s) {numeric} are categorical clinical variables "
            "([study] categorical): list them in [harmonization] categorical too"
        )


def _check_exclude(features: tuple[str, ...], harmonization: HarmonizationConfig) -> None:
    """``[harmonization] exclude`` names features: each a feature or matched by one of
    the study's feature patterns."""
    import fnmatch

    patterns = [e for e in harmonization.exclude if any(ch in e for ch in "*?[")]
    if patterns:
        raise StudyConfigError(
            f"[harmonization]: exclude takes feature names, not patterns: {patterns}"
        )
    unknown = [
        e
        for e in harmonization.exclude
        if not any(e == f or fnmatch.fnmatchcase(e, f) for f in features)
    ]
    if unknown:
        raise StudyConfigError(
            f"[harmonization]: exclude names {unknown}, which are not [study] features "
            f"(features: {list(features)})"
        )


def _nomogram(
    table: dict[str, Any], predictors: list[str], categorical: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``[nomogram]``: axis titles, the level names of 0/1 predictors, and the names of a
    categorical predictor's levels (a table level -> name; unnamed levels show as such)."""
    _check_keys(table, "nomogram")
    labels, levels = table.get("labels", {}), table.get("levels", {})
    examples = {"labels": '{ sex = "Sex" }', "levels": '{ sex = ["female", "male"] }'}
    for key, value in (("labels", labels), ("levels", levels)):
        if not isinstance(value, dict):
            raise StudyConfigError(
                f"[nomogram]: {key} must be a table such as {examples[key]}, got {value!r}"
            )
        unknown = sorted(set(value) - set(predictors))
        if unknown:
            raise StudyConfigError(
                f"[nomogram]: {key} for {unknown}, which no model uses; "
                f"the predictors are {predictors}"
            )
    for name, text in labels.items():
        if not isinstance(text, str) or not text.strip():
            raise StudyConfigError(f"[nomogram]: labels.{name} must be text, got {text!r}")
    for name, names in levels.items():
        if name in categorical:
            if not isinstance(names, dict) or not all(
                isinstance(n, str) and n.strip() for n in names.values()
            ):
                raise StudyConfigError(
                    f"[nomogram]: levels.{name} of a categorical variable must be a table of "
                    f'level = "name", e.g. {{ "1" = "typical angina" }}, got {names!r}'
                )
            continue
        if (
            not isinstance(names, list)
            or len(names) != 2
            or not all(isinstance(n, str) and n.strip() for n in names)
        ):
            raise StudyConfigError(
                f"[nomogram]: levels.{name} must name the levels of 0 and 1, "
                f'e.g. ["female", "male"], got {names!r}'
            )
    return {
        "nomogram_labels": {k: v.strip() for k, v in labels.items()},
        "nomogram_levels": {
            k: {lv: n.strip() for lv, n in v.items()}
            if k in categorical
            else (v[0].strip(), v[1].strip())
            for k, v in levels.items()
        },
    }


def _harmonization(table: dict[str, Any]) -> HarmonizationConfig:
    _check_keys(table, "harmonization")
    method = table.get("method", "combat")
    if not isinstance(method, str) or method not in {"combat", "none"}:
        raise StudyConfigError(
            f"[harmonization]: method must be 'combat' or 'none', got {method!r}"
        )
    batch = table.get("batch", SITE_BATCH)
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
    exclude = _string_list(table, "exclude", "[harmonization]")
    return HarmonizationConfig(method, batch, covariates, categorical, **flags, exclude=exclude)


def _selection(table: dict[str, Any]) -> SelectionConfig:
    _check_keys(table, "selection")
    known = {f.name for f in fields(SelectionConfig)}
    cfg = SelectionConfig(**{k: v for k, v in table.items() if k in known})
    for key, low in (("mrmr_k", 1), ("folds", 2), ("n_lambdas", 2)):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise StudyConfigError(f"[selection]: {key} must be an integer >= {low}, got {value!r}")
    ratio = cfg.lambda_min_ratio
    if ratio is not None and (
        isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1
    ):
        raise StudyConfigError(f"[selection]: lambda_min_ratio must be in (0, 1), got {ratio!r}")
    if not isinstance(cfg.rule, str) or cfg.rule not in {"lambda.min", "lambda.1se"}:
        raise StudyConfigError(
            f"[selection]: rule must be 'lambda.min' or 'lambda.1se', got {cfg.rule!r}"
        )
    icc = cfg.icc_threshold
    if isinstance(icc, bool) or not isinstance(icc, (int, float)) or not 0 <= icc <= 1:
        raise StudyConfigError(f"[selection]: icc_threshold must be in [0, 1], got {icc!r}")
    if not isinstance(cfg.icc_type, str) or cfg.icc_type not in {"ICC2", "ICC3"}:
        raise StudyConfigError(
            f"[selection]: icc_type must be 'ICC2' or 'ICC3', got {cfg.icc_type!r}"
        )
    if not isinstance(cfg.mrmr_in_folds, bool):
        raise StudyConfigError(
            f"[selection]: mrmr_in_folds must be true or false, got {cfg.mrmr_in_folds!r}"
        )
    return cfg


def _classifiers(table: dict[str, Any]) -> ClassifiersConfig:
    _check_keys(table, "classifiers")
    cfg = ClassifiersConfig(**table)
    if not isinstance(cfg.compare, bool):
        raise StudyConfigError(f"[classifiers]: compare must be true or false, got {cfg.compare!r}")
    for key, (low, high) in CLASSIFIER_BOUNDS.items():
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise StudyConfigError(
                f"[classifiers]: {key} must be an integer in {low}..{high}, got {value!r}"
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
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise StudyConfigError(f"{path}: not valid TOML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise StudyConfigError(f"{path}: not UTF-8 text (TOML must be UTF-8): {exc}") from exc
    try:
        return parse_study(data, path.parent, source=path)
    except StudyConfigError as exc:
        raise StudyConfigError(f"{path}: {exc}") from exc
