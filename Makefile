# `make test` and `make demo` set everything up on a fresh machine: a .venv with the
# project and its pinned dependencies (constraints.txt), then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
BENCH_STAMP := $(VENV)/.bench-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
# Two workers: the suite is sized for a 2-core machine.
PYTEST_ARGS ?= -q -n 2 --durations=25

.PHONY: install test demo bench docs clean

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[all,dev]"
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/pyroflows demo

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[all,dev,bench]"
	touch $@

# Every benchmark; each writes benchmarks/results/*.md (see benchmarks/README.md).
bench: $(BENCH_STAMP)
	$(PY) benchmarks/density_throughput.py
	$(PY) benchmarks/svi_speed.py
	$(PY) benchmarks/posteriordb.py --backend jax --no-progress
	$(PY) benchmarks/posteriordb.py --backend torch --no-progress
	$(PY) benchmarks/unbiased.py
	$(PY) benchmarks/snf_doublewell.py --no-progress
	$(PY) benchmarks/fit_posterior_defaults.py --backend both
	$(PY) benchmarks/funnel.py --backend torch
	$(PY) benchmarks/funnel.py --backend jax
	$(PY) benchmarks/nan_sweep.py --backend both

# The API reference site (mkdocs.yml, docs/) into build/site/; --strict fails on any warning
# (a broken cross-reference, a malformed docstring). tests/test_docs.py runs the same build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
