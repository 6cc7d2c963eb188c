"""Write a quantized network as one int8 ONNX file in QDQ form.

The graph is built node by node rather than exported from PyTorch, so its shape is fixed and
simple for the two compilers that read it (numba kernels, CKKS plan): every tensor between
layers travels as ``QuantizeLinear -> DequantizeLinear``, weights are int8 initializers behind a
per-channel ``DequantizeLinear`` and biases are int32 initializers. onnxruntime fuses these
patterns into its integer kernels (QLinearConv, QGemm, QLinearMul, ...). The last layer has no
output QuantizeLinear: it produces the float logits (onnxruntime's QGemm with a float output).

Hidden activations are uint8, or uint16 for an A16W8 network (see :mod:`models.quantization`);
16-bit QuantizeLinear needs opset 21, so only such a network is written at that opset, and every
uint8 model keeps the file it always had.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.layers import AvgPool, Conv, Dense, Flatten, Square
from models.quantization import QuantizedLayer, QuantizedNetwork, QuantParams

OPSET = 17
OPSET_16_BIT = 21  # the first opset whose QuantizeLinear has uint16 outputs
PRODUCER = "hegate"


class _GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []

    def constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def quantize(self, tensor: str, params: QuantParams, prefix: str) -> _Quantized:
        scale = self.constant(f"{prefix}.scale", np.array(params.scale, np.float32))
        zero = self.constant(f"{prefix}.zero_point", np.array(params.zero_point, params.dtype))
        return _Quantized(self.node("QuantizeLinear", [tensor, scale, zero], f"{prefix}.q"), scale, zero)

    def dequantize(self, x: _Quantized, output: str) -> str:
        return self.node("DequantizeLinear", [x.tensor, x.scale, x.zero_point], output)

    def per_channel(self, q: np.ndarray, scale: np.ndarray, prefix: str) -> str:
        """A per-channel (axis 0) dequantized initializer: int8 weights or int32 biases."""
        zero = np.zeros(len(scale), q.dtype)
        inputs = [
            self.constant(f"{prefix}.q", q),
            self.constant(f"{prefix}.scale", scale.astype(np.float32)),
            self.constant(f"{prefix}.zero_point", zero),
        ]
        return self.node("DequantizeLinear", inputs, f"{prefix}.dq", axis=0)


@dataclass(frozen=True)
class _Quantized:
    """A quantized tensor in the graph with the names of its scale and zero-point initializers."""

    tensor: str
    scale: str
    zero_point: str


def _weighted(builder: _GraphBuilder, ql: QuantizedLayer, x: str, input_scale: float, name: str, out: str) -> str:
    weight = builder.per_channel(ql.weight_q, ql.weight_scale, f"{name}.weight")
    bias = builder.per_channel(ql.bias_q, np.float32(input_scale) * ql.weight_scale, f"{name}.bias")
    match ql.layer:
        case Conv(stride=s, padding=p, weight=w):
            k = w.shape[-1]
            attrs = {"strides": [s, s], "pads": [p, p, p, p], "kernel_shape": [k, k]}
            return builder.node("Conv", [x, weight, bias], out, **attrs)
        case Dense():
            return builder.node("Gemm", [x, weight, bias], out, transB=1)
    raise TypeError(f"not a weighted layer: {ql.layer!r}")


def build_onnx(
    network: QuantizedNetwork,
    *,
    input_name: str,
    input_shape: list[int],
    output_name: str,
    num_outputs: int,
    doc: str,
) -> onnx.ModelProto:
    """Build the QDQ int8 ONNX model of ``network`` with a dynamic batch axis."""
    builder = _GraphBuilder()
    params = network.input
    x_q = builder.quantize(input_name, params, "input")
    last = len(network.layers) - 1
    for index, ql in enumerate(network.layers):
        name = f"layer{index}"
        if isinstance(ql.layer, Flatten):
            # Flatten the quantized tensor, so that a DequantizeLinear feeds the next GEMM directly.
            x_q = _Quantized(builder.node("Flatten", [x_q.tensor], f"{name}.q", axis=1), x_q.scale, x_q.zero_point)
            continue
        x = builder.dequantize(x_q, f"{name}.in")
        # The last layer writes float logits straight from its accumulators: no output rounding.
        out = output_name if index == last else f"{name}.out"
        match ql.layer:
            case Conv() | Dense():
                y = _weighted(builder, ql, x, params.scale, name, out)
            case Square():
                y = builder.node("Mul", [x, x], out)
            case AvgPool(kernel=k, stride=s):
                y = builder.node("AveragePool", [x], out, kernel_shape=[k, k], strides=[s, s])
        if index < last:
            params = ql.output
            x_q = builder.quantize(y, params, name)
    graph = helper.make_graph(
        builder.nodes,
        "hegate",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["batch", *input_shape])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", num_outputs])],
        builder.initializers,
    )
    wide = any(ql.output is not None and ql.output.bits == 16 for ql in network.layers)
    opset, ir_version = (OPSET_16_BIT, 10) if wide else (OPSET, 8)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name=PRODUCER, doc_string=doc
    )
    model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model
