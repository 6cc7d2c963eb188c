"""Where each value sits in a ciphertext's slots: the one rule that client and server share.

A plan computes in a *virtual* ring of ``virtual_slots`` positions (a power of two). The
physical ciphertext holds ``lanes = slots // virtual_slots`` independent inputs, interleaved:
virtual position ``p`` of lane ``l`` is physical slot ``p * lanes + l``. A rotation by ``d``
virtual positions is then a physical rotation by ``d * lanes``, which moves every lane's values
within that lane, so the server evaluates ``lanes`` inputs of one client for the price of one.

Within a lane the input occupies the first positions in one of two orders:

- ``flat``: the normalized input, flattened (``x.ravel()``), then zeros;
- ``im2col``: for a first layer that is a convolution, the pixel under kernel offset ``k`` of
  output position ``p`` goes to position ``k * block + p`` (``block`` = output positions per
  channel; a padding pixel is a zero). The convolution then needs one product per distinct
  ``(k - c) * block`` offset instead of one per kernel tap and channel.

A result's values (logits) sit at virtual positions ``[0, outputs)`` of each lane.
"""

from __future__ import annotations

from functools import cached_property
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.errors import InvalidArgumentError


class ConvGeometry(BaseModel):
    """A convolution's shape: enough to lay its input out in im2col order."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_shape: list[int] = Field(description="[channels, height, width]")
    kernel: list[int] = Field(description="[height, width]")
    stride: list[int]
    pads: list[int] = Field(description="[top, left, bottom, right], as ONNX orders them")

    @property
    def output_hw(self) -> tuple[int, int]:
        _, height, width = self.input_shape
        top, left, bottom, right = self.pads
        return (
            (height + top + bottom - self.kernel[0]) // self.stride[0] + 1,
            (width + left + right - self.kernel[1]) // self.stride[1] + 1,
        )

    @property
    def block(self) -> int:
        """Output positions per channel: the stride between two kernel offsets' blocks."""
        oh, ow = self.output_hw
        return oh * ow

    @property
    def taps(self) -> int:
        """Kernel offsets, input channels included: the number of blocks."""
        return self.input_shape[0] * self.kernel[0] * self.kernel[1]

    def gather(self) -> np.ndarray:
        """``index[k * block + p]``: the flat input index under tap ``k`` at output position ``p``, or -1."""
        channels, height, width = self.input_shape
        oh, ow = self.output_hw
        kh, kw = self.kernel
        c, i, j, y, x = np.meshgrid(
            np.arange(channels), np.arange(kh), np.arange(kw), np.arange(oh), np.arange(ow), indexing="ij"
        )
        row = y * self.stride[0] + i - self.pads[0]
        col = x * self.stride[1] + j - self.pads[1]
        inside = (row >= 0) & (row < height) & (col >= 0) & (col < width)
        return np.where(inside, (c * height + row) * width + col, -1).ravel()


class Packing(BaseModel):
    """How inputs enter the slots and where results leave them; part of the public spec."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["flat", "im2col"]
    input_shape: list[int]
    slots: int = Field(description="physical slots of the ciphertext (ring degree / 2)")
    virtual_slots: int = Field(description="positions per lane; a power of two dividing slots")
    outputs: int = Field(description="result values per lane, at positions [0, outputs)")
    conv: ConvGeometry | None = Field(default=None, description="the first layer's geometry, for im2col")

    @model_validator(mode="after")
    def _consistent(self) -> Packing:
        v = self.virtual_slots
        if v < 1 or v & (v - 1) or self.slots % v:
            raise ValueError(f"virtual_slots={v} must be a power of two dividing slots={self.slots}")
        if (self.kind == "im2col") != (self.conv is not None):
            raise ValueError("an im2col packing needs its conv geometry, and only it")
        if self.width > v or self.outputs > v:
            raise ValueError(f"{self.width} input or {self.outputs} output positions exceed {v} per lane")
        return self

    @property
    def lanes(self) -> int:
        """Inputs per ciphertext."""
        return self.slots // self.virtual_slots

    @property
    def width(self) -> int:
        """Positions that the packed input occupies in its lane."""
        return self.conv.taps * self.conv.block if self.conv else int(np.prod(self.input_shape))

    @cached_property
    def gather(self) -> np.ndarray:
        """For each virtual position of a lane: the flat input index it holds, or -1 for zero."""
        index = np.full(self.virtual_slots, -1)
        index[: self.width] = self.conv.gather() if self.conv else np.arange(self.width)
        return index

    def pack(self, inputs: np.ndarray) -> np.ndarray:
        """Slot values for up to ``lanes`` inputs ``[n, *input_shape]`` (float64, length ``slots``).

        Raises:
            InvalidArgumentError: wrong shape, or more inputs than lanes.
        """
        if list(inputs.shape[1:]) != self.input_shape or inputs.ndim != len(self.input_shape) + 1:
            raise InvalidArgumentError(f"inputs must have shape [n, *{self.input_shape}], got {list(inputs.shape)}")
        if not 1 <= len(inputs) <= self.lanes:
            raise InvalidArgumentError(f"1 to {self.lanes} inputs fit one ciphertext, got {len(inputs)}")
        flat = np.concatenate([inputs.reshape(len(inputs), -1).astype(np.float64), np.zeros((len(inputs), 1))], 1)
        lanes = np.zeros((self.lanes, self.virtual_slots))
        lanes[: len(inputs)] = flat[:, self.gather]  # index -1 reads the appended zero
        return lanes.T.ravel()  # position-major: slot = position * lanes + lane

    def unpack(self, slot_values: np.ndarray, count: int) -> np.ndarray:
        """The ``[count, outputs]`` results of the first ``count`` lanes."""
        positions = np.asarray(slot_values).reshape(self.virtual_slots, self.lanes)
        return positions[: self.outputs, :count].T.copy()

    def spread(self, values: np.ndarray) -> np.ndarray:
        """One lane's virtual vector repeated into every lane: how plaintexts are encoded."""
        return np.repeat(np.asarray(values, np.float64), self.lanes)
