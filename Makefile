# Two commands: `make run` (main job) and `make test` (the whole suite). Both build .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Data lives outside the repo; point MNNN_DATA_DIR at it (defaults to ../shared/data when present).
MNNN_DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)
export MNNN_DATA_DIR
# Small ops do not gain from many threads; oversubscription makes them crawl.
export OMP_NUM_THREADS ?= 2

.PHONY: run demo test bench install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/mnnn train

demo: $(STAMP)
	$(BIN)/mnnn demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[bench]"
	$(BIN)/mnnn bench all --out runs/bench
	$(BIN)/mnnn bench mqar --preset steps-small --out runs/bench
	$(BIN)/python -m mnnn.bench.readme --results runs/bench

clean:
	rm -rf $(VENV) runs
