"""The models shipped in the repository: complete, valid, accounted and within the int8 budget."""

from __future__ import annotations

import json
import math

import pytest

from gateway.cli import BUNDLED_REPOSITORY
from models.manifest import MANIFEST_FILE
from models.randomness import SECURE_GENERATOR
from models.repository import ModelRepository
from models.training import recompute_epsilon

# The PRV accountant is numerical: numpy/scipy releases move its result by ~1e-9 relative, while a
# record off by one step or by 0.01% in noise, sampling rate or delta moves it by more than 5e-5.
ACCOUNTANT_REL_TOLERANCE = 1e-6

EXPECTED = {f"mnist-{arch}-eps{eps}" for arch in ("cnn", "mlp") for eps in ("1", "3", "8", "inf")} | {
    "breast-cancer-linear-eps3"
}


@pytest.fixture(scope="module")
def bundled() -> ModelRepository:
    return ModelRepository(BUNDLED_REPOSITORY)


def test_every_bundled_model_is_present(bundled):
    assert set(bundled.names()) == EXPECTED


def test_bundled_epsilons_come_from_the_accountant(bundled):
    for artifact in bundled.artifacts():
        dp = artifact.manifest.dp
        assert recompute_epsilon(dp) == pytest.approx(dp.epsilon, rel=ACCOUNTANT_REL_TOLERANCE), artifact.manifest.name
        if dp.private:
            assert dp.epsilon <= dp.target_epsilon + 0.01
            assert dp.noise_multiplier > 0
        else:
            assert math.isinf(dp.epsilon) and dp.noise_multiplier == 0
        if dp.dataset == "mnist":
            assert dp.delta == 1e-5


def test_no_bundled_private_model_carries_a_seed_that_replays_its_noise(bundled):
    """Every finite-epsilon bundled model drew its noise from the CSPRNG; only the non-private
    baselines (no noise) record the seed that replays their batches."""
    for artifact in bundled.artifacts():
        dp = artifact.manifest.dp
        raw = json.loads((artifact.directory / MANIFEST_FILE).read_text())["dp"]
        assert "seed" not in raw, artifact.manifest.name
        if dp.private:
            assert dp.secure_rng and dp.replay_seed is None and raw["replay_seed"] is None, artifact.manifest.name
            assert dp.rng == SECURE_GENERATOR and dp.claims_dp
        else:
            assert dp.replay_seed is not None and not dp.claims_dp


@pytest.mark.parametrize(
    ("field", "factor"), [("steps", None), ("noise_multiplier", 1 + 1e-4), ("sample_rate", 1 + 1e-4), ("delta", 1.001)]
)
def test_the_tolerance_still_catches_a_wrong_record(bundled, field, factor):
    dp = bundled.get("mnist-cnn-eps8").manifest.dp
    wrong = dp.model_copy(update={field: dp.steps - 1 if factor is None else getattr(dp, field) * factor})
    assert recompute_epsilon(wrong) != pytest.approx(dp.epsilon, rel=ACCOUNTANT_REL_TOLERANCE)


def test_bundled_int8_accuracy_is_within_0_3_points_of_fp32(bundled):
    for artifact in bundled.artifacts():
        metrics = artifact.manifest.metrics
        assert abs(metrics.int8_accuracy - metrics.fp32_accuracy) <= 0.003, artifact.manifest.name


def test_bundled_models_are_small_and_record_their_command(bundled):
    for artifact in bundled.artifacts():
        assert artifact.model_bytes < 400 * 1024
        assert artifact.manifest.training.command.startswith("hegate train ")
        assert f"--epsilon {artifact.manifest.name.rsplit('eps', 1)[1]}" in artifact.manifest.training.command
