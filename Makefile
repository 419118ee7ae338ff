# Set-up is part of every target: a fresh clone needs only python3 (≥ 3.10), make and, for tests, apt-get.
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= out/demo

.PHONY: setup demo test lint bench

$(BIN)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

## The main job on the embedded default: local Ray, local files, CPU when there is no GPU.
demo: setup
	$(BIN)/landmark-index demo $(DEMO_OUT)

## Lint + the whole test suite (starts its own S3-compatible server and local Ray).
test: setup
	bash scripts/install-test-deps.sh
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
