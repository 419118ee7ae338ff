# Set-up is part of every target: a fresh clone needs only python3 (≥ 3.11, the version the locks are resolved for), make and, for tests, apt-get.
VENV ?= .venv
GPU_VENV ?= .venv-gpu
DEMO_OUT ?= out/demo
GPU_CHECK_OUT ?= out/gpu-check.json

.PHONY: setup demo test lint lock gpu-check

# $(call install,VENV,LOCK): a virtualenv with LOCK's exact hashed pins, then the project itself without
# re-resolving anything. Runtime (requirements/cpu.lock): no TensorFlow, no test tools; dev (requirements/dev.lock):
# everything, TensorFlow for convert-weights included; GPU (requirements/gpu.lock): the image's CUDA stack.
define install
	python3 -m venv $(1)
	$(1)/bin/pip install -q --upgrade pip
	$(1)/bin/pip install -q --require-hashes -r $(2)
	$(1)/bin/pip install -q --no-deps -e .
	touch $@
endef

$(VENV)/.installed-runtime: pyproject.toml requirements/cpu.lock
	$(call install,$(VENV),requirements/cpu.lock)

$(VENV)/.installed-dev: pyproject.toml requirements/dev.lock
	$(call install,$(VENV),requirements/dev.lock)

$(GPU_VENV)/.installed-gpu: pyproject.toml requirements/gpu.lock
	$(call install,$(GPU_VENV),requirements/gpu.lock)

setup: $(VENV)/.installed-dev

## The main job on the embedded default: local Ray, local files, CPU when there is no GPU (runtime lock only).
demo: $(VENV)/.installed-runtime
	$(VENV)/bin/landmark-index demo $(DEMO_OUT)

## Lint + the whole test suite (starts its own S3-compatible server and local Ray).
test: $(VENV)/.installed-dev
	bash scripts/install-test-deps.sh
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pytest -q

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

## GPU figures (extraction, re-ranking, faiss on GPU) in one JSON file, ≤ 8 min on one GPU; without a GPU it
## says why and exits 0. Its own virtualenv from the image's lock (CUDA torch, faiss-gpu).
gpu-check: $(GPU_VENV)/.installed-gpu
	$(GPU_VENV)/bin/python benchmarks/gpu_check.py --out $(GPU_CHECK_OUT)

## Re-resolve requirements/*.lock after changing a dependency in pyproject.toml (needs uv).
lock:
	scripts/lock.sh
