"""The models a gateway serves: each artifact with its plaintext backend and its encryption spec.

Loaded once at start. The plaintext path runs the numba int8 kernels (onnxruntime if the kernels
refuse a model, or for every model when the settings ask for it) in the gateway process itself:
one MNIST request takes 7-104 us, less than a hop to another process costs. Encryption specs are
compiled here too, at the configured precision (clients fetch them); the encoded plans live in
the workers. A model the engine cannot compile is served in plaintext
only, with a logged reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gateway.he.params import Precision
from gateway.he.plan import EncryptionSpec, compile_plan
from gateway.workers.messages import ModelRef
from kernels import OnnxRuntimeModel, load_backend
from kernels.loader import Backend, LogitsModel
from models.errors import HegateError, InvalidArgumentError, NotFoundError
from models.repository import ModelArtifact, ModelRepository

logger = logging.getLogger(__name__)


@dataclass
class ServedModel:
    artifact: ModelArtifact
    plaintext: LogitsModel
    spec: EncryptionSpec | None
    encrypted_inflight: int = 0

    @property
    def name(self) -> str:
        return self.artifact.manifest.name

    @property
    def version(self) -> str:
        return str(self.artifact.manifest.version)

    @property
    def input_shape(self) -> list[int]:
        return self.artifact.manifest.input.shape

    def predict(self, x: np.ndarray, *, max_batch: int) -> np.ndarray:
        """Plaintext logits of a batch ``[n, *input_shape]`` of normalized float32 inputs.

        Raises:
            InvalidArgumentError: wrong dtype, shape or batch size.
        """
        if x.dtype != np.float32:
            raise InvalidArgumentError(f"model {self.name!r} takes FP32 inputs, got {x.dtype}")
        if x.ndim != len(self.input_shape) + 1 or list(x.shape[1:]) != self.input_shape:
            raise InvalidArgumentError(
                f"model {self.name!r} takes shape [batch, {', '.join(map(str, self.input_shape))}], got {list(x.shape)}"
            )
        if not 1 <= len(x) <= max_batch:
            raise InvalidArgumentError(f"batch size must be 1 to {max_batch}, got {len(x)}")
        return self.plaintext.predict_logits(x)


class ModelStore:
    """Every version of every model in a repository, ready to serve."""

    def __init__(
        self, repository: Path, *, plaintext_backend: Backend = "numba", precision: Precision = "standard"
    ) -> None:
        self.repository = ModelRepository(repository)
        self.precision = precision
        self._models: dict[str, dict[str, ServedModel]] = {}
        for artifact in self.repository.artifacts():
            spec = None
            try:
                spec, _ = compile_plan(artifact.onnx_path, precision=precision)
            except HegateError as exc:
                logger.warning("%s is served in plaintext only: %s", artifact.manifest.name, exc)
            plaintext = (
                load_backend(artifact.onnx_path)
                if plaintext_backend == "numba"
                else OnnxRuntimeModel(artifact.onnx_path)
            )
            served = ServedModel(artifact=artifact, plaintext=plaintext, spec=spec)
            self._models.setdefault(served.name, {})[served.version] = served

    def models(self) -> list[ServedModel]:
        return [versions[v] for name, versions in sorted(self._models.items()) for v in sorted(versions, key=int)]

    def get(self, name: str, version: str = "") -> ServedModel:
        """``version`` "" means the latest.

        Raises:
            NotFoundError: unknown model or version, naming what exists.
        """
        versions = self._models.get(name)
        if not versions:
            raise NotFoundError(f"unknown model {name!r}; served: {', '.join(sorted(self._models))}")
        if not version:
            return versions[max(versions, key=int)]
        if version not in versions:
            raise NotFoundError(f"model {name!r} has no version {version!r}; versions: {sorted(versions, key=int)}")
        return versions[version]

    def encrypted(self, name: str, version: str = "") -> ServedModel:
        """Like :meth:`get`, for the encrypted path.

        Raises:
            NotFoundError: unknown, or not served encrypted.
        """
        model = self.get(name, version)
        if model.spec is None:
            raise NotFoundError(f"model {name!r} is served in plaintext only (the CKKS engine cannot compile it)")
        return model

    def worker_models(self) -> list[ModelRef]:
        """What the encrypted workers load."""
        return [
            ModelRef(name=m.name, version=m.version, onnx_path=m.artifact.onnx_path, precision=self.precision)
            for m in self.models()
            if m.spec is not None
        ]
