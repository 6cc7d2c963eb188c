"""``hegate infer`` inputs: .npy arrays and image files, normalized as the manifest says."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest

from gateway.cli import BUNDLED_REPOSITORY
from gateway.client.inputs import read_input
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
