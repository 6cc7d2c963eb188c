"""The shared packing rule: lanes, flat and im2col layouts, and the im2col form of a convolution."""

from __future__ import annotations

import numpy as np
import pytest

from gateway.he.graph import _affine, _conv
from gateway.he.packing import ConvGeometry, Packing
from gateway.he.plan import im2col_matrix
from models.errors import InvalidArgumentError


def test_flat_packing_interleaves_lanes():
    packing = Packing(kind="flat", input_shape=[5], slots=32, virtual_slots=8, outputs=2)
    inputs = np.arange(15, dtype=np.float32).reshape(3, 5) + 1
    slots = packing.pack(inputs)
    assert packing.lanes == 4 and slots.shape == (32,)
    for lane in range(4):
        for position in range(8):
            expected = inputs[lane, position] if lane < 3 and position < 5 else 0
            assert slots[position * 4 + lane] == expected
    np.testing.assert_array_equal(packing.unpack(slots, 3), inputs[:, :2])


def test_spread_repeats_a_lane_vector_into_every_lane():
    packing = Packing(kind="flat", input_shape=[5], slots=32, virtual_slots=8, outputs=2)
    np.testing.assert_array_equal(packing.spread(np.arange(8)).reshape(8, 4), np.repeat(np.arange(8)[:, None], 4, 1))


GEOMETRY = ConvGeometry(input_shape=[2, 6, 7], kernel=[3, 2], stride=[2, 1], pads=[1, 0, 0, 1])


def test_im2col_gathers_the_pixel_under_each_tap():
    oh, ow = GEOMETRY.output_hw
    assert (oh, ow) == (3, 7) and GEOMETRY.taps == 12 and GEOMETRY.block == 21
    gather = GEOMETRY.gather().reshape(2, 3, 2, oh, ow)  # channel, tap row, tap column, output row, column
    assert gather[0, 0, 0, 0, 0] == -1  # the top padding row
    assert gather[1, 1, 1, 2, 3] == (1 * 6 + (2 * 2 + 1 - 1)) * 7 + 3 + 1
    assert gather[0, 2, 1, 2, 6] == -1  # the right padding column


def test_convolution_on_the_im2col_lane_equals_the_convolution():
    rng = np.random.default_rng(0)
    weight, bias = rng.normal(size=(4, 2, 3, 2)), rng.normal(size=4)
    attrs = {"strides": GEOMETRY.stride, "pads": GEOMETRY.pads}
    affine, _ = _affine([_conv(weight, bias, attrs)], GEOMETRY.input_shape, GEOMETRY)
    packing = Packing(kind="im2col", input_shape=[2, 6, 7], slots=1024, virtual_slots=256, outputs=4, conv=GEOMETRY)
    x = rng.normal(size=(2, 2, 6, 7)).astype(np.float32)
    lanes = packing.pack(x).reshape(256, 4).T
    matrix = im2col_matrix(affine, packing)
    np.testing.assert_allclose(lanes[:2] @ matrix.T, x.reshape(2, -1) @ affine.matrix.T, atol=1e-12)
    # one distinct offset (tap - channel) * block per product: 12 taps and 4 channels give 15
    rows, slots = np.nonzero(matrix)
    assert len(np.unique((slots - rows) % 256)) == 12 + 4 - 1


def test_im2col_refuses_a_map_that_is_not_the_convolution():
    packing = Packing(kind="im2col", input_shape=[2, 6, 7], slots=1024, virtual_slots=256, outputs=4, conv=GEOMETRY)
    dense = _affine([lambda x: x.reshape(len(x), -1)[:, :42] * 2], GEOMETRY.input_shape, GEOMETRY)[0]
    with pytest.raises(InvalidArgumentError, match="not a plain convolution"):
        im2col_matrix(dense, packing)


def test_packing_refuses_bad_inputs_and_inconsistent_layouts():
    packing = Packing(kind="flat", input_shape=[5], slots=32, virtual_slots=8, outputs=2)
    with pytest.raises(InvalidArgumentError, match=r"shape \[n, \*\[5\]\]"):
        packing.pack(np.zeros((1, 6)))
    with pytest.raises(InvalidArgumentError, match="1 to 4 inputs"):
        packing.pack(np.zeros((5, 5)))
    with pytest.raises(ValueError, match="power of two"):
        Packing(kind="flat", input_shape=[5], slots=32, virtual_slots=12, outputs=2)
    with pytest.raises(ValueError, match="exceed"):
        Packing(kind="flat", input_shape=[9], slots=32, virtual_slots=8, outputs=2)
    with pytest.raises(ValueError, match="conv geometry"):
        Packing(kind="im2col", input_shape=[5], slots=32, virtual_slots=8, outputs=2)
