"""The execution plan: what :mod:`kernels.compiler` extracts from an int8 ONNX graph.

A plan is a list of integer steps between quantized tensors, each step the fused form that
onnxruntime itself runs for the same QDQ pattern (``DQ -> Conv -> Q`` is one QLinearConv, and
so on). Every tensor has one per-tensor :class:`QuantParams` and is stored per sample in
row-major (NCHW) order, so ``Flatten`` moves no data and exists only as a new tensor shape.

Tensors are uint8, or uint16 (``params.bits == 16``) for the hidden activations of an A16W8
model. A step that reads or writes a uint16 tensor is one of a few (a Gemm, a square, the
graph's first QuantizeLinear and last DequantizeLinear): onnxruntime runs those in float32, and
the kernels compute their float elementwise formulas bit for bit and their Gemms in exact
integer arithmetic (see :mod:`kernels.arithmetic`). :attr:`Plan.has_16_bit` tells them apart.

The plan holds plain numpy data and no numba objects: :mod:`kernels.reference` runs it with
numpy, :mod:`kernels.program` lowers it to the flat arrays the numba interpreter reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.quantization import QuantParams

INPUT = -1  # tensor id of the float graph input
OUTPUT = -2  # tensor id of the float graph output


@dataclass(frozen=True)
class Square:
    """``x * x`` on the dequantized value, requantized to ``output``.

    uint8 to uint8: onnxruntime's QLinearMul. uint16 to uint16: its float32 ``DequantizeLinear ->
    Mul -> QuantizeLinear``. (The compiler refuses a square between a uint8 and a uint16 tensor.)
    """

    output: QuantParams


@dataclass(frozen=True)
class Relu:
    """``max(x, 0)`` on the dequantized value, quantized to ``output`` (a float Relu in onnxruntime)."""

    output: QuantParams


Activation = Square | Relu


@dataclass(frozen=True)
class Tensor:
    """A uint8 or uint16 tensor (``params.bits``): the shape of one sample and its quantization."""

    shape: tuple[int, ...]
    params: QuantParams

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def bits(self) -> int:
        return self.params.bits


@dataclass(frozen=True)
class Quantize:
    """QuantizeLinear of the float graph input (to uint8, or uint16 as ``params.bits`` says)."""

    name: str
    source: int
    target: int
    params: QuantParams


@dataclass(frozen=True)
class Conv:
    """QLinearConv: int8 filters per output channel, int32 bias, fused activation."""

    name: str
    source: int
    target: int
    weight: np.ndarray  # int8 [out_channels, in_channels, kernel_h, kernel_w]
    weight_scale: np.ndarray  # float32 [out_channels]
    bias: np.ndarray  # int32 [out_channels]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    output: QuantParams  # of the convolution, before the activation
    activation: Activation | None = None


@dataclass(frozen=True)
class Gemm:
    """QGemm with ``transB=1``: int8 weights [out_features, in_features], int32 bias, fused activation.

    With ``output=None`` the layer writes the float graph output itself (``target == OUTPUT``):
    onnxruntime's QGemm with a float output scales the int32 sums straight to float32 logits.

    With a uint16 input or output, the same integer sums and scaling, exact where onnxruntime
    runs a float32 Gemm (see :mod:`kernels.arithmetic`).
    """

    name: str
    source: int
    target: int
    weight: np.ndarray  # int8 [out_features, in_features]
    weight_scale: np.ndarray  # float32 [out_features]
    bias: np.ndarray  # int32 [out_features]
    output: QuantParams | None
    activation: Activation | None = None


@dataclass(frozen=True)
class Elementwise:
    """A standalone activation on a quantized tensor (when no Conv/Gemm precedes it to fuse into)."""

    name: str
    source: int
    target: int
    activation: Activation


@dataclass(frozen=True)
class AvgPool:
    """QLinearAveragePool (2-D, ``ceil_mode=0``)."""

    name: str
    source: int
    target: int
    kernel: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    count_include_pad: bool


@dataclass(frozen=True)
class Dequantize:
    """DequantizeLinear of the last tensor (uint8 or uint16) into the float graph output."""

    name: str
    source: int
    target: int


Step = Quantize | Conv | Gemm | Elementwise | AvgPool | Dequantize


@dataclass(frozen=True)
class Plan:
    """Steps in execution order over ``tensors``; the input and output are float32.

    The last step writes the output: a :class:`Dequantize`, or a :class:`Gemm` with a float output.
    """

    input_name: str
    input_shape: tuple[int, ...]
    output_name: str
    tensors: tuple[Tensor, ...]
    steps: tuple[Step, ...]

    @property
    def has_16_bit(self) -> bool:
        """Whether any tensor is uint16: then the 16-bit layers are exact-integer rather than
        bit-identical to onnxruntime's float32 path (an all-uint8 plan is bit-identical)."""
        return any(tensor.bits == 16 for tensor in self.tensors)

    @property
    def num_outputs(self) -> int:
        last = self.steps[-1]
        if isinstance(last, Gemm) and last.output is None:
            return int(last.weight.shape[0])
        return self.tensors[last.source].size

    def macs_per_sample(self) -> int:
        """Multiply-accumulates of the weighted steps, for sizing work per thread."""
        total = 0
        for step in self.steps:
            if isinstance(step, Conv):
                out = self.tensors[step.target].shape
                total += int(np.prod(out)) * int(np.prod(step.weight.shape[1:]))
            elif isinstance(step, Gemm):
                total += int(step.weight.size)
        return total

    def describe(self) -> list[str]:
        """One line per step, for logs and error messages."""
        lines = []
        for step in self.steps:
            kind = type(step).__name__
            activation = getattr(step, "activation", None)
            suffix = f" + {type(activation).__name__.lower()}" if activation is not None else ""
            shape = self.tensors[step.target].shape if step.target >= 0 else (self.num_outputs,)
            wide = " uint16" if step.target >= 0 and self.tensors[step.target].bits == 16 else ""
            lines.append(f"{kind.lower()}{suffix} ({step.name}) -> {list(shape)}{wide}")
        return lines
