# Two commands on a fresh machine: `make demo` (the main job) and `make test` (everything, as CI runs it);
# `make test-fast` skips the tests marked slow (training-heavy) for the edit-test loop.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup chromium demo test test-fast lint fuzz bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned torch pulls several GB of CUDA packages.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet "setuptools>=64"
	$(PY) -m pip install --quiet --no-build-isolation -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) chromium

# The report's browser test needs Chromium; it never installs anything itself. As root (a container, CI)
# we install Debian's package; otherwise we say how, and the test skips locally (it fails under CI=true).
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else echo "note: chromium is missing; install it (sudo apt-get install chromium) to run the browser test"; fi

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

lint: setup
	$(PY) -m ruff check auditor tests benchmarks scripts examples
	$(PY) -m mypy

clean:
	rm -rf $(VENV) build *.egg-info demo-out
