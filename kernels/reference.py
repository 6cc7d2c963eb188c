"""A plan run with numpy: the independent check of the numba kernels.

It shares nothing with the kernels but the plan and the formulas of :mod:`kernels.arithmetic`:
no packing, no layouts (every tensor stays NCHW), no tiles, integer products in int64, window
sums written out element by element. The tests hold the kernels to this reference bit for bit
(random shapes, extreme values), and this reference to onnxruntime on single-operator graphs.
Slow by design; meant for tests and debugging, not serving.

uint16 tensors follow the 16-bit rules of :mod:`kernels.arithmetic`: the float32 square, and
Gemms from the exact int64 sums (which the compiler guarantees fit int32), scaled as the 8-bit
QGemm scales them. :func:`trace` also returns every intermediate tensor, for error analysis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels import arithmetic
from kernels.plan import AvgPool, Conv, Dequantize, Elementwise, Gemm, Plan, Quantize, Relu, Square


def _activate(q: np.ndarray, source_scale: float, source_zero: int, activation) -> np.ndarray:
    match activation:
        case None:
            return q
        case Square(output=out) if out.bits == 16:  # from uint16 (the compiler admits no mixture)
            return arithmetic.float_square(q, source_scale, source_zero, out.scale, out.zero_point, out.bits)
        case Square(output=out):
            ratio = arithmetic.square_ratio(source_scale, out.scale)
            return arithmetic.square(q, source_zero, ratio, out.zero_point)
        case Relu(output=out):
            return arithmetic.relu(q, source_scale, source_zero, out.scale, out.zero_point)
    raise TypeError(f"not an activation: {activation!r}")


def conv_accumulate(q: np.ndarray, zero_point: int, weight: np.ndarray, strides, pads) -> np.ndarray:
    """Exact int64 sums of ``(q - zp) * w`` for an NCHW batch; padding contributes 0."""
    batch, channels, height, width = q.shape
    out_channels, _, kernel_h, kernel_w = weight.shape
    top, left, bottom, right = pads
    out_h = (height + top + bottom - kernel_h) // strides[0] + 1
    out_w = (width + left + right - kernel_w) // strides[1] + 1
    padded = np.zeros((batch, channels, height + top + bottom, width + left + right), np.int64)
    padded[:, :, top : top + height, left : left + width] = q.astype(np.int64) - zero_point
    acc = np.zeros((batch, out_channels, out_h, out_w), np.int64)
    for kh in range(kernel_h):
        for kw in range(kernel_w):
            rows = slice(kh, kh + strides[0] * (out_h - 1) + 1, strides[0])
            cols = slice(kw, kw + strides[1] * (out_w - 1) + 1, strides[1])
            acc += np.einsum("bchw,oc->bohw", padded[:, :, rows, cols], weight[:, :, kh, kw].astype(np.int64))
    return acc


def average_pool(q: np.ndarray, step: AvgPool, source, target) -> np.ndarray:
    """QLinearAveragePool on an NCHW batch, either of onnxruntime's two paths."""
    batch, channels, height, width = q.shape
    params, out = source.params, target.params
    if step.kernel == (height, width) and not any(step.pads):
        count = height * width
        acc = q.reshape(batch, channels, count).astype(np.int64).sum(axis=2) - params.zero_point * count
        scale = arithmetic.global_pool_scale(params.scale, out.scale, count)
        return arithmetic.requantize(acc, scale, out.zero_point).reshape(batch, channels, 1, 1)
    values = arithmetic.dequantize_table(params.scale, params.zero_point)[q]
    _, out_h, out_w = target.shape
    top, left = step.pads[0], step.pads[1]
    result = np.zeros((batch, channels, out_h, out_w), np.uint8)
    for ph in range(out_h):
        h0 = ph * step.strides[0] - top
        h1, h0 = min(h0 + step.kernel[0], height), max(h0, 0)
        for pw in range(out_w):
            w0 = pw * step.strides[1] - left
            w1, w0 = min(w0 + step.kernel[1], width), max(w0, 0)
            total = np.zeros((batch, channels), np.float32)
            for h in range(h0, h1):
                for w in range(w0, w1):
                    total = (total + values[:, :, h, w]).astype(np.float32)
            count = step.kernel[0] * step.kernel[1] if step.count_include_pad else (h1 - h0) * (w1 - w0)
            mean = (total / np.float32(count)).astype(np.float32)
            result[:, :, ph, pw] = arithmetic.pool_quantize(mean, out.scale, out.zero_point)
    return result


def run(plan: Plan, x: np.ndarray) -> np.ndarray:
    """Float32 logits of ``plan`` for float32 inputs ``[batch, *input_shape]``."""
    return _run(plan, x)[0]


@dataclass(frozen=True)
class Trace:
    """A run of a plan with its intermediate values (codes, ``[batch, *shape]``)."""

    logits: np.ndarray
    tensors: dict[int, np.ndarray]  # by tensor id
    before_activation: dict[int, np.ndarray]  # by step index: a Conv/Gemm's output before its fused activation


def trace(plan: Plan, x: np.ndarray) -> Trace:
    """Like :func:`run`, also keeping every intermediate tensor."""
    before: dict[int, np.ndarray] = {}
    logits, tensors = _run(plan, x, before)
    batch = x.shape[0]
    return Trace(logits, {i: q.reshape(batch, *plan.tensors[i].shape) for i, q in tensors.items()}, before)


def _run(plan: Plan, x: np.ndarray, before: dict[int, np.ndarray] | None = None) -> tuple[np.ndarray, dict]:
    batch = x.shape[0]
    tensors: dict[int, np.ndarray] = {}
    before = {} if before is None else before
    for index, step in enumerate(plan.steps):
        if isinstance(step, Quantize):
            tensors[step.target] = arithmetic.quantize(x, step.params.scale, step.params.zero_point, step.params.bits)
            continue
        source = plan.tensors[step.source]
        q = tensors[step.source].reshape(batch, *source.shape)
        match step:
            case Dequantize():
                logits = arithmetic.dequantize(q.reshape(batch, -1), source.params.scale, source.params.zero_point)
                return logits, tensors
            case Conv():
                acc = conv_accumulate(q, source.params.zero_point, step.weight, step.strides, step.pads)
                acc = acc + step.bias.astype(np.int64)[None, :, None, None]
                multiplier = arithmetic.requant_multiplier(source.params.scale, step.weight_scale, step.output.scale)
                y = arithmetic.requantize(acc, multiplier[None, :, None, None], step.output.zero_point)
                before[index] = y
                tensors[step.target] = _activate(y, step.output.scale, step.output.zero_point, step.activation)
            case Gemm():
                rows = q.reshape(batch, -1).astype(np.int64) - source.params.zero_point
                acc = rows @ step.weight.astype(np.int64).T + step.bias.astype(np.int64)
                if step.output is None:  # float logits: QGemm's float output
                    scale = (np.float32(source.params.scale) * step.weight_scale.astype(np.float32)).astype(np.float32)
                    return (acc.astype(np.int32).astype(np.float32) * scale).astype(np.float32), tensors
                multiplier = arithmetic.requant_multiplier(source.params.scale, step.weight_scale, step.output.scale)
                y = arithmetic.requantize(acc, multiplier[None, :], step.output.zero_point, step.output.bits)
                before[index] = y
                tensors[step.target] = _activate(y, step.output.scale, step.output.zero_point, step.activation)
            case Elementwise():
                tensors[step.target] = _activate(q, source.params.scale, source.params.zero_point, step.activation)
            case AvgPool():
                tensors[step.target] = average_pool(q, step, source, plan.tensors[step.target])
    raise ValueError("plan writes no output")
