"""Inputs: the valid range every SDK call clips to, and files for ``hegate infer`` (``.npy``
arrays or image files, normalized as the model's manifest says)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from models.errors import InvalidArgumentError
from models.manifest import InputSpec

logger = logging.getLogger(__name__)


class InputRange:
    """The manifest's ``raw_range`` in normalized units; the SDK clips every input to it.

    Why in the client: the server cannot check the range of a ciphertext, and an out-of-range
    input is one the model never saw in training. Clipping here gives the plaintext and the
    encrypted path the same input, and a logged warning, once per instance (the SDK keeps one per
    client and model), tells the caller that something was out of range. (Beyond this,
    :meth:`gateway.he.client.ClientKeys.encrypt` saturates at the ends of the model's uint8 input
    grid, the range the plan's value and error bounds assume, as the int8 model does.)

    Clipping a normalized value at the normalized ends of ``raw_range`` gives exactly the
    normalized clipped raw value: the normalization is increasing (its scale and standard
    deviations are positive) and rounding to float32 keeps order, so for ``f`` the normalization
    ``f(clip(raw, lo, hi)) == clip(f(raw), f(lo), f(hi))``.
    """

    def __init__(self, spec: InputSpec, *, model: str) -> None:
        self.model = model
        self.raw_range = spec.raw_range
        self.low, self.high = (spec.normalization.apply(np.full(spec.shape, end)) for end in spec.raw_range)
        self._warned = False

    def clip(self, x: np.ndarray) -> np.ndarray:
        """Normalized inputs ``[n, *shape]`` clipped to the valid range (a warning the first time
        values change).

        Raises:
            InvalidArgumentError: a value that is NaN or infinite.
        """
        if not np.isfinite(x).all():
            raise InvalidArgumentError(f"inputs to {self.model} hold NaN or infinite values")
        clipped = np.clip(x, self.low, self.high).astype(x.dtype, copy=False)
        changed = int(np.count_nonzero(clipped != x))
        if changed and not self._warned:
            self._warned = True
            logger.warning(
                "%s: %d of %d input values lay outside the manifest's raw range [%g, %g] and were clipped to it "
                "(logged once per client and model)",
                self.model,
                changed,
                x.size,
                *self.raw_range,
            )
        return clipped


def read_input(path: Path, spec: InputSpec) -> np.ndarray:
    """Normalized float32 inputs ``[n, *shape]`` from raw values in ``path``.

    A ``.npy`` file holds raw values (the manifest's ``raw_range``, e.g. MNIST pixels 0-255) of
    one input or a batch. An image (PNG, JPEG, ...) is read as grayscale and resized to the
    input's height and width; MNIST models expect a light digit on a dark background. Values
    outside ``raw_range`` are clipped by the client that sends them (:class:`InputRange`).

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
