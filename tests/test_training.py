from __future__ import annotations

import math

import numpy as np
import pytest

from models.errors import InvalidArgumentError
from models.pipeline import train_private
from models.randomness import SECURE_GENERATOR, SecureRandomness, gaussian_noise
from models.recipes import recipe_for
from models.training import default_delta, recompute_epsilon, validate_delta


def _train(digits, **overrides):
    return train_private(recipe_for("digits", "mlp", **{"epochs": 2, **overrides}), digits, progress=False)


def test_default_delta_is_a_power_of_ten_well_below_one_over_n():
    assert default_delta(59000) == pytest.approx(1e-6)
    assert default_delta(398) == pytest.approx(1e-4)
    assert default_delta(1000) == pytest.approx(1e-4)
    assert default_delta(1001) == pytest.approx(1e-5)


@pytest.mark.parametrize("delta", [0.0, 1e-2, 1 / 1257])
def test_delta_at_or_above_one_over_n_is_refused(delta):
    with pytest.raises(InvalidArgumentError, match="must be in"):
        validate_delta(delta, 1257)


def test_epsilon_is_recomputed_by_a_fresh_accountant(digits):
    trained = _train(digits, epsilon=2.0)
    record = trained.dp
    assert record.epsilon <= 2.0 + 0.05
    assert record.noise_multiplier > 0
    assert record.steps == record.epochs * round(1 / record.sample_rate)
    assert recompute_epsilon(record) == pytest.approx(record.epsilon, rel=1e-9)
    assert record.private_size == len(digits.private)
    assert record.delta == default_delta(len(digits.private))


def test_infinite_epsilon_trains_without_noise(digits):
    record = _train(digits, epsilon=math.inf).dp
    assert record.noise_multiplier == 0
    assert math.isinf(record.epsilon) and not record.private
    assert math.isinf(recompute_epsilon(record))


def _weights(trained) -> np.ndarray:
    return trained.module[1].weight.detach().numpy()


def test_private_training_cannot_be_replayed(digits):
    """Identical flags, seed included, give different weights: the noise and the batches come
    from the operating system's CSPRNG, and the record carries no seed that replays them."""
    first, second = _train(digits, epsilon=3.0, seed=7), _train(digits, epsilon=3.0, seed=7)
    assert not np.array_equal(_weights(first), _weights(second))
    for record in (first.dp, second.dp):
        assert record.secure_rng and record.claims_dp and record.replay_seed is None
        assert record.rng == SECURE_GENERATOR and record.init_seed == 7
        assert record.label.startswith("epsilon: ")


def test_replayable_noise_replays_and_is_not_called_private(digits):
    first = _train(digits, epsilon=3.0, seed=7, randomness="replayable")
    second = _train(digits, epsilon=3.0, seed=7, randomness="replayable")
    other = _train(digits, epsilon=3.0, seed=8, randomness="replayable")
    np.testing.assert_array_equal(_weights(first), _weights(second))
    assert not np.array_equal(_weights(first), _weights(other))
    record = first.dp
    assert not record.secure_rng and record.replay_seed == 7 and not record.claims_dp
    assert record.label == "epsilon: none (replayable noise)"


def test_the_non_private_baseline_replays_from_its_seed(digits):
    first, second = _train(digits, epsilon=math.inf, seed=7), _train(digits, epsilon=math.inf, seed=7)
    np.testing.assert_array_equal(_weights(first), _weights(second))
    assert first.dp.replay_seed == 7 and first.dp.label == "epsilon: inf (no DP)"


def test_noise_and_batches_come_from_the_source_not_from_torch(digits, monkeypatch):
    """Opacus' own noise generator and torch's default generator are never drawn from: making
    them raise changes nothing, and the CSPRNG is asked for both the batches and the noise."""
    import opacus.optimizers.optimizer as opacus_optimizer
    import torch

    from models import training

    def refuse(*args, **kwargs):
        raise AssertionError("Opacus drew noise from torch's generator")

    monkeypatch.setattr(opacus_optimizer, "_generate_noise", refuse)
    monkeypatch.setattr(torch, "normal", refuse)
    sources: dict[str, list[object]] = {"batches": [], "noise": []}

    def recorded(kind, function):
        def wrapper(source, *args):
            sources[kind].append(source)
            return function(source, *args)

        return wrapper

    monkeypatch.setattr(training, "poisson_mask", recorded("batches", training.poisson_mask))
    monkeypatch.setattr(training, "gaussian_noise", recorded("noise", training.gaussian_noise))
    trained = _train(digits, epsilon=3.0)
    assert len(sources["batches"]) == trained.dp.steps  # one Poisson mask per step
    assert len(sources["noise"]) == trained.dp.steps * 4  # each of the 4 parameter tensors, every step
    assert all(isinstance(source, SecureRandomness) for source in sources["batches"] + sources["noise"])


def test_secure_noise_has_the_asked_standard_deviation():
    samples = gaussian_noise(SecureRandomness(), 200_000, 0.5)
    assert abs(samples.mean()) < 0.01 and samples.std() == pytest.approx(0.5, rel=0.01)
    assert not np.array_equal(SecureRandomness().uniform(8), SecureRandomness().uniform(8))


def test_delta_override_is_validated(digits):
    with pytest.raises(InvalidArgumentError):
        _train(digits, epsilon=3.0, delta=0.5)
