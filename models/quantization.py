"""Static int8 quantization of a layer list.

Why static, per-tensor activations: every scale is fixed at export time from a public
calibration split, so the result for one input never depends on the other inputs of a batch
(onnxruntime's dynamic quantization scales by the whole batch, which lets one request change
another's answer). Weights are symmetric int8 per output channel; activations are asymmetric
uint8 per tensor; biases are int32 at scale ``input_scale * weight_scale``, the layout that
onnxruntime's QLinearConv / QGemm kernels consume. The last layer is not requantized: its
int32 accumulators are scaled straight to float logits, because a uint8 grid over a logit range
of hundreds flips close decisions (a breast-cancer model lost 2.6 points of accuracy to it).

Weights use 7 of their 8 bits ([-63, 63], onnxruntime's "reduce range"): on AVX2 CPUs without
VNNI (this project's machines), onnxruntime's uint8 x int8 kernels add pairs of products in
saturating int16 (``vpmaddubsw``), and 255 * 127 * 2 overflows it. With full-range weights a
digits CNN's conv outputs differed from the exact result by up to 16 steps on 4% of values;
with 7-bit weights onnxruntime is exact and bit-identical to the reference arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.errors import InvalidArgumentError
from models.layers import WEIGHTED, Flatten, Layer

UINT8_MAX = 255
INT8_MAX = 63  # 7-bit weight range, see the module docstring


@dataclass(frozen=True)
class QuantParams:
    """Affine uint8 parameters: ``real = (q - zero_point) * scale``."""

    scale: float
    zero_point: int

    @classmethod
    def from_range(cls, low: float, high: float) -> QuantParams:
        """Cover ``[low, high]`` widened to include 0, so that 0 is exactly representable."""
        low, high = min(float(low), 0.0), max(float(high), 0.0)
        if not (np.isfinite(low) and np.isfinite(high)):
            raise InvalidArgumentError(f"calibration range [{low}, {high}] is not finite")
        scale = (high - low) / UINT8_MAX if high > low else 1.0
        scale = float(np.float32(scale))
        zero_point = int(np.clip(round(-low / scale), 0, UINT8_MAX))
        return cls(scale=scale, zero_point=zero_point)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Round half to even, as ONNX QuantizeLinear does."""
        q = np.rint(x.astype(np.float32) / np.float32(self.scale)) + self.zero_point
        return np.clip(q, 0, UINT8_MAX).astype(np.uint8)

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


def quantize_network(layers: list[Layer], ranges: list[tuple[float, float]]) -> QuantizedNetwork:
    """Quantize ``layers`` given the calibrated ``(low, high)`` of the input and of each output.

    Args:
        layers: the fp32 layer list.
        ranges: ``len(layers) + 1`` ranges: the network input's, then each layer's output.
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
        output = QuantParams.from_range(*output_range) if index < len(layers) - 1 else None
        if isinstance(layer, WEIGHTED):
            weight_q, weight_scale = quantize_weights(layer.weight)
            bias_scale = np.float32(current.scale) * weight_scale
            bias_q = np.rint(layer.bias / bias_scale).astype(np.int32)
            quantized.append(QuantizedLayer(layer, output, weight_q, weight_scale, bias_q))
        else:
            quantized.append(QuantizedLayer(layer=layer, output=output))
        current = output
    return QuantizedNetwork(input=network_input, layers=quantized)
