"""The framework-neutral layer list that every executor starts from.

Training produces a PyTorch module; export turns it into this list of plain numpy layers, which
quantization and the ONNX builder consume. Only operators that CKKS can evaluate exist here:
linear maps, the square activation and average pooling (a linear map too). There is no ReLU,
max-pooling or BatchNorm, so every model built from these layers can be evaluated encrypted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.manifest import LayerRecord


@dataclass(frozen=True)
class Conv:
    weight: np.ndarray  # [out_channels, in_channels, kernel, kernel]
    bias: np.ndarray  # [out_channels]
    stride: int
    padding: int


@dataclass(frozen=True)
class Dense:
    weight: np.ndarray  # [out_features, in_features]
    bias: np.ndarray  # [out_features]


@dataclass(frozen=True)
class Square:
    """``x * x``: the lowest-degree polynomial activation, one ciphertext multiplication."""


@dataclass(frozen=True)
class AvgPool:
    kernel: int
    stride: int


@dataclass(frozen=True)
class Flatten:
    """Reshape to ``[batch, features]``; free in every executor."""


Layer = Conv | Dense | Square | AvgPool | Flatten
WEIGHTED = (Conv, Dense)


def describe(layer: Layer) -> LayerRecord:
    """One manifest line per layer, with the CKKS levels it consumes.

    Each plaintext-weight product (conv, dense, average pooling) costs one rescale, and so does
    each ciphertext square; flatten is a relabelling of slots and costs nothing.
    """
    match layer:
        case Conv(weight=w, stride=s, padding=p):
            out, inp, k, _ = w.shape
            return LayerRecord(op="conv", detail=f"{inp}->{out} channels, {k}x{k}, stride {s}, padding {p}", levels=1)
        case Dense(weight=w):
            return LayerRecord(op="dense", detail=f"{w.shape[1]}->{w.shape[0]}", levels=1)
        case Square():
            return LayerRecord(op="square", detail="x*x", levels=1)
        case AvgPool(kernel=k, stride=s):
            return LayerRecord(op="avgpool", detail=f"{k}x{k}, stride {s}", levels=1)
        case Flatten():
            return LayerRecord(op="flatten", detail="to [batch, features]", levels=0)
    raise TypeError(f"not a layer: {layer!r}")
