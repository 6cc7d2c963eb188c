"""The numpy reference (kernels.arithmetic, kernels.reference) against onnxruntime, one operator at a time.

These pin down onnxruntime's rounding as documented in kernels/arithmetic.py: if a formula there
were wrong (multiply instead of divide, clamp after rounding, add the zero point after rounding,
float instead of integer global pooling...), a test here fails.
"""

from __future__ import annotations

import numpy as np
import pytest

from kernels import arithmetic, reference
from kernels.compiler import compile_model
from kernels.testing import QdqGraph, onnxruntime_deviation_bound, random_weights
from models import onnx_runtime
from models.quantization import QuantParams


def _ort(model, x: np.ndarray) -> np.ndarray:
    return onnx_runtime.predict_logits(onnx_runtime.create_session(model.SerializeToString()), x)


def _assert_reference_matches_ort(graph: QdqGraph, x: np.ndarray) -> np.ndarray:
    model = graph.build()
    expected = _ort(model, x)
    got = reference.run(compile_model(model), x)
    np.testing.assert_array_equal(got, expected)
    return got


def test_quantize_divides_rounds_half_to_even_and_maps_nan_to_zero():
    params = QuantParams(0.02, 37)
    x = np.concatenate(
        [
            [np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0, -0.0],
            (np.arange(-300, 300) * np.float32(0.01)),  # x / 0.02 lands on many exact .5 ties
            np.random.default_rng(0).standard_normal(400) * 3,
        ]
    ).astype(np.float32)[None, :]
    graph = QdqGraph([x.shape[1]], params)
    got = _assert_reference_matches_ort(graph, x)
    q = arithmetic.quantize(x, params.scale, params.zero_point)
    assert q[0, 0] == 0 and q[0, 1] == 255 and q[0, 2] == 0  # NaN -> 0, +inf -> 255, -inf -> 0
    multiplied = np.clip(np.rint(x * np.float32(1 / params.scale)) + params.zero_point, 0, 255)
    assert not np.array_equal(multiplied[0, 7:], q[0, 7:]), "dividing must differ from multiplying by 1/scale"
    assert got.shape == x.shape


@pytest.mark.parametrize(
    ("in_shape", "out_channels", "kernel", "strides", "pads"),
    [
        ((1, 28, 28), 33, (7, 7), (1, 1), (3, 3, 3, 3)),
        ((3, 11, 9), 5, (3, 2), (2, 1), (1, 0, 2, 1)),
        ((2, 13, 13), 7, (5, 5), (3, 3), (2, 2, 2, 2)),
    ],
)
def test_conv_requantizes_with_one_float32_multiplier(in_shape, out_channels, kernel, strides, pads):
    rng = np.random.default_rng(1)
    graph = QdqGraph(list(in_shape), QuantParams(0.013, 120))
    weight = random_weights(rng, (out_channels, in_shape[0], *kernel))
    graph.conv(
        weight, rng.uniform(0.002, 0.01, out_channels), rng.integers(-5000, 5000, out_channels), QuantParams(0.03, 100),
        strides=strides, pads=pads,
    ).flatten()  # fmt: skip
    x = rng.uniform(-1.6, 1.8, (8, *in_shape)).astype(np.float32)
    got = _assert_reference_matches_ort(graph, x)
    codes = np.rint(got / np.float32(0.03)) + 100
    assert (codes == 0).any() and (codes == 255).any(), "the case must saturate both ways"


@pytest.mark.parametrize("trans_b", [True, False])
def test_gemm_matches_qgemm(trans_b):
    rng = np.random.default_rng(2)
    graph = QdqGraph([37], QuantParams(0.05, 7))
    graph.gemm(
        random_weights(rng, (10, 37)),
        rng.uniform(0.0005, 0.02, 10),
        rng.integers(-900, 900, 10),
        QuantParams(0.4, 131),
        trans_b=trans_b,
    )
    _assert_reference_matches_ort(graph, rng.uniform(-0.4, 12, (33, 37)).astype(np.float32))


def test_float_output_gemm_scales_the_int32_sums_directly():
    rng = np.random.default_rng(7)
    graph = QdqGraph([37], QuantParams(0.05, 7))
    graph.gemm(random_weights(rng, (10, 37)), rng.uniform(0.0005, 0.02, 10), rng.integers(-900, 900, 10), None)
    _assert_reference_matches_ort(graph, rng.uniform(-0.4, 12, (33, 37)).astype(np.float32))


@pytest.mark.parametrize("output_scale", [0.05, 1e-9])
def test_square_adds_the_zero_point_before_rounding_and_wraps_past_int32(output_scale):
    rng = np.random.default_rng(3)
    graph = QdqGraph([300], QuantParams(0.031, 91)).square(QuantParams(output_scale, 3))
    x = rng.uniform(-4, 6, (16, 300)).astype(np.float32)
    got = _assert_reference_matches_ort(graph, x)
    if output_scale < 1e-6:  # products beyond 2**31 come out as code 0, not 255
        codes = np.rint(got / np.float32(output_scale)) + 3
        assert (codes == 0).sum() > 1000 and (codes == 255).any()


@pytest.mark.parametrize("zero_point", [0, 9])
def test_relu_is_a_float_operator(zero_point):
    rng = np.random.default_rng(4)
    graph = QdqGraph([300], QuantParams(0.03, 100)).relu(QuantParams(0.02, zero_point))
    _assert_reference_matches_ort(graph, rng.uniform(-4, 6, (16, 300)).astype(np.float32))


@pytest.mark.parametrize(
    ("shape", "kernel", "strides", "pads", "count_include_pad"),
    [
        ((33, 28, 28), (4, 4), (4, 4), (0, 0, 0, 0), False),
        ((3, 9, 11), (3, 2), (2, 3), (1, 0, 1, 1), False),
        ((3, 9, 11), (3, 3), (2, 2), (1, 1, 1, 1), True),
        ((5, 7, 7), (7, 7), (1, 1), (0, 0, 0, 0), False),
    ],
)
def test_average_pool_sums_float32_in_window_order(shape, kernel, strides, pads, count_include_pad):
    rng = np.random.default_rng(5)
    graph = QdqGraph(list(shape), QuantParams(0.037, 13))
    graph.avg_pool(kernel, QuantParams(0.011, 55), strides=strides, pads=pads, count_include_pad=count_include_pad)
    _assert_reference_matches_ort(graph.flatten(), rng.uniform(-0.4, 4, (16, *shape)).astype(np.float32))


def test_whole_image_average_pool_takes_onnxruntimes_integer_path():
    """A window covering the image is summed in int32; seed 3133 (found by search) is a tie where
    the float32 path of the general case would round the other way."""
    rng = np.random.default_rng(3133)
    source = QuantParams(float(np.float32(rng.uniform(0.001, 0.1))), int(rng.integers(0, 256)))
    target = QuantParams(float(np.float32(source.scale * rng.uniform(0.02, 0.5))), int(rng.integers(0, 256)))
    q = rng.integers(0, 256, (1, 16, 7, 7)).astype(np.uint8)
    x = arithmetic.dequantize(q, source.scale, source.zero_point)
    got = _assert_reference_matches_ort(QdqGraph([16, 7, 7], source).avg_pool((7, 7), target).flatten(), x)
    table = arithmetic.dequantize_table(source.scale, source.zero_point)
    total = np.zeros((1, 16), np.float32)
    for h in range(7):
        for w in range(7):
            total = (total + table[q[:, :, h, w]]).astype(np.float32)
    float_path = arithmetic.pool_quantize((total / np.float32(49)).astype(np.float32), target.scale, target.zero_point)
    assert (arithmetic.dequantize(float_path, target.scale, target.zero_point) != got).sum() == 1


def test_dequantize_table_matches_elementwise_dequantize():
    table = arithmetic.dequantize_table(0.0371, 201)
    np.testing.assert_array_equal(table, arithmetic.dequantize(np.arange(256, dtype=np.uint8), 0.0371, 201))


# ---- uint16 activations (A16W8) -------------------------------------------------------------
# onnxruntime runs these in float32: the quantize and the square are its float formulas, bit for
# bit; the Gemms are exact integer sums, held to integer numpy and to onnxruntime within the
# bound of kernels.testing.onnxruntime_deviation_bound.

INPUT16 = QuantParams(0.0007, 30001, bits=16)


def _ties(x: np.ndarray, scale: float) -> int:
    v = (x[np.isfinite(x)] / np.float32(scale)).astype(np.float32)
    return int((v - np.floor(v) == 0.5).sum())


def test_quantize16_is_the_8_bit_formula_with_65535():
    x = np.concatenate(
        [
            [np.nan, np.inf, -np.inf, 1e30, -1e30, 0.0, -0.0],
            np.arange(-30000, 30000) * np.float32(INPUT16.scale / 2),  # x / scale: 25,000 exact .5 ties
            np.random.default_rng(20).standard_normal(20000) * 30,  # beyond [-21.0, 24.9] both ways
        ]
    ).astype(np.float32)[None, :]
    assert _ties(x, INPUT16.scale) > 20000
    got = _assert_reference_matches_ort(QdqGraph([x.shape[1]], INPUT16), x)  # Q(uint16) -> DQ output
    q = arithmetic.quantize(x, INPUT16.scale, INPUT16.zero_point, bits=16)
    assert q.dtype == np.uint16
    assert q[0, 0] == 0 and q[0, 1] == 65535 and q[0, 2] == 0  # NaN -> 0, +inf -> 65535, -inf -> 0
    assert (q == 0).sum() > 100 and (q == 65535).sum() > 100
    np.testing.assert_array_equal(got, arithmetic.dequantize(q, INPUT16.scale, INPUT16.zero_point))
    multiplied = np.clip(np.rint(x[0, 7:] * np.float32(1 / INPUT16.scale)) + INPUT16.zero_point, 0, 65535)
    assert not np.array_equal(multiplied, q[0, 7:]), "dividing must differ from multiplying by 1/scale"


@pytest.mark.parametrize(
    "output", [QuantParams(3e-5, 0, bits=16), QuantParams(0.01, 100, bits=16), QuantParams(1e-9, 7, bits=16)]
)
def test_square16_is_the_float32_square_not_qlinearmul(output):
    rng = np.random.default_rng(21)
    graph = QdqGraph([4000], INPUT16).square(output)
    x = rng.uniform(-25, 25, (16, 4000)).astype(np.float32)
    got = _assert_reference_matches_ort(graph, x)
    q = arithmetic.quantize(x, INPUT16.scale, INPUT16.zero_point, bits=16)
    d = q.astype(np.int64) - INPUT16.zero_point
    codes = arithmetic.quantize(got, output.scale, output.zero_point, bits=16)
    integer = np.clip(
        np.rint((d * d).astype(np.float32) * arithmetic.square_ratio(INPUT16.scale, output.scale) + output.zero_point),
        0,
        65535,
    )
    if output.scale < 1e-6:  # saturates: squares past 2**31 still give 65535, not 0
        assert (codes == 65535).mean() > 0.9
    else:
        assert (codes != integer).any(), "QLinearMul's formula (ratio, zero point before rounding) differs"


def _integer_gemm(q: np.ndarray, zero_point: int, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    return (q.reshape(len(q), -1).astype(np.int64) - zero_point) @ weight.astype(np.int64).T + bias.astype(np.int64)


def _assert_within_bound_of_ort(model, x: np.ndarray) -> np.ndarray:
    plan = compile_model(model)
    got = reference.run(plan, x)
    expected = _ort(model, x)
    bound = onnxruntime_deviation_bound(plan, x)
    assert plan.has_16_bit and bound.max() > 0
    assert (np.abs(got.astype(np.float64) - expected) <= bound).all()
    return got


@pytest.mark.parametrize("square", [False, True])
def test_gemm_from_uint8_to_uint16_is_exact_integer(square):
    rng = np.random.default_rng(22)
    source = QuantParams(0.05, 7)
    output = QuantParams(float(np.float32(350 / 65535)), 37449, bits=16)  # [-200, 150] of [-290, 202]
    squared = QuantParams(float(np.float32(30000 / 65535)), 0, bits=16)  # [0, 30000] of [0, 84000]
    weight, weight_scale, bias = (
        random_weights(rng, (24, 300)),
        rng.uniform(0.0005, 0.02, 24),
        rng.integers(-9e4, 9e4, 24),
    )
    graph = QdqGraph([300], source).gemm(weight, weight_scale, bias, output)
    if square:
        graph.square(squared)
    x = rng.uniform(-0.4, 12, (64, 300)).astype(np.float32)
    got = _assert_within_bound_of_ort(graph.build(), x)
    acc = _integer_gemm(arithmetic.quantize(x, source.scale, source.zero_point), source.zero_point, weight, bias)
    multiplier = arithmetic.requant_multiplier(source.scale, weight_scale, output.scale)
    codes = arithmetic.requantize(acc, multiplier, output.zero_point, bits=16)
    assert (codes == 0).any() and (codes == 65535).any(), "the case must saturate both ways"
    # one rounding of the exact result: within half a code of it, plus float32's relative error
    exact = acc * (np.float64(source.scale) * weight_scale.astype(np.float32)) / output.scale
    low, high = -output.zero_point, 65535 - output.zero_point
    deviation = codes.astype(np.float64) - output.zero_point - np.clip(exact, low, high)
    assert np.abs(deviation).max() <= 0.5 + 4 * 2.0**-24 * high
    if square:
        codes = arithmetic.float_square(codes, output.scale, output.zero_point, squared.scale, squared.zero_point)
        assert (codes == 65535).any()
        output = squared
    np.testing.assert_array_equal(got, arithmetic.dequantize(codes, output.scale, output.zero_point))


def test_gemm_from_uint16_to_uint16_and_to_float_is_exact_integer():
    rng = np.random.default_rng(23)
    hidden = QuantParams(float(np.float32(24 / 65535)), 32768, bits=16)  # [-12, 12] of [-24, 25]
    w1, s1, b1 = random_weights(rng, (40, 57)), rng.uniform(0.0005, 0.002, 40), rng.integers(-9e5, 9e5, 40)
    w2, s2, b2 = random_weights(rng, (10, 40)), rng.uniform(0.0005, 0.002, 10), rng.integers(-9e5, 9e5, 10)
    graph = QdqGraph([57], INPUT16).gemm(w1, s1, b1, hidden).gemm(w2, s2, b2, None)
    x = rng.uniform(-21, 24, (64, 57)).astype(np.float32)
    got = _assert_within_bound_of_ort(graph.build(), x)
    q = arithmetic.quantize(x, INPUT16.scale, INPUT16.zero_point, bits=16)
    multiplier = arithmetic.requant_multiplier(INPUT16.scale, s1, hidden.scale)
    h = arithmetic.requantize(_integer_gemm(q, INPUT16.zero_point, w1, b1), multiplier, hidden.zero_point, bits=16)
    assert (h == 0).any() and (h == 65535).any(), "the hidden layer must saturate both ways"
    scale = (np.float32(hidden.scale) * s2.astype(np.float32)).astype(np.float32)
    logits = _integer_gemm(h, hidden.zero_point, w2, b2).astype(np.int32).astype(np.float32) * scale
    np.testing.assert_array_equal(got, logits)
