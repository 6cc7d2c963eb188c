"""The numba kernels against the numpy reference: random shapes (odd sizes included), extreme
uint8/uint16/int8 values and saturated outputs, one operator (or a short chain) at a time."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import arithmetic, ops, reference
from kernels import compiler as kernel_compiler
from kernels import isa as kernel_isa
from kernels.compiler import compile_model
from kernels.executor import ONES, NumbaModel
from kernels.plan import Elementwise, Gemm
from kernels.program import PAIR_LIMIT, _pack
from kernels.testing import QdqGraph, random_weights
from models.quantization import QuantParams

SEEDS = range(8)
ISAS = kernel_isa.available()


def _extreme_inputs(rng: np.random.Generator, shape: tuple[int, ...], params: QuantParams) -> np.ndarray:
    """Floats whose codes are often exactly 0 or 255 (and a few far outside the range)."""
    codes = rng.integers(0, 256, shape)
    codes[rng.random(shape) < 0.15] = 0
    codes[rng.random(shape) < 0.15] = 255
    x = arithmetic.dequantize(codes.astype(np.uint8), params.scale, params.zero_point)
    x[rng.random(shape) < 0.02] *= np.float32(50)
    return x


def _params(rng: np.random.Generator, scale_low: float, scale_high: float) -> QuantParams:
    return QuantParams(float(np.float32(rng.uniform(scale_low, scale_high))), int(rng.integers(0, 256)))


def _assert_kernels_match_reference(graph: QdqGraph, x: np.ndarray, *, threads: int = 1) -> np.ndarray:
    """On every code path this CPU runs (AVX2, and VNNI where it has it): each one bit for bit.

    With ``threads=2`` every batch of two rows or more is split across both threads.
    """
    plan = compile_model(graph.build())
    expected = reference.run(plan, x)
    for isa in ISAS:
        split = {"parallel_min_macs": 1} if threads > 1 else {}
        got = NumbaModel(plan, threads=threads, isa=isa, **split).predict_logits(x)
        np.testing.assert_array_equal(got, expected, err_msg=f"{isa} path")
    return got


def _saturation(got: np.ndarray, params: QuantParams) -> tuple[float, float]:
    codes = np.rint(got / np.float32(params.scale)) + params.zero_point
    return float((codes == 0).mean()), float((codes == 255).mean())


@pytest.mark.parametrize("seed", SEEDS)
def test_gemm_random_shapes(seed):
    rng = np.random.default_rng(seed)
    k, n, batch = int(rng.integers(1, 300)), int(rng.integers(1, 70)), int(rng.integers(1, 14))
    source = _params(rng, 0.01, 0.1)
    output = _params(rng, 0.05, 2.0)
    graph = QdqGraph([k], source)
    graph.gemm(random_weights(rng, (n, k)), rng.uniform(0.001, 0.02, n), rng.integers(-20000, 20000, n), output)
    activation = seed % 3
    if activation == 1:
        graph.square(_params(rng, 0.5, 50))
    elif activation == 2:
        graph.relu(_params(rng, 0.05, 2.0))
    _assert_kernels_match_reference(graph, _extreme_inputs(rng, (batch, k), source))


def test_gemm_saturates_both_ways():
    rng = np.random.default_rng(10)
    source, output = QuantParams(0.05, 128), QuantParams(0.01, 128)
    graph = QdqGraph([64], source).gemm(random_weights(rng, (24, 64)), np.full(24, 0.01), np.zeros(24), output)
    got = _assert_kernels_match_reference(graph, _extreme_inputs(rng, (9, 64), source))
    low, high = _saturation(got, output)
    assert low > 0.1 and high > 0.1


@pytest.mark.parametrize("seed", SEEDS)
def test_conv_random_geometry(seed):
    rng = np.random.default_rng(100 + seed)
    channels, height, width = int(rng.integers(1, 5)), int(rng.integers(3, 15)), int(rng.integers(3, 15))
    kernel = (int(rng.integers(1, min(height, 6) + 1)), int(rng.integers(1, min(width, 6) + 1)))
    strides = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    pads = tuple(int(p) for p in rng.integers(0, 3, 4))
    out_channels, batch = int(rng.integers(1, 41)), int(rng.integers(1, 6))
    source = _params(rng, 0.01, 0.05)
    graph = QdqGraph([channels, height, width], source)
    weight = random_weights(rng, (out_channels, channels, *kernel))
    scale, bias = rng.uniform(0.002, 0.01, out_channels), rng.integers(-5000, 5000, out_channels)
    graph.conv(
        weight, scale, bias, _params(rng, 0.005, 0.2),
        strides=strides, pads=pads,
    )  # fmt: skip
    if seed % 2:
        graph.square(_params(rng, 0.05, 3.0))
    if seed % 4 == 3:  # a second convolution reads the first one's channels-last output
        c2 = int(rng.integers(1, 12))
        graph.conv(
            random_weights(rng, (c2, out_channels, 1, 2)),
            rng.uniform(0.002, 0.01, c2),
            rng.integers(-99, 99, c2),
            _params(rng, 0.05, 0.5),
            pads=(0, 1, 0, 0),
        )
    _assert_kernels_match_reference(graph.flatten(), _extreme_inputs(rng, (batch, channels, height, width), source))


def test_activation_after_flattening_a_channels_last_map():
    rng = np.random.default_rng(12)
    source = QuantParams(0.02, 120)
    graph = QdqGraph([2, 6, 5], source)
    graph.conv(random_weights(rng, (11, 2, 3, 3)), np.full(11, 0.01), np.zeros(11), QuantParams(0.05, 100))
    graph.flatten().square(QuantParams(0.05, 0)).relu(QuantParams(0.03, 5))
    graph.gemm(random_weights(rng, (7, graph.shape[0])), np.full(7, 0.01), rng.integers(-99, 99, 7), None)
    _assert_kernels_match_reference(graph, _extreme_inputs(rng, (5, 2, 6, 5), source))


def test_conv_mnist_shape_saturates_both_ways():
    rng = np.random.default_rng(11)
    source, output = QuantParams(0.013, 20), QuantParams(0.004, 128)
    graph = QdqGraph([1, 28, 28], source)
    graph.conv(
        random_weights(rng, (33, 1, 7, 7)), np.full(33, 0.01), rng.integers(-99, 99, 33), output, pads=(3, 3, 3, 3)
    )
    got = _assert_kernels_match_reference(graph.flatten(), _extreme_inputs(rng, (3, 1, 28, 28), source))
    low, high = _saturation(got, output)
    assert low > 0.05 and high > 0.05


@pytest.mark.parametrize("seed", SEEDS)
def test_average_pool_random_geometry(seed):
    rng = np.random.default_rng(200 + seed)
    channels, height, width = int(rng.integers(1, 20)), int(rng.integers(2, 12)), int(rng.integers(2, 12))
    kernel = (int(rng.integers(1, height + 1)), int(rng.integers(1, width + 1)))
    if seed == 0:
        kernel = (height, width)  # the whole-image (integer) path
    strides = (int(rng.integers(1, 4)), int(rng.integers(1, 4)))
    pads = tuple(int(min(p, k - 1)) for p, k in zip(rng.integers(0, 3, 4), [*kernel, *kernel], strict=True))
    if seed == 0:
        pads = (0, 0, 0, 0)
    source = _params(rng, 0.01, 0.1)
    graph = QdqGraph([3, height + 2, width + 1], source)
    if seed % 2:  # pool a convolution's channels-last output, else the NCHW input directly
        graph.conv(
            random_weights(rng, (channels, 3, 3, 2)), rng.uniform(0.002, 0.01, channels), np.zeros(channels), source
        )
    target = QuantParams(float(np.float32(source.scale * rng.uniform(0.2, 1.5))), int(rng.integers(0, 256)))
    graph.avg_pool(kernel, target, strides=strides, pads=pads, count_include_pad=bool(seed % 3 == 2))
    _assert_kernels_match_reference(graph.flatten(), _extreme_inputs(rng, (4, 3, height + 2, width + 1), source))


@pytest.mark.parametrize("seed", SEEDS)
def test_standalone_square_and_relu(seed):
    rng = np.random.default_rng(300 + seed)
    size = int(rng.integers(1, 500))
    source = _params(rng, 0.01, 0.1)
    graph = QdqGraph([size], source)
    graph.square(_params(rng, 1e-9, 1e-3) if seed == 0 else _params(rng, 1e-3, 1.0))  # seed 0: past int32
    graph.relu(_params(rng, 0.01, 0.5))
    _assert_kernels_match_reference(graph, _extreme_inputs(rng, (int(rng.integers(1, 7)), size), source))


def test_quantize_handles_nan_inf_and_ties():
    params = QuantParams(0.02, 37)
    x = np.concatenate([[np.nan, np.inf, -np.inf, 1e30, -1e30, -0.0], np.arange(-300, 300) * np.float32(0.01)]).astype(
        np.float32
    )[None, :]
    got = _assert_kernels_match_reference(QdqGraph([x.shape[1]], params), x)
    np.testing.assert_array_equal(got[0, :3], arithmetic.dequantize(np.array([0, 255, 0], np.uint8), 0.02, 37))


@pytest.mark.parametrize("seed", range(6))
def test_tiles_compute_exact_int32_products(seed):
    rng = np.random.default_rng(400 + seed)
    rows, k, n = int(rng.integers(1, 5)), int(rng.integers(1, 200)), int(rng.integers(1, 50))
    a = rng.integers(0, 256, (rows, k)).astype(np.uint8)
    a[:, ::3] = 255
    w = random_weights(rng, (n, k))
    packed, n_padded = _pack("test", w)
    a_padded = np.zeros((rows, packed.shape[1] * 4), np.uint8)
    a_padded[:, :k] = a
    sums = np.zeros((4, n_padded), np.int32)
    ops._tile_rows(a_padded, 0, rows, packed, packed.shape[1], n_padded, sums, 0, ONES)
    np.testing.assert_array_equal(sums[:rows, :n], a.astype(np.int64) @ w.astype(np.int64).T)


def test_tiles_are_exact_at_the_pair_limit_and_saturate_beyond_it():
    """|w0| + |w1| = 128 against 255s is the largest exact pair sum; the packer refuses more because
    vpmaddubsw would clip it (this is onnxruntime's AVX2 behaviour too)."""
    a = np.full((1, 8), 255, np.uint8)
    for w_pair, exact in (((65, 63), True), ((-64, -64), True), ((127, 127), False)):
        rows = np.tile(np.array(w_pair, np.int8), (8, 4))  # 8 output columns of k = 8 weights
        packed = np.zeros((1, 2, 64), np.int8)  # one panel: [k/4, 16 columns, 4], columns 8-15 unused
        packed[0, :, :32] = rows.reshape(8, 2, 4).transpose(1, 0, 2).reshape(2, 32)
        sums = np.zeros((4, 8), np.int32)
        ops._tile_rows(a, 0, 1, packed, 2, 8, sums, 0, ONES)
        expected = 255 * int(rows[0].astype(np.int64).sum())
        assert bool((sums[0] == expected).all()) == exact
        assert (abs(w_pair[0]) + abs(w_pair[1]) <= PAIR_LIMIT) == exact


# ---- uint16 activations (A16W8) -------------------------------------------------------------


def _extreme_inputs16(rng: np.random.Generator, shape: tuple[int, ...], params: QuantParams) -> np.ndarray:
    """Floats whose uint16 codes are often exactly 0 or 65535 (and a few far outside the range)."""
    codes = rng.integers(0, 65536, shape)
    codes[rng.random(shape) < 0.15] = 0
    codes[rng.random(shape) < 0.15] = 65535
    x = arithmetic.dequantize(codes.astype(np.uint16), params.scale, params.zero_point)
    x[rng.random(shape) < 0.02] *= np.float32(50)
    return x


def _covering(values: np.ndarray, fraction: float = 0.8) -> QuantParams:
    """uint16 parameters over ``fraction`` of the range of ``values`` (around its middle): some values
    saturate at each end."""
    low, high = float(values.min()), float(values.max())
    middle, half = (low + high) / 2, (high - low) * fraction / 2
    low, high = min(middle - half, 0.0), max(middle + half, 0.0)
    scale = float(np.float32((high - low) / 65535))
    return QuantParams(scale, int(np.clip(round(-low / scale), 0, 65535)), bits=16)


def _dense(rng: np.random.Generator, n: int, k: int, source: QuantParams, codes: np.ndarray):
    """Weights, scales and bias of an n x k layer, and the real values it computes from ``codes``."""
    weight, scale, bias = random_weights(rng, (n, k)), rng.uniform(0.001, 0.02, n), rng.integers(-20000, 20000, n)
    acc = (codes.reshape(len(codes), -1).astype(np.int64) - source.zero_point) @ weight.astype(np.int64).T + bias
    return weight, scale, bias, acc * (source.scale * scale)


@pytest.mark.parametrize("seed", SEEDS)
def test_16_bit_dense_layers_random_shapes(seed):
    """uint8 -> uint16 (the SIMD tiles, a 16-bit epilogue), optionally squared, then uint16 -> uint16 or
    not, then the float output, a uint16 DequantizeLinear or a square's: every 16-bit layer kind."""
    rng = np.random.default_rng(600 + seed)
    k, n1, n2, batch = int(rng.integers(1, 300)), int(rng.integers(2, 70)), int(rng.integers(2, 40)), 1 + seed
    source = _params(rng, 0.01, 0.1)
    x = _extreme_inputs(rng, (batch, k), source)
    graph = QdqGraph([k], source)
    params, codes = source, arithmetic.quantize(x, source.scale, source.zero_point)

    def dense(n: int) -> None:
        nonlocal params, codes
        weight, scale, bias, real = _dense(rng, n, graph.shape[0], params, codes)
        params = _covering(real)  # 80% of the range: saturates both ways
        graph.gemm(weight, scale, bias, params)
        codes = arithmetic.quantize(real.astype(np.float32), params.scale, params.zero_point, 16)

    def square() -> None:
        nonlocal params, codes
        real = arithmetic.dequantize(codes, params.scale, params.zero_point) ** 2
        params = _covering(real, 0.5)  # from 0 to half the largest square: saturates at the top
        graph.square(params)
        codes = arithmetic.quantize(real, params.scale, params.zero_point, 16)

    dense(n1)
    if seed % 2:
        square()
    if seed % 3 == 0:
        dense(n2)
    if seed % 4 == 1:
        square()
    if seed % 4 == 3:
        graph.gemm(random_weights(rng, (7, graph.shape[0])), np.full(7, 0.001), rng.integers(-99, 99, 7), None)
    got = _assert_kernels_match_reference(graph, x, threads=1 + seed % 2)
    if seed % 4 != 3:  # a uint16 output: saturated
        out = np.rint(got / np.float32(params.scale)).astype(np.int64) + params.zero_point
        assert (out == 65535).any()


@pytest.mark.parametrize("seed", range(4))
def test_16_bit_input_quantize_square_and_dequantize(seed):
    rng = np.random.default_rng(700 + seed)
    size, batch = int(rng.integers(1, 500)), int(rng.integers(1, 9))
    source = QuantParams(float(np.float32(rng.uniform(1e-4, 1e-2))), int(rng.integers(0, 65536)), bits=16)
    graph = QdqGraph([size], source)
    if seed:  # seed 0: quantize and dequantize alone
        low = -source.zero_point * source.scale
        largest = max(low**2, ((65535 - source.zero_point) * source.scale) ** 2)
        scale = largest / 65535 * (1e-6 if seed == 1 else 0.7)  # seed 1: nearly every square saturates
        graph.square(QuantParams(float(np.float32(scale)), int(rng.integers(0, 200)), bits=16))
    x = _extreme_inputs16(rng, (batch, size), source)
    x[0, : min(size, 6)] = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, -0.0], np.float32)[: min(size, 6)]
    _assert_kernels_match_reference(graph, x, threads=1 + seed % 2)


def test_16_bit_quantize_handles_nan_inf_and_ties():
    params = QuantParams(0.0007, 30001, bits=16)
    x = np.concatenate(
        [[np.nan, np.inf, -np.inf, 1e30, -1e30, -0.0], np.arange(-30000, 30000) * np.float32(0.00035)]
    ).astype(np.float32)[None, :]
    got = _assert_kernels_match_reference(QdqGraph([x.shape[1]], params), x)
    np.testing.assert_array_equal(got[0, :3], arithmetic.dequantize(np.array([0, 65535, 0], np.uint16), 0.0007, 30001))


@pytest.mark.parametrize("first_bits", [8, 16])
def test_fused_16_bit_square_equals_the_standalone_one(monkeypatch, first_bits):
    """A square fused into the dense layer before it squares the requantized uint16 value, in float32,
    exactly as the standalone operator does."""
    rng = np.random.default_rng(800 + first_bits)
    source = _params(rng, 0.01, 0.1) if first_bits == 8 else QuantParams(0.0007, 30001, bits=16)
    k = 77 if first_bits == 8 else 40
    x = _extreme_inputs(rng, (13, k), source) if first_bits == 8 else _extreme_inputs16(rng, (13, k), source)
    codes = arithmetic.quantize(x, source.scale, source.zero_point, first_bits)
    weight, scale, bias, real = _dense(rng, 29, k, source, codes)
    hidden = _covering(real)
    rounded = arithmetic.quantize(real, hidden.scale, hidden.zero_point, 16)
    squared = _covering(arithmetic.dequantize(rounded, hidden.scale, hidden.zero_point) ** 2, 0.6)
    graph = QdqGraph([k], source).gemm(weight, scale, bias, hidden).square(squared)
    graph.gemm(random_weights(rng, (10, 29)), np.full(10, 0.001), rng.integers(-99, 99, 10), None)
    model = graph.build()
    fused = compile_model(model)
    monkeypatch.setattr(kernel_compiler, "_fuse_activations", list)
    unfused = compile_model(model)
    assert fused.steps[1].activation is not None and isinstance(unfused.steps[2], Elementwise)
    assert isinstance(unfused.steps[1], Gemm) and unfused.steps[1].activation is None
    expected = reference.run(fused, x)
    np.testing.assert_array_equal(reference.run(unfused, x), expected)
    for isa in ISAS:
        for plan in (fused, unfused):
            np.testing.assert_array_equal(NumbaModel(plan, isa=isa).predict_logits(x), expected)


def test_16_bit_dense_layer_after_a_channels_last_map():
    """A uint8 convolution's NHWC output, flattened, into a uint8 -> uint16 dense layer (permuted weights)."""
    rng = np.random.default_rng(900)
    source = QuantParams(0.02, 120)
    graph = QdqGraph([2, 6, 5], source)
    graph.conv(random_weights(rng, (11, 2, 3, 3)), np.full(11, 0.01), np.zeros(11), QuantParams(0.05, 100))
    graph.flatten().gemm(
        random_weights(rng, (9, graph.shape[0])),
        np.full(9, 0.01),
        rng.integers(-99, 99, 9),
        QuantParams(0.002, 30000, 16),
    )
    graph.square(QuantParams(0.001, 0, bits=16))
    graph.gemm(random_weights(rng, (7, 9)), np.full(7, 0.01), rng.integers(-99, 99, 7), None)
    _assert_kernels_match_reference(graph, _extreme_inputs(rng, (5, 2, 6, 5), source), threads=2)
