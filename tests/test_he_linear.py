"""The BSGS diagonal product on real ciphertexts against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal.sealapi as seal

from gateway.he.client import galois_elements
from gateway.he.linear import EncodedLinear, plan_matrix, plan_replicated
from gateway.he.params import MAX_MODULUS_BITS, CkksParameters, choose_parameters
from models.errors import InvalidArgumentError

SLOTS = 4096


@pytest.fixture(scope="module")
def keys():
    params = choose_parameters(depth=2, slots_needed=SLOTS)
    context = params.seal_context
    generator = seal.KeyGenerator(context)
    return params, context, generator


def _encrypt(params, context, generator, x: np.ndarray, period: int | None = None) -> seal.Ciphertext:
    plaintext = seal.Plaintext()
    values = np.zeros(period or params.slots)
    values[: len(x)] = x
    values = np.tile(values, params.slots // len(values))
    seal.CKKSEncoder(context).encode(values.tolist(), 2.0**params.scale_bits, plaintext)
    ciphertext = seal.Ciphertext()
    seal.Encryptor(context, generator.secret_key()).encrypt_symmetric(plaintext, ciphertext)
    return ciphertext


def _decrypt(context, generator, ciphertext) -> np.ndarray:
    plaintext = seal.Plaintext()
    seal.Decryptor(context, generator.secret_key()).decrypt(ciphertext, plaintext)
    return np.array(seal.CKKSEncoder(context).decode_double(plaintext))


def _run(keys, matrix, bias, x, period=None):
    params, context, generator = keys
    if period:
        plan = plan_replicated(matrix, bias, slots=params.slots, period=period)
    else:
        plan = plan_matrix(matrix, bias, slots=params.slots)
    galois = seal.GaloisKeys()
    generator.create_galois_keys(galois_elements(sorted(plan.rotation_steps), params.poly_modulus_degree), galois)
    encoded = EncodedLinear(
        plan, context=context, parms_id=context.first_parms_id(), input_scale=2.0**params.scale_bits
    )
    result = encoded.evaluate(seal.Evaluator(context), _encrypt(params, context, generator, x, period), galois)
    return plan, _decrypt(context, generator, result)


def test_dense_matrix_matches_numpy(keys):
    rng = np.random.default_rng(0)
    matrix, bias, x = rng.normal(size=(13, 37)), rng.normal(size=13), rng.normal(size=37)
    plan, y = _run(keys, matrix, bias, x)
    np.testing.assert_allclose(y[:13], matrix @ x + bias, atol=1e-4)
    assert plan.products == 13 + 37 - 1
    assert plan.rotations < plan.products / 3  # baby/giant split, not one rotation per diagonal


def test_banded_matrix_needs_few_rotations(keys):
    rng = np.random.default_rng(1)
    matrix = np.zeros((64, 64))
    for offset in (0, 1, 2, 8):
        matrix[np.arange(64 - offset), np.arange(offset, 64)] = rng.normal(size=64 - offset)
    x = rng.normal(size=64)
    plan, y = _run(keys, matrix, None, x)
    np.testing.assert_allclose(y[:64], matrix @ x, atol=1e-4)
    assert plan.products == 4 and plan.rotations <= 3


def test_replicated_layout_needs_one_product_per_output_row(keys):
    """A 13x37 layer on an input repeated every 64 slots: 16 diagonals, the result repeats every 16."""
    rng = np.random.default_rng(2)
    matrix, bias, x = rng.normal(size=(13, 37)), rng.normal(size=13), rng.normal(size=37)
    plan, y = _run(keys, matrix, bias, x, period=64)
    expected = np.zeros(16)
    expected[:13] = matrix @ x + bias
    np.testing.assert_allclose(y, np.tile(expected, len(y) // 16), atol=1e-4)
    assert plan.products == 16 and plan.fold_steps == [16, 32] and plan.output_period == 16


def test_replicated_layout_refuses_what_does_not_fit():
    with pytest.raises(InvalidArgumentError, match="does not fit input period 32"):
        plan_replicated(np.ones((4, 40)), None, slots=SLOTS, period=32)
    with pytest.raises(InvalidArgumentError, match="widens a replicated"):
        plan_replicated(np.ones((100, 30)), None, slots=SLOTS, period=32)


def test_matrix_larger_than_the_slots_is_refused():
    with pytest.raises(InvalidArgumentError, match="does not fit"):
        plan_matrix(np.ones((3, SLOTS + 1)), None, slots=SLOTS)


def test_security_limits_match_seal():
    for degree, bits in MAX_MODULUS_BITS.items():
        assert seal.CoeffModulus.MaxBitCount(degree, seal.SEC_LEVEL_TYPE.TC128) == bits


def test_parameters_below_128_bit_security_are_refused():
    with pytest.raises(ValueError, match="exceed the 218"):
        CkksParameters(poly_modulus_degree=8192, coeff_modulus_bits=[60, 40, 40, 40, 40], scale_bits=40)


def test_parameters_are_chosen_from_depth_and_width():
    params = choose_parameters(depth=3, slots_needed=4096)
    assert (params.poly_modulus_degree, params.scale_bits, params.depth) == (8192, 38, 3)
    assert sum(params.coeff_modulus_bits) <= 218
    assert choose_parameters(depth=3, slots_needed=5000).poly_modulus_degree == 16384
    assert choose_parameters(depth=8, slots_needed=100).poly_modulus_degree == 16384  # 8192 leaves < 26 bits
    with pytest.raises(InvalidArgumentError, match="within 128-bit security"):
        choose_parameters(depth=40, slots_needed=4096)
