# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv (if needed), installs radfed into it, and runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean system-tools images

# System tools the tests use: a headless browser for the report (Debian's chromium)
# and nginx for the coordinator's gateway.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# pyradiomics 3.0.1 must be built against the numpy already installed, without build
# isolation (its sdist's metadata is otherwise wrong for numpy 2): numpy first, then the rest.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --upgrade numpy "setuptools>=77" wheel
	$(BIN)/pip install --quiet --no-build-isolation -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/radfed demo

test: $(VENV)/.installed system-tools
	$(BIN)/python -m pytest

system-tools:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1 \
	  || [ -n "$$RADFED_CHROMIUM" ] || missing="chromium"; \
	command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian's$$missing for the tests"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

lint: $(VENV)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) radfed-demo

# The three container images of a study, built once by the coordinator and published
# (deploy/RUNBOOK-coordinator.md): hospitals only load or pull them. Tags: radfed-site and
# radfed-coordinator get the package version, radfed-mlflow MLflow's (as the compose
# files name them). Each image is saved to dist/images/NAME-TAG.tar with NAME-TAG.tar.sha256
# beside it; the image IDs are printed (pin them in the study instructions).
# Docker, or podman with --format docker (OCI images drop the HEALTHCHECK) and each
# Dockerfile's ignore file. No # syntax= line: BuildKit uses its built-in frontend.
VERSION := $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml | head -n 1)
MLFLOW_VERSION := $(shell sed -n 's/^mlflow==//p' deploy/requirements/mlflow.txt)
IMAGES_DIR ?= dist/images
IMAGES := site:radfed-site:$(VERSION) coordinator:radfed-coordinator:$(VERSION) \
	mlflow:radfed-mlflow:$(MLFLOW_VERSION)

images:
	@set -e; \
	if command -v docker >/dev/null 2>&1 && ! docker --version 2>/dev/null | grep -qi podman \
	  && docker info >/dev/null 2>&1; then \
	  engine=docker; \
	elif command -v podman >/dev/null 2>&1; then \
	  engine=podman; \
	else \
	  echo "make images: no container engine found: install Docker Engine 24+ (and start it: 'docker info' must answer) or podman 4+." >&2; \
	  if command -v docker >/dev/null 2>&1; then \
	    echo "make images: the docker command is installed, but no Docker engine answers ('docker info' fails)." >&2; \
	  fi; \
	  exit 1; \
	fi; \
	if [ "$$engine" = docker ] && ! docker buildx version >/dev/null 2>&1; then \
	  echo "make images: note: no docker buildx, so Docker's legacy builder runs; it ignores deploy/Dockerfile.*.dockerignore and sends the whole repository as build context (nothing of it beyond what the Dockerfiles copy reaches the images)." >&2; \
	fi; \
	mkdir -p $(IMAGES_DIR); \
	for spec in $(IMAGES); do \
	  kind=$${spec%%:*}; tag=$${spec#*:}; file=$$(echo "$$tag" | tr ':' '-').tar; \
	  echo "make images: $$engine build $$tag (deploy/Dockerfile.$$kind)"; \
	  if [ "$$engine" = podman ]; then \
	    podman build --format docker --ignorefile deploy/Dockerfile.$$kind.dockerignore \
	      -f deploy/Dockerfile.$$kind -t "$$tag" .; \
	  else \
	    docker build -f deploy/Dockerfile.$$kind -t "$$tag" .; \
	  fi; \
	  rm -f "$(IMAGES_DIR)/$$file"; \
	  $$engine save -o "$(IMAGES_DIR)/$$file" "$$tag"; \
	  (cd $(IMAGES_DIR) && sha256sum "$$file" > "$$file.sha256"); \
	  echo "make images: $(IMAGES_DIR)/$$file  $$(cut -d' ' -f1 "$(IMAGES_DIR)/$$file.sha256")  image ID $$($$engine image inspect --format '{{.Id}}' "$$tag")"; \
	done
