# One entry point for people and CI. `make test` creates .venv if needed and runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1

.PHONY: venv test lint bench peer demo infra-up infra-down clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch/torchvision first, pinned: pip then takes the local wheels instead of a download
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	# onnx: the ONNX Runtime embedding runtime, tested beside torch and OpenVINO; int8: nncf,
	# which compresses OpenVINO exports' weights for model.precision=int8
	$(BIN)/pip install -q -e ".[dev,onnx,int8]"
	# the authors' DINOv2 code, for the parity test only (code, no dependencies)
	$(BIN)/pip install -q --no-deps "dinov2==0.0.1.dev2"
	# anomalib 2.7.0's source (no dependencies, never imported by the project) into
	# .data/anomalib-2.7.0, for the FoundAD projector parity test only
	$(BIN)/python -m tests.core.foundad.anomalib_source
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/embed.py
	$(BIN)/python bench/score.py
	$(BIN)/python bench/zero_shot.py

peer: $(STAMP)  ## anomalib 2.7.0's AnomalyDINO vs this pipeline (its own venv, .data/peer-venv)
	$(BIN)/python bench/peer.py $(PEER_ARGS)

demo: $(STAMP)
	$(BIN)/anomalydino demo

infra-up: $(STAMP)
	$(BIN)/python -m infra start

infra-down: $(STAMP)
	$(BIN)/python -m infra stop

clean:
	rm -rf .pytest_cache .ruff_cache runs
