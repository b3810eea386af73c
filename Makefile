# Two commands are all a fresh clone needs: `make smoke` and `make test` (both set up .venv when missing).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PIP_QUIET := --quiet --disable-pip-version-check

.PHONY: setup smoke test test-fast clean benchmark-prepare benchmark-train benchmark-peers benchmark-gpu-input mlflow-ui help

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml constraints.txt scripts/install_pillow_simd.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(PIP_QUIET) --upgrade pip setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
	set -o pipefail; $(BIN)/pip install $(PIP_QUIET) -c constraints.txt -e '.[dev]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	bash scripts/install_pillow_simd.sh $(BIN)
	touch $(STAMP)

setup: $(STAMP)  ## create .venv with the pinned stack and pillow-simd (falls back to Pillow with a warning)

smoke: $(STAMP)  ## the main job on embedded defaults: synthetic ImageNet -> prepare -> stats -> train -> evaluate
	$(BIN)/python -m flows.smoke

test: $(STAMP)  ## the whole test suite (CPU only)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)  ## unit tests only (no Ray, no servers)
	$(BIN)/python -m pytest -q -m "not slow"

benchmark-prepare: $(STAMP)  ## preprocessing throughput vs a naive Pillow baseline and decode-only
	$(BIN)/python benchmarks/prepare_throughput.py

benchmark-train: $(STAMP)  ## training input pipeline vs ImageFolder+DataLoader; AlexNet step throughput
	$(BIN)/python benchmarks/train_input.py
	$(BIN)/python benchmarks/train_step.py

# FFCV and LitData get venvs of their own under ~/.cache/alexnet-peers (never this one); PEERS_ARGS="--rounds 5"
benchmark-peers: $(STAMP)  ## our input pipeline vs FFCV and LitData side by side (installs them with --install)
	$(BIN)/python benchmarks/peers.py --install $(PEERS_ARGS)

benchmark-gpu-input: $(STAMP)  ## which input path (nvJPEG, CPU decode, raw) feeds the GPU's AlexNet step
	$(BIN)/python benchmarks/gpu_input.py

# One worker process: a personal UI starts in seconds (MLflow's default of 4 is for a shared server).
mlflow-ui: $(STAMP)  ## the MLflow UI on the default store (sqlite:///mlflow.db), bound to 127.0.0.1
	$(BIN)/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db} --host 127.0.0.1 --port $${MLFLOW_PORT:-5000} --workers 1

clean:  ## remove build and run outputs (keeps .venv)
	rm -rf .pytest_cache build *.egg-info runs
