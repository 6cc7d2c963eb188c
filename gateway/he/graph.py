"""Lower an int8 QDQ ONNX model to what CKKS evaluates: affine maps and squares.

CKKS computes on real numbers, so the int8 model is read as the real network it encodes: every
weight and bias dequantized exactly as onnxruntime dequantizes it, and every activation
QuantizeLinear / DequantizeLinear pair read as the identity (there is no rounding under
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

from models.errors import InvalidArgumentError
from models.quantization import QuantParams

Op = Callable[[np.ndarray], np.ndarray]  # batch-first float64 arrays


@dataclass(frozen=True)
class Affine:
    matrix: np.ndarray  # [outputs, inputs]
    bias: np.ndarray  # [outputs]


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
        x = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
        _, _, kh, kw = weight.shape
        oh, ow = (x.shape[2] - kh) // stride[0] + 1, (x.shape[3] - kw) // stride[1] + 1
        windows = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
        windows = windows[:, :, :: stride[0], :: stride[1]][:, :, :oh, :ow]
        y = np.einsum("bchwij,ocij->bohw", windows, weight)
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


def _affine(ops: list[Op], shape: list[int]) -> tuple[Affine, list[int]]:
    """The affine map of a run of linear ops, probed with the zero and unit vectors."""
    size = int(np.prod(shape))
    probes = np.concatenate([np.zeros((1, size)), np.eye(size)]).reshape(size + 1, *shape)
    out = probes
    for op in ops:
        out = op(out)
    out_shape = list(out.shape[1:])
    flat = out.reshape(size + 1, -1)
    bias = flat[0]
    return Affine(matrix=(flat[1:] - bias).T.copy(), bias=bias.copy()), out_shape


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
                input_quantization = QuantParams(scale=float(raw[node.input[1]]), zero_point=int(raw[node.input[2]]))
        elif op == "DequantizeLinear":  # an activation: the identity on real numbers
            continue
        elif op == "Flatten":
            pending.append(lambda x: x.reshape(len(x), -1))
        elif op == "Conv":
            bias = constants.get(node.input[2]) if len(node.input) > 2 else None
            pending.append(_conv(constants[node.input[1]], bias, attrs))
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
            affine, shape = _affine(pending, shape)
            stages += [affine, Square(width=affine.matrix.shape[0])]
            pending = []
        else:
            raise UnsupportedOperatorError(
                f"operator {op} (node {node.name!r}) cannot be evaluated under CKKS; "
                "supported: Conv, Gemm, AveragePool, Flatten, Mul(x, x), QuantizeLinear, DequantizeLinear"
            )
    if pending:
        affine, shape = _affine(pending, shape)
        stages.append(affine)
    if input_quantization is None:
        raise UnsupportedOperatorError("the graph does not quantize its input")
    return LoweredModel(input_shape=input_shape, input_quantization=input_quantization, stages=stages)
