"""Client inputs: the valid range every SDK call clips to; ``hegate infer``'s .npy arrays and image files."""

from __future__ import annotations

import logging
from importlib import resources

import numpy as np
import pytest

from gateway.cli import BUNDLED_REPOSITORY
from gateway.client.inputs import InputRange, read_input
from gateway.client.protocol import ModelInfo, infer_request, model_inputs
from models.errors import InvalidArgumentError
from models.repository import ModelRepository

SPEC = ModelRepository(BUNDLED_REPOSITORY).get("mnist-cnn-eps3").manifest.input
SAMPLES = resources.files("gateway") / "samples"


def test_npy_and_png_samples_read_as_the_same_normalized_images():
    batch = np.load(SAMPLES / "mnist-test-32.npz")["images"]
    from_npy = read_input(SAMPLES / "mnist-test-0.npy", SPEC)
    from_png = read_input(SAMPLES / "mnist-test-1.png", SPEC)
    assert from_npy.shape == (1, 1, 28, 28) and from_npy.dtype == np.float32
    np.testing.assert_allclose(from_npy, SPEC.normalization.apply(batch[:1]), atol=1e-6)
    np.testing.assert_allclose(from_png, SPEC.normalization.apply(batch[1:2]), atol=1e-6)


def test_a_batch_file_and_a_resized_image(tmp_path):
    np.save(tmp_path / "batch.npy", np.zeros((5, 1, 28, 28), np.uint8))
    assert read_input(tmp_path / "batch.npy", SPEC).shape == (5, 1, 28, 28)
    from PIL import Image

    Image.new("RGB", (56, 40), (255, 255, 255)).save(tmp_path / "big.png")
    assert read_input(tmp_path / "big.png", SPEC).shape == (1, 1, 28, 28)


def test_unreadable_or_misshapen_inputs_are_refused(tmp_path):
    with pytest.raises(InvalidArgumentError, match="does not exist"):
        read_input(tmp_path / "none.npy", SPEC)
    np.save(tmp_path / "wrong.npy", np.zeros((27, 28)))
    with pytest.raises(InvalidArgumentError, match=r"shape \[27, 28\]"):
        read_input(tmp_path / "wrong.npy", SPEC)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(InvalidArgumentError, match="not a readable image"):
        read_input(tmp_path / "junk.png", SPEC)


CANCER = ModelRepository(BUNDLED_REPOSITORY).get("breast-cancer-linear-eps3").manifest


@pytest.mark.parametrize("spec", [SPEC, CANCER.input], ids=["mnist", "breast-cancer"])
def test_clipping_normalized_inputs_equals_normalizing_clipped_raw_values(spec):
    low, high = spec.raw_range
    raw = np.random.default_rng(0).uniform(low - (high - low), high + (high - low), size=(200, *spec.shape))
    raw[0], raw[1] = low, high  # the ends themselves
    clipped = InputRange(spec, model="m").clip(spec.normalization.apply(raw))
    np.testing.assert_array_equal(clipped, spec.normalization.apply(np.clip(raw, low, high)))
    assert clipped.dtype == np.float32


def test_inputs_in_range_pass_unchanged_and_a_clip_is_logged_once(caplog):
    valid = InputRange(SPEC, model="mnist-cnn-eps3")
    inside = SPEC.normalization.apply(np.random.default_rng(1).integers(0, 256, size=(4, 1, 28, 28)))
    outside = SPEC.normalization.apply(np.full((2, 1, 28, 28), 300.0))
    with caplog.at_level(logging.WARNING, logger="gateway.client.inputs"):
        np.testing.assert_array_equal(valid.clip(inside), inside)
        assert not caplog.records
        np.testing.assert_array_equal(valid.clip(outside), SPEC.normalization.apply(np.full((2, 1, 28, 28), 255.0)))
        valid.clip(outside)
    assert len(caplog.records) == 1
    assert "mnist-cnn-eps3: 1568 of 1568 input values lay outside" in caplog.records[0].getMessage()


def test_every_sdk_call_sends_its_inputs_through_the_range_and_refuses_bad_ones():
    info = ModelInfo(name="breast-cancer-linear-eps3", version="1", manifest=CANCER, encrypted=True, lanes=64)
    raw = np.zeros((3, 30))
    raw[1, 13] = -300.0  # below raw_range: one feature of one input
    batch = model_inputs(info, CANCER.input.normalization.apply(raw))
    np.testing.assert_array_equal(batch, CANCER.input.normalization.apply(np.clip(raw, *CANCER.input.raw_range)))
    assert model_inputs(info, CANCER.input.normalization.apply(raw[0])).shape == (1, 30)
    sent = np.frombuffer(infer_request(info, CANCER.input.normalization.apply(raw)).raw_input_contents[0], "<f4")
    np.testing.assert_array_equal(sent.reshape(3, 30), batch)
    with pytest.raises(InvalidArgumentError, match="float32"):
        model_inputs(info, raw)
    with pytest.raises(InvalidArgumentError, match=r"shape \[3, 29\]"):
        model_inputs(info, np.zeros((3, 29), np.float32))
    for bad in (np.nan, np.inf):
        with pytest.raises(InvalidArgumentError, match="NaN or infinite"):
            model_inputs(info, np.full((1, 30), bad, np.float32))
