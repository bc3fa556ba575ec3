"""Deployment configuration: environment variables only, each documented once.

:data:`VARIABLES` is the single list of what the site and coordinator entrypoints
read; ``deploy/README.md`` shows it as one table (a test keeps the two equal).
:func:`site_settings` and :func:`coordinator_settings` read and validate it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from radfed.shared.privacy import PrivacyPolicy

SITE, COORDINATOR, MLFLOW, COMPOSE = "site", "coordinator", "mlflow", "compose"


class ConfigError(Exception):
    """A deployment setting is missing or invalid (one line, shown at start-up)."""


@dataclass(frozen=True)
class Variable:
    """One environment variable: who reads it, its default ("" = required) and meaning."""

    name: str
    roles: tuple[str, ...]
    default: str
    help: str


VARIABLES: tuple[Variable, ...] = (
    Variable("RADFED_SITE_NAME", (SITE,), "", "this hospital's site name, as in the study file"),
    Variable("RADFED_SUPERLINK", (SITE,), "",
             "coordinator address `host:port` (its one public TLS port)"),
    Variable("RADFED_DATA_DIR", (SITE,), "/data",
             "data folder (read-only) holding `manifest.csv` or `features.csv`/`.parquet`"),
    Variable("RADFED_CACHE_DIR", (SITE,), "/cache",
             "writable folder: feature cache and Flower's app folder"),
    Variable("RADFED_AUTH_KEY", (SITE,), "/etc/radfed/node.key",
             "this SuperNode's private key (OpenSSH, EC P-384); its `.pub` is registered "
             "at the coordinator"),
    Variable("RADFED_TRUSTED_ENTITIES", (SITE,), "/etc/radfed/trusted-entities.yaml",
             "the study's app-signing public key(s): only apps they signed run here"),
    Variable("RADFED_MIN_CELL", (SITE,), str(PrivacyPolicy.min_cell),
             "smallest count this site sends (not below 3)"),
    Variable("RADFED_MAX_PARAM_FRACTION", (SITE,), "1/3",
             "most model parameters per patient this site fits (not above 1/3); a "
             "fraction (`1/4`) or a decimal (`0.25`)"),
    Variable("RADFED_SITE_STATE_DIR", (SITE,), "/state",
             "writable, persistent, private to the site: its secret, pinned studies, "
             "answered patient sets, split assignments and audit log (`radfed audit`; "
             "docs/privacy.md). A new folder forgets every pin"),
    Variable("RADFED_APPROVED_STUDIES", (SITE,), "(none: any study, pinned when first "
             "answered)",
             "comma-separated protocol hashes (`radfed study-hash STUDY.toml`) this site "
             "answers; no other study is answered"),
    Variable("RADFED_MAX_BOOTSTRAP", (SITE,), "200",
             "highest bootstrap replicate this site answers (0: none; at most 1000); each "
             "is a refit of the study on its training rows reweighted (docs/privacy.md)"),
    Variable("RADFED_MAX_CLASSIFIER_ROUNDS", (SITE,), "20",
             "most training rounds of seed 000's classifier comparison this site answers "
             "(0: it takes no part; at most 20); each round sends XGBoost trees and "
             "FedAvg parameters (docs/classifiers.md)"),
    Variable("RADFED_JOBS", (SITE,), "1", "parallel pyradiomics extractions"),
    Variable("RADFED_CONNECT_TIMEOUT", (SITE,), "10",
             "seconds the start-up check waits for the coordinator"),
    Variable("RADFED_RUNTIME_PORT", (SITE,), "9094",
             "loopback port of the SuperNode's own API (health check)"),
    Variable("RADFED_CA_CERT", (SITE, COORDINATOR), "/etc/radfed/ca.crt",
             "the study CA certificate (PEM)"),
    Variable("RADFED_LISTEN", (COORDINATOR,), "0.0.0.0:9093",
             "SuperLink `host:port` (Fleet, Control and Runtime APIs; keep it private, "
             "the gateway publishes the Fleet API)"),
    Variable("RADFED_SERVER_CERT", (COORDINATOR,), "/etc/radfed/superlink.crt",
             "SuperLink TLS certificate, naming the public host, `coordinator` and 127.0.0.1"),
    Variable("RADFED_SERVER_KEY", (COORDINATOR,), "/etc/radfed/superlink.key",
             "its private key"),
    Variable("RADFED_STATE_DIR", (COORDINATOR,), "/state",
             "writable: the SuperLink's state database (`superlink.db`) and `flwr` settings"),
    Variable("RADFED_NODES_DIR", (COORDINATOR,), "/study/nodes",
             "admitted hospitals: one `SITE.pub` per SuperNode, registered at start"),
    Variable("RADFED_APPS_DIR", (COORDINATOR,), "/study/apps",
             "signed app bundles (`python -m radfed.deploy.signing sign`)"),
    Variable("RADFED_APP", (COORDINATOR,), "@radfed/radfed-app==0.1.0",
             "the signed app a study run uses"),
    Variable("RADFED_STUDY", (COORDINATOR,), "/study/study.toml",
             "study file submitted by `submit` (its `[tracking] uri` is the MLflow server)"),
    Variable("RADFED_TRACKING_URI", (COORDINATOR,), "(the study file's)",
             "MLflow tracking URI of every run, e.g. `https://mlflow:5000` (overrides the study "
             "file's `[tracking] uri`)"),
    Variable("RADFED_RUNS_DIR", (COORDINATOR,), "/runs",
             "writable: one output folder per run (`results.json`, logs)"),
    Variable("RADFED_SITE_TIMEOUT", (COORDINATOR,), "120",
             "seconds a run waits for every study site to connect"),
    Variable("RADFED_RUN_TIMEOUT", (COORDINATOR,), "3600", "seconds a run may take"),
    Variable("MLFLOW_TRACKING_SERVER_CERT_PATH", (COORDINATOR,), "$RADFED_CA_CERT",
             "CA the MLflow client trusts for an `https://` tracking server (MLflow's own)"),
    Variable("MLFLOW_DB_HOST", (MLFLOW,), "postgres", "PostgreSQL host of the tracking server"),
    Variable("MLFLOW_DB_PORT", (MLFLOW,), "5432", "its port"),
    Variable("MLFLOW_DB_USER", (MLFLOW,), "mlflow", "database user"),
    Variable("MLFLOW_DB_NAME", (MLFLOW,), "mlflow", "database name"),
    Variable("MLFLOW_DB_PASSWORD_FILE", (MLFLOW,), "",
             "file holding the database password (a compose secret)"),
    Variable("MLFLOW_TLS_CERT", (MLFLOW,), "",
             "tracking server certificate (study CA), naming `mlflow` and 127.0.0.1"),
    Variable("MLFLOW_TLS_KEY", (MLFLOW,), "", "its private key"),
    Variable("MLFLOW_CA_CERT", (MLFLOW,), "", "the study CA (for the container's health check)"),
    Variable("MLFLOW_ARTIFACTS_DIR", (MLFLOW,), "/mlartifacts",
             "the artifact store (a volume), served through the tracking server"),
    Variable("MLFLOW_ALLOWED_HOSTS", (MLFLOW,), "mlflow,mlflow:5000,localhost,...",
             "Host headers the server answers"),
    Variable("RADFED_DATA", (COMPOSE,), "",
             "site stack: the data folder on the hospital's host, mounted read-only at /data"),
    Variable("RADFED_SITE_IMAGE", (COMPOSE,), "radfed-site:0.1.0",
             "site stack: the site image the coordinator published, e.g. "
             "`registry.example.org/radfed-site:0.1.0@sha256:...` (pinned by digest); "
             "the default is the tag `docker load` gives the archive"),
    Variable("RADFED_PUBLIC_PORT", (COMPOSE,), "443",
             "coordinator stack: the gateway's published port (the sites' one outbound port)"),
)  # fmt: skip

#: The privacy floor of DESIGN.md: a site may be stricter, never looser.
MIN_CELL_FLOOR = PrivacyPolicy.min_cell
MAX_PARAM_FRACTION_CEILING = PrivacyPolicy.max_param_fraction


def variables(role: str) -> list[Variable]:
    return [v for v in VARIABLES if role in v.roles]


def _get(env: Mapping[str, str], name: str) -> str:
    spec = next(v for v in VARIABLES if v.name == name)
    value = env.get(name, "").strip() or spec.default
    if not value:
        raise ConfigError(f"{name} is not set: {spec.help}")
    return value


def _number(env: Mapping[str, str], name: str, kind: type[int] | type[float]) -> float:
    text = _get(env, name)
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a {kind.__name__}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name}={text!r} is not a finite number")
    return value


def _fraction(env: Mapping[str, str], name: str) -> Fraction:
    """A fraction written as ``1/3`` or as a decimal (``0.25``, ``0.3333333333333333``)."""
    text = _get(env, name)
    try:
        return Fraction(text.replace(" ", ""))
    except (ValueError, ZeroDivisionError):
        raise ConfigError(
            f"{name}={text!r} is not a fraction: write e.g. 1/3, 1/4 or 0.25"
        ) from None


def parse_address(address: str, name: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}={address!r} is not host:port")
    return host, int(port)


# --------------------------------------------------------------------------- site


@dataclass(frozen=True)
class SiteSettings:
    """What a hospital's container is told (see :data:`VARIABLES`)."""

    name: str
    superlink: str
    data_dir: Path
    cache_dir: Path
    ca_cert: Path
    auth_key: Path
    trusted_entities: Path
    privacy: PrivacyPolicy
    jobs: int
    connect_timeout: float
    runtime_port: int
    state_dir: Path = Path("/state")
    approved_studies: tuple[str, ...] = ()
    max_bootstrap: int = 200
    max_classifier_rounds: int = 20

    @property
    def superlink_host_port(self) -> tuple[str, int]:
        return parse_address(self.superlink, "RADFED_SUPERLINK")

    @property
    def flwr_home(self) -> Path:
        return self.cache_dir / "flwr"

    @property
    def feature_cache(self) -> Path:
        return self.cache_dir / "features"


def site_settings(env: Mapping[str, str] | None = None) -> SiteSettings:
    """Read a site's settings; the privacy limits may only be stricter than DESIGN's."""
    env = os.environ if env is None else env
    # A site answers no more bootstrap replicates than a study may ask for.
    from radfed.shared.config import CLASSIFIER_BOUNDS, MAX_BOOTSTRAP, SITE_NAME

    name = _get(env, "RADFED_SITE_NAME")
    if not SITE_NAME.match(name):
        raise ConfigError(f"RADFED_SITE_NAME={name!r}: use letters, digits, '-' and '_'")
    min_cell = int(_number(env, "RADFED_MIN_CELL", int))
    exact = _fraction(env, "RADFED_MAX_PARAM_FRACTION")
    fraction = float(exact)
    if min_cell < MIN_CELL_FLOOR:
        raise ConfigError(
            f"RADFED_MIN_CELL={min_cell} is below radfed's floor of {MIN_CELL_FLOOR}: "
            "a site may only be stricter"
        )
    if not 0 < exact <= Fraction(MAX_PARAM_FRACTION_CEILING).limit_denominator(1000):
        raise ConfigError(
            f"RADFED_MAX_PARAM_FRACTION={_get(env, 'RADFED_MAX_PARAM_FRACTION')} must be in "
            "(0, 1/3]: a site may only be stricter"
        )
    max_bootstrap = int(_number(env, "RADFED_MAX_BOOTSTRAP", int))
    if not 0 <= max_bootstrap <= MAX_BOOTSTRAP:
        raise ConfigError(
            f"RADFED_MAX_BOOTSTRAP={max_bootstrap} must be from 0 (no replicate) to {MAX_BOOTSTRAP}"
        )
    max_classifier_rounds = int(_number(env, "RADFED_MAX_CLASSIFIER_ROUNDS", int))
    most_rounds = CLASSIFIER_BOUNDS["rounds"][1]
    if not 0 <= max_classifier_rounds <= most_rounds:
        raise ConfigError(
            f"RADFED_MAX_CLASSIFIER_ROUNDS={max_classifier_rounds} must be from 0 (no part in "
            f"the classifier comparison) to {most_rounds}"
        )
    settings = SiteSettings(
        name=name,
        superlink=_get(env, "RADFED_SUPERLINK"),
        data_dir=Path(_get(env, "RADFED_DATA_DIR")),
        cache_dir=Path(_get(env, "RADFED_CACHE_DIR")),
        ca_cert=Path(_get(env, "RADFED_CA_CERT")),
        auth_key=Path(_get(env, "RADFED_AUTH_KEY")),
        trusted_entities=Path(_get(env, "RADFED_TRUSTED_ENTITIES")),
        privacy=PrivacyPolicy(min_cell=min_cell, max_param_fraction=fraction),
        jobs=max(1, int(_number(env, "RADFED_JOBS", int))),
        connect_timeout=float(_number(env, "RADFED_CONNECT_TIMEOUT", float)),
        runtime_port=int(_number(env, "RADFED_RUNTIME_PORT", int)),
        state_dir=Path(_get(env, "RADFED_SITE_STATE_DIR")),
        approved_studies=approved_studies(env.get("RADFED_APPROVED_STUDIES", "")),
        max_bootstrap=max_bootstrap,
        max_classifier_rounds=max_classifier_rounds,
    )
    settings.superlink_host_port  # noqa: B018 - validates the address now
    return settings


def approved_studies(text: str) -> tuple[str, ...]:
    """``RADFED_APPROVED_STUDIES``: comma-separated SHA-256 protocol hashes."""
    hashes = tuple(h.strip().lower() for h in text.split(",") if h.strip())
    for h in hashes:
        if not re.fullmatch(r"[0-9a-f]{64}", h):
            raise ConfigError(
                f"RADFED_APPROVED_STUDIES: {h[:70]!r} is not a study's protocol hash "
                "(64 hex digits, from `radfed study-hash STUDY.toml`)"
            )
    return hashes


# --------------------------------------------------------------------------- coordinator


@dataclass(frozen=True)
class CoordinatorSettings:
    """What the coordinator's container is told (see :data:`VARIABLES`)."""

    listen: str
    ca_cert: Path
    server_cert: Path
    server_key: Path
    state_dir: Path
    nodes_dir: Path
    apps_dir: Path
    app: str
    study: Path
    runs_dir: Path
    site_timeout: float
    run_timeout: float

    @property
    def host_port(self) -> tuple[str, int]:
        return parse_address(self.listen, "RADFED_LISTEN")

    @property
    def local_address(self) -> str:
        """Where processes in the coordinator's container reach the SuperLink."""
        host, port = self.host_port
        return (
            f"127.0.0.1:{port}"
            if host in ("0.0.0.0", "127.0.0.1", "localhost")
            else (f"{host}:{port}")
        )

    @property
    def database(self) -> Path:
        return self.state_dir / "superlink.db"

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr"


def coordinator_settings(env: Mapping[str, str] | None = None) -> CoordinatorSettings:
    env = os.environ if env is None else env
    app = _get(env, "RADFED_APP")
    if not app.startswith("@") or "==" not in app:
        raise ConfigError(f"RADFED_APP={app!r} is not a signed app spec @publisher/name==x.y.z")
    settings = CoordinatorSettings(
        listen=_get(env, "RADFED_LISTEN"),
        ca_cert=Path(_get(env, "RADFED_CA_CERT")),
        server_cert=Path(_get(env, "RADFED_SERVER_CERT")),
        server_key=Path(_get(env, "RADFED_SERVER_KEY")),
        state_dir=Path(_get(env, "RADFED_STATE_DIR")),
        nodes_dir=Path(_get(env, "RADFED_NODES_DIR")),
        apps_dir=Path(_get(env, "RADFED_APPS_DIR")),
        app=app,
        study=Path(_get(env, "RADFED_STUDY")),
        runs_dir=Path(_get(env, "RADFED_RUNS_DIR")),
        site_timeout=float(_number(env, "RADFED_SITE_TIMEOUT", float)),
        run_timeout=float(_number(env, "RADFED_RUN_TIMEOUT", float)),
    )
    settings.host_port  # noqa: B018 - validates the address now
    return settings


def markdown_table() -> str:
    """:data:`VARIABLES` as the Markdown table of ``deploy/README.md``."""
    rows = ["| variable | read by | default | meaning |", "|---|---|---|---|"]
    for v in VARIABLES:
        default = f"`{v.default}`" if v.default else "**required**"
        rows.append(f"| `{v.name}` | {', '.join(v.roles)} | {default} | {v.help} |")
    return "\n".join(rows)
