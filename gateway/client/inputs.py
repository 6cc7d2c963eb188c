"""Inputs from files, for ``hegate infer``: ``.npy`` arrays or image files, normalized as the
model's manifest says."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.errors import InvalidArgumentError
from models.manifest import InputSpec


def read_input(path: Path, spec: InputSpec) -> np.ndarray:
    """Normalized float32 inputs ``[n, *shape]`` from raw values in ``path``.

    A ``.npy`` file holds raw values (the manifest's ``raw_range``, e.g. MNIST pixels 0-255) of
    one input or a batch. An image (PNG, JPEG, ...) is read as grayscale and resized to the
    input's height and width; MNIST models expect a light digit on a dark background.

    Raises:
        InvalidArgumentError: unreadable file or a shape that does not fit the model.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"{path} does not exist")
    if path.suffix == ".npy":
        try:
            raw = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise InvalidArgumentError(f"{path}: not a numpy array file: {exc}") from None
    else:
        raw = _image(path, spec.shape)
    if list(raw.shape) == spec.shape:
        raw = raw[None]
    if list(raw.shape[1:]) != spec.shape:
        raise InvalidArgumentError(f"{path}: shape {list(raw.shape)} is neither {spec.shape} nor [n, *{spec.shape}]")
    return spec.normalization.apply(raw.astype(np.float64))


def _image(path: Path, shape: list[int]) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if len(shape) != 3 or shape[0] != 1:
        raise InvalidArgumentError(f"images fit only one-channel image models, this model takes {shape}")
    try:
        with Image.open(path) as image:
            gray = image.convert("L").resize((shape[2], shape[1]), Image.Resampling.LANCZOS)
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidArgumentError(f"{path}: not a readable image: {exc}") from None
    return np.asarray(gray, dtype=np.float64)[None]
