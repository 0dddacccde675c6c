# Two commands a newcomer needs: `make demo` (the main job) and `make test` (the whole suite).
# Both create .venv on first use (torch==2.13.0 and its torchvision first, then the project) and reuse it after.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# the CPU torch wheel and the torchvision built for it: installed first, so nothing asks for another torch
TORCH ?= 2.13.0
TORCHVISION ?= 0.28.0
export OMP_NUM_THREADS ?= 1
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# DVC stages call `python -m flows.cli`: run them with this project's environment first on PATH
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup demo test lint bench bench-quick clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==$(TORCH) torchvision==$(TORCHVISION)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/dvc repro
	$(BIN)/diffenc compare

lint: setup
	$(BIN)/ruff check .

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python -m benchmarks.run_all

bench-quick: setup
	$(BIN)/python -m benchmarks.run_all --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
