"""From an int8 QDQ ONNX graph to a :class:`~kernels.plan.Plan`.

The compiler recognises the groups that onnxruntime fuses into integer kernels and nothing
else: ``QuantizeLinear`` of the float input; ``DequantizeLinear -> {Conv, Gemm, Mul(x, x), Relu,
AveragePool} -> QuantizeLinear``; ``Flatten`` of a quantized tensor; and, to produce the float
output, either a final ``DequantizeLinear`` or a last ``DequantizeLinear -> Gemm`` whose float
result is the output (onnxruntime runs it as a QGemm with a float output). Any other operator
with a float output runs in float32 in onnxruntime, which integer kernels cannot reproduce bit
for bit, so it is refused. Weights must be int8 initializers behind a
``DequantizeLinear`` with zero zero-points (per-channel along the output axis, or per-tensor),
biases int32 initializers, activations uint8 (or uint16, below) per-tensor. Anything else, an
unknown operator as much as an unsupported attribute value, raises
:class:`UnsupportedModelError` naming the node, at load time: a model either runs entirely on
the kernels or not at all.

16-bit activations (A16W8 models: ``QuantizeLinear`` with a uint16 zero point). onnxruntime
fuses no group that touches a uint16 tensor and runs it in float32 (:mod:`kernels.arithmetic`),
so the kernels accept only the few uint16 operations they implement, each with a stated rule:

* ``QuantizeLinear`` of the float input to uint16, and ``DequantizeLinear`` of a uint16 tensor
  into the graph output: onnxruntime's formulas, bit for bit;
* ``Mul(x, x)`` from uint16 to uint16: the float32 square, bit for bit;
* ``Gemm`` from uint8 to uint16 (the 8-bit SIMD tiles, a 16-bit output), from uint16 to uint16,
  and from uint16 to the float graph output: exact integer sums, not bit-identical to
  onnxruntime's float32 SGEMM, whose summation order cannot be reproduced. The compiler admits
  such a layer only if its worst-case sum ``max|q - zp| * sum|w| + |bias|`` fits int32 (so the
  int32 sums are exact); ``Flatten`` of a uint16 tensor, as of any other.

Conv, AveragePool and Relu on a uint16 tensor, and any step between a uint8 and a uint16 tensor
other than the uint8-input Gemm (a square from uint8 to uint16, a Gemm from uint16 to uint8),
are refused naming the node.

After parsing, a square or ReLU that directly follows a convolution or dense layer is fused
into it (one kernel writes the activated result: for a 16-bit square, the float32 square of the
requantized uint16 value, so fused and unfused give the same codes), and tensors left unused
are dropped.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
from onnx import numpy_helper

from kernels.arithmetic import global_pool_scale, global_pool_scale_supported
from kernels.errors import UnsupportedModelError
from kernels.plan import (
    INPUT,
    OUTPUT,
    AvgPool,
    Conv,
    Dequantize,
    Elementwise,
    Gemm,
    Plan,
    Quantize,
    Relu,
    Square,
    Step,
    Tensor,
)
from models.errors import ModelArtifactError
from models.quantization import INT32_MAX, QuantParams

SUPPORTED_OPERATORS = ("QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "Mul", "Relu", "AveragePool", "Flatten")
_ZERO_POINT_BITS = {np.dtype(np.uint8): 8, np.dtype(np.uint16): 16}
_OUTPUT_DTYPE_BITS = {onnx.TensorProto.UINT8: 8, onnx.TensorProto.UINT16: 16}


@dataclass(frozen=True)
class _View:
    """A graph value backed by plan tensor ``tensor``, seen with ``shape`` (Flatten changes only the shape)."""

    tensor: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Constant:
    """The output of ``DequantizeLinear`` applied to an initializer (weights or bias)."""

    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int


@dataclass(frozen=True)
class _Pending:
    """A float result waiting for the QuantizeLinear that completes its fused group."""

    node: onnx.NodeProto
    source: _View
    build: str
    details: dict


def _describe(node: onnx.NodeProto) -> str:
    return f"node {node.name or '<unnamed>'!r} ({node.op_type})"


def _refuse(node: onnx.NodeProto, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{_describe(node)}: {why}")


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _pair(node: onnx.NodeProto, values, default: int, what: str) -> tuple[int, int]:
    if values is None:
        return default, default
    values = [int(v) for v in values]
    if len(values) != 2:
        raise _refuse(node, f"{what} {values}: only 2-D operations are supported")
    return values[0], values[1]


def _pads(node: onnx.NodeProto, values) -> tuple[int, int, int, int]:
    if values is None:
        return 0, 0, 0, 0
    values = [int(v) for v in values]
    if len(values) != 4 or min(values) < 0:
        raise _refuse(node, f"pads {values}: need four non-negative 2-D pads")
    top, left, bottom, right = values
    return top, left, bottom, right


class _Compiler:
    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.graph = graph
        self.initializers = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self.consumers = Counter(name for node in graph.node for name in node.input if name)
        self.consumers.update(o.name for o in graph.output)
        self.tensors: list[Tensor] = []
        self.steps: list[Step] = []
        self.quantized: dict[str, _View] = {}
        self.dequantized: dict[str, _View] = {}
        self.constants: dict[str, _Constant] = {}
        self.pending: dict[str, _Pending] = {}
        inputs = [i for i in graph.input if i.name not in self.initializers]
        if len(inputs) != 1 or len(graph.output) != 1:
            raise UnsupportedModelError(
                f"graph has inputs {[i.name for i in inputs]} and outputs {[o.name for o in graph.output]}; "
                "the kernels need exactly one of each"
            )
        self.input_name = inputs[0].name
        self.output_name = graph.output[0].name
        tensor_type = inputs[0].type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise UnsupportedModelError(f"graph input {self.input_name!r} is not float32")
        if len(dims) < 2 or any(d is None or d <= 0 for d in dims[1:]):
            raise UnsupportedModelError(
                f"graph input {self.input_name!r} needs a batch axis and fixed positive sample dims, got {dims}"
            )
        self.input_shape = tuple(int(d) for d in dims[1:])

    # ---- helpers -------------------------------------------------------------------------

    def _initializer(self, node: onnx.NodeProto, name: str, what: str) -> np.ndarray:
        if name not in self.initializers:
            raise _refuse(node, f"{what} {name!r} must be an initializer")
        return self.initializers[name]

    def _quant_params(self, node: onnx.NodeProto) -> QuantParams:
        """Per-tensor uint8 or uint16 scale and zero point of a Q or DQ on an activation."""
        scale = self._initializer(node, node.input[1], "scale")
        if scale.size != 1 or scale.dtype != np.float32 or not np.isfinite(scale).all() or float(scale.ravel()[0]) <= 0:
            raise _refuse(node, f"scale must be one positive finite float32, got {scale.dtype} {scale.ravel()[:4]}")
        if len(node.input) > 2 and node.input[2]:
            zero = self._initializer(node, node.input[2], "zero point")
            if zero.size != 1 or zero.dtype not in _ZERO_POINT_BITS:
                raise _refuse(
                    node,
                    f"activations must be uint8 per-tensor (or uint16, A16W8); zero point is {zero.dtype} of size "
                    f"{zero.size}",
                )
            zero_point, bits = int(zero.ravel()[0]), _ZERO_POINT_BITS[zero.dtype]
        else:  # no zero point: 0, of the type QuantizeLinear's output_dtype names (uint8 by default)
            output_dtype = int(_attributes(node).get("output_dtype", 0)) if node.op_type == "QuantizeLinear" else 0
            if output_dtype not in (0, *_OUTPUT_DTYPE_BITS):
                raise _refuse(node, f"activations must be uint8 or uint16; output_dtype is {output_dtype}")
            zero_point, bits = 0, _OUTPUT_DTYPE_BITS.get(output_dtype, 8)
        return QuantParams(scale=float(scale.ravel()[0]), zero_point=zero_point, bits=bits)

    @staticmethod
    def _refuse_16_bit(node: onnx.NodeProto, *params: QuantParams) -> None:
        """Refuse ``node`` if it reads or writes a uint16 tensor: its operator has no 16-bit form here."""
        if any(p.bits == 16 for p in params):
            raise _refuse(
                node,
                f"reads or writes a uint16 tensor; {node.op_type} is supported on uint8 tensors only (16-bit "
                "activations: Gemm, Mul(x, x), Flatten, QuantizeLinear of the input, DequantizeLinear of the output)",
            )

    def _check_accumulation(self, node: onnx.NodeProto, source: _View, weight: np.ndarray, bias: np.ndarray) -> None:
        """A Gemm with a uint16 input or output is computed as exact int32 sums: refuse it unless the
        worst case ``max|q - zp| * sum|w| + |bias|`` (over output channels) fits int32."""
        params = self.tensors[source.tensor].params
        largest = max(params.zero_point, params.qmax - params.zero_point)
        rows = np.abs(weight.astype(np.int64)).sum(axis=1)
        worst = int((largest * rows + np.abs(bias.astype(np.int64))).max(initial=0))
        if worst > INT32_MAX:
            raise _refuse(
                node,
                f"its integer sums could reach {worst} (|q - zp| <= {largest}, inputs {weight.shape[1]}), beyond "
                "int32: the 16-bit Gemm is computed in exact int32 arithmetic",
            )

    def _new_tensor(self, shape: tuple[int, ...], params: QuantParams) -> int:
        self.tensors.append(Tensor(shape=tuple(int(s) for s in shape), params=params))
        return len(self.tensors) - 1

    def _activation_input(self, node: onnx.NodeProto, name: str) -> _View:
        if name not in self.dequantized:
            raise _refuse(node, f"input {name!r} must be the DequantizeLinear of a quantized activation")
        return self.dequantized[name]

    def _weights(self, node: onnx.NodeProto, name: str, channels_axis: int) -> tuple[np.ndarray, np.ndarray]:
        """int8 values and float32 per-output-channel scales of a dequantized weight initializer."""
        constant = self.constants.get(name)
        if constant is None:
            raise _refuse(node, f"weight {name!r} must be a DequantizeLinear of an int8 initializer")
        values = constant.values
        if values.dtype != np.int8:
            raise _refuse(node, f"weights are {values.dtype}; the kernels need int8")
        if np.any(constant.zero_point != 0):
            raise _refuse(node, "weights need zero zero-points (symmetric quantization)")
        channels = values.shape[channels_axis]
        scale = constant.scale.astype(np.float32).ravel()
        if scale.size == 1:
            scale = np.full(channels, scale[0], np.float32)
        elif scale.size != channels or constant.axis % values.ndim != channels_axis:
            raise _refuse(node, f"weight scales must be per-tensor or per output channel (axis {channels_axis})")
        if not (np.isfinite(scale).all() and (scale > 0).all()):
            raise _refuse(node, "weight scales must be positive and finite")
        return values, scale

    def _bias(self, node: onnx.NodeProto, source: _View, weight_scale: np.ndarray) -> np.ndarray:
        """int32 bias; its scale must be ``input_scale * weight_scale``, the scale of the integer sums
        that onnxruntime's fused kernels add it to unscaled."""
        channels = weight_scale.size
        if len(node.input) < 3 or not node.input[2]:
            return np.zeros(channels, np.int32)
        constant = self.constants.get(node.input[2])
        if constant is None or constant.values.dtype != np.int32 or np.any(constant.zero_point != 0):
            raise _refuse(node, "bias must be a DequantizeLinear of an int32 initializer with zero zero-points")
        expected = (np.float32(self.tensors[source.tensor].params.scale) * weight_scale).astype(np.float32)
        if not np.array_equal(np.broadcast_to(constant.scale.astype(np.float32).ravel(), expected.shape), expected):
            raise _refuse(node, "bias scale must equal input scale x weight scale (float32), as for integer kernels")
        bias = constant.values.ravel()
        if bias.size == 1:
            bias = np.full(channels, bias[0], np.int32)
        if bias.size != channels:
            raise _refuse(node, f"bias has {bias.size} values for {channels} output channels")
        return bias.astype(np.int32)

    # ---- operators ------------------------------------------------------------------------

    def quantize_linear(self, node: onnx.NodeProto) -> None:
        params = self._quant_params(node)
        source = node.input[0]
        if source == self.input_name:
            target = self._new_tensor(self.input_shape, params)
            self.steps.append(Quantize(name=node.name, source=INPUT, target=target, params=params))
        elif source in self.pending:
            pending = self.pending.pop(source)
            if self.consumers[source] != 1:
                raise _refuse(pending.node, "its float output must feed exactly one QuantizeLinear")
            target, step = getattr(self, f"_build_{pending.build}")(pending, params)
            self.steps.append(step)
            if pending.build == "elementwise":  # keeps its input's tensor shape and its view (e.g. flattened)
                self.quantized[node.output[0]] = _View(target, pending.source.shape)
                return
        else:
            raise _refuse(
                node, f"quantizes {source!r}, which is neither the graph input nor a supported operator's output"
            )
        self.quantized[node.output[0]] = _View(target, self.tensors[target].shape)

    def dequantize_linear(self, node: onnx.NodeProto) -> None:
        source, output = node.input[0], node.output[0]
        if source in self.initializers:
            values = self.initializers[source]
            scale = self._initializer(node, node.input[1], "scale")
            has_zero = len(node.input) > 2 and bool(node.input[2])
            zero = self._initializer(node, node.input[2], "zero point") if has_zero else np.zeros(1, values.dtype)
            axis = int(_attributes(node).get("axis", 1))
            self.constants[output] = _Constant(values, np.asarray(scale), np.asarray(zero), axis)
            return
        if source not in self.quantized:
            raise _refuse(node, f"dequantizes {source!r}, which is neither an initializer nor a quantized tensor")
        view = self.quantized[source]
        params = self._quant_params(node)
        if len(node.input) < 3 or not node.input[2]:  # no zero point: 0, of the input's type
            params = dataclasses.replace(params, bits=self.tensors[view.tensor].bits)
        if params != self.tensors[view.tensor].params:
            raise _refuse(node, "dequantizes with a scale or zero point different from the tensor's QuantizeLinear")
        if output == self.output_name:
            if len(view.shape) != 1:
                raise _refuse(node, f"the graph output must be [batch, features], got sample shape {list(view.shape)}")
            self.steps.append(Dequantize(name=node.name, source=view.tensor, target=OUTPUT))
        else:
            self.dequantized[output] = view

    def conv(self, node: onnx.NodeProto) -> None:
        self._integer_output(node)
        source = self._activation_input(node, node.input[0])
        self._refuse_16_bit(node, self.tensors[source.tensor].params)
        if len(source.shape) != 3:
            raise _refuse(node, f"needs a [channels, height, width] input, got {list(source.shape)}")
        weight, scale = self._weights(node, node.input[1], 0)
        attrs = _attributes(node)
        if weight.ndim != 4 or weight.shape[1] != source.shape[0]:
            raise _refuse(node, f"weight shape {list(weight.shape)} does not match input {list(source.shape)}")
        if int(attrs.get("group", 1)) != 1:
            raise _refuse(node, "grouped convolutions are not supported")
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise _refuse(node, "auto_pad is not supported; use explicit pads")
        if _pair(node, attrs.get("dilations"), 1, "dilations") != (1, 1):
            raise _refuse(node, "dilated convolutions are not supported")
        kernel = _pair(node, attrs.get("kernel_shape"), 0, "kernel_shape")
        if attrs.get("kernel_shape") is not None and kernel != tuple(weight.shape[2:]):
            raise _refuse(node, f"kernel_shape {list(kernel)} does not match the weights {list(weight.shape[2:])}")
        strides = _pair(node, attrs.get("strides"), 1, "strides")
        pads = _pads(node, attrs.get("pads"))
        _, height, width = source.shape
        out_h = (height + pads[0] + pads[2] - weight.shape[2]) // strides[0] + 1
        out_w = (width + pads[1] + pads[3] - weight.shape[3]) // strides[1] + 1
        if min(strides) < 1 or out_h < 1 or out_w < 1:
            raise _refuse(node, f"strides {list(strides)} and pads {list(pads)} leave no output")
        details = dict(
            weight=weight,
            weight_scale=scale,
            bias=self._bias(node, source, scale),
            strides=strides,
            pads=pads,
            shape=(weight.shape[0], out_h, out_w),
        )
        self.pending[node.output[0]] = _Pending(node, source, "conv", details)

    def gemm(self, node: onnx.NodeProto) -> None:
        source = self._activation_input(node, node.input[0])
        attrs = _attributes(node)
        if (
            int(attrs.get("transA", 0)) != 0
            or float(attrs.get("alpha", 1.0)) != 1.0
            or float(attrs.get("beta", 1.0)) != 1.0
        ):
            raise _refuse(node, "needs transA=0, alpha=1 and beta=1")
        trans_b = int(attrs.get("transB", 0))
        weight, scale = self._weights(node, node.input[1], 0 if trans_b else 1)
        if weight.ndim != 2:
            raise _refuse(node, f"weight must be 2-D, got {list(weight.shape)}")
        if not trans_b:
            weight = np.ascontiguousarray(weight.T)
        if len(source.shape) != 1 or source.shape[0] != weight.shape[1]:
            raise _refuse(
                node, f"input of sample shape {list(source.shape)} does not match weights {list(weight.shape)}"
            )
        details = dict(
            weight=weight, weight_scale=scale, bias=self._bias(node, source, scale), shape=(weight.shape[0],)
        )
        if node.output[0] == self.output_name:  # float logits straight from the int32 sums
            if self.tensors[source.tensor].bits == 16:
                self._check_accumulation(node, source, weight, details["bias"])
            step = Gemm(
                name=node.name, source=source.tensor, target=OUTPUT, weight=weight, weight_scale=scale,
                bias=details["bias"], output=None,
            )  # fmt: skip
            self.steps.append(step)
            return
        self.pending[node.output[0]] = _Pending(node, source, "gemm", details)

    def _integer_output(self, node: onnx.NodeProto) -> None:
        if node.output[0] == self.output_name:
            raise _refuse(
                node,
                "writes the float graph output, which onnxruntime computes in float32 (only a Gemm may, as a QGemm)",
            )

    def mul(self, node: onnx.NodeProto) -> None:
        self._integer_output(node)
        if len(node.input) != 2 or node.input[0] != node.input[1]:
            raise _refuse(node, "only x * x (the square activation) is supported, not a product of two tensors")
        source = self._activation_input(node, node.input[0])
        self.pending[node.output[0]] = _Pending(node, source, "elementwise", dict(kind=Square))

    def relu(self, node: onnx.NodeProto) -> None:
        self._integer_output(node)
        source = self._activation_input(node, node.input[0])
        self._refuse_16_bit(node, self.tensors[source.tensor].params)
        self.pending[node.output[0]] = _Pending(node, source, "elementwise", dict(kind=Relu))

    def average_pool(self, node: onnx.NodeProto) -> None:
        self._integer_output(node)
        source = self._activation_input(node, node.input[0])
        self._refuse_16_bit(node, self.tensors[source.tensor].params)
        if len(source.shape) != 3:
            raise _refuse(node, f"needs a [channels, height, width] input, got {list(source.shape)}")
        attrs = _attributes(node)
        if int(attrs.get("ceil_mode", 0)) != 0:
            raise _refuse(node, "ceil_mode=1 is not supported")
        if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise _refuse(node, "auto_pad is not supported; use explicit pads")
        if _pair(node, attrs.get("dilations"), 1, "dilations") != (1, 1):
            raise _refuse(node, "dilated pooling is not supported")
        kernel = _pair(node, attrs.get("kernel_shape"), 0, "kernel_shape")
        strides = _pair(node, attrs.get("strides"), 1, "strides")
        pads = _pads(node, attrs.get("pads"))
        channels, height, width = source.shape
        out_h = (height + pads[0] + pads[2] - kernel[0]) // strides[0] + 1
        out_w = (width + pads[1] + pads[3] - kernel[1]) // strides[1] + 1
        if min(kernel) < 1 or min(strides) < 1 or out_h < 1 or out_w < 1:
            raise _refuse(node, f"kernel {list(kernel)}, strides {list(strides)} and pads {list(pads)} leave no output")
        if max(pads[0], pads[2]) >= kernel[0] or max(pads[1], pads[3]) >= kernel[1]:
            raise _refuse(node, "pads must be smaller than the kernel")
        details = dict(
            kernel=kernel,
            strides=strides,
            pads=pads,
            count_include_pad=bool(int(attrs.get("count_include_pad", 0))),
            shape=(channels, out_h, out_w),
        )
        self.pending[node.output[0]] = _Pending(node, source, "pool", details)

    def flatten(self, node: onnx.NodeProto) -> None:
        if int(_attributes(node).get("axis", 1)) != 1:
            raise _refuse(node, "only axis=1 (flatten each sample) is supported")
        name = node.input[0]
        table = self.quantized if name in self.quantized else self.dequantized if name in self.dequantized else None
        if table is None:
            raise _refuse(node, f"flattens {name!r}, which is not a quantized tensor")
        view = table[name]
        table[node.output[0]] = _View(view.tensor, (int(np.prod(view.shape)),))

    # ---- fused groups, completed by their QuantizeLinear ---------------------------------

    def _build_conv(self, pending: _Pending, params: QuantParams) -> tuple[int, Step]:
        self._refuse_16_bit(pending.node, params)
        d = pending.details
        target = self._new_tensor(d["shape"], params)
        step = Conv(
            name=pending.node.name,
            source=pending.source.tensor,
            target=target,
            weight=d["weight"],
            weight_scale=d["weight_scale"],
            bias=d["bias"],
            strides=d["strides"],
            pads=d["pads"],
            output=params,
        )
        return target, step

    def _build_gemm(self, pending: _Pending, params: QuantParams) -> tuple[int, Step]:
        d = pending.details
        source_bits = self.tensors[pending.source.tensor].bits
        if source_bits == 16 and params.bits == 8:
            raise _refuse(pending.node, "a Gemm from a uint16 to a uint8 tensor is not supported")
        if 16 in (source_bits, params.bits):
            self._check_accumulation(pending.node, pending.source, d["weight"], d["bias"])
        target = self._new_tensor(d["shape"], params)
        step = Gemm(
            name=pending.node.name,
            source=pending.source.tensor,
            target=target,
            weight=d["weight"],
            weight_scale=d["weight_scale"],
            bias=d["bias"],
            output=params,
        )
        return target, step

    def _build_elementwise(self, pending: _Pending, params: QuantParams) -> tuple[int, Step]:
        # Same shape as the source tensor (not its view), so that the lowering lays both out alike.
        source = self.tensors[pending.source.tensor]
        if pending.details["kind"] is Relu:
            self._refuse_16_bit(pending.node, source.params, params)
        elif source.bits != params.bits:
            raise _refuse(
                pending.node, f"a square from a uint{source.bits} to a uint{params.bits} tensor is not supported"
            )
        target = self._new_tensor(source.shape, params)
        activation = pending.details["kind"](output=params)
        return target, Elementwise(
            name=pending.node.name, source=pending.source.tensor, target=target, activation=activation
        )

    def _build_pool(self, pending: _Pending, params: QuantParams) -> tuple[int, Step]:
        d = pending.details
        source = self.tensors[pending.source.tensor]
        self._refuse_16_bit(pending.node, params)
        _, height, width = source.shape
        if d["kernel"] == (height, width) and not any(d["pads"]):
            scale = global_pool_scale(source.params.scale, params.scale, height * width)
            if not global_pool_scale_supported(scale):
                raise _refuse(pending.node, f"global average pool multiplier {scale} is outside onnxruntime's range")
        target = self._new_tensor(d["shape"], params)
        step = AvgPool(
            name=pending.node.name,
            source=pending.source.tensor,
            target=target,
            kernel=d["kernel"],
            strides=d["strides"],
            pads=d["pads"],
            count_include_pad=d["count_include_pad"],
        )
        return target, step

    # ---- driver ---------------------------------------------------------------------------

    _HANDLERS: ClassVar[dict[str, Callable[[_Compiler, onnx.NodeProto], None]]] = {
        "QuantizeLinear": quantize_linear,
        "DequantizeLinear": dequantize_linear,
        "Conv": conv,
        "Gemm": gemm,
        "Mul": mul,
        "Relu": relu,
        "AveragePool": average_pool,
        "Flatten": flatten,
    }

    def run(self) -> Plan:
        for node in self.graph.node:
            handler = self._HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if handler is None:
                raise _refuse(
                    node, f"operator not supported by the numba kernels (supported: {', '.join(SUPPORTED_OPERATORS)})"
                )
            handler(self, node)
        if self.pending:
            node = next(iter(self.pending.values())).node
            raise _refuse(node, "its float output is not quantized by a QuantizeLinear")
        last = self.steps[-1] if self.steps else None
        writes_output = isinstance(last, Dequantize) or (isinstance(last, Gemm) and last.output is None)
        if not writes_output or not isinstance(self.steps[0], Quantize):
            raise UnsupportedModelError(
                f"the graph must start by quantizing {self.input_name!r} and end by writing {self.output_name!r} "
                "with a DequantizeLinear or a float-output Gemm"
            )
        return _compact(
            Plan(
                input_name=self.input_name,
                input_shape=self.input_shape,
                output_name=self.output_name,
                tensors=tuple(self.tensors),
                steps=tuple(_fuse_activations(self.steps)),
            )
        )


def _fuse_activations(steps: list[Step]) -> list[Step]:
    """Fold an activation into the Conv/Gemm that produces its input, when nothing else reads that tensor."""
    readers = Counter(step.source for step in steps)
    fused: list[Step] = []
    for step in steps:
        previous = fused[-1] if fused else None
        if (
            isinstance(step, Elementwise)
            and isinstance(previous, Conv | Gemm)
            and previous.activation is None
            and previous.target == step.source
            and readers[step.source] == 1
        ):
            fused[-1] = dataclasses.replace(previous, target=step.target, activation=step.activation)
        else:
            fused.append(step)
    return fused


def _compact(plan: Plan) -> Plan:
    """Drop tensors no step writes any more and renumber the rest in order of use."""
    used = sorted({s.target for s in plan.steps if s.target >= 0} | {s.source for s in plan.steps if s.source >= 0})
    renumber = {old: new for new, old in enumerate(used)} | {INPUT: INPUT, OUTPUT: OUTPUT}
    steps = tuple(dataclasses.replace(s, source=renumber[s.source], target=renumber[s.target]) for s in plan.steps)
    return dataclasses.replace(plan, tensors=tuple(plan.tensors[i] for i in used), steps=steps)


def compile_model(model: onnx.ModelProto) -> Plan:
    """Compile an int8 QDQ ONNX model (uint8 activations, or A16W8) to an execution plan.

    Raises:
        UnsupportedModelError: an operator, attribute or quantization the kernels do not
            implement; the message names the node.
    """
    return _Compiler(model).run()


def compile_file(path: Path) -> Plan:
    """Load ``path`` (an artifact's ``model.onnx``) and compile it.

    Raises:
        ModelArtifactError: the file is missing or not a loadable ONNX model.
        UnsupportedModelError: see :func:`compile_model`.
    """
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises several unrelated types for a missing or corrupt file
        raise ModelArtifactError(f"{path}: not a loadable ONNX model ({exc})") from None
    return compile_model(model)
