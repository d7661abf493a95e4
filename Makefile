# Flywheel: `make help` lists the targets.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ENV ?= local
export MLFLOW_DISABLE_TELEMETRY := true
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	@# pip's config here points at local mirrors that warn per missing package: keep the log readable
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]' 2>&1 \
		| grep -v 'is ignored: it is neither a file nor a directory' ; test $${PIPESTATUS[0]} -eq 0
	touch $(STAMP)

venv: $(STAMP) ## Create .venv and install the project with pinned dependencies

# --fresh: every `make run` tells the whole story from no champion (an earlier run's registry is
# moved to runs/earlier/); `flywheel run` without it continues from the registry's champion.
run: $(STAMP) ## Run the whole lifecycle on the embedded `local` environment, from an empty registry
	$(BIN)/flywheel run --env $(ENV) --fresh

# test-fast's pytest-xdist workers: 2 fits a 2-core laptop or runner (measured there); each worker
# collects and imports on its own (~10 s of CPU) and many tests start servers or subprocesses of
# their own, so more workers than cores only adds load. TEST_WORKERS=4 on a bigger machine, 0 for one process.
TEST_WORKERS ?= 2

test: lint $(STAMP) ## Lint (ruff, layer contracts), then run the test suite
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: lint $(STAMP) ## The inner loop: lint, then every test not marked `slow` (no pipelines, no multi-process jobs), on TEST_WORKERS=2 workers
	$(BIN)/pytest -m "not slow" -n $(TEST_WORKERS) $(PYTEST_ARGS)

lint: $(STAMP) ## ruff, and the import contracts that keep each layer off the ones above it
	$(BIN)/ruff check --quiet .
	$(BIN)/lint-imports --no-cache

check: $(STAMP) ## Validate every environment's config against the pipelines
	$(BIN)/flywheel check

compile: $(STAMP) ## Compile every pipeline for ENV (default local) into dist/ENV/
	$(BIN)/flywheel compile --env $(ENV)

render: $(STAMP) ## Regenerate the GitOps tree (manifests/) from config, then print ENV's clusters (ENV=dev|staging|prod)
	$(BIN)/flywheel render --env $(ENV) --write

bench: $(STAMP) ## Run the benchmarks (validation, training, serving under wrk, drift checks, sink ingest, batch scoring, task start-up)
	$(BIN)/python benchmarks/validation.py --sizes 10k,100k,1M
	$(BIN)/python benchmarks/training.py
	$(BIN)/python benchmarks/serving.py
	$(BIN)/python benchmarks/monitoring.py
	$(BIN)/python benchmarks/monitoring_sink.py
	$(BIN)/python benchmarks/scoring.py --rows 1M
	$(BIN)/python benchmarks/tasks.py

IMAGE_METADATA ?= dist/image-$(ENV).json
image: $(STAMP) ## Build and push ENV's pipeline image (docker buildx), then pin its digest in config/ENV.yaml
	@mkdir -p $(dir $(IMAGE_METADATA))
	@# build-args: ENV's repository:tag, and PyTorch's CUDA index when ENV trains on NVIDIA GPUs
	args="$$($(BIN)/python -m pipelines.images build-args --env $(ENV))" && \
		docker buildx build --push --metadata-file $(IMAGE_METADATA) $$args .
	$(BIN)/python -m pipelines.images pin --env $(ENV) --metadata $(IMAGE_METADATA)

clean: ## Remove generated files (keeps .venv)
	rm -rf dist runs mlruns .pytest_cache

.PHONY: help venv run test test-fast lint check compile bench render image clean
