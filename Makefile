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
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

models: $(CORE_STAMP)
	$(BIN)/hegate models

bench-pipeline: $(DEV_STAMP)
	$(BIN)/python -m bench.pipeline

# Retrain every bundled model; these are the commands their manifests record.
TRAIN_BUNDLED := $(BIN)/hegate train --out models/bundled --quiet
bundled: $(DEV_STAMP)
	for eps in 1 3 8 inf; do for arch in cnn mlp; do \
		$(TRAIN_BUNDLED) --dataset mnist --arch $$arch --epsilon $$eps --delta 1e-5 || exit 1; done; done
	$(TRAIN_BUNDLED) --dataset breast_cancer --arch mlp --epsilon 3

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
