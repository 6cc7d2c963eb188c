# Two entry points that set everything up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORE_STAMP := $(VENV)/.installed-core
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: serve test lint models bench-pipeline bundled clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The gateway itself: core dependencies only, no torch.
$(CORE_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# Everything: training extra (torch CPU build, opacus, datasets) and the dev tools.
$(DEV_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[train,dev]'
	touch $@ $(CORE_STAMP)

serve: $(CORE_STAMP)
	$(BIN)/hegate models

test: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

models: $(CORE_STAMP)
	$(BIN)/hegate models

bench-pipeline: $(DEV_STAMP)
	$(BIN)/python -m bench.pipeline

# Retrain every bundled model with the commands recorded in their manifests (about an hour).
bundled: $(DEV_STAMP)
	$(BIN)/python -m bench.pipeline --retrain-bundled

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
