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
# glibc serves every buffer above 32 MB with a fresh mmap, so a full-resolution forward pass on the
# CPU spends about half its time in page faults; transparent huge pages for malloc (glibc >= 2.35,
# THP in madvise mode) cut a 2048x1024 pass by about 10 % (benchmarks/NOTES.md section 10).
# Older glibc ignores the setting.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

BOOK_STAMP := $(VENV)/.book-installed
TEST_STAMP := $(VENV)/.test-installed

.PHONY: book test venv test-deps main-job notebooks html paper-run chromium clean

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

## make book: the pipeline on the built-in benchmark, the chapters re-executed, then the HTML book
book: $(BOOK_STAMP)
	$(MAKE) --no-print-directory main-job
	$(MAKE) --no-print-directory notebooks
	$(MAKE) --no-print-directory html

# The book's training shares the cores with whatever else runs on them: passive OpenMP threads
# sleep instead of spinning while they wait (the same numbers; on two busy cores the default
# spinning made a training step about 25 times slower, README). Set OMP_WAIT_POLICY to override.
main-job notebooks: export OMP_WAIT_POLICY ?= PASSIVE

main-job:
	$(PY) -m cag run configs/synthetic.yaml

# Re-execute every chapter of _toc.yml in place with papermill (sequentially: they share
# runs/synthetic), keeping a chapter only when all its cells ran; volatile metadata stripped.
notebooks: $(BOOK_STAMP)
	$(PY) -m cag.book execute

# Render the committed notebooks (no execution); maths served from _static/mathjax (offline).
html: $(BOOK_STAMP)
	rm -rf _build/html _build/.doctrees _build/jupyter_execute
	$(VENV)/bin/jupyter-book build --path-output . --warningiserror --nitpick --keep-going .
	@echo "Book written to _build/html/index.html"

## make paper-run CONFIG=configs/gta5_to_cityscapes.yaml STAGE=stage1 ARGS="data.source_root=... data.target_root=..."
## executes the chapters up to STAGE on real data into runs/<name>/book/ (notebooks + run.json)
CONFIG ?= configs/gta5_to_cityscapes.yaml
STAGE ?= evaluate
ARGS ?=
paper-run: $(BOOK_STAMP)
	$(PY) -m cag.book paper-run $(CONFIG) --stage $(STAGE) $(ARGS)

## make test: every test (unit, integration, notebooks). All but the real-scale file on two
## pytest-xdist workers of one thread each (tests/conftest.py; passive OpenMP threads, so that
## chapters re-executed with two threads beside a worker do not spin), then the real-scale file
## alone with two threads (~9 GB per run: it does not fit beside other work in 24 GB)
test: $(TEST_STAMP) chromium
	OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -p no:cacheprovider --durations=20 -n 2 \
		--dist loadfile --no-loadscope-reorder -m "not real_scale" tests
	$(PY) -m pytest -q -p no:cacheprovider --durations=5 -m real_scale tests

# The HTML test drives headless Chromium (Debian's package); CI installs it when running as root.
chromium:
	@if [ "$${CI:-}" = true ] && [ "$$(id -u)" = 0 ] && ! command -v chromium >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; fi

clean:
	rm -rf _build runs
