"""onnxruntime's integer arithmetic for the QDQ operators hegate uses, as numpy.

Measured against onnxruntime 1.32 (CPU provider, ``ORT_ENABLE_ALL``; the tests in
``tests/test_kernels_reference.py`` hold every formula below to bit-identical outputs on
synthetic single-operator graphs, ties and saturation included). With graph optimization on,
onnxruntime fuses each uint8 ``DequantizeLinear -> op -> QuantizeLinear`` group into one integer
kernel, and the rounding is the kernel's, not the ONNX float reference's (16-bit tensors: see
below):

* **QuantizeLinear** (MLAS): ``q = rint(clamp(x / scale, -zp, 255 - zp)) + zp`` in float32. It
  divides (a multiply by ``1 / scale`` rounds differently), clamps *before* rounding, and NaN
  becomes ``-zp`` (``maxps`` returns its second operand), so NaN quantizes to 0; ``rint`` is
  round half to even.
* **QLinearConv and QGemm** (per-channel int8 weights): the int32 accumulator (bias included,
  exact integer arithmetic) is converted to float32, multiplied by a float32 multiplier computed
  once as ``(x_scale * w_scale[c]) / y_scale`` (float32, in that order), clamped to
  ``[-zp, 255 - zp]``, rounded half to even, then ``zp`` is added (``MlasRequantizeOutput``).
  It is one float multiply, not a fixed-point multiplier and shift.
* **QGemm with a float output** (``DequantizeLinear -> Gemm`` writing the graph output, the
  exporter's last layer): ``float32(int32 sum + bias) * (x_scale * w_scale[c])``, the scale a
  float32 product computed once; no output rounding at all.
* **QLinearMul** (``x * x`` here): ``(a - za) * (b - zb)`` as an exact int32, converted to float32,
  times the float32 ratio ``(a_scale * b_scale) / y_scale``, plus ``float(zy)`` *before* rounding
  (so ties go to even on the shifted value), rounded half to even by ``cvtps2dq``, then
  saturated by the int16 and uint8 packs. A value >= 2**31 converts to INT32_MIN and ends as
  **0, not 255** (checked with a tiny output scale); hegate's calibrated scales never get there,
  but the kernels reproduce it anyway.
* **QLinearAveragePool**, general case: the input is dequantized to float32
  (``x_scale * (q - zp)``, a 256-entry table), each window summed in float32 in row-major order,
  divided by the element count (``count_include_pad`` decides whether padding counts), then
  ``nearbyintf(y / y_scale + zy)`` and clamped to [0, 255] (out of int32 range gives 0, as for
  QLinearMul).
* **QLinearAveragePool** whose kernel covers the whole image with no padding falls back to
  QLinearGlobalAveragePool: an exact int32 sum minus ``zp * n``, times the float32 scale
  ``x_scale / (y_scale * n)``, requantized like QGemm. The two paths disagree on ties; the
  kernels take the one onnxruntime takes.
* **Relu** between DQ and Q stays a float operator: ``quantize(max(x_scale * (q - zp), 0))``.
  (With an output zero point of 0 onnxruntime drops the Relu, which gives the same numbers.)
* **DequantizeLinear**: ``float32(q - zp) * scale``.

**16-bit activations** (A16W8: int8 weights, uint8 network input, uint16 hidden activations;
``QuantizeLinear`` with a uint16 zero point, opset 21). onnxruntime has no integer kernels for
uint16 tensors: it fuses none of their ``DequantizeLinear -> op -> QuantizeLinear`` groups and
runs the op in float32 on the dequantized values (checked on its optimized graph: a float Gemm
and a float Mul between DequantizeLinear and QuantizeLinear). So:

* **QuantizeLinear to uint16**: the uint8 formula with 65535 for 255: divide, clamp to
  ``[-zp, 65535 - zp]``, round half to even, add ``zp``; NaN becomes 0 (ties, NaN, infinities
  and saturation checked bit for bit against onnxruntime). **DequantizeLinear** is unchanged.
* **Square on uint16** (``DQ -> Mul(x, x) -> Q``): float32 ``d = float32(q - zp) * scale``,
  ``y = d * d``, then QuantizeLinear of ``y``; not QLinearMul's integer formula, which is only
  what onnxruntime runs when both sides are uint8. Bit-identical to onnxruntime.
* **Gemm with a uint16 output or a uint16 input**: onnxruntime computes a float32 SGEMM of the
  dequantized inputs and weights plus the dequantized bias, in a summation order (blocking,
  FMA) that is its own and that nothing outside MLAS can reproduce. The kernels compute instead
  the exact integer result, with the 8-bit QGemm's scaling: the int32 sum of ``(q - zp) * w``
  plus the int32 bias (the compiler admits only layers whose worst case fits int32), times the
  float32 multiplier ``(x_scale * w_scale[c]) / y_scale``, rounded half to even and clamped to
  ``[-zp, 65535 - zp]``, plus ``zp``; with a float output ``float32(acc) * (x_scale * w_scale[c])``.
  These layers are therefore *exact-integer*, not bit-identical to onnxruntime: one rounding of
  the exact sum, where onnxruntime's float sum carries float32 rounding errors. On the bundled
  MNIST MLPs (784 -> 128 -> square -> 10, all 10,000 test images), 0.05-0.07% of the first
  layer's values came out one 16-bit step away from onnxruntime's (never more), the squares
  that follow amplify that to 1-4 steps on 0.03-0.04%, the logits were at most 0.003-0.005 apart
  (of logits up to 100-200), and every class agreed. ``kernels.testing`` derives a bound.

Why not reproduce the float path: the rounding errors of a float32 sum of 784 products depend
on the order of the additions, which depends on MLAS's blocking for the CPU and the batch size;
the exact integer sum is the same on every CPU, every ISA and every batch, as the 8-bit path is.

The integer products themselves are exact in both onnxruntime and these kernels only because
hegate's weights are 7-bit (see ``models/quantization.py``): with full-range int8 weights,
onnxruntime's AVX2 kernels saturate int16 pair sums.
"""

from __future__ import annotations

import numpy as np

from models.quantization import code_dtype, code_max

F32 = np.float32
INT32_LIMIT = F32(2.0**31)  # float32 values at or beyond this do not convert to int32


def requant_multiplier(input_scale: float, weight_scale: np.ndarray, output_scale: float) -> np.ndarray:
    """QLinearConv / QGemm's float32 output multiplier per channel: ``(x_scale * w_scale) / y_scale``."""
    product = (F32(input_scale) * np.asarray(weight_scale, F32)).astype(F32)
    return (product / F32(output_scale)).astype(F32)


def square_ratio(input_scale: float, output_scale: float) -> np.float32:
    """QLinearMul's float32 ratio for ``x * x``: ``(a_scale * b_scale) / y_scale``."""
    return F32(F32(F32(input_scale) * F32(input_scale)) / F32(output_scale))


def global_pool_scale(input_scale: float, output_scale: float, count: int) -> np.float32:
    """QLinearGlobalAveragePool's multiplier: ``x_scale / (y_scale * n)`` in float32."""
    return F32(F32(input_scale) / F32(F32(output_scale) * F32(count)))


def global_pool_scale_supported(scale: np.float32) -> bool:
    """onnxruntime refuses to run a global average pool outside this multiplier range."""
    return bool(F32(2.0**-32) <= scale < F32(256.0))


def dequantize_table(scale: float, zero_point: int) -> np.ndarray:
    """Float32 value of each uint8 code: ``scale * (q - zp)``, as QLinearAveragePool tabulates it."""
    return (F32(scale) * (np.arange(256, dtype=np.int32) - zero_point).astype(F32)).astype(F32)


def quantize(x: np.ndarray, scale: float, zero_point: int, bits: int = 8) -> np.ndarray:
    """QuantizeLinear to uint8 (or uint16 with ``bits=16``), NaN to 0 (see the module docstring)."""
    v = (np.asarray(x, F32) / F32(scale)).astype(F32)
    low, high = F32(-zero_point), F32(code_max(bits) - zero_point)
    v = np.where(v > low, v, low)  # NaN fails the comparison and takes ``low``, as maxps does
    v = np.where(v < high, v, high)
    return (np.rint(v) + zero_point).astype(code_dtype(bits))


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return ((q.astype(np.int32) - zero_point).astype(F32) * F32(scale)).astype(F32)


def requantize(acc: np.ndarray, multiplier: np.ndarray, zero_point: int, bits: int = 8) -> np.ndarray:
    """MlasRequantizeOutput: int32 accumulator to uint8 (``multiplier`` broadcasts against ``acc``).

    With ``bits=16``, the same scaling to uint16: how the kernels round a 16-bit Gemm's exact sums.
    """
    v = (np.asarray(acc, np.int32).astype(F32) * np.asarray(multiplier, F32)).astype(F32)
    v = np.clip(v, F32(-zero_point), F32(code_max(bits) - zero_point))
    return (np.rint(v) + zero_point).astype(code_dtype(bits))


def saturate_rounded(v: np.ndarray) -> np.ndarray:
    """Round half to even to int32 and saturate to uint8; out-of-range and NaN give 0 (INT32_MIN)."""
    v = np.asarray(v, F32)
    inside = (v < INT32_LIMIT) & (v >= -INT32_LIMIT)
    rounded = np.rint(np.where(inside, v, F32(0))).astype(np.int64)
    return np.where(inside, np.clip(rounded, 0, 255), 0).astype(np.uint8)


def square(q: np.ndarray, input_zero_point: int, ratio: np.float32, output_zero_point: int) -> np.ndarray:
    """QLinearMul of a uint8 tensor with itself."""
    d = q.astype(np.int32) - input_zero_point
    return saturate_rounded((d * d).astype(F32) * F32(ratio) + F32(output_zero_point))


def float_square(
    q: np.ndarray, input_scale: float, input_zero_point: int, scale: float, zero_point: int, bits: int = 16
) -> np.ndarray:
    """``DequantizeLinear -> Mul(x, x) -> QuantizeLinear`` in float32: onnxruntime's square of a uint16 tensor."""
    d = dequantize(q, input_scale, input_zero_point)
    return quantize((d * d).astype(F32), scale, zero_point, bits)


def relu(q: np.ndarray, source_scale: float, source_zero_point: int, scale: float, zero_point: int) -> np.ndarray:
    """DequantizeLinear -> Relu -> QuantizeLinear in float32."""
    x = dequantize(q, source_scale, source_zero_point)
    return quantize(np.where(x > F32(0), x, F32(0)), scale, zero_point)


def pool_quantize(mean: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """QLinearAveragePool's ``nearbyintf(y / y_scale + zy)``, clamped to uint8."""
    return saturate_rounded((np.asarray(mean, F32) / F32(scale)).astype(F32) + F32(zero_point))
