# octssl: `make demo` and `make test` create/refresh .venv themselves.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.octssl-installed
export DS_ACCELERATOR ?= cpu
export PYTHONUNBUFFERED := 1

.PHONY: venv demo test test-all bench lint typecheck check prometheus clean

venv: $(STAMP)

# torch first (the pinned CPU wheel; GPU users install their CUDA torch before `pip install -e .`),
# then the project, then DeepSpeed rebuilt with its CPU shared-memory comm op compiled at install time
# (otherwise every first deepspeed.initialize JIT-compiles it for ~55 s).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 $(BIN)/pip install -q --no-build-isolation \
	  --no-deps --force-reinstall --no-cache-dir "deepspeed==$$($(BIN)/python -c 'from importlib.metadata import version; print(version("deepspeed"))')"
	touch $(STAMP)

# A real Prometheus server (and promtool) for the monitoring tests: the Debian package, installed as root.
# `make test` does not need it (those tests skip and say how to get it); .ci/run installs it first.
prometheus:
	@command -v prometheus >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null)

demo: venv
	$(BIN)/octssl demo --out runs/demo

# The quick loop while coding: everything but the tests marked slow (over ~1 minute each).
test: venv
	$(BIN)/python -m pytest -m "not slow" -q

# The whole suite, slow fault tests included (what CI runs), with the ten slowest tests listed at the end.
# pytest's exit status 5 ("no tests collected") is a failure here: a suite that collects nothing passed nothing.
test-all: venv
	$(BIN)/python -m pytest -q --durations=10

bench: venv
	$(BIN)/python benchmarks/run_cpu.py

lint: venv
	$(BIN)/ruff check platform tests benchmarks

# Static types of the platform package (mypy, configured in pyproject.toml): zero errors.
typecheck: venv
	$(BIN)/mypy

# Everything CI runs: lint, type check, the whole suite.
check: lint typecheck test-all

clean:
	rm -rf $(VENV) runs .pytest_cache
