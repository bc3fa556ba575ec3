# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv (if needed), installs radfed into it, and runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean system-tools

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
