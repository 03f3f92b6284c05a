# octssl: `make demo` and `make test` create/refresh .venv themselves.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.octssl-installed
export DS_ACCELERATOR ?= cpu
export PYTHONUNBUFFERED := 1

.PHONY: venv prereqs demo test test-all bench lint typecheck check prometheus clean

venv: $(STAMP)

# What the machine must have before .venv can be built (README, "Prerequisites"): Linux, Python >= 3.10 with
# venv, and a C++ compiler with OpenMP and Python's headers, because DeepSpeed's CPU shared-memory op is
# compiled at install. Each missing piece stops here with its Debian package named, not 2 GB into pip.
CXX_PROBE = printf '\043include <Python.h>\n\043include <omp.h>\nint main() { return 0; }\n' | \
	  $${CXX:-c++} -x c++ -fopenmp -I"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" - -o /dev/null
prereqs:
	@test "$$(uname -s)" = Linux || { echo "make: octssl needs Linux (DeepSpeed's CPU op uses Linux-only APIs)" >&2; exit 1; }
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || { \
	  echo "make: octssl needs Python >= 3.10 as '$(PY)' (found: $$($(PY) --version 2>&1)); e.g. make PY=python3.11" >&2; exit 1; }
	@$(PY) -c 'import ensurepip, venv' 2>/dev/null || { \
	  echo "make: $(PY) cannot create a venv (Debian: apt-get install python3-venv)" >&2; exit 1; }
	@command -v $${CXX:-c++} >/dev/null || { \
	  echo "make: no C++ compiler '$${CXX:-c++}' for DeepSpeed's CPU op (Debian: apt-get install g++)" >&2; exit 1; }
	@$(PY) -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' || { \
	  echo "make: no Python.h for $(PY), needed to compile DeepSpeed's CPU op (Debian: apt-get install python3-dev)" >&2; exit 1; }
	@$(CXX_PROBE) 2>/dev/null || { echo "make: '$${CXX:-c++}' cannot compile against Python.h with -fopenmp:" >&2; $(CXX_PROBE); exit 1; }

# torch first (the pinned CPU wheel; GPU users install their CUDA torch before `pip install -e .`),
# then the project, then DeepSpeed rebuilt with its CPU shared-memory comm op compiled at install time
# (otherwise every first deepspeed.initialize JIT-compiles it for ~55 s).
$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory prereqs
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
	$(BIN)/python -m pytest -m "not slow" -q --durations=10

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
