"""The BSGS diagonal product on real ciphertexts against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal.sealapi as seal

from gateway.he.linear import EncodedLinear, plan_matrix, plan_replicated
from gateway.he.params import MAX_MODULUS_BITS, CkksParameters, choose_parameters
from models.errors import InvalidArgumentError

SLOTS = 4096


@pytest.fixture(scope="module")
def keys():
    params = choose_parameters(depth=2, slots_needed=SLOTS, value_bound=100)
    context = params.seal_context
    generator = seal.KeyGenerator(context)
    return params, context, generator


def _encrypt(params, context, generator, lanes: np.ndarray) -> seal.Ciphertext:
    """``lanes[l]`` is lane ``l``'s virtual vector; slot ``p * len(lanes) + l`` holds ``lanes[l, p]``."""
    plaintext = seal.Plaintext()
    seal.CKKSEncoder(context).encode(np.asarray(lanes).T.ravel().tolist(), 2.0**params.scale_bits, plaintext)
    ciphertext = seal.Ciphertext()
    seal.Encryptor(context, generator.secret_key()).encrypt_symmetric(plaintext, ciphertext)
    return ciphertext


def _decrypt(context, generator, ciphertext) -> np.ndarray:
    plaintext = seal.Plaintext()
    seal.Decryptor(context, generator.secret_key()).decrypt(ciphertext, plaintext)
    return np.array(seal.CKKSEncoder(context).decode_double(plaintext))


def _run(keys, matrix, bias, xs, period=None, output_scale=None):
    """Evaluate on one input per lane (``xs``: [lanes, cols]); returns the plan and each lane's virtual vector."""
    params, context, generator = keys
    xs = np.atleast_2d(xs)
    lanes, virtual = len(xs), params.slots // len(xs)
    if period:
        plan = plan_replicated(matrix, bias, slots=virtual, period=period)
    else:
        plan = plan_matrix(matrix, bias, slots=virtual)
    packed = np.zeros((lanes, virtual))
    for lane, x in enumerate(xs):
        packed[lane, : len(x)] = x
        if period:
            packed[lane] = np.tile(packed[lane, :period], virtual // period)
    encoded = EncodedLinear(
        plan,
        context=context,
        parms_id=context.first_parms_id(),
        lanes=lanes,
        input_scale=2.0**params.scale_bits,
        output_scale=output_scale,
    )
    galois = seal.GaloisKeys()
    generator.create_galois_keys(params.galois_elements(sorted(encoded.rotation_steps)), galois)
    result = encoded.evaluate(seal.Evaluator(context), _encrypt(params, context, generator, packed), galois)
    assert result.scale == encoded.output_scale
    return plan, _decrypt(context, generator, result).reshape(virtual, lanes).T


def test_dense_matrix_matches_numpy(keys):
    rng = np.random.default_rng(0)
    matrix, bias, x = rng.normal(size=(13, 37)), rng.normal(size=13), rng.normal(size=37)
    plan, y = _run(keys, matrix, bias, x)
    np.testing.assert_allclose(y[0, :13], matrix @ x + bias, atol=1e-4)
    assert plan.products == 13 + 37 - 1
    assert plan.rotations < plan.products / 3  # baby/giant split, not one rotation per diagonal


def test_banded_matrix_needs_few_rotations(keys):
    rng = np.random.default_rng(1)
    matrix = np.zeros((64, 64))
    for offset in (0, 1, 2, 8):
        matrix[np.arange(64 - offset), np.arange(offset, 64)] = rng.normal(size=64 - offset)
    x = rng.normal(size=64)
    plan, y = _run(keys, matrix, None, x)
    np.testing.assert_allclose(y[0, :64], matrix @ x, atol=1e-4)
    assert plan.products == 4 and plan.rotations <= 3


def test_replicated_layout_needs_one_product_per_output_row(keys):
    """A 13x37 layer on an input repeated every 64 slots: 16 diagonals, the result repeats every 16."""
    rng = np.random.default_rng(2)
    matrix, bias, x = rng.normal(size=(13, 37)), rng.normal(size=13), rng.normal(size=37)
    plan, y = _run(keys, matrix, bias, x, period=64)
    expected = np.zeros(16)
    expected[:13] = matrix @ x + bias
    np.testing.assert_allclose(y[0], np.tile(expected, y.shape[1] // 16), atol=1e-4)
    assert plan.products == 16 and plan.fold_steps == [16, 32] and plan.output_period == 16


def test_lanes_carry_independent_inputs_at_the_cost_of_one(keys):
    """Eight inputs interleaved in one ciphertext: each lane gets its own product, nothing mixes."""
    rng = np.random.default_rng(3)
    matrix, bias, xs = rng.normal(size=(13, 37)), rng.normal(size=13), rng.normal(size=(8, 37))
    single, _ = _run(keys, matrix, bias, xs[:1], period=64)
    plan, y = _run(keys, matrix, bias, xs, period=64)
    np.testing.assert_allclose(y[:, :13], xs @ matrix.T + bias, atol=1e-4)
    assert (plan.products, plan.rotations) == (single.products, single.rotations)


def test_output_scale_can_be_lowered_for_the_last_layer(keys):
    rng = np.random.default_rng(4)
    matrix, x = rng.normal(size=(13, 37)), rng.normal(size=37)
    _, y = _run(keys, matrix, None, x, output_scale=2.0**24)
    np.testing.assert_allclose(y[0, :13], matrix @ x, atol=1e-3)


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


def test_parameters_are_chosen_from_depth_width_and_value_range():
    params = choose_parameters(depth=3, slots_needed=4096, value_bound=10_000)
    # the first prime holds |values| < 2**14 at the 2**24 result scale, with a sign and a margin bit
    assert params.coeff_modulus_bits == [40, 44, 44, 44, 44] and params.poly_modulus_degree == 8192
    assert params.depth == 3 and sum(params.coeff_modulus_bits) <= MAX_MODULUS_BITS[8192]
    assert choose_parameters(depth=3, slots_needed=100, value_bound=1e6).coeff_modulus_bits[0] == 46
    assert choose_parameters(depth=3, slots_needed=5000, value_bound=100).poly_modulus_degree == 16384
    assert choose_parameters(depth=8, slots_needed=100, value_bound=100).poly_modulus_degree == 16384
    with pytest.raises(InvalidArgumentError, match="within 128-bit security"):
        choose_parameters(depth=40, slots_needed=4096, value_bound=100)
    with pytest.raises(InvalidArgumentError, match="first prime"):
        choose_parameters(depth=2, slots_needed=4096, value_bound=1e12)
