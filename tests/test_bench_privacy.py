"""``hegate bench privacy --quick`` end to end on small models, and its Pareto front on known cells."""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess

import pytest
from gateway_harness import HEGATE

from bench.privacy import PATHS, Cell, _selected, pareto_optimal
from gateway.settings import BUNDLED_REPOSITORY
from models.repository import ModelRepository


def _cell(**fields) -> Cell:
    defaults = dict(
        model="m", dataset="d", architecture="mlp", path="plaintext-numba", input_encrypted=False, security="none",
        epsilon=3.0, delta=1e-5, noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.01, steps=100,
        accuracy=0.9, accuracy_low=0.9, accuracy_high=0.9, accuracy_n=100, max_logit_error=0.0,
        stated_error_bound=float("nan"), p50_ms=1.0, p95_ms=1.0, p99_ms=1.0, requests_per_second=1.0, in_flight=1,
        gateway_cpu_us=1.0, gateway_servicer_us=1.0, in_process_p50_us=1.0, in_process_served_p50_us=1.0,
        inputs_per_ciphertext=0, request_bytes=1, response_bytes=1, key_bytes=0, errors=0, seconds=1.0,
    )  # fmt: skip
    return Cell(**{**defaults, **fields})


def test_pareto_front_keeps_each_trade_and_drops_dominated_cells():
    fast = _cell(p50_ms=0.5, accuracy=0.95)
    accurate = _cell(p50_ms=2.0, accuracy=0.99)
    private = _cell(epsilon=1.0, p50_ms=2.0, accuracy=0.90)
    encrypted = _cell(path="encrypted-standard", input_encrypted=True, p50_ms=60.0, accuracy=0.95)
    dominated = _cell(p50_ms=1.0, accuracy=0.94)  # slower and less accurate than ``fast``, same privacy
    other_dataset = _cell(dataset="e", p50_ms=100.0, accuracy=0.5)  # compared only with its own dataset
    cells = [fast, accurate, private, encrypted, dominated, other_dataset]
    assert pareto_optimal(cells) == [True, True, True, True, False, True]


def test_quick_takes_the_first_model_of_each_dataset_unless_told():
    args = argparse.Namespace(models=None, quick=True)
    assert _selected(args, ModelRepository(BUNDLED_REPOSITORY)) == ["breast-cancer-linear-eps3", "mnist-cnn-eps1"]
    args.quick = False
    assert len(_selected(args, ModelRepository(BUNDLED_REPOSITORY))) == len(ModelRepository(BUNDLED_REPOSITORY).names())
    args.models = ["mnist-mlp-eps3"]
    assert _selected(args, ModelRepository(BUNDLED_REPOSITORY)) == ["mnist-mlp-eps3"]


@pytest.fixture(scope="module")
def sweep(trained_repo, tmp_path_factory):
    """The quick sweep over two digits models (cnn, mlp at epsilon 3) and the breast-cancer model,
    every path in one gateway."""
    root = tmp_path_factory.mktemp("privacy")
    repository = root / "repository"
    shutil.copytree(trained_repo, repository)
    shutil.copytree(BUNDLED_REPOSITORY / "breast-cancer-linear-eps3", repository / "breast-cancer-linear-eps3")
    out = root / "out"
    names = sorted(ModelRepository(repository).names())  # --quick alone would take one model per dataset
    command = [str(HEGATE), "bench", "privacy", "--repo", str(repository), "--quick", "--out", str(out), "--models"]
    command += names
    result = subprocess.run([*command, "--no-progress"], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return repository, out, result.stdout


def test_every_model_is_measured_on_every_path(sweep):
    repository, out, stdout = sweep
    cells = json.loads((out / "privacy.json").read_text())["cells"]
    names = sorted(ModelRepository(repository).names())
    assert sorted((c["model"], c["path"]) for c in cells) == sorted((n, p) for n in names for p in PATHS)
    with (out / "privacy.csv").open() as file:
        assert len(list(csv.DictReader(file))) == len(cells)
    assert all(c["errors"] == 0 and c["p50_ms"] > 0 and c["requests_per_second"] > 0 for c in cells)
    assert "| model | epsilon | path |" in stdout
    assert "## The two plaintext backends, in one gateway" in stdout
    backends = stdout.split("## The two plaintext backends, in one gateway")[1].split("\n## ")[0]
    table = [line for line in backends.splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1  # the header and the rows have the same columns
    assert "## What circuit privacy costs (against the standard profile)" in stdout
    assert "one started here with its defaults" in json.loads((out / "privacy.json").read_text())["gateway"]
    for png in ("privacy-accuracy.png", "privacy-pareto.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plaintext_paths_reproduce_the_manifest_accuracy_and_record_the_dp_budget(sweep):
    """Both plaintext backends, through the gateway, score exactly what the manifest recorded for the
    int8 model on the whole test set; every epsilon printed is the accountant's, with its record."""
    repository, out, _ = sweep
    cells = json.loads((out / "privacy.json").read_text())["cells"]
    for cell in cells:
        manifest = ModelRepository(repository).get(cell["model"]).manifest
        assert (cell["epsilon"], cell["delta"], cell["steps"]) == (
            manifest.dp.epsilon,
            manifest.dp.delta,
            manifest.dp.steps,
        )
        if not cell["input_encrypted"]:
            assert cell["accuracy"] == pytest.approx(manifest.metrics.int8_accuracy, abs=1e-12)
            assert cell["accuracy_n"] == manifest.metrics.test_size
            assert cell["key_bytes"] == 0 and cell["security"].startswith("none")
            assert 0 < cell["in_process_p50_us"] < cell["in_process_served_p50_us"]  # the call < decode, call, encode
            # the gateway does more than its servicer, which does more than the backend
            assert cell["gateway_cpu_us"] > cell["gateway_servicer_us"] > cell["in_process_p50_us"]
            assert cell["max_logit_error"] < 1e-2  # numba within its float32 bound of onnxruntime (0 for uint8)


def test_encrypted_paths_state_their_sample_interval_and_cost(sweep):
    _, out, _ = sweep
    cells = json.loads((out / "privacy.json").read_text())["cells"]
    by = {(c["model"], c["path"]): c for c in cells}
    for (model, path), cell in by.items():
        if not cell["input_encrypted"]:
            continue
        assert cell["accuracy_n"] == 8  # the quick sample
        assert cell["accuracy_low"] <= cell["accuracy"] <= cell["accuracy_high"]
        assert cell["accuracy_high"] - cell["accuracy_low"] > 0.1  # eight inputs cannot pin accuracy down
        assert cell["security"].startswith("128-bit CKKS") and cell["key_bytes"] > 0
        assert 0 < cell["max_logit_error"] <= cell["stated_error_bound"]
        standard = by[(model, "encrypted-standard")]
        if path == "encrypted-high":  # the finer profile costs more keys and bytes than the standard one
            assert cell["key_bytes"] > standard["key_bytes"]
            assert cell["response_bytes"] > standard["response_bytes"]
        if path == "encrypted-circuit-private":  # two primes a level, a public key, a flood in the logits
            assert "circuit-private" in cell["security"] and "circuit-private" not in standard["security"]
            assert cell["key_bytes"] > by[(model, "encrypted-high")]["key_bytes"]
