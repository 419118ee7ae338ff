# Set-up is part of every target: a fresh clone needs only python3 (≥ 3.11, the version the lock is resolved for), make and, for tests, apt-get.
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_OUT ?= out/demo

.PHONY: setup demo test lint lock

# Everything from the hashed lock (scripts/lock.sh writes it from pyproject.toml), then the project itself.
$(BIN)/.installed: pyproject.toml requirements/dev.lock
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --require-hashes -r requirements/dev.lock
	$(BIN)/pip install -q --no-deps -e .
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

## Re-resolve requirements/*.lock after changing a dependency in pyproject.toml (needs uv).
lock:
	scripts/lock.sh
