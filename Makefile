# Two commands on a fresh machine: `make demo` and `make test` (each sets up .venv first).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CORES ?= 2
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo lint test test-fast dryrun aperio cohorts clean distclean

setup: $(STAMP)

# torch first, pinned: the CPU build installs quickly; an unpinned torch pulls GBs of CUDA wheels.
$(STAMP): pyproject.toml envs/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -r envs/requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $@

demo: setup
	$(BIN)/snakemake --configfile config/demo.yaml --cores $(CORES) all results/models/demo/model.pt
	@echo "grades (results/qc/grades.tsv):" && cat results/qc/grades.tsv
	@echo "look at: results/qc/slides.parquet (one row per slide), results/DEMO/DEMO-01/nuclei.parquet," \
	  "results/DEMO/DEMO-01/qc_overlay.png (tissue, nuclei, checked patches), results/report/grades.html," \
	  "results/export/qupath/DEMO/DEMO-01.geojson; the briefly trained demo model: results/models/demo/model_card.json"

dryrun: setup
	$(BIN)/snakemake --configfile config/demo.yaml -n

# The real Aperio slides in ../shared/data/slides/aperio (not part of a fresh clone).
aperio: setup
	$(BIN)/snakemake --configfile config/demo.yaml config/aperio.yaml --cores $(CORES)

# Sample sheets of the 14 seed cancer types from the GDC (needs internet; commit the result).
cohorts: setup
	$(BIN)/nucseg cohort --all-seed-types --out-dir config/cohorts

# Static checks (pyflakes, bugbear, complexity, style; config in pyproject.toml), before any test runs.
lint: setup
	$(BIN)/ruff check src tests benchmarks

test: lint
	$(BIN)/python -m pytest -q -rs

test-fast: setup
	$(BIN)/python -m pytest -q -rs -m "not slow"

clean:
	rm -rf results logs .snakemake resources/demo

distclean: clean
	rm -rf $(VENV) resources
