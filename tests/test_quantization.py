from __future__ import annotations

import numpy as np
import pytest

from models.errors import InvalidArgumentError
from models.layers import Dense, Flatten, Square
from models.quantization import INT8_MAX, QuantParams, quantize_network, quantize_weights


def test_range_always_contains_zero_exactly():
    params = QuantParams.from_range(0.5, 3.0)
    assert params.zero_point == 0
    assert params.dequantize(params.quantize(np.array([0.0])))[0] == 0.0
    negative = QuantParams.from_range(-2.0, -1.0)
    assert negative.zero_point == 255


def test_quantize_rounds_half_to_even_and_saturates():
    params = QuantParams(scale=1.0, zero_point=0)
    np.testing.assert_array_equal(params.quantize(np.array([0.5, 1.5, 2.5, -3.0, 300.0])), [0, 2, 2, 0, 255])


def test_non_finite_calibration_is_refused():
    with pytest.raises(InvalidArgumentError, match="not finite"):
        QuantParams.from_range(0.0, float("inf"))


def test_weights_are_symmetric_per_output_channel():
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(4, 9)).astype(np.float32) * np.array([[1e-3], [1.0], [10.0], [0.0]], np.float32)
    q, scale = quantize_weights(weight)
    assert q.dtype == np.int8
    assert np.abs(q[:3]).max(axis=1).tolist() == [INT8_MAX] * 3
    assert (q[3] == 0).all()
    reconstructed = q * scale[:, None]
    assert (np.abs(reconstructed - weight) <= scale[:, None] / 2 * 1.0001).all()


def test_extreme_weights_saturate_to_int8_range():
    weight = np.array([[-1e30, 1e30, 0.0]], np.float32)
    q, _ = quantize_weights(weight)
    assert q.tolist() == [[-INT8_MAX, INT8_MAX, 0]]
    assert INT8_MAX == 63  # reduce range: no int16 saturation in onnxruntime's AVX2 kernels


def _dense(out: int, inp: int) -> Dense:
    return Dense(np.ones((out, inp), np.float32), np.zeros(out, np.float32))


def test_quantize_network_needs_one_range_per_layer():
    layers = [Flatten(), _dense(4, 3), Square(), _dense(2, 4)]
    with pytest.raises(InvalidArgumentError, match="need 5 calibration ranges"):
        quantize_network(layers, [(0.0, 1.0)] * 4)
    network = quantize_network(layers, [(0.0, 1.0)] * 5)
    assert network.layers[0].output is None  # flatten passes its input's parameters through
    assert network.layers[1].bias_q.dtype == np.int32
    assert network.layers[2].output is not None
    assert network.layers[3].output is None  # float logits, not requantized


def test_network_must_end_with_a_weighted_layer():
    with pytest.raises(InvalidArgumentError, match="last layer must be dense or conv, got Square"):
        quantize_network([_dense(2, 3), Square()], [(0.0, 1.0)] * 3)


def test_sixteen_bit_parameters_cover_the_range_on_a_finer_grid():
    wide, narrow = QuantParams.from_range(-1.0, 3.0, 16), QuantParams.from_range(-1.0, 3.0)
    assert (wide.qmax, wide.dtype, narrow.qmax, narrow.dtype) == (65535, np.uint16, 255, np.uint8)
    assert wide.scale == pytest.approx(narrow.scale * 255 / 65535)
    q = wide.quantize(np.array([-5.0, 0.0, 2.0, 1e9]))
    assert q.dtype == np.uint16 and q[0] == 0 and q[-1] == 65535
    assert wide.dequantize(q)[1] == 0.0
    assert abs(wide.dequantize(q)[2] - 2.0) <= wide.scale / 2


def test_a16w8_quantizes_hidden_activations_to_uint16_and_keeps_a_uint8_input():
    layers = [Flatten(), _dense(4, 3), Square(), _dense(2, 4)]
    network = quantize_network(layers, [(0.0, 1.0)] * 5, activation_bits=16)
    assert network.input.bits == 8
    assert [ql.output.bits for ql in network.layers[1:3]] == [16, 16]
    assert network.layers[3].output is None


def test_a_bias_that_does_not_fit_int32_at_its_scale_is_refused():
    tiny_input_scale = [(0.0, 1e-9)] + [(0.0, 1.0)] * 2
    layers = [Flatten(), Dense(np.ones((2, 3), np.float32), np.full(2, 1e3, np.float32))]
    with pytest.raises(InvalidArgumentError, match="layer 1: a bias does not fit int32"):
        quantize_network(layers, tiny_input_scale)
