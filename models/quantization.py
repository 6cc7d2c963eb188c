"""Static int8 quantization of a layer list.

Why static, per-tensor activations: every scale is fixed at export time from a public
calibration split, so the result for one input never depends on the other inputs of a batch
(onnxruntime's dynamic quantization scales by the whole batch, which lets one request change
another's answer). Weights are symmetric int8 per output channel; activations are asymmetric
uint8 per tensor; biases are int32 at scale ``input_scale * weight_scale``, the layout that
onnxruntime's QLinearConv / QGemm kernels consume. The last layer is not requantized: its
int32 accumulators are scaled straight to float logits, because a uint8 grid over a logit range
of hundreds flips close decisions (a breast-cancer model lost 2.6 points of accuracy to it).

Hidden activations may instead be uint16 (``activation_bits=16``, the "A16W8" scheme: int8
weights, 16-bit activations). An MLP's single hidden layer carries every rounding error straight
to the logits, with no pooling to average it: on MNIST its uint8 hidden and squared activations
changed 0.2-0.7% of the classes of the exact network (the one the CKKS engine evaluates, which
cannot round); uint16 changes none of 10,000. The network input stays uint8 either way: it is
the grid the client rounds to before it encrypts. onnxruntime has no 16-bit integer kernels and
runs those layers in float32 on dequantized values.

Weights use 7 of their 8 bits ([-63, 63], onnxruntime's "reduce range"): on AVX2 CPUs without
VNNI (this project's machines), onnxruntime's uint8 x int8 kernels add pairs of products in
saturating int16 (``vpmaddubsw``), and 255 * 127 * 2 overflows it. With full-range weights a
digits CNN's conv outputs differed from the exact result by up to 16 steps on 4% of values;
with 7-bit weights onnxruntime is exact and bit-identical to the reference arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from models.errors import InvalidArgumentError
from models.layers import WEIGHTED, Flatten, Layer

UINT8_MAX = 255
INT8_MAX = 63  # 7-bit weight range, see the module docstring
INT32_MAX = 2**31 - 1
ActivationBits = Literal[8, 16]


def code_max(bits: ActivationBits) -> int:
    """The largest code of an unsigned ``bits``-bit tensor: 255 or 65535."""
    return (1 << bits) - 1


def code_dtype(bits: ActivationBits) -> type[np.unsignedinteger]:
    return np.uint8 if bits == 8 else np.uint16


@dataclass(frozen=True)
class QuantParams:
    """Affine unsigned parameters: ``real = (q - zero_point) * scale``, ``q`` in ``[0, 2**bits - 1]``."""

    scale: float
    zero_point: int
    bits: ActivationBits = 8

    @property
    def qmax(self) -> int:
        return code_max(self.bits)

    @property
    def dtype(self) -> type[np.unsignedinteger]:
        return code_dtype(self.bits)

    @classmethod
    def from_range(cls, low: float, high: float, bits: ActivationBits = 8) -> QuantParams:
        """Cover ``[low, high]`` widened to include 0, so that 0 is exactly representable."""
        low, high = min(float(low), 0.0), max(float(high), 0.0)
        if not (np.isfinite(low) and np.isfinite(high)):
            raise InvalidArgumentError(f"calibration range [{low}, {high}] is not finite")
        qmax = code_max(bits)
        scale = (high - low) / qmax if high > low else 1.0
        scale = float(np.float32(scale))
        zero_point = int(np.clip(round(-low / scale), 0, qmax))
        return cls(scale=scale, zero_point=zero_point, bits=bits)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Round half to even, as ONNX QuantizeLinear does."""
        q = np.rint(x.astype(np.float32) / np.float32(self.scale)) + self.zero_point
        return np.clip(q, 0, self.qmax).astype(self.dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        return ((q.astype(np.int32) - self.zero_point) * np.float32(self.scale)).astype(np.float32)


@dataclass(frozen=True)
class QuantizedLayer:
    """A layer with its int8 weights (weighted layers only) and its output's quantization."""

    layer: Layer
    # None for Flatten, which passes its input's parameters through, and for the last layer,
    # whose int32 accumulators become float logits without a final uint8 rounding.
    output: QuantParams | None
    weight_q: np.ndarray | None = None  # int8
    weight_scale: np.ndarray | None = None  # float32, one per output channel
    bias_q: np.ndarray | None = None  # int32


@dataclass(frozen=True)
class QuantizedNetwork:
    input: QuantParams
    layers: list[QuantizedLayer]


def quantize_weights(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel (axis 0), range [-INT8_MAX, INT8_MAX]."""
    flat = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)
    scale = np.where(flat > 0, flat / INT8_MAX, 1.0).astype(np.float32)
    shape = (-1,) + (1,) * (weight.ndim - 1)
    q = np.clip(np.rint(weight / scale.reshape(shape)), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


def quantize_network(
    layers: list[Layer], ranges: list[tuple[float, float]], *, activation_bits: ActivationBits = 8
) -> QuantizedNetwork:
    """Quantize ``layers`` given the calibrated ``(low, high)`` of the input and of each output.

    Args:
        layers: the fp32 layer list.
        ranges: ``len(layers) + 1`` ranges: the network input's, then each layer's output.
        activation_bits: the width of every hidden activation (the input is always uint8).

    Raises:
        InvalidArgumentError: a range is not finite, or a bias does not fit int32 at its scale.
    """
    if len(ranges) != len(layers) + 1:
        raise InvalidArgumentError(f"need {len(layers) + 1} calibration ranges, got {len(ranges)}")
    current = QuantParams.from_range(*ranges[0])
    network_input = current
    quantized: list[QuantizedLayer] = []
    if not isinstance(layers[-1], WEIGHTED):
        raise InvalidArgumentError(f"the last layer must be dense or conv, got {type(layers[-1]).__name__}")
    for index, (layer, output_range) in enumerate(zip(layers, ranges[1:], strict=True)):
        if isinstance(layer, Flatten):
            quantized.append(QuantizedLayer(layer=layer, output=None))
            continue
        output = QuantParams.from_range(*output_range, activation_bits) if index < len(layers) - 1 else None
        if isinstance(layer, WEIGHTED):
            weight_q, weight_scale = quantize_weights(layer.weight)
            bias_scale = np.float32(current.scale) * weight_scale
            bias = np.rint(layer.bias / bias_scale)
            if np.abs(bias).max(initial=0) > INT32_MAX:
                raise InvalidArgumentError(f"layer {index}: a bias does not fit int32 at scale input x weight")
            bias_q = bias.astype(np.int32)
            quantized.append(QuantizedLayer(layer, output, weight_q, weight_scale, bias_q))
        else:
            quantized.append(QuantizedLayer(layer=layer, output=output))
        current = output
    return QuantizedNetwork(input=network_input, layers=quantized)
