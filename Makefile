# The two commands of the README contract: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test setup clean lint bench-small study

# The packages are installed by uv (from the package index, like pip; it downloads and installs
# in parallel: set-up takes about a third of pip's time), byte-compiled up front as pip does.
# Where uv cannot be installed or cannot install (e.g. an index only pip is configured for),
# pip does the same install.
$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q uv || echo "uv unavailable: installing with pip"

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m uv pip install -q --python $(PY) --compile-bytecode -e ".[test,experiments]" \
	  || { echo "installing with pip"; $(PY) -m pip install -q --upgrade pip \
	       && $(PY) -m pip install -q -e ".[test,experiments]"; }
	touch $(STAMP)

setup: $(STAMP)

## make test: set up .venv and run the whole test suite (CPU).
test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup --durations=20 tests --doctest-modules optax_ext models

## make demo: set up .venv and run the main job on the embedded corpus (CPU, < 10 minutes).
demo: $(STAMP)
	$(PY) -m experiments.demo

## make study: every optimizer, LR-swept and seeded (resumable; ~90 CPU-minutes); docs/RESULTS.md.
study: $(STAMP)
	$(PY) -m experiments.study

bench-small: $(STAMP)
	$(PY) -m experiments.bench_step --small

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
