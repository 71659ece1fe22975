# The two commands: `make book` (main job + HTML book) and `make test` (every test).
# Both create .venv when it is missing and install the pinned requirements and the package.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# 2 cores: one process uses both; parallel test workers get one thread each.
export OMP_NUM_THREADS ?= 2
export MPLBACKEND ?= Agg
export PYTHONHASHSEED := 0

BOOK_STAMP := $(VENV)/.book-installed
TEST_STAMP := $(VENV)/.test-installed

.PHONY: book test venv test-deps main-job html clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(BOOK_STAMP): requirements.txt pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

$(TEST_STAMP): requirements-test.txt $(BOOK_STAMP)
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

venv: $(BOOK_STAMP)
test-deps: $(TEST_STAMP)

## make book: the pipeline on the built-in benchmark, then the HTML book in _build/html
book: $(BOOK_STAMP)
	$(MAKE) --no-print-directory main-job
	$(MAKE) --no-print-directory html

main-job:
	$(PY) -m cag run configs/synthetic.yaml

html:
	rm -rf _build/html _build/.doctrees
	$(VENV)/bin/jupyter-book build --path-output . --warningiserror --nitpick --keep-going .
	@echo "Book written to _build/html/index.html"

## make test: every test (unit, integration, notebooks)
test: $(TEST_STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf _build runs
