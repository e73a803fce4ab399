# biorecipes — one entry point for every recipe. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

RECIPES := geneformer esm2_fa omnibiote plant_lm gtdb_mamba
TORCH_VERSION ?= 2.13.0
PYTHON ?= python3
VENV := $(CURDIR)/.venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-done-torch$(TORCH_VERSION)
REQUIREMENTS := $(wildcard recipes/*/requirements.txt recipes/*/requirements-nodeps.txt) shared/pyproject.toml \
	ci/setup_venv.sh ci/constraints.txt
# esm2_fa's faesm backend needs transformers <= 4.53, so it lives in its own environment beside .venv.
VENV_FAESM := $(CURDIR)/.venv-faesm
FAESM_STAMP := $(VENV_FAESM)/.setup-done-torch$(TORCH_VERSION)
FAESM_REQUIREMENTS := $(wildcard recipes/esm2_fa/requirements-faesm*.txt) shared/pyproject.toml ci/setup_venv.sh \
	ci/constraints.txt
# make test needs .venv-faesm only when it runs esm2_fa (all recipes, or recipe=esm2_fa).
TEST_NEEDS_FAESM := $(if $(filter-out esm2_fa,$(recipe)),,setup-faesm)
RUN_IN_RECIPE = cd recipes/$(recipe) && PATH="$(BIN):$$PATH" VIRTUAL_ENV="$(VENV)"

.PHONY: help setup setup-faesm train test lint bench docker-build export clean check-recipe gpu-wheels gpu-check

help: ## List the targets
	@echo "usage: make TARGET [recipe=NAME] (recipes: $(RECIPES))"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup: $(STAMP) ## Create .venv: torch (TORCH_VERSION, default 2.13.0), shared/ and every recipe's CPU requirements

$(STAMP): $(REQUIREMENTS)
	PYTHON=$(PYTHON) TORCH_VERSION=$(TORCH_VERSION) bash ci/setup_venv.sh "$(VENV)"
	@touch $@

setup-faesm: $(FAESM_STAMP) ## Create .venv-faesm: torch (TORCH_VERSION), shared/ and esm2_fa's faesm backend (transformers 4.53)

$(FAESM_STAMP): $(FAESM_REQUIREMENTS)
	PYTHON=$(PYTHON) TORCH_VERSION=$(TORCH_VERSION) bash ci/setup_venv.sh "$(VENV_FAESM)" faesm
	@touch $@

check-recipe:
	@if [ -z "$(recipe)" ]; then echo "error: name a recipe: make $(MAKECMDGOALS) recipe=NAME ($(RECIPES))" >&2; exit 2; fi
	@if [ ! -d "recipes/$(recipe)" ]; then echo "error: no recipe '$(recipe)' (have: $(RECIPES))" >&2; exit 2; fi

train: check-recipe setup ## Train recipe=NAME end to end on its bundled sample data (CPU, ~5 min)
	@test -f recipes/$(recipe)/train_sample.sh || { echo "error: recipes/$(recipe) has no train_sample.sh yet" >&2; exit 2; }
	$(RUN_IN_RECIPE) bash train_sample.sh

test: setup $(TEST_NEEDS_FAESM) lint ## Lint + all tests (shared, every recipe in-tree and exported, esm2_fa's faesm job); recipe=NAME for one
	FAESM_BIN="$(VENV_FAESM)/bin" bash ci/run_tests.sh "$(BIN)" $(recipe)

lint: setup ## ruff on all Python, hadolint on every Dockerfile
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@dockerfiles=$$(ls recipes/*/Dockerfile 2>/dev/null); \
	if [ -n "$$dockerfiles" ]; then echo "hadolint $$dockerfiles"; $(BIN)/hadolint docker/base.Dockerfile $$dockerfiles; fi

bench: check-recipe setup ## Run recipe=NAME's benchmark; prints ratios against a baseline of the same run
	@test -f recipes/$(recipe)/bench.py || { echo "error: recipes/$(recipe) has no bench.py yet" >&2; exit 2; }
	$(RUN_IN_RECIPE) python bench.py

docker-build: check-recipe ## docker build the shared base image, then recipe=NAME as biorecipes/NAME:latest
	@command -v docker >/dev/null 2>&1 || { echo "error: docker is not installed (needed for make docker-build)" >&2; exit 1; }
	@docker info >/dev/null 2>&1 || { echo "error: docker is installed but no docker engine is reachable (is the daemon running?)" >&2; exit 1; }
	docker build -f docker/base.Dockerfile -t biorecipes/base:latest .
	docker build -f recipes/$(recipe)/Dockerfile --build-arg RECIPE_DIR=recipes/$(recipe) -t biorecipes/$(recipe):latest .

export: check-recipe ## Copy recipe=NAME with a vendored shared/ into dest=DIR, standalone
	@if [ -z "$(dest)" ]; then echo "error: name a destination: make export recipe=$(recipe) dest=DIR" >&2; exit 2; fi
	bash ci/export_recipe.sh "$(recipe)" "$(dest)"

# GPU check: the device machine has python3 3.12 + torch 2.11 and no network; .whl/ travels with the working tree.
DEVICE ?= cuda
OUT ?= gpu_check_out
CHECK_PYTHON = $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))

gpu-wheels: ## Download the wheels the GPU check needs (ci/gpu_wheels.txt, Python 3.12 manylinux) into .whl/
	PYTHON="$(CHECK_PYTHON)" bash ci/gpu_wheels.sh .whl

gpu-check: ## Parity, throughput/MFU, training + resume, FP8 on a GPU (OUT=dir; DEVICE=cpu: tiny CPU dry run)
	$(CHECK_PYTHON) ci/gpu_check/run.py --device $(DEVICE) --out $(OUT)

clean: ## Remove the virtual environments and caches (keeps your outputs and data)
	rm -rf $(VENV) $(VENV_FAESM)
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
