"""Choosing the plaintext backend of a model: the numba kernels, or onnxruntime as a fallback.

The gateway calls :func:`load_backend` once per model at load time. A model the kernels cannot
run (an operator they do not implement, weights outside their exact range) is refused by the
compiler with :class:`UnsupportedModelError` naming the node; by default the model is then
served by onnxruntime with a logged warning, and with ``strict=True`` the error propagates
instead (for deployments that must not silently run the slower path).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from kernels.errors import UnsupportedModelError
from kernels.executor import NumbaModel
from models import onnx_runtime
from models.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

Backend = Literal["numba", "onnxruntime"]


class LogitsModel(Protocol):
    """What the gateway's plaintext path needs from a backend."""

    backend: Backend

    def predict_logits(self, x: np.ndarray) -> np.ndarray: ...


class OnnxRuntimeModel:
    """onnxruntime behind the same interface as :class:`~kernels.executor.NumbaModel`."""

    backend: Backend = "onnxruntime"

    def __init__(self, path: Path, *, threads: int = 1) -> None:
        if threads < 1:
            raise InvalidArgumentError(f"threads must be at least 1, got {threads}")
        self.path = Path(path)
        self.session = onnx_runtime.create_session(self.path, threads=threads)

    def predict_logits(self, x: np.ndarray) -> np.ndarray:
        return onnx_runtime.predict_logits(self.session, x)


def load_backend(path: Path, *, threads: int = 1, strict: bool = False) -> LogitsModel:
    """The numba kernels for ``path`` (a ``model.onnx``), or onnxruntime if they cannot run it.

    Args:
        path: the artifact's int8 ONNX file.
        threads: threads per call, for either backend.
        strict: raise instead of falling back to onnxruntime.

    Raises:
        UnsupportedModelError: only with ``strict=True``; names the offending node.
        ModelArtifactError: the file is not a loadable ONNX model.
        InvalidArgumentError: ``threads`` out of range.
    """
    try:
        return NumbaModel.load(Path(path), threads=threads)
    except UnsupportedModelError as exc:
        if strict:
            raise
        logger.warning("numba kernels cannot run %s, serving it with onnxruntime instead: %s", path, exc)
        return OnnxRuntimeModel(Path(path), threads=threads)
