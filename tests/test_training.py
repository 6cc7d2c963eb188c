from __future__ import annotations

import math

import numpy as np
import pytest

from models.errors import InvalidArgumentError
from models.pipeline import train_private
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


def test_training_is_deterministic_for_a_seed(digits):
    first, second = _train(digits, epsilon=3.0, seed=7), _train(digits, epsilon=3.0, seed=7)
    other = _train(digits, epsilon=3.0, seed=8)
    w1, w2, w3 = (t.module[1].weight.detach().numpy() for t in (first, second, other))
    np.testing.assert_array_equal(w1, w2)
    assert not np.array_equal(w1, w3)


def test_delta_override_is_validated(digits):
    with pytest.raises(InvalidArgumentError):
        _train(digits, epsilon=3.0, delta=0.5)
