# Everything a user or CI runs goes through here: `make run`, `make test`, `make bench`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
IMAGES ?= ./photos
MODELS ?= resnet50
OUT ?= results.jsonl

.PHONY: setup setup-dev run lint test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[worker,embedded,report]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[worker,embedded,report,postgres,parquet,dev,openvino]'
	touch $@

setup: $(VENV)/.installed

setup-dev: $(VENV)/.installed-dev

## Classify a folder of images: make run IMAGES=./photos MODELS="resnet50 bit_m_r152x4"
run: setup
	$(BIN)/imgq run $(IMAGES) $(foreach m,$(MODELS),--model $(m)) --out $(OUT)

lint: setup-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## The whole check: lint, types, then the tests on a real Redis and real workers.
test: lint
	$(BIN)/python -m pytest --durations=20

bench: setup-dev
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) test-artifacts .pytest_cache .mypy_cache .ruff_cache
