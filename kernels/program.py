"""Lowering a :class:`~kernels.plan.Plan` to the flat arrays the numba interpreter reads.

Why flat arrays: the whole network runs in one call to one compiled function (a per-request
Python loop over layers costs more than a batch-1 MLP computes), and that function must be
the same for every model so that numba compiles it once, caches it on disk and every later
model loads instantly. So a program is data: an ``int64`` table with one row per operation
(opcode, tensor ids, shapes, offsets) and three flat parameter buffers (int8 weights, int32
biases and offsets, float32 multipliers and scales).

Layouts: the plan is in ONNX's NCHW order, but a convolution writes its output channels-last
(NHWC, channels padded to a multiple of 8): its tiles broadcast output pixels against the
filters, so the sums come out [pixel, channel], one epilogue loop covers a whole block of
them, and the average pool that follows vectorizes across channels. A dense layer reading a
flattened NHWC tensor gets its weight columns permuted (and zero-padded) to match, once, here;
a final DequantizeLinear writes an NHWC map back in NCHW order.

Weights are packed into panels of 16 output columns, ``[k/4, 16, 4]`` each (see :func:`_pack`
and :mod:`kernels.simd`). A convolution's k axis is ordered so that four consecutive k are four
contiguous input bytes: ``(channel, kh, kw padded to 4)`` for an NCHW input, ``(kh, kw, channel
padded to 8)`` for an NHWC one; the padding taps get zero weights. The zero point of the input
folds into the bias: ``sum((x - zx) * w) = sum(x * w) - zx * sum(w)``.

Tensors live in a per-chunk uint8 workspace, each sample's values contiguous with a row
stride rounded up to four bytes. Lowering also checks the precondition of the exact
``vpmaddubsw`` arithmetic: adjacent packed weights satisfy ``|w0| + |w1| <= 128``. The VNNI
tiles (``vpdpbusd``, no int16 step) would be exact without it, but keep it: whether a model
runs on the kernels must not depend on the CPU, and it is what makes both paths equal.

uint16 tensors (A16W8 models) take two bytes per value in the same workspace (the interpreter
views their rows as uint16; every offset is a multiple of four, so the view is aligned) and are
always NCHW: only dense layers and squares read or write one. Their operations have opcodes of
their own, so that the rows of the uint8 ones keep their meaning and their kernels:
``OP_QUANTIZE16`` and ``OP_DEQUANTIZE16`` (the graph's input and output), ``OP_GEMM_TO16`` (a
uint8 input through the same packed panels and tiles as ``OP_GEMM``, requantized to uint16),
``OP_GEMM16`` (a uint16 input: int8 weights unpacked, ``[n, k]`` row-major, for a plain loop;
uint16 or float output) and ``OP_SQUARE16``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels.arithmetic import global_pool_scale, requant_multiplier, square_ratio
from kernels.errors import UnsupportedModelError
from kernels.plan import INPUT, Activation, AvgPool, Conv, Dequantize, Elementwise, Gemm, Plan, Quantize, Relu, Square
from kernels.simd import COLUMN_ALIGN, K_GROUP, TILE_COLS, TILE_ROWS, VNNI_ROWS

# opcodes: uint8 operations, then those that read or write a uint16 tensor (OP_QUANTIZE16 and up)
OP_QUANTIZE, OP_GEMM, OP_CONV, OP_POOL, OP_ELEMENTWISE, OP_DEQUANTIZE = range(6)
OP_QUANTIZE16, OP_DEQUANTIZE16, OP_GEMM_TO16, OP_GEMM16, OP_SQUARE16 = range(6, 11)
# activation codes
ACT_NONE, ACT_SQUARE, ACT_RELU = range(3)
# tensor layouts
NCHW, NHWC = 0, 1

# Every operation row starts with these three columns; the rest are named per opcode below.
F_CODE, F_SRC, F_DST = 0, 1, 2
FIELDS = 40

CONV_PIXEL_BLOCK = 64  # output pixels per block: their sums and outputs stay in L1
GEMM_SUM_ROWS = max(TILE_ROWS, VNNI_ROWS)  # rows of int32 sums a dense layer keeps (whichever tiles run)
PAIR_LIMIT = 128  # |w0| + |w1| <= 128 keeps 255 * (|w0| + |w1|) inside int16: no vpmaddubsw saturation
ALIGN = 64

QUANTIZE_FIELDS = ("features", "zero_point", "scale")
DEQUANTIZE_FIELDS = ("features", "zero_point", "scale", "layout", "channels", "channel_stride")
ELEMENTWISE_FIELDS = ("features", "input_zero", "act", "act_zero", "act_floats")
GEMM_FIELDS = (
    "k_groups",
    "n",
    "n_padded",
    "weights",
    "bias",
    "multiplier",
    "zero_point",
    "act",
    "act_zero",
    "act_floats",
)
# OP_GEMM16: uint16 input; ``zero_point`` of the output (unused for a float output, ``dst < 0``)
GEMM16_FIELDS = ("k", "n", "weights", "bias", "multiplier", "input_zero", "zero_point", "act", "act_zero", "act_floats")
# conv_rows reads the first 16 as its ``geometry`` array, in this order
CONV_FIELDS = (
    "in_channels", "height", "width", "out_channels", "stride_h", "stride_w", "out_h", "out_w",
    "padded_h", "padded_w", "k_groups", "pad_top", "pad_left", "layout", "channel_stride", "n_padded",
    "weights", "bias", "multiplier", "input_zero", "zero_point", "act", "act_zero", "act_floats", "group_offsets",
)  # fmt: skip
# pool_rows reads the first 13 as its ``geometry`` array, in this order
POOL_FIELDS = (
    "channels", "height", "width", "kernel_h", "kernel_w", "stride_h", "stride_w", "pad_top", "pad_left",
    "out_h", "out_w", "count_include_pad", "layout", "is_global", "floats", "input_zero", "zero_point",
)  # fmt: skip
CONV_GEOMETRY = CONV_FIELDS.index("n_padded") + 1
POOL_GEOMETRY = POOL_FIELDS.index("layout") + 1


def field(names: tuple[str, ...], name: str) -> int:
    """Column of ``name`` in an operation row."""
    return 3 + names.index(name)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class Program:
    """A compiled model: operation table, parameter buffers and workspace layout."""

    ops: np.ndarray  # int64 [n_ops, FIELDS]
    weights: np.ndarray  # int8, packed
    ints: np.ndarray  # int32: biases (zero point folded in), receptive-field offsets
    floats: np.ndarray  # float32: multipliers, ratios, scales
    tensor_offsets: np.ndarray  # int64 [n_tensors]: bytes before the tensor in one sample's share of a chunk
    tensor_strides: np.ndarray  # int64 [n_tensors]: bytes per sample
    layouts: tuple[int, ...]  # NCHW or NHWC per tensor
    scratch_u8: int  # uint8 scratch per chunk (a convolution's zero-point-padded input image)
    scratch_i32: int  # int32 scratch per chunk (tile sums)
    scratch_f32: int  # float32 scratch per chunk (pooling sums)
    input_features: int
    num_outputs: int
    macs_per_sample: int

    @property
    def bytes_per_sample(self) -> int:
        return int(self.tensor_strides.sum())

    def workspace_u8(self, rows: int) -> int:
        """uint8 workspace of one chunk of ``rows`` samples: scratch, then every tensor."""
        return self.scratch_u8 + rows * self.bytes_per_sample


class _Buffers:
    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {"weights": [], "ints": [], "floats": []}
        self.sizes = {"weights": 0, "ints": 0, "floats": 0}

    def _add(self, kind: str, values, dtype) -> int:
        values = np.ascontiguousarray(np.atleast_1d(values), dtype).ravel()
        offset = self.sizes[kind]
        self.parts[kind].append(values)
        self.sizes[kind] += values.size
        return offset

    def weight(self, values) -> int:
        return self._add("weights", values, np.int8)

    def int(self, values) -> int:
        return self._add("ints", values, np.int32)

    def float(self, values) -> int:
        return self._add("floats", values, np.float32)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        def join(kind, dtype, spare):
            # spare zeros: an operation reads two activation floats even when it uses fewer
            return np.concatenate([*self.parts[kind], np.zeros(spare, dtype)]).astype(dtype)

        return join("weights", np.int8, 1), join("ints", np.int32, 1), join("floats", np.float32, 2)


def _check_pairs(name: str, rows: np.ndarray) -> None:
    """Refuse weights whose adjacent k pairs could saturate vpmaddubsw's int16 sums."""
    pairs = np.abs(rows.astype(np.int32)).reshape(rows.shape[0], -1, 2).sum(axis=2)
    if pairs.max(initial=0) > PAIR_LIMIT:
        raise UnsupportedModelError(
            f"node {name!r}: adjacent weights reach |w0| + |w1| = {int(pairs.max())} > {PAIR_LIMIT}; the int8 "
            "kernels (like onnxruntime's AVX2 ones) would saturate. Export with 7-bit weights (models/quantization.py)"
        )


def _pack(name: str, rows: np.ndarray) -> tuple[np.ndarray, int]:
    """[out, k] int8 rows to the tiles' panels, zero-padded; also ``out_padded`` (a multiple of 8).

    Panel ``p`` holds output columns ``16p .. 16p + 15`` as [k/4, 16, 4]: the 16 x 4 weights one
    tile step reads are 64 contiguous bytes, and a tile streams its whole panel sequentially
    (the hardware prefetcher follows it; a row-major [k/4, out, 4] layout made each tile step
    touch a new cache line).
    """
    n, k = rows.shape
    n_padded, k_padded = _round_up(n, COLUMN_ALIGN), _round_up(k, K_GROUP)
    panels = -(-n_padded // TILE_COLS)
    padded = np.zeros((panels * TILE_COLS, k_padded), np.int8)
    padded[:n, :k] = rows
    _check_pairs(name, padded)
    grouped = padded.reshape(panels, TILE_COLS, k_padded // K_GROUP, K_GROUP)
    return np.ascontiguousarray(grouped.transpose(0, 2, 1, 3)).reshape(
        panels, k_padded // K_GROUP, TILE_COLS * K_GROUP
    ), n_padded


def _folded_bias(bias: np.ndarray, weight_rows: np.ndarray, input_zero_point: int, name: str) -> np.ndarray:
    folded = bias.astype(np.int64) - input_zero_point * weight_rows.astype(np.int64).sum(axis=1)
    if np.abs(folded).max(initial=0) >= 2**31:
        raise UnsupportedModelError(f"node {name!r}: bias with the input zero point folded in overflows int32")
    return folded.astype(np.int32)


def _activation(buffers: _Buffers, activation: Activation | None, source_scale: float) -> tuple[int, int, int]:
    """(code, output zero point, float offset) of an activation applied to values at ``source_scale``.

    The floats: QLinearMul's ratio for a uint8 square; the input and output scales for a uint16
    square (the float32 formula) and for a ReLU.
    """
    match activation:
        case None:
            return ACT_NONE, 0, 0
        case Square(output=out) if out.bits == 16:
            return ACT_SQUARE, out.zero_point, buffers.float([source_scale, out.scale])
        case Square(output=out):
            return ACT_SQUARE, out.zero_point, buffers.float(square_ratio(source_scale, out.scale))
        case Relu(output=out):
            return ACT_RELU, out.zero_point, buffers.float([source_scale, out.scale])
    raise TypeError(f"not an activation: {activation!r}")


def _row(code: int, step, names: tuple[str, ...], values: dict) -> np.ndarray:
    row = np.zeros(FIELDS, np.int64)
    row[F_CODE], row[F_SRC], row[F_DST] = code, step.source, step.target
    row[3 : 3 + len(names)] = [values[name] for name in names]
    return row


def _physical_size(tensor, layout: int) -> int:
    """Bytes of one sample: channels-last tensors pad their channels to a multiple of 8; uint16 ones
    take two bytes a value."""
    if layout == NHWC:
        channels, height, width = tensor.shape
        return height * width * _round_up(channels, COLUMN_ALIGN)
    return tensor.size * (tensor.bits // 8)


def lower(plan: Plan) -> Program:
    """Pack ``plan`` into a :class:`Program`.

    Raises:
        UnsupportedModelError: weights outside the exact range of the int8 kernels.
    """
    buffers = _Buffers()
    layouts = [NCHW] * len(plan.tensors)
    rows: list[np.ndarray] = []
    scratch = {"u8": 1, "i32": 1, "f32": 1}
    for step in plan.steps:
        source = plan.tensors[step.source] if step.source != INPUT else None
        match step:
            case Quantize(params=params):
                values = dict(features=int(np.prod(plan.input_shape)), zero_point=params.zero_point)
                code = OP_QUANTIZE16 if params.bits == 16 else OP_QUANTIZE
                rows.append(_row(code, step, QUANTIZE_FIELDS, values | {"scale": buffers.float(params.scale)}))
            case Gemm() if source.bits == 16:
                values = _lower_gemm16(buffers, step, source)
                rows.append(_row(OP_GEMM16, step, GEMM16_FIELDS, values))
                scratch["i32"] = max(scratch["i32"], values["k"])
            case Gemm():
                values = _lower_gemm(buffers, step, source, layouts[step.source])
                wide = step.output is not None and step.output.bits == 16
                rows.append(_row(OP_GEMM_TO16 if wide else OP_GEMM, step, GEMM_FIELDS, values))
                scratch["i32"] = max(scratch["i32"], GEMM_SUM_ROWS * values["n_padded"])
            case Conv():
                values, u8, i32 = _lower_conv(buffers, step, source, plan.tensors[step.target], layouts[step.source])
                rows.append(_row(OP_CONV, step, CONV_FIELDS, values))
                layouts[step.target] = NHWC
                scratch["u8"], scratch["i32"] = max(scratch["u8"], u8), max(scratch["i32"], i32)
            case AvgPool():
                values = _lower_pool(buffers, step, source, plan.tensors[step.target], layouts[step.source])
                rows.append(_row(OP_POOL, step, POOL_FIELDS, values))
                layouts[step.target] = layouts[step.source]
                scratch["f32"] = max(scratch["f32"], values["channels"])
            case Elementwise(activation=activation):
                code, zero, floats = _activation(buffers, activation, source.params.scale)
                wide = source.bits == 16  # a uint16 square (the compiler admits nothing else on uint16)
                values = dict(
                    features=source.size if wide else _physical_size(source, layouts[step.source]),
                    input_zero=source.params.zero_point,
                    act=code,
                    act_zero=zero,
                    act_floats=floats,
                )
                rows.append(_row(OP_SQUARE16 if wide else OP_ELEMENTWISE, step, ELEMENTWISE_FIELDS, values))
                layouts[step.target] = layouts[step.source]
            case Dequantize() if source.bits == 16:  # always NCHW
                values = dict(
                    features=source.size,
                    zero_point=source.params.zero_point,
                    scale=buffers.float(source.params.scale),
                    layout=NCHW,
                    channels=1,
                    channel_stride=1,
                )
                rows.append(_row(OP_DEQUANTIZE16, step, DEQUANTIZE_FIELDS, values))
            case Dequantize():
                layout = layouts[step.source]
                values = dict(
                    features=source.size,
                    zero_point=source.params.zero_point,
                    scale=buffers.float(source.params.scale),
                    layout=layout,  # an NHWC feature map is written out in ONNX's NCHW order
                    channels=source.shape[0] if layout == NHWC else 1,
                    channel_stride=_round_up(source.shape[0], COLUMN_ALIGN) if layout == NHWC else 1,
                )
                rows.append(_row(OP_DEQUANTIZE, step, DEQUANTIZE_FIELDS, values))
    sizes = [_physical_size(tensor, layout) for tensor, layout in zip(plan.tensors, layouts, strict=True)]
    strides = np.array([_round_up(size, K_GROUP) for size in sizes], np.int64)
    weights, ints, floats = buffers.arrays()
    return Program(
        ops=np.stack(rows),
        weights=weights,
        ints=ints,
        floats=floats,
        tensor_offsets=np.concatenate([[0], np.cumsum(strides)[:-1]]).astype(np.int64),
        tensor_strides=strides,
        layouts=tuple(layouts),
        scratch_u8=_round_up(scratch["u8"], ALIGN),
        scratch_i32=_round_up(scratch["i32"], ALIGN),
        scratch_f32=_round_up(scratch["f32"], ALIGN),
        input_features=int(np.prod(plan.input_shape)),
        num_outputs=plan.num_outputs,
        macs_per_sample=plan.macs_per_sample(),
    )


def _lower_gemm(buffers: _Buffers, step: Gemm, source, layout: int) -> dict:
    weight = step.weight
    if layout == NHWC:  # the flattened input is (h, w, channel padded to 8), not (c, h, w)
        channels, height, width = source.shape
        permuted = np.zeros((weight.shape[0], height, width, _round_up(channels, COLUMN_ALIGN)), np.int8)
        permuted[..., :channels] = weight.reshape(-1, channels, height, width).transpose(0, 2, 3, 1)
        weight = permuted.reshape(weight.shape[0], -1)
    packed, n_padded = _pack(step.name, weight)
    if step.output is None:  # float output: QGemm's scale is (1.0 * x_scale) * w_scale, no output scale
        multiplier = (np.float32(source.params.scale) * np.asarray(step.weight_scale, np.float32)).astype(np.float32)
        code, zero, floats = ACT_NONE, 0, 0
    else:
        multiplier = requant_multiplier(source.params.scale, step.weight_scale, step.output.scale)
        code, zero, floats = _activation(buffers, step.activation, step.output.scale)
    return dict(
        k_groups=packed.shape[1],
        n=weight.shape[0],
        n_padded=n_padded,
        weights=buffers.weight(packed),
        bias=buffers.int(_folded_bias(step.bias, weight, source.params.zero_point, step.name)),
        multiplier=buffers.float(multiplier),
        zero_point=step.output.zero_point if step.output is not None else 0,
        act=code,
        act_zero=zero,
        act_floats=floats,
    )


def _lower_gemm16(buffers: _Buffers, step: Gemm, source) -> dict:
    """A uint16-input dense layer: unpacked int8 weights [n, k], the bias as is (no zero point folded
    in: the loop subtracts it from the input, so every partial sum stays within the compiler's int32
    bound), and the 8-bit QGemm's multipliers."""
    if step.output is None:
        multiplier = (np.float32(source.params.scale) * np.asarray(step.weight_scale, np.float32)).astype(np.float32)
        zero_point, (code, zero, floats) = 0, (ACT_NONE, 0, 0)
    else:
        multiplier = requant_multiplier(source.params.scale, step.weight_scale, step.output.scale)
        zero_point = step.output.zero_point
        code, zero, floats = _activation(buffers, step.activation, step.output.scale)
    return dict(
        k=step.weight.shape[1],
        n=step.weight.shape[0],
        weights=buffers.weight(step.weight),
        bias=buffers.int(step.bias),
        multiplier=buffers.float(multiplier),
        input_zero=source.params.zero_point,
        zero_point=zero_point,
        act=code,
        act_zero=zero,
        act_floats=floats,
    )


def _lower_conv(buffers: _Buffers, step: Conv, source, target, layout: int) -> tuple[dict, int, int]:
    out_channels, in_channels, kernel_h, kernel_w = step.weight.shape
    _, height, width = source.shape
    _, out_h, out_w = target.shape
    top, left, bottom, right = step.pads
    padded_h = height + top + bottom
    if layout == NCHW:  # k = (channel, kh, kw padded to 4): four taps of one kernel row are contiguous
        taps = _round_up(kernel_w, K_GROUP)
        padded_w = width + left + right + taps - kernel_w  # room for the padding taps' reads
        channel_stride = 1
        rows = np.zeros((out_channels, in_channels, kernel_h, taps), np.int8)
        rows[..., :kernel_w] = step.weight
        starts = np.arange(rows[0].size // K_GROUP) * K_GROUP
        channel, rest = np.divmod(starts, kernel_h * taps)
        kh, kw = np.divmod(rest, taps)
        group_offsets = (channel * padded_h + kh) * padded_w + kw
    else:  # NHWC: k = (kh, kw, channel padded to 8): four channels of one pixel are contiguous
        channel_stride = _round_up(in_channels, COLUMN_ALIGN)
        padded_w = width + left + right
        rows = np.zeros((out_channels, kernel_h, kernel_w, channel_stride), np.int8)
        rows[..., :in_channels] = step.weight.transpose(0, 2, 3, 1)
        starts = np.arange(rows[0].size // K_GROUP) * K_GROUP
        pixel, channel = np.divmod(starts, channel_stride)
        kh, kw = np.divmod(pixel, kernel_w)
        group_offsets = (kh * padded_w + kw) * channel_stride + channel
    rows = rows.reshape(out_channels, -1)
    packed, n_padded = _pack(step.name, rows)
    block = CONV_PIXEL_BLOCK
    # The epilogue runs over a whole block of NHWC output (pixels x padded channels) as one
    # vector loop, so bias and multiplier are tiled to that shape (zero for padding channels).
    bias = np.zeros(n_padded, np.int32)
    bias[:out_channels] = _folded_bias(step.bias, rows, source.params.zero_point, step.name)
    multiplier = np.zeros(n_padded, np.float32)
    multiplier[:out_channels] = requant_multiplier(source.params.scale, step.weight_scale, step.output.scale)
    code, zero, floats = _activation(buffers, step.activation, step.output.scale)
    values = dict(
        in_channels=in_channels,
        height=height,
        width=width,
        out_channels=out_channels,
        stride_h=step.strides[0],
        stride_w=step.strides[1],
        out_h=out_h,
        out_w=out_w,
        padded_h=padded_h,
        padded_w=padded_w,
        k_groups=packed.shape[1],
        pad_top=top,
        pad_left=left,
        layout=layout,
        channel_stride=channel_stride,
        n_padded=n_padded,
        weights=buffers.weight(packed),
        bias=buffers.int(np.tile(bias, block)),
        multiplier=buffers.float(np.tile(multiplier, block)),
        input_zero=source.params.zero_point,
        zero_point=step.output.zero_point,
        act=code,
        act_zero=zero,
        act_floats=floats,
        group_offsets=buffers.int(group_offsets),
    )
    scratch_u8 = padded_h * padded_w * (in_channels if layout == NCHW else channel_stride)
    scratch_i32 = block * n_padded + block
    return values, scratch_u8, scratch_i32


def _lower_pool(buffers: _Buffers, step: AvgPool, source, target, layout: int) -> dict:
    _, height, width = source.shape
    channels, out_h, out_w = target.shape
    if layout == NHWC:
        channels = _round_up(channels, COLUMN_ALIGN)  # padding channels are pooled too, and ignored
    params, out = source.params, target.params
    is_global = step.kernel == (height, width) and not any(step.pads)
    if is_global:
        floats = buffers.float(global_pool_scale(params.scale, out.scale, height * width))
    else:
        floats = buffers.float([params.scale, out.scale])
    return dict(
        channels=channels,
        height=height,
        width=width,
        kernel_h=step.kernel[0],
        kernel_w=step.kernel[1],
        stride_h=step.strides[0],
        stride_w=step.strides[1],
        pad_top=step.pads[0],
        pad_left=step.pads[1],
        out_h=out_h,
        out_w=out_w,
        count_include_pad=int(step.count_include_pad),
        layout=layout,
        is_global=int(is_global),
        floats=floats,
        input_zero=params.zero_point,
        zero_point=out.zero_point,
    )
