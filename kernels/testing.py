"""Small int8 QDQ graphs built layer by layer, for tests and experiments with the kernels.

The exporter (:mod:`models.export`) writes only what hegate's architectures need; this builder
covers everything the kernels accept (rectangular kernels and strides, asymmetric pads,
``count_include_pad``, ReLU, ``transB=0``, per-tensor weight scales, uint16 activations given
``QuantParams(..., bits=16)``), so that tests can check every branch against onnxruntime and
against :mod:`kernels.reference`.

>>> graph = QdqGraph([1, 8, 8], QuantParams(0.02, 128))  # doctest: +SKIP
>>> graph.conv(weight, scale, bias, QuantParams(0.1, 3), strides=(2, 1)).square(QuantParams(0.05, 0))  # doctest: +SKIP
>>> model = graph.flatten().gemm(w2, s2, b2, QuantParams(0.2, 120)).build()  # doctest: +SKIP

:func:`onnxruntime_deviation_bound` bounds how far onnxruntime's logits can be from the kernels'
for a plan with uint16 tensors, whose layers onnxruntime runs in float32.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kernels import reference
from kernels.plan import Dequantize, Elementwise, Gemm, Plan, Quantize, Square
from models.quantization import QuantParams, code_dtype

OPSET = 17
OPSET_16_BIT = 21  # the first opset whose QuantizeLinear writes uint16


class QdqGraph:
    """A chain of quantized layers from a float input ``[batch, *input_shape]`` to float logits."""

    def __init__(self, input_shape: list[int], params: QuantParams, *, input_name: str = "input") -> None:
        self.input_shape = list(input_shape)
        self.input_name = input_name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.shape = list(input_shape)
        self.count = 0
        self.wide = False  # whether some tensor is uint16 (the model then needs opset 21)
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
        zero = self._constant(f"{name}.zero_point", np.array(params.zero_point, code_dtype(params.bits)))
        self.wide = self.wide or params.bits == 16
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
        opset, ir_version = (OPSET_16_BIT, 10) if self.wide else (OPSET, 8)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="hegate-tests")
        model.ir_version = ir_version
        onnx.checker.check_model(model)
        return model


def random_weights(rng: np.random.Generator, shape: tuple[int, ...], *, limit: int = 63) -> np.ndarray:
    """int8 weights in [-limit, limit], with the extremes over-represented."""
    values = rng.integers(-limit, limit + 1, shape)
    extremes = rng.random(shape) < 0.2
    values[extremes] = rng.choice([-limit, limit], int(extremes.sum()))
    return values.astype(np.int8)


# ---- how far onnxruntime's float32 path can be from the kernels' exact one ----------------

UNIT_ROUNDOFF = 2.0**-24  # float32


def _gamma(n: int) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: the relative error bound of n float32 roundings."""
    return n * UNIT_ROUNDOFF / (1 - n * UNIT_ROUNDOFF)


def _square_deviation(q: np.ndarray, e: np.ndarray, source: QuantParams, out: QuantParams) -> np.ndarray:
    """Code deviation bound of a uint16 square whose input codes ``q`` may be off by ``e`` on onnxruntime's side.

    Both sides run the same float32 formula, so equal inputs give equal outputs (0). Otherwise the
    exact values ``d^2`` differ by at most ``(2|d| + e s) e s``, and each side's three roundings (the
    dequantize, the product, QuantizeLinear's division) add ``gamma_4`` of its own value, at most
    ``(|d| + e s)^2 / s_out``; one more step for rounding the two apart.
    """
    s = np.float64(source.scale)
    d = np.abs(q.astype(np.float64) - source.zero_point) * s
    spread = ((2 * d + e * s) * e * s + 2 * _gamma(4) * (d + e * s) ** 2) / np.float64(out.scale)
    return np.where(e > 0, np.floor(spread) + 1, 0.0)


def onnxruntime_deviation_bound(plan: Plan, x: np.ndarray, trace: reference.Trace | None = None) -> np.ndarray:
    """An upper bound of ``|onnxruntime's logits - the kernels' logits|``, per sample and output.

    Zero for a plan of uint8 tensors only: onnxruntime's fused integer kernels and the kernels are
    bit-identical. With uint16 tensors, onnxruntime runs the 16-bit layers in float32 (see
    :mod:`kernels.arithmetic`) and the kernels in exact integer arithmetic, and the bound follows
    the values of the exact run (``trace``, the numpy reference, which the kernels equal bit for
    bit) through the plan, keeping per sample and element ``e``: how many codes onnxruntime's
    value of a tensor may be from the exact one.

    * uint8 tensors and the input's QuantizeLinear: ``e = 0`` (the same formulas; the compiler
      lets no uint16 tensor feed a uint8 one).
    * A Gemm with a uint16 input or output, output channel ``c``, ``K`` inputs: onnxruntime's
      value before rounding is a float32 sum of ``K + 1`` products of dequantized values (each
      product three roundings away from exact, the bias two), in some order, with or without FMA,
      then divided by ``s_out``; the kernels' is ``float32(acc) * float32(float32(s_in * ws_c) /
      s_out)``, four roundings. A float sum of n terms in any order is within ``gamma_{n-1}`` times
      the sum of their magnitudes of the exact sum (Higham, *Accuracy and Stability of Numerical
      Algorithms*, chapters 3 and 4), so onnxruntime's value is within ``gamma_{K+4}`` of the
      magnitudes, the kernels' within ``gamma_4``, and the two differ by at most ``D_c = (s_in ws_c
      / s_out) (sum_j |W_cj| e_j + gamma_{K+8} (sum_j (|q_j - zp| + e_j) |W_cj| + |b_c|))``: the
      first term from onnxruntime's inputs being off by ``e_j`` codes, the second from rounding
      (``q_j`` the exact run's input codes). Rounded to codes, the outputs are then
      at most ``floor(D_c) + 1`` apart (clamping to [0, 65535] only brings them closer).
    * A fused or standalone uint16 square: :func:`_square_deviation`.
    * The float output of such a Gemm: ``D_c`` without the division by ``s_out`` and without the
      rounding step; a DequantizeLinear output: ``e s`` plus each side's rounding.

    The bound is rigorous but loose: it takes every rounding error at its worst, where float32
    sums mostly cancel theirs. On an MNIST MLP (784 -> 128 -> square -> 10, 10,000 images) it
    allows 2 to 4 codes of the first hidden layer (0.06% of onnxruntime's differ, by 1) and 0.04
    to 0.14 in a logit (onnxruntime's are at most 0.003 from the kernels', of logits up to 100).

    Args:
        plan: the compiled model.
        x: its float32 inputs ``[batch, *input_shape]``.
        trace: :func:`kernels.reference.trace` of ``plan`` on ``x``, if already computed.

    Returns:
        float64 ``[batch, num_outputs]``.
    """
    trace = trace if trace is not None else reference.trace(plan, x)
    batch = x.shape[0]
    deviation: dict[int, np.ndarray] = {}

    def codes(tensor: int) -> np.ndarray:
        return trace.tensors[tensor].reshape(batch, -1)

    for index, step in enumerate(plan.steps):
        if isinstance(step, Quantize):
            deviation[step.target] = np.zeros((batch, plan.tensors[step.target].size))
            continue
        source = plan.tensors[step.source]
        e = deviation[step.source]
        if source.bits == 8 and not (isinstance(step, Gemm) and step.output is not None and step.output.bits == 16):
            if e.any():  # the compiler refuses every step that would get here; nothing to bound it with
                raise ValueError(f"step {step.name!r}: a uint8 input off onnxruntime's by a rounding")
            if step.target >= 0:
                deviation[step.target] = np.zeros((batch, plan.tensors[step.target].size))
                continue
            return np.zeros((batch, plan.num_outputs))  # a uint8 step writes the output: bit-identical
        match step:
            case Dequantize():
                s = np.float64(source.params.scale)
                d = np.abs(codes(step.source).astype(np.float64) - source.params.zero_point)
                return np.where(e > 0, e * s + 2 * UNIT_ROUNDOFF * (d + e) * s, 0.0)
            case Gemm():
                weight = np.abs(step.weight.astype(np.float64))
                q = np.abs(codes(step.source).astype(np.float64) - source.params.zero_point)
                unit = np.float64(source.params.scale) * step.weight_scale.astype(np.float64)
                magnitude = (q + e) @ weight.T + np.abs(step.bias.astype(np.float64))
                spread = unit * (e @ weight.T + _gamma(weight.shape[1] + 8) * magnitude)
                if step.output is None:
                    return spread
                e_out = np.floor(spread / np.float64(step.output.scale)) + 1
                if isinstance(step.activation, Square):
                    e_out = _square_deviation(
                        trace.before_activation[index], e_out, step.output, step.activation.output
                    )
                deviation[step.target] = e_out
            case Elementwise(activation=Square(output=out)):
                deviation[step.target] = _square_deviation(codes(step.source), e, source.params, out)
            case _:  # the compiler admits no other step on a uint16 tensor
                raise ValueError(f"step {step.name!r}: no deviation bound for {type(step).__name__} on uint16")
    raise ValueError("plan writes no output")
