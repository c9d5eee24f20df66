# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint fuzz bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulls several GB of CUDA packages.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet "setuptools>=64"
	$(PY) -m pip install --quiet --no-build-isolation -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest

lint: setup
	$(PY) -m ruff check auditor tests benchmarks scripts examples
	$(PY) -m mypy

clean:
	rm -rf $(VENV) build *.egg-info demo-out
