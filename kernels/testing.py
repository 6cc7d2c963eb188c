"""Small int8 QDQ graphs built layer by layer, for tests and experiments with the kernels.

The exporter (:mod:`models.export`) writes only what hegate's architectures need; this builder
covers everything the kernels accept (rectangular kernels and strides, asymmetric pads,
``count_include_pad``, ReLU, ``transB=0``, per-tensor weight scales), so that tests can check
every branch against onnxruntime and against :mod:`kernels.reference`.

>>> graph = QdqGraph([1, 8, 8], QuantParams(0.02, 128))  # doctest: +SKIP
>>> graph.conv(weight, scale, bias, QuantParams(0.1, 3), strides=(2, 1)).square(QuantParams(0.05, 0))  # doctest: +SKIP
>>> model = graph.flatten().gemm(w2, s2, b2, QuantParams(0.2, 120)).build()  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.quantization import QuantParams

OPSET = 17


class QdqGraph:
    """A chain of quantized layers from a float input ``[batch, *input_shape]`` to float logits."""

    def __init__(self, input_shape: list[int], params: QuantParams, *, input_name: str = "input") -> None:
        self.input_shape = list(input_shape)
        self.input_name = input_name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.shape = list(input_shape)
        self.count = 0
        self.tensor, self.params = self._quantize(input_name, params)

    def _name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}{self.count}"

    def _constant(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def _quantize(self, tensor: str, params: QuantParams) -> tuple[str, QuantParams]:
        name = self._name("q")
        scale = self._constant(f"{name}.scale", np.array(params.scale, np.float32))
        zero = self._constant(f"{name}.zero_point", np.array(params.zero_point, np.uint8))
        self.nodes.append(helper.make_node("QuantizeLinear", [tensor, scale, zero], [name], name=name))
        self._scale, self._zero = scale, zero
        return name, params

    def _dequantize(self) -> str:
        name = self._name("dq")
        self.nodes.append(
            helper.make_node("DequantizeLinear", [self.tensor, self._scale, self._zero], [name], name=name)
        )
        return name

    def _per_channel(self, values: np.ndarray, scale: np.ndarray, prefix: str) -> str:
        scale = np.asarray(scale, np.float32)
        inputs = [
            self._constant(f"{prefix}.q", values),
            self._constant(f"{prefix}.scale", scale),
            self._constant(f"{prefix}.zero_point", np.zeros(scale.shape, values.dtype)),
        ]
        self.nodes.append(helper.make_node("DequantizeLinear", inputs, [f"{prefix}.dq"], name=f"{prefix}.dq", axis=0))
        return f"{prefix}.dq"

    def _op(self, op: str, inputs: list[str], output: QuantParams, **attrs) -> QdqGraph:
        name = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        self.tensor, self.params = self._quantize(name, output)
        return self

    def conv(
        self,
        weight: np.ndarray,
        weight_scale: np.ndarray,
        bias: np.ndarray,
        output: QuantParams,
        *,
        strides: tuple[int, int] = (1, 1),
        pads: tuple[int, int, int, int] = (0, 0, 0, 0),
    ) -> QdqGraph:
        """Conv with int8 ``weight`` [out, in, kh, kw] and int32 ``bias`` at ``input_scale * weight_scale``."""
        x = self._dequantize()
        prefix = self._name("conv_w")
        w = self._per_channel(weight.astype(np.int8), weight_scale, prefix)
        b = self._per_channel(
            bias.astype(np.int32),
            np.float32(self.params.scale) * np.asarray(weight_scale, np.float32),
            f"{prefix}.bias",
        )
        attrs = {"kernel_shape": list(weight.shape[2:]), "strides": list(strides), "pads": list(pads)}
        _, height, width = self.shape
        self.shape = [
            weight.shape[0],
            (height + pads[0] + pads[2] - weight.shape[2]) // strides[0] + 1,
            (width + pads[1] + pads[3] - weight.shape[3]) // strides[1] + 1,
        ]
        return self._op("Conv", [x, w, b], output, **attrs)

    def gemm(
        self,
        weight: np.ndarray,
        weight_scale: np.ndarray,
        bias: np.ndarray,
        output: QuantParams | None,
        *,
        trans_b: bool = True,
    ) -> QdqGraph:
        """Gemm with int8 ``weight`` [out, in] (stored transposed when ``trans_b`` is False).

        ``output=None`` makes it the last layer, writing float logits (as the exporter does).
        """
        x = self._dequantize()
        prefix = self._name("gemm_w")
        stored = weight if trans_b else np.ascontiguousarray(weight.T)
        scale = np.asarray(weight_scale, np.float32)
        values = [self._constant(f"{prefix}.q", stored.astype(np.int8)), self._constant(f"{prefix}.scale", scale)]
        values.append(self._constant(f"{prefix}.zero_point", np.zeros(scale.shape, np.int8)))
        self.nodes.append(
            helper.make_node(
                "DequantizeLinear", values, [f"{prefix}.dq"], name=f"{prefix}.dq", axis=0 if trans_b else 1
            )
        )
        b = self._per_channel(bias.astype(np.int32), np.float32(self.params.scale) * scale, f"{prefix}.bias")
        self.shape = [weight.shape[0]]
        if output is None:
            self.nodes.append(
                helper.make_node("Gemm", [x, f"{prefix}.dq", b], ["logits"], name="logits", transB=int(trans_b))
            )
            self.tensor = None
            return self
        return self._op("Gemm", [x, f"{prefix}.dq", b], output, transB=int(trans_b))

    def square(self, output: QuantParams) -> QdqGraph:
        x = self._dequantize()
        return self._op("Mul", [x, x], output)

    def relu(self, output: QuantParams) -> QdqGraph:
        return self._op("Relu", [self._dequantize()], output)

    def avg_pool(
        self,
        kernel: tuple[int, int],
        output: QuantParams,
        *,
        strides: tuple[int, int] | None = None,
        pads: tuple[int, int, int, int] = (0, 0, 0, 0),
        count_include_pad: bool = False,
    ) -> QdqGraph:
        strides = strides or kernel
        channels, height, width = self.shape
        self.shape = [
            channels,
            (height + pads[0] + pads[2] - kernel[0]) // strides[0] + 1,
            (width + pads[1] + pads[3] - kernel[1]) // strides[1] + 1,
        ]
        attrs = {"kernel_shape": list(kernel), "strides": list(strides), "pads": list(pads)}
        return self._op("AveragePool", [self._dequantize()], output, count_include_pad=int(count_include_pad), **attrs)

    def flatten(self) -> QdqGraph:
        """Flatten the uint8 tensor, as the exporter does."""
        name = self._name("flatten")
        self.nodes.append(helper.make_node("Flatten", [self.tensor], [name], name=name, axis=1))
        self.tensor = name
        self.shape = [int(np.prod(self.shape))]
        return self

    def build(self, *, output_name: str = "logits") -> onnx.ModelProto:
        """Dequantize the last tensor into the float output (unless a float-output Gemm wrote it)."""
        if self.tensor is None:
            output_name = "logits"
        else:
            dequantize = helper.make_node(
                "DequantizeLinear", [self.tensor, self._scale, self._zero], [output_name], name=output_name
            )
            self.nodes.append(dequantize)
        graph = helper.make_graph(
            self.nodes,
            "qdq-test",
            [helper.make_tensor_value_info(self.input_name, TensorProto.FLOAT, ["batch", *self.input_shape])],
            [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["batch", *self.shape])],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="hegate-tests")
        model.ir_version = 8
        onnx.checker.check_model(model)
        return model


def random_weights(rng: np.random.Generator, shape: tuple[int, ...], *, limit: int = 63) -> np.ndarray:
    """int8 weights in [-limit, limit], with the extremes over-represented."""
    values = rng.integers(-limit, limit + 1, shape)
    extremes = rng.random(shape) < 0.2
    values[extremes] = rng.choice([-limit, limit], int(extremes.sum()))
    return values.astype(np.int8)
