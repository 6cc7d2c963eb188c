"""Errors raised by the numba kernels, inside hegate's one error tree (:mod:`models.errors`)."""

from __future__ import annotations

from models.errors import HegateError


class UnsupportedModelError(HegateError):
    """The int8 graph uses an operator, attribute or value range the numba kernels do not implement.

    Raised at load time, never per request; the message names the ONNX node and what about it
    is unsupported. :func:`kernels.loader.load_backend` catches it and falls back to
    onnxruntime unless asked to be strict.
    """
