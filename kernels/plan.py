"""The execution plan: what :mod:`kernels.compiler` extracts from an int8 ONNX graph.

A plan is a list of integer steps between uint8 tensors, each step the fused form that
onnxruntime itself runs for the same QDQ pattern (``DQ -> Conv -> Q`` is one QLinearConv, and
so on). Every tensor is uint8 with one per-tensor :class:`QuantParams`, stored per sample in
row-major (NCHW) order, so ``Flatten`` moves no data and exists only as a new tensor shape.

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
    """``x * x`` on the dequantized value, requantized to ``output`` (onnxruntime's QLinearMul)."""

    output: QuantParams


@dataclass(frozen=True)
class Relu:
    """``max(x, 0)`` on the dequantized value, quantized to ``output`` (a float Relu in onnxruntime)."""

    output: QuantParams


Activation = Square | Relu


@dataclass(frozen=True)
class Tensor:
    """A uint8 tensor: the shape of one sample and its quantization."""

    shape: tuple[int, ...]
    params: QuantParams

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


@dataclass(frozen=True)
class Quantize:
    """QuantizeLinear of the float graph input."""

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
    """A standalone activation on a uint8 tensor (when no Conv/Gemm precedes it to fuse into)."""

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
    """DequantizeLinear of the last uint8 tensor into the float graph output."""

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
            lines.append(f"{kind.lower()}{suffix} ({step.name}) -> {list(shape)}")
        return lines
