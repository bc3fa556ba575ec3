# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv (if needed), installs radfed into it, and runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean chromium

# The report's test opens it in a real headless browser (Debian's chromium).
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

test: $(VENV)/.installed chromium
	$(BIN)/python -m pytest

chromium:
	@command -v chromium >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1 \
	  || [ -n "$$RADFED_CHROMIUM" ] \
	  || { echo "installing Debian's chromium for the report's browser test"; \
	       $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium >/dev/null; }

lint: $(VENV)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) radfed-demo
