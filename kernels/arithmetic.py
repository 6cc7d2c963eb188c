"""onnxruntime's integer arithmetic for the QDQ operators hegate uses, as numpy.

Measured against onnxruntime 1.32 (CPU provider, ``ORT_ENABLE_ALL``; the tests in
``tests/test_kernels_reference.py`` hold every formula below to bit-identical outputs on
synthetic single-operator graphs, ties and saturation included). With graph optimization on,
onnxruntime fuses each ``DequantizeLinear -> op -> QuantizeLinear`` group into one integer
kernel, and the rounding is the kernel's, not the ONNX float reference's:

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

The integer products themselves are exact in both onnxruntime and these kernels only because
hegate's weights are 7-bit (see ``models/quantization.py``): with full-range int8 weights,
onnxruntime's AVX2 kernels saturate int16 pair sums.
"""

from __future__ import annotations

import numpy as np

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


def quantize(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """QuantizeLinear to uint8, NaN to 0 (see the module docstring)."""
    v = (np.asarray(x, F32) / F32(scale)).astype(F32)
    low, high = F32(-zero_point), F32(255 - zero_point)
    v = np.where(v > low, v, low)  # NaN fails the comparison and takes ``low``, as maxps does
    v = np.where(v < high, v, high)
    return (np.rint(v) + zero_point).astype(np.uint8)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return ((q.astype(np.int32) - zero_point).astype(F32) * F32(scale)).astype(F32)


def requantize(acc: np.ndarray, multiplier: np.ndarray, zero_point: int) -> np.ndarray:
    """MlasRequantizeOutput: int32 accumulator to uint8 (``multiplier`` broadcasts against ``acc``)."""
    v = (np.asarray(acc, np.int32).astype(F32) * np.asarray(multiplier, F32)).astype(F32)
    v = np.clip(v, F32(-zero_point), F32(255 - zero_point))
    return (np.rint(v) + zero_point).astype(np.uint8)


def saturate_rounded(v: np.ndarray) -> np.ndarray:
    """Round half to even to int32 and saturate to uint8; out-of-range and NaN give 0 (INT32_MIN)."""
    v = np.asarray(v, F32)
    inside = (v < INT32_LIMIT) & (v >= -INT32_LIMIT)
    rounded = np.rint(np.where(inside, v, F32(0))).astype(np.int64)
    return np.where(inside, np.clip(rounded, 0, 255), 0).astype(np.uint8)


def square(q: np.ndarray, input_zero_point: int, ratio: np.float32, output_zero_point: int) -> np.ndarray:
    """QLinearMul of a tensor with itself."""
    d = q.astype(np.int32) - input_zero_point
    return saturate_rounded((d * d).astype(F32) * F32(ratio) + F32(output_zero_point))


def relu(q: np.ndarray, source_scale: float, source_zero_point: int, scale: float, zero_point: int) -> np.ndarray:
    """DequantizeLinear -> Relu -> QuantizeLinear in float32."""
    x = dequantize(q, source_scale, source_zero_point)
    return quantize(np.where(x > F32(0), x, F32(0)), scale, zero_point)


def pool_quantize(mean: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """QLinearAveragePool's ``nearbyintf(y / y_scale + zy)``, clamped to uint8."""
    return saturate_rounded((np.asarray(mean, F32) / F32(scale)).astype(F32) + F32(zero_point))
