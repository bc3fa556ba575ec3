# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv (if needed), installs radfed into it, and runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint clean

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

test: $(VENV)/.installed
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) radfed-demo
