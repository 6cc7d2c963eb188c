"""Lower an int8 QDQ ONNX model to what CKKS evaluates: affine maps and squares.

CKKS computes on real numbers, so the int8 model is read as the real network it encodes: every
weight and bias dequantized exactly as onnxruntime dequantizes it, and every activation
QuantizeLinear / DequantizeLinear pair, uint8 or uint16, read as the identity (there is no rounding under
encryption; the input's own quantization is applied by the client before it encrypts). What is
left is a chain of linear operators (Conv, Gemm, AveragePool, Flatten) broken by squares
(``Mul(x, x)``). Each maximal run of linear operators becomes one affine map ``A x + c``, found by
pushing the zero vector and the unit vectors through the operators in numpy.

Anything else is refused here, when the model loads, naming the operator and the node.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from gateway.he.packing import ConvGeometry
from models.errors import InvalidArgumentError
from models.quantization import QuantParams

Op = Callable[[np.ndarray], np.ndarray]  # batch-first float64 arrays


@dataclass(frozen=True)
class Affine:
    matrix: np.ndarray  # [outputs, inputs]
    bias: np.ndarray  # [outputs]
    conv: ConvGeometry | None = None  # set when this map is exactly one Conv: it can take an im2col input


@dataclass(frozen=True)
class Square:
    width: int


Stage = Affine | Square


@dataclass(frozen=True)
class LoweredModel:
    input_shape: list[int]
    input_quantization: QuantParams  # the client rounds its input with these before encrypting
    stages: list[Stage]

    @property
    def depth(self) -> int:
        return len(self.stages)

    def bounds(self) -> list[float]:
        """A bound on ``|value|`` after each stage, for every input the client can encrypt.

        The client rounds its input to the model's uint8 grid, so each input value lies in the
        grid's range; intervals carried through the affine maps (``|W|`` times the radius) and
        the squares bound every intermediate value and the logits. Rigorous, and loose by the
        ratio of worst-case to typical alignment of weights and inputs.
        """
        q = self.input_quantization
        low, high = float(q.dequantize(np.array(0))), float(q.dequantize(np.array(q.qmax)))
        width = int(np.prod(self.input_shape))
        low, high = np.full(width, low), np.full(width, high)
        result = []
        for stage in self.stages:
            if isinstance(stage, Affine):
                centre, radius = (low + high) / 2, (high - low) / 2
                centre, radius = stage.matrix @ centre + stage.bias, np.abs(stage.matrix) @ radius
                low, high = centre - radius, centre + radius
            else:
                top = np.maximum(low**2, high**2)
                low, high = np.where((low <= 0) & (high >= 0), 0.0, np.minimum(low**2, high**2)), top
            result.append(float(max(np.abs(low).max(), np.abs(high).max())))
        return result

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        """What the encrypted evaluation approximates, in float64: the int8 network without
        onnxruntime's rounding of intermediate activations (the input is rounded, as the client does).

        ``x``: normalized inputs ``[batch, *input_shape]``; returns ``[batch, outputs]``.
        """
        q = self.input_quantization
        values = q.dequantize(q.quantize(np.asarray(x, np.float32))).reshape(len(x), -1).astype(np.float64)
        for stage in self.stages:
            values = values @ stage.matrix.T + stage.bias if isinstance(stage, Affine) else values * values
        return values


class UnsupportedOperatorError(InvalidArgumentError):
    """The graph holds an operator that the encrypted engine cannot evaluate."""


def _attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _conv(weight: np.ndarray, bias: np.ndarray | None, attrs: dict) -> Op:
    stride = attrs.get("strides", [1, 1])
    pads = attrs.get("pads", [0, 0, 0, 0])
    if attrs.get("group", 1) != 1 or attrs.get("dilations", [1, 1]) != [1, 1]:
        raise UnsupportedOperatorError("Conv with groups or dilations is not supported")

    def run(x: np.ndarray) -> np.ndarray:
        """One kernel offset at a time: memory stays at the output's size, not kernel-size times it."""
        x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
        _, _, kh, kw = weight.shape
        oh, ow = (x.shape[2] - kh) // stride[0] + 1, (x.shape[3] - kw) // stride[1] + 1
        y = np.zeros((len(x), weight.shape[0], oh, ow))
        for i in range(kh):
            for j in range(kw):
                patch = x[:, :, i : i + stride[0] * oh : stride[0], j : j + stride[1] * ow : stride[1]]
                y += np.einsum("bchw,oc->bohw", patch, weight[:, :, i, j])
        return y + (bias.reshape(1, -1, 1, 1) if bias is not None else 0)

    return run


def _avgpool(attrs: dict) -> Op:
    kh, kw = attrs["kernel_shape"]
    stride = attrs.get("strides", [kh, kw])
    if any(attrs.get("pads", [0, 0, 0, 0])):
        raise UnsupportedOperatorError("AveragePool with padding is not supported")

    def run(x: np.ndarray) -> np.ndarray:
        windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
        return windows[:, :, :: stride[0], :: stride[1]].mean(axis=(-1, -2))

    return run


def _affine(ops: list[Op], shape: list[int], conv: ConvGeometry | None) -> tuple[Affine, list[int]]:
    """The affine map of a run of linear ops, probed with the zero and unit vectors.

    ``conv`` is kept only when the run is that one convolution."""
    size = int(np.prod(shape))
    probes = np.concatenate([np.zeros((1, size)), np.eye(size)]).reshape(size + 1, *shape)
    out = probes
    for op in ops:
        out = op(out)
    out_shape = list(out.shape[1:])
    flat = out.reshape(size + 1, -1)
    bias = flat[0]
    matrix = (flat[1:] - bias).T.copy()
    return Affine(matrix=matrix, bias=bias.copy(), conv=conv if len(ops) == 1 else None), out_shape


def lower(path: Path) -> LoweredModel:
    """Read the int8 model at ``path`` as a chain of affine maps and squares.

    Raises:
        UnsupportedOperatorError: an operator CKKS cannot evaluate, named with its node.
    """
    model = onnx.load(str(path))
    graph = model.graph
    constants = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in graph.initializer}
    raw = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    input_value = graph.input[0]
    input_shape = [d.dim_value for d in input_value.type.tensor_type.shape.dim][1:]
    input_quantization: QuantParams | None = None

    stages: list[Stage] = []
    pending: list[Op] = []
    geometry: ConvGeometry | None = None  # the pending run's, while it is one Conv
    shape = list(input_shape)
    for node in graph.node:
        op, attrs = node.op_type, _attributes(node)
        if op == "DequantizeLinear" and node.input[0] in raw:  # a weight or bias
            q, scale = raw[node.input[0]].astype(np.float64), constants[node.input[1]]
            axis = attrs.get("axis", 1)
            scale = scale.reshape([-1 if i == axis else 1 for i in range(q.ndim)]) if scale.ndim else scale
            constants[node.output[0]] = (q - constants[node.input[2]].reshape(scale.shape)) * scale
        elif op == "QuantizeLinear":
            if node.input[0] == input_value.name:
                zero_point = raw[node.input[2]]
                if zero_point.dtype != np.uint8:  # the client rounds to a uint8 grid, which the spec describes
                    raise UnsupportedOperatorError(
                        f"QuantizeLinear node {node.name!r}: the network input must be uint8, not {zero_point.dtype}"
                    )
                input_quantization = QuantParams(scale=float(raw[node.input[1]]), zero_point=int(zero_point))
        elif op == "DequantizeLinear":  # an activation: the identity on real numbers
            continue
        elif op == "Flatten":
            pending.append(lambda x: x.reshape(len(x), -1))
        elif op == "Conv":
            bias = constants.get(node.input[2]) if len(node.input) > 2 else None
            weight = constants[node.input[1]]
            pending.append(_conv(weight, bias, attrs))
            if not pending[:-1]:
                geometry = ConvGeometry(
                    input_shape=shape,
                    kernel=list(weight.shape[2:]),
                    stride=attrs.get("strides", [1, 1]),
                    pads=attrs.get("pads", [0, 0, 0, 0]),
                )
        elif op == "Gemm":
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                raise UnsupportedOperatorError(f"Gemm node {node.name!r}: only transA=0, alpha=beta=1")
            weight = constants[node.input[1]]
            weight = weight if attrs.get("transB", 0) else weight.T
            bias = constants.get(node.input[2]) if len(node.input) > 2 else None
            pending.append(lambda x, w=weight, b=bias: x @ w.T + (b if b is not None else 0))
        elif op == "AveragePool":
            pending.append(_avgpool(attrs))
        elif op == "Mul" and node.input[0] == node.input[1]:
            affine, shape = _affine(pending, shape, geometry)
            stages += [affine, Square(width=affine.matrix.shape[0])]
            pending, geometry = [], None
        else:
            raise UnsupportedOperatorError(
                f"operator {op} (node {node.name!r}) cannot be evaluated under CKKS; "
                "supported: Conv, Gemm, AveragePool, Flatten, Mul(x, x), QuantizeLinear, DequantizeLinear"
            )
    if pending:
        affine, shape = _affine(pending, shape, geometry)
        stages.append(affine)
    if input_quantization is None:
        raise UnsupportedOperatorError("the graph does not quantize its input")
    return LoweredModel(input_shape=input_shape, input_quantization=input_quantization, stages=stages)
