# Everything a user or CI runs goes through here: `make run`, `make test`, `make bench`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
IMAGES ?= ./photos
MODELS ?= resnet50
OUT ?= results.jsonl

.PHONY: setup setup-dev run lint test test-deploy bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[worker,embedded,report,train]'
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e '.[worker,embedded,report,train,postgres,vectors,parquet,s3,dev,openvino]'
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

## The whole check: lint, types, then the tests on a real Redis and real workers,
## in TEST_PROCESSES processes (pytest-xdist; tests/conftest.py says how they share out).
TEST_PROCESSES ?= 4
test: lint
	@# Byte-compiled once here, not by each of the tests' CLI and worker processes
	@# (nothing is written where PYTHONDONTWRITEBYTECODE is set).
	$(BIN)/python -m compileall -q producer shared workers
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadfile --durations=20

## The compose deployment run for real: image built, stack up, workers scaled and
## killed, Sentinel failover, all torn down (Docker Engine as root; docs/deployment.md).
test-deploy: setup-dev
	IMGQ_TEST_DEPLOY=1 $(BIN)/python -m pytest tests/test_compose_stack.py -v --durations=0

bench: setup-dev
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) test-artifacts .pytest_cache .mypy_cache .ruff_cache
