# Two entry points that set everything up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CORE_STAMP := $(VENV)/.installed-core
DEV_STAMP := $(VENV)/.installed-dev
SYSTEM_STAMP := $(VENV)/.installed-system
SYSTEM_PACKAGES := redis-server nginx  # Debian packages named like the binaries the tests start
APT_GET ?= apt-get

.PHONY: serve test demo models protos bench-pipeline bench-kernels bench-encrypted bench-gateway bench-privacy bench-peer bench-audit bench-hostile bench-keys bundled clean

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

# The gateway on the bundled models: 127.0.0.1:8001 (gRPC), metrics on 8002; Ctrl-C stops it.
serve: $(CORE_STAMP)
	$(BIN)/hegate serve

# What the tests start besides Python: redis-server (the shared key store) and nginx (two replicas behind it).
# Installed with apt-get when a binary is missing (as root, or through sudo); nothing to do when both are there.
$(SYSTEM_STAMP):
	@missing=""; \
	for binary in $(SYSTEM_PACKAGES); do \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v $$binary >/dev/null 2>&1 || missing="$$missing $$binary"; \
	done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then sudo=""; \
	  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	  else echo "make: the tests need$$missing: run 'apt-get install$$missing' as root (or give this user sudo)" >&2; exit 1; fi; \
	  echo "installing$$missing with apt-get"; \
	  $$sudo $(APT_GET) update -qq && \
	  $$sudo env DEBIAN_FRONTEND=noninteractive $(APT_GET) install -y -qq --no-install-recommends $$missing || exit 1; \
	fi
	@mkdir -p $(@D) && touch $@

test: $(DEV_STAMP) $(SYSTEM_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

# Starts a gateway, sends one encrypted and one plaintext MNIST request, stops it.
demo: $(CORE_STAMP)
	$(BIN)/python -m gateway.demo

models: $(CORE_STAMP)
	$(BIN)/hegate models

# Regenerates gateway/api from protos/*.proto (a test fails when they are stale).
protos: $(DEV_STAMP)
	$(BIN)/python protos/generate.py

bench-pipeline: $(DEV_STAMP)
	$(BIN)/python -m bench.pipeline

bench-kernels: $(DEV_STAMP)
	$(BIN)/python -m bench.kernels

bench-encrypted: $(DEV_STAMP)
	$(BIN)/python -m bench.encrypted --images 10000

bench-gateway: $(DEV_STAMP)
	$(BIN)/python -m bench.gateway

# Every bundled model on every path (plaintext onnxruntime/numba, CKKS standard/high/circuit_private), one gateway: table, CSV, JSON, plots
bench-privacy: $(DEV_STAMP)
	$(BIN)/hegate bench privacy

# hegate beside MLServer (its own environment, .venv-mlserver, made from PyPI on first use; ~2 min)
bench-peer: $(DEV_STAMP)
	$(BIN)/python -m bench.peer

# One hostile peer per attack on each port: gateway RSS, other clients' p50/p99; fast path against main's (~25 min)
bench-hostile: $(DEV_STAMP)
	$(BIN)/python -m bench.hostile

# The key tier (issue 15): workers' memory per key set (2 and 4 workers), encrypted throughput with 20 clients'
# keys against 515c763, cold loads from Redis, locality behind nginx (~10 min; parts 3-4 need redis-server, nginx)
bench-keys: $(DEV_STAMP)
	$(BIN)/python -m bench.keys

# Membership-inference audit of every bundled model (loss and offline LiRA, 8 shadow models each, ~30 min),
# then the one-run audit's empirical epsilon of each (one training run with 5,000 canaries, 1-2 min each),
# recorded in each model's manifest.json (model.onnx does not change)
bench-audit: $(DEV_STAMP)
	$(BIN)/python -m bench.audit --write-manifests

# Retrain every bundled model (about 10 minutes); these are the commands their manifests record.
# The non-private baselines clip looser (with no noise, the DP recipes' tight clip only slows them).
TRAIN_BUNDLED := $(BIN)/hegate train --out models/bundled --quiet --delta 1e-5 --dataset mnist
bundled: $(DEV_STAMP)
	for eps in 1 3 8; do $(TRAIN_BUNDLED) --arch cnn --epsilon $$eps || exit 1; done
	$(TRAIN_BUNDLED) --arch cnn --epsilon inf --max-grad-norm 1 --lr 2
	for eps in 1 3 8; do $(TRAIN_BUNDLED) --arch mlp --epsilon $$eps || exit 1; done
	$(TRAIN_BUNDLED) --arch mlp --epsilon inf --max-grad-norm 10 --lr 0.2 --epochs 40
	$(BIN)/hegate train --out models/bundled --quiet --dataset breast_cancer --arch linear --epsilon 3

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
