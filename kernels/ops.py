"""The numba kernels: one function per operation, each over one chunk of samples.

Every function here reproduces onnxruntime's arithmetic bit for bit (see
:mod:`kernels.arithmetic` for what that arithmetic is and how it was established), except the
dense layers that read or write uint16 tensors (the last section), which compute the exact
integer result where onnxruntime sums in float32. Two rules keep the float32 steps identical to
onnxruntime's:

* float32 stays float32: every constant is ``np.float32`` and integers reach float32 through
  ``np.int32`` (numba would otherwise widen to float64, and the AVX2 conversion from int64 does
  not vectorize);
* no fast-math: numba does not reassociate or contract ``a * b + c`` into an FMA unless asked,
  and onnxruntime rounds the product before the add.

The epilogues (requantize, then square or ReLU) are written as separate loops per activation
so that LLVM vectorizes each one; the integer products run in :mod:`kernels.simd` tiles.
Callers (:mod:`kernels.executor`) guarantee every shape; nothing is bounds-checked here.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kernels.isa import VNNI
from kernels.program import ACT_RELU, ACT_SQUARE, CONV_PIXEL_BLOCK, NCHW
from kernels.simd import (
    COLUMN_ALIGN,
    TILE_COLS,
    TILE_ROWS,
    VNNI_ACCUMULATORS,
    VNNI_PANELS,
    VNNI_ROWS,
    accumulate_dequantized,
    indirect_1x8,
    indirect_1x16,
    indirect_2x8,
    indirect_2x16,
    indirect_3x8,
    indirect_3x16,
    indirect_4x8,
    indirect_4x16,
    tile_1x8,
    tile_1x16,
    tile_2x8,
    tile_2x16,
    tile_3x8,
    tile_3x16,
    tile_4x8,
    tile_4x16,
    vnni_indirect,
    vnni_tile,
)

_F0 = np.float32(0.0)
_F255 = np.float32(255.0)
_INT32_LIMIT = np.float32(2.0**31)
_JIT = dict(cache=True, nogil=True, boundscheck=False)


@njit(**_JIT)
def quantize_rows(x, out, features, scale, zero_point):
    """QuantizeLinear of float32 rows ``x[:, :features]`` into uint8 ``out``."""
    low = np.float32(-zero_point)
    high = np.float32(255 - zero_point)
    zero = np.float32(zero_point)
    for r in range(x.shape[0]):
        src = x[r]
        dst = out[r]
        for j in range(features):
            v = src[j] / scale
            v = v if v > low else low  # NaN takes ``low``, as maxps does
            v = v if v < high else high
            dst[j] = np.uint8(np.rint(v) + zero)


@njit(**_JIT)
def dequantize_rows(q, out, n, scale, zero_point, layout, channels, channel_stride):
    """DequantizeLinear: ``float32(q - zp) * scale``; a channels-last map comes out in NCHW order."""
    pixels = n // channels
    for r in range(q.shape[0]):
        src = q[r]
        dst = out[r]
        if layout == NCHW:
            for j in range(n):
                dst[j] = np.float32(np.int32(np.int32(src[j]) - zero_point)) * scale
        else:
            for c in range(channels):
                for p in range(pixels):
                    dst[c * pixels + p] = (
                        np.float32(np.int32(np.int32(src[p * channel_stride + c]) - zero_point)) * scale
                    )


@njit(inline="always")
def _requantized(acc, bias, multiplier, low, high):
    """``q - zp`` of MlasRequantizeOutput as float32: scale, round half to even, clamp.

    onnxruntime clamps before rounding; with integer bounds the order makes no difference, and
    rounding first (with ``min``/``max``, never NaN here) lets LLVM vectorize about twice as
    well as the select-based clamp.
    """
    return min(max(np.rint(np.float32(np.int32(acc + bias)) * multiplier), low), high)


@njit(inline="always")
def _square(r, ratio, zero):
    """QLinearMul of ``r = q - zp`` with itself: ``r * r * ratio + zp``, rounded, packed to uint8.

    ``g`` is never negative (positive scales); at or above 2**31 ``cvtps2dq`` gives INT32_MIN,
    which the packs turn into 0.
    """
    g = r * r * ratio + zero
    t = min(max(np.rint(g), _F0), _F255)
    return np.uint8(t if g < _INT32_LIMIT else _F0)


@njit(inline="always")
def _relu(r, scale, output_scale, low, high, zero):
    """Dequantize ``r = q - zp``, ReLU, quantize (QuantizeLinear's rounding)."""
    y = max(r * scale, _F0)
    return np.uint8(min(max(np.rint(y / output_scale), low), high) + zero)


@njit(**_JIT)
def _requantize(sums, n, bias, multiplier, zero_point, act, act_zero, act_a, act_b, out):
    """Requantize ``n`` int32 sums (per-element bias and multiplier) into uint8 ``out``, then activate.

    Called once per dense-layer row or per convolution block (pixels x channels, with bias and
    multiplier tiled to that shape): one long loop that LLVM vectorizes, where many short
    per-channel loops would cost more in calls, alias checks and scalar remainders.
    """
    low, high, zero = np.float32(-zero_point), np.float32(255 - zero_point), np.float32(zero_point)
    low2, high2, zero2 = np.float32(-act_zero), np.float32(255 - act_zero), np.float32(act_zero)
    if act == ACT_SQUARE:
        for j in range(n):
            out[j] = _square(_requantized(sums[j], bias[j], multiplier[j], low, high), act_a, zero2)
    elif act == ACT_RELU:
        for j in range(n):
            out[j] = _relu(_requantized(sums[j], bias[j], multiplier[j], low, high), act_a, act_b, low2, high2, zero2)
    else:
        for j in range(n):
            out[j] = np.uint8(_requantized(sums[j], bias[j], multiplier[j], low, high) + zero)


@njit(inline="always")
def _requantize_rows(sums, rows, n, bias, multiplier, zero_point, act, act_zero, act_a, act_b, out, r0):
    """:func:`_requantize` of ``sums[:rows]`` into ``out[r0 : r0 + rows]``, inlined and indexing the
    2-D arrays directly: at the VNNI tiles' speed, a call and two row views per row showed
    (63 -> 55 us for 256 rows of the MNIST MLP's first layer)."""
    low, high, zero = np.float32(-zero_point), np.float32(255 - zero_point), np.float32(zero_point)
    low2, high2, zero2 = np.float32(-act_zero), np.float32(255 - act_zero), np.float32(act_zero)
    for i in range(rows):
        r = r0 + i
        if act == ACT_SQUARE:
            for j in range(n):
                out[r, j] = _square(_requantized(sums[i, j], bias[j], multiplier[j], low, high), act_a, zero2)
        elif act == ACT_RELU:
            for j in range(n):
                value = _requantized(sums[i, j], bias[j], multiplier[j], low, high)
                out[r, j] = _relu(value, act_a, act_b, low2, high2, zero2)
        else:
            for j in range(n):
                out[r, j] = np.uint8(_requantized(sums[i, j], bias[j], multiplier[j], low, high) + zero)


@njit(**_JIT)
def elementwise_rows(q, out, n, input_zero, act, act_zero, act_a, act_b):
    """A standalone square (QLinearMul) or ReLU (float Relu between DQ and Q) on uint8 rows."""
    low2, high2, zero2 = np.float32(-act_zero), np.float32(255 - act_zero), np.float32(act_zero)
    for r in range(q.shape[0]):
        src = q[r]
        dst = out[r]
        if act == ACT_SQUARE:
            for j in range(n):
                dst[j] = _square(np.float32(np.int32(np.int32(src[j]) - input_zero)), act_a, zero2)
        elif act == ACT_RELU:
            for j in range(n):
                d = np.float32(np.int32(np.int32(src[j]) - input_zero))
                dst[j] = _relu(d, act_a, act_b, low2, high2, zero2)
        else:
            dst[:n] = src[:n]


@njit(**_JIT)
def _tile_rows(x, r0, rows, weights, k_groups, n_padded, sums, s0, ones):
    """Sums of ``rows`` (<= 4) uint8 rows ``x[r0:]`` times every packed weight column, into ``sums[s0:]``."""
    for p in range(weights.shape[0]):
        c0 = p * TILE_COLS
        panel = weights[p]
        wide = c0 + TILE_COLS <= n_padded
        if rows == 4:
            if wide:
                tile_4x16(x, r0, panel, 0, k_groups, sums, s0, c0, ones)
            else:
                tile_4x8(x, r0, panel, 0, k_groups, sums, s0, c0, ones)
        elif rows == 3:
            if wide:
                tile_3x16(x, r0, panel, 0, k_groups, sums, s0, c0, ones)
            else:
                tile_3x8(x, r0, panel, 0, k_groups, sums, s0, c0, ones)
        elif rows == 2:
            if wide:
                tile_2x16(x, r0, panel, 0, k_groups, sums, s0, c0, ones)
            else:
                tile_2x8(x, r0, panel, 0, k_groups, sums, s0, c0, ones)
        elif wide:
            tile_1x16(x, r0, panel, 0, k_groups, sums, s0, c0, ones)
        else:
            tile_1x8(x, r0, panel, 0, k_groups, sums, s0, c0, ones)


@njit(inline="always")
def _power_of_two(limit):
    """The largest power of two <= ``limit`` (>= 1)."""
    p = 1
    while p * 2 <= limit:
        p *= 2
    return p


@njit(inline="always")
def _vnni_tile_shape(rows, panels):
    """(most rows per tile, panels per tile) for ``rows`` (<= VNNI_ROWS) rows and ``panels`` panels left.

    Shapes are powers of two (``simd.VNNI_SHAPES``) with at most VNNI_ACCUMULATORS accumulators.
    Four rows or fewer: as many panels as fit (batch 1: eight, so eight independent accumulator
    chains). More: four rows x four panels (8 loads per 16 ``vpdpbusd``), or eight rows when at
    most two panels are left (a narrow layer still gets 8 to 16 chains).
    """
    if rows >= VNNI_ROWS and panels <= 2:
        return VNNI_ROWS, panels
    tile_rows = _power_of_two(min(rows, TILE_ROWS))
    return tile_rows, _power_of_two(min(panels, VNNI_PANELS, VNNI_ACCUMULATORS // tile_rows))


@njit(**_JIT)
def _vnni_products(x, r0, rows, weights, k_groups, n_padded, sums, s0):
    """Sums of ``rows`` (<= VNNI_ROWS) uint8 rows ``x[r0:]`` times every packed column, into ``sums[s0:]``."""
    panels = weights.shape[0]
    p0 = 0
    while p0 < panels:
        most_rows, tile_panels = _vnni_tile_shape(rows, panels - p0)
        c0 = p0 * TILE_COLS
        i = 0
        while i < rows:
            tile_rows = _power_of_two(min(most_rows, rows - i))
            vnni_tile(
                x, r0 + i, tile_rows, weights, p0, tile_panels, k_groups, sums, s0 + i, c0, n_padded - c0
            )  # fmt: skip
            i += tile_rows
        p0 += tile_panels


@njit(**_JIT)
def _vnni_indirect_products(plane, bases, rows, groups, weights, k_groups, n_padded, sums):
    """Sums of output pixels ``0 .. rows`` (``bases`` into ``plane``) times every filter, into ``sums``."""
    panels = weights.shape[0]
    for r0 in range(0, rows, VNNI_ROWS):
        group = min(VNNI_ROWS, rows - r0)
        p0 = 0
        while p0 < panels:
            most_rows, tile_panels = _vnni_tile_shape(group, panels - p0)
            c0 = p0 * TILE_COLS
            i = r0
            while i < r0 + group:
                tile_rows = _power_of_two(min(most_rows, r0 + group - i))
                vnni_indirect(
                    plane, bases, i, tile_rows, groups, weights, p0, tile_panels, k_groups, sums, i, c0, n_padded - c0
                )  # fmt: skip
                i += tile_rows
            p0 += tile_panels


@njit(**_JIT)
def gemm_rows(
    x, out, weights, k_groups, n, n_padded, bias, multiplier, zero_point, act, act_zero, act_a, act_b, sums, ones, isa
):
    """QGemm with a fused activation on uint8 rows ``x`` [rows, >= 4 * k_groups] into ``out``.

    ``weights`` is packed in panels [panels, k_groups, 64] (see :mod:`kernels.program`), ``sums`` an
    int32 scratch of at least [4, n_padded]. Four rows at a time: their sums stay in L1.
    ``isa`` picks the tiles (:mod:`kernels.isa`); VNNI takes eight rows at a time (``sums`` then
    at least [8, n_padded]), with its epilogue inlined.
    """
    rows = x.shape[0]
    if isa == VNNI:
        for r0 in range(0, rows, VNNI_ROWS):
            mr = min(VNNI_ROWS, rows - r0)
            _vnni_products(x, r0, mr, weights, k_groups, n_padded, sums, 0)
            _requantize_rows(sums, mr, n, bias, multiplier, zero_point, act, act_zero, act_a, act_b, out, r0)
        return
    for r0 in range(0, rows, TILE_ROWS):
        mr = min(TILE_ROWS, rows - r0)
        _tile_rows(x, r0, mr, weights, k_groups, n_padded, sums, 0, ones)
        for i in range(mr):
            _requantize(sums[i], n, bias, multiplier, zero_point, act, act_zero, act_a, act_b, out[r0 + i])


@njit(**_JIT)
def gemm_rows_to_float(x, out, weights, k_groups, n, n_padded, bias, multiplier, sums, ones, isa):
    """QGemm with a float output (the last layer): ``float32(sum + bias) * (x_scale * w_scale)``."""
    rows = x.shape[0]
    step = VNNI_ROWS if isa == VNNI else TILE_ROWS
    for r0 in range(0, rows, step):
        mr = min(step, rows - r0)
        if isa == VNNI:
            _vnni_products(x, r0, mr, weights, k_groups, n_padded, sums, 0)
        else:
            _tile_rows(x, r0, mr, weights, k_groups, n_padded, sums, 0, ones)
        for i in range(mr):
            acc = sums[i]
            dst = out[r0 + i]
            for j in range(n):
                dst[j] = np.float32(np.int32(acc[j] + bias[j])) * multiplier[j]


@njit(**_JIT)
def _indirect_rows(plane, bases, r0, rows, groups, weights, k_groups, n_padded, sums, ones):
    """Sums of ``rows`` (<= 4) output pixels (``bases[r0:]`` into ``plane``) times every filter, into ``sums[r0:]``."""
    for p in range(weights.shape[0]):
        c0 = p * TILE_COLS
        panel = weights[p]
        wide = c0 + TILE_COLS <= n_padded
        if rows == 4:
            if wide:
                indirect_4x16(plane, bases, r0, groups, panel, 0, k_groups, sums, r0, c0, ones)
            else:
                indirect_4x8(plane, bases, r0, groups, panel, 0, k_groups, sums, r0, c0, ones)
        elif rows == 3:
            if wide:
                indirect_3x16(plane, bases, r0, groups, panel, 0, k_groups, sums, r0, c0, ones)
            else:
                indirect_3x8(plane, bases, r0, groups, panel, 0, k_groups, sums, r0, c0, ones)
        elif rows == 2:
            if wide:
                indirect_2x16(plane, bases, r0, groups, panel, 0, k_groups, sums, r0, c0, ones)
            else:
                indirect_2x8(plane, bases, r0, groups, panel, 0, k_groups, sums, r0, c0, ones)
        elif wide:
            indirect_1x16(plane, bases, r0, groups, panel, 0, k_groups, sums, r0, c0, ones)
        else:
            indirect_1x8(plane, bases, r0, groups, panel, 0, k_groups, sums, r0, c0, ones)


@njit(**_JIT)
def _pad_image(image, padded, layout, channels, height, width, padded_h, padded_w, pixel_bytes, top, left, zero):
    """Copy one image into a plane filled with its zero point (padding then contributes 0).

    NCHW images copy plane by plane; channels-last ones row by row (``pixel_bytes`` per pixel,
    the stored tensor's padded channel count).
    """
    if layout == NCHW:
        padded[: channels * padded_h * padded_w] = np.uint8(zero)
        for c in range(channels):
            for h in range(height):
                dst = (c * padded_h + h + top) * padded_w + left
                padded[dst : dst + width] = image[(c * height + h) * width : (c * height + h + 1) * width]
    else:
        padded[: padded_h * padded_w * pixel_bytes] = np.uint8(zero)
        row = width * pixel_bytes
        for h in range(height):
            dst = ((h + top) * padded_w + left) * pixel_bytes
            padded[dst : dst + row] = image[h * row : (h + 1) * row]


@njit(**_JIT)
def conv_rows(
    x, out, weights, bias, multiplier, groups, geometry, input_zero, zero_point, act, act_zero, act_a, act_b,
    scratch, acc, ones, isa,
):  # fmt: skip
    """QLinearConv with a fused activation, one image at a time, writing NHWC.

    ``geometry`` holds the first 16 fields of ``program.CONV_FIELDS``. The image is copied once
    into a padded plane; then per block of output pixels, the indirect tiles read each pixel's
    receptive field straight from that plane (base offset per pixel, group offset per four k),
    and one epilogue loop requantizes the block into the NHWC output (``bias`` and
    ``multiplier`` are tiled to [block, padded channels]).
    """
    in_channels, height, width, _, stride_h, stride_w, out_h, out_w = geometry[:8]
    padded_h, padded_w, k_groups, top, left, layout, channel_stride, n_padded = geometry[8:16]
    pixels = out_h * out_w
    block = CONV_PIXEL_BLOCK
    pixel_bytes = 1 if layout == NCHW else channel_stride
    plane = padded_h * padded_w * (in_channels if layout == NCHW else channel_stride)
    padded = scratch[:plane]
    sums = acc[: block * n_padded].reshape(block, n_padded)
    flat_sums = acc[: block * n_padded]
    bases = acc[block * n_padded : block * n_padded + block]
    for r in range(x.shape[0]):
        _pad_image(
            x[r], padded, layout, in_channels, height, width, padded_h, padded_w, pixel_bytes, top, left, input_zero
        )
        image_out = out[r]
        for p0 in range(0, pixels, block):
            count = min(block, pixels - p0)
            oh = p0 // out_w
            ow = p0 - oh * out_w
            for j in range(count):
                bases[j] = (oh * stride_h * padded_w + ow * stride_w) * pixel_bytes
                ow += 1
                if ow == out_w:
                    ow = 0
                    oh += 1
            if isa == VNNI:
                _vnni_indirect_products(padded, bases, count, groups, weights, k_groups, n_padded, sums)
            else:
                for j0 in range(0, count, TILE_ROWS):
                    _indirect_rows(
                        padded, bases, j0, min(TILE_ROWS, count - j0), groups, weights, k_groups, n_padded, sums, ones
                    )
            n = count * n_padded
            _requantize(
                flat_sums, n, bias, multiplier, zero_point, act, act_zero, act_a, act_b,
                image_out[p0 * n_padded : p0 * n_padded + n],
            )  # fmt: skip


@njit(**_JIT)
def pool_rows(x, out, geometry, input_scale, input_zero, output_scale, zero_point, sums):
    """QLinearAveragePool, general case: float32 window sums in row-major window order.

    ``geometry`` holds the first 13 fields of ``program.POOL_FIELDS``. Channels-last inputs
    (``channels`` a multiple of 8) accumulate whole pixels with vector instructions; an NCHW
    input (only when pooling a multi-channel network input) takes a scalar loop. ``sums`` is a
    float32 scratch of at least ``channels``.
    """
    channels, height, width, kernel_h, kernel_w, stride_h, stride_w, top, left, out_h, out_w = geometry[:11]
    count_include_pad, layout = geometry[11], geometry[12]
    zero = np.float32(zero_point)
    vectors = channels // COLUMN_ALIGN
    for r in range(x.shape[0]):
        src = x[r]
        dst = out[r]
        for ph in range(out_h):
            h0 = ph * stride_h - top
            h1 = min(h0 + kernel_h, height)
            h0 = max(h0, 0)
            for pw in range(out_w):
                w0 = pw * stride_w - left
                w1 = min(w0 + kernel_w, width)
                w0 = max(w0, 0)
                count = kernel_h * kernel_w if count_include_pad else (h1 - h0) * (w1 - w0)
                divisor = np.float32(count)
                for c in range(channels):
                    sums[c] = _F0
                if layout == NCHW:
                    for c in range(channels):
                        total = _F0
                        for h in range(h0, h1):
                            for w in range(w0, w1):
                                q = np.int32(src[(c * height + h) * width + w])
                                total += np.float32(np.int32(q - input_zero)) * input_scale
                        sums[c] = total
                else:
                    for h in range(h0, h1):
                        for w in range(w0, w1):
                            accumulate_dequantized(
                                sums, src, (h * width + w) * channels, vectors, input_zero, input_scale
                            )
                for c in range(channels):
                    v = (sums[c] / divisor) / output_scale + zero
                    inside = (v < _INT32_LIMIT) & (v >= -_INT32_LIMIT)  # else INT32_MIN, clamped to 0
                    t = min(max(np.rint(v), _F0), _F255) if inside else _F0
                    at = (c * out_h + ph) * out_w + pw if layout == NCHW else (ph * out_w + pw) * channels + c
                    dst[at] = np.uint8(t)


@njit(**_JIT)
def global_pool_rows(x, out, layout, channels, size, input_zero, multiplier, zero_point):
    """QLinearGlobalAveragePool: exact int32 sums, requantized like QGemm."""
    low = np.float32(-zero_point)
    high = np.float32(255 - zero_point)
    zero = np.float32(zero_point)
    for r in range(x.shape[0]):
        src = x[r]
        dst = out[r]
        for c in range(channels):
            total = 0
            for i in range(size):
                total += np.int32(src[c * size + i] if layout == NCHW else src[i * channels + c])
            rounded = min(max(np.rint(np.float32(np.int32(total - input_zero * size)) * multiplier), low), high)
            dst[c] = np.uint8(rounded + zero)


# ---- uint16 activations (A16W8) -----------------------------------------------------------
#
# onnxruntime runs every operation on a uint16 tensor in float32 (see kernels.arithmetic): the
# elementwise ones below are its float formulas, bit for bit; the dense layers are exact integer
# sums, scaled and rounded once like the 8-bit QGemm's. 16-bit tensors are always NCHW.


@njit(**_JIT)
def quantize16_rows(x, out, features, scale, zero_point):
    """QuantizeLinear of float32 rows ``x[:, :features]`` into uint16 ``out`` (the uint8 formula, 65535 for 255).

    Not :func:`quantize_rows` with the top code as a parameter: that version, storing through an
    implicit cast, made the CNN's batch-1 call 0.25 us (4%) slower, measured.
    """
    low = np.float32(-zero_point)
    high = np.float32(65535 - zero_point)
    zero = np.float32(zero_point)
    for r in range(x.shape[0]):
        src = x[r]
        dst = out[r]
        for j in range(features):
            v = src[j] / scale
            v = v if v > low else low  # NaN takes ``low``, as maxps does
            v = v if v < high else high
            dst[j] = np.uint16(np.rint(v) + zero)


@njit(inline="always")
def _square16(r, scale, output_scale, low, high, zero):
    """The float32 square of a uint16 value ``r = q - zp`` (an integer in float32): dequantize, ``d * d``,
    QuantizeLinear to uint16.

    ``y / output_scale`` is never NaN (``y`` is finite or +inf), so rounding before clamping (with
    ``min``/``max``, which vectorize) gives QuantizeLinear's result.
    """
    d = r * scale
    y = d * d
    return np.uint16(min(max(np.rint(y / output_scale), low), high) + zero)


@njit(**_JIT)
def square16_rows(q, out, n, input_zero, act_zero, input_scale, output_scale):
    """A standalone square from uint16 to uint16 (``DequantizeLinear -> Mul -> QuantizeLinear`` in float32)."""
    low, high, zero = np.float32(-act_zero), np.float32(65535 - act_zero), np.float32(act_zero)
    for r in range(q.shape[0]):
        src = q[r]
        dst = out[r]
        for j in range(n):
            value = np.float32(np.int32(np.int32(src[j]) - input_zero))
            dst[j] = _square16(value, input_scale, output_scale, low, high, zero)


@njit(inline="always")
def _requantize16(sums, n, bias, multiplier, zero_point, act, act_zero, act_a, act_b, out):
    """:func:`_requantize` to uint16: the same float32 scaling and rounding, clamped to [0, 65535]; a
    fused square is the float32 square of the requantized value (``act_a``, ``act_b``: its input and
    output scales), so that fused and standalone squares agree."""
    low, high, zero = np.float32(-zero_point), np.float32(65535 - zero_point), np.float32(zero_point)
    low2, high2, zero2 = np.float32(-act_zero), np.float32(65535 - act_zero), np.float32(act_zero)
    if act == ACT_SQUARE:
        for j in range(n):
            value = _requantized(sums[j], bias[j], multiplier[j], low, high)
            out[j] = _square16(value, act_a, act_b, low2, high2, zero2)
    else:
        for j in range(n):
            out[j] = np.uint16(_requantized(sums[j], bias[j], multiplier[j], low, high) + zero)


@njit(**_JIT)
def gemm_rows_to16(
    x, out, weights, k_groups, n, n_padded, bias, multiplier, zero_point, act, act_zero, act_a, act_b, sums, ones, isa
):
    """A dense layer from uint8 rows ``x`` to uint16 ``out``: the sums of :func:`gemm_rows` (same packed
    panels and tiles), requantized to uint16 with an optional fused uint16 square.

    The tiles' int32 sums of ``x * w`` plus the bias with the input zero point folded in are the
    exact ``sum((x - zx) * w) + bias`` (int32 arithmetic wraps, and the compiler admits only layers
    whose exact result fits int32).
    """
    rows = x.shape[0]
    step = VNNI_ROWS if isa == VNNI else TILE_ROWS
    for r0 in range(0, rows, step):
        mr = min(step, rows - r0)
        if isa == VNNI:
            _vnni_products(x, r0, mr, weights, k_groups, n_padded, sums, 0)
        else:
            _tile_rows(x, r0, mr, weights, k_groups, n_padded, sums, 0, ones)
        for i in range(mr):
            _requantize16(sums[i], n, bias, multiplier, zero_point, act, act_zero, act_a, act_b, out[r0 + i])


@njit(inline="always")
def _exact_sum(centered, w, k, bias):
    """``bias + sum(centered[:k] * w[:k])``, exact in int64 (the compiler checks that it fits int32)."""
    acc = np.int64(bias)
    for j in range(k):
        acc += np.int64(centered[j]) * np.int64(w[j])
    return acc


@njit(inline="always")
def _center16(src, input_zero, k, centered):
    for j in range(k):
        centered[j] = np.int32(src[j]) - input_zero


@njit(**_JIT)
def gemm16_rows(x, out, weights, bias, multiplier, input_zero, zero_point, act, act_zero, act_a, act_b, scratch):
    """A dense layer from uint16 rows ``x`` to uint16 ``out``: exact integer sums of ``(x - zx) * w``
    plus the bias, then :func:`_requantize16`'s scaling (and fused square).

    ``weights`` int8 [n, k] row-major; ``scratch`` int32 of at least k (the centered input row).
    A plain loop: such layers (e.g. an MLP's 128 -> 10) cost little next to the uint8 layer before them.
    """
    n, k = weights.shape
    centered = scratch[:k]
    low, high, zero = np.float32(-zero_point), np.float32(65535 - zero_point), np.float32(zero_point)
    low2, high2, zero2 = np.float32(-act_zero), np.float32(65535 - act_zero), np.float32(act_zero)
    for r in range(x.shape[0]):
        _center16(x[r], input_zero, k, centered)
        dst = out[r]
        for c in range(n):
            acc = np.int32(_exact_sum(centered, weights[c], k, bias[c]))
            value = min(max(np.rint(np.float32(acc) * multiplier[c]), low), high)
            if act == ACT_SQUARE:
                dst[c] = _square16(value, act_a, act_b, low2, high2, zero2)
            else:
                dst[c] = np.uint16(value + zero)


@njit(**_JIT)
def gemm16_rows_to_float(x, out, weights, bias, multiplier, input_zero, scratch):
    """A dense layer from uint16 rows to the float output: ``float32(exact sum + bias) * (x_scale * w_scale)``."""
    n, k = weights.shape
    centered = scratch[:k]
    for r in range(x.shape[0]):
        _center16(x[r], input_zero, k, centered)
        dst = out[r]
        for c in range(n):
            dst[c] = np.float32(np.int32(_exact_sum(centered, weights[c], k, bias[c]))) * multiplier[c]
