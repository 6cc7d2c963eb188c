"""The models a gateway serves: each artifact with its plaintext backends and its encryption specs.

Loaded once at start. The plaintext path runs in the gateway process itself (a batch-1 MNIST
call costs the kernels 6-11 us, less than a hop to another process): every model has both
backends, the numba int8 kernels and onnxruntime (the reference), and a request may name either
(the Open Inference Protocol parameter ``backend``); without one it gets the configured default.
A model the kernels refuse is served by onnxruntime only.

Encryption specs are compiled here per profile: the default profile's at start (a model the
engine cannot compile under it is served in plaintext only, with a logged reason), any other
profile's on first request, once, then kept: at most models x profiles specs (the MNIST CNN's
circuit_private spec takes about 14 s to compile, most of it lowering the convolution). The
encoded plans live in the workers.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gateway.he.params import PROFILES, Precision, Profile
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
    backends: dict[Backend, LogitsModel]
    default_backend: Backend
    default_profile: Profile
    specs: dict[Profile, EncryptionSpec | HegateError] = field(default_factory=dict)
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

    @property
    def spec(self) -> EncryptionSpec | None:
        """The default profile's spec, or None if the model is served in plaintext only."""
        spec = self.specs.get(self.default_profile)
        return spec if isinstance(spec, EncryptionSpec) else None

    @property
    def plaintext(self) -> LogitsModel:
        """The default plaintext backend."""
        return self.backends[self.default_backend]

    def backend(self, name: str = "") -> LogitsModel:
        """The plaintext backend ``name`` ("" for the default).

        Raises:
            InvalidArgumentError: an unknown backend, or numba for a model the kernels refused.
        """
        if not name:
            return self.plaintext
        if name not in self.backends:
            raise InvalidArgumentError(
                f"model {self.name!r} is served by the plaintext backends {sorted(self.backends)}, not {name!r}"
            )
        return self.backends[name]

    def predict(self, x: np.ndarray, *, max_batch: int, backend: str = "") -> np.ndarray:
        """Plaintext logits of a batch ``[n, *input_shape]`` of normalized float32 inputs.

        Raises:
            InvalidArgumentError: wrong dtype, shape or batch size, or an unknown backend.
        """
        model = self.backend(backend)
        if x.dtype != np.float32:
            raise InvalidArgumentError(f"model {self.name!r} takes FP32 inputs, got {x.dtype}")
        if x.ndim != len(self.input_shape) + 1 or list(x.shape[1:]) != self.input_shape:
            raise InvalidArgumentError(
                f"model {self.name!r} takes shape [batch, {', '.join(map(str, self.input_shape))}], got {list(x.shape)}"
            )
        if not 1 <= len(x) <= max_batch:
            raise InvalidArgumentError(f"batch size must be 1 to {max_batch}, got {len(x)}")
        return model.predict_logits(x)


class ModelStore:
    """Every version of every model in a repository, ready to serve."""

    def __init__(
        self, repository: Path, *, plaintext_backend: Backend = "numba", precision: Precision = "standard"
    ) -> None:
        self.repository = ModelRepository(repository)
        self.default_profile: Profile = precision
        self._compiling = threading.Lock()
        self._models: dict[str, dict[str, ServedModel]] = {}
        for artifact in self.repository.artifacts():
            kernels = load_backend(artifact.onnx_path)  # onnxruntime itself if the kernels refuse the model
            backends: dict[Backend, LogitsModel] = {kernels.backend: kernels}
            backends.setdefault("onnxruntime", OnnxRuntimeModel(artifact.onnx_path))
            default = plaintext_backend if plaintext_backend in backends else "onnxruntime"
            served = ServedModel(
                artifact=artifact, backends=backends, default_backend=default, default_profile=precision
            )
            try:
                served.specs[precision] = compile_plan(artifact.onnx_path, profile=precision)[0]
            except HegateError as exc:
                logger.warning("%s is served in plaintext only: %s", artifact.manifest.name, exc)
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

    def profiles(self) -> tuple[Profile, ...]:
        """The profiles clients may ask for, the default first."""
        return (self.default_profile, *(p for p in PROFILES if p != self.default_profile))

    def profile(self, name: str) -> Profile:
        """The profile ``name`` ("" for the default).

        Raises:
            InvalidArgumentError: not a profile.
        """
        if not name:
            return self.default_profile
        if name not in PROFILES:
            raise InvalidArgumentError(f"unknown CKKS profile {name!r}; profiles: {', '.join(PROFILES)}")
        return name  # type: ignore[return-value]

    def compiled(self, name: str, version: str = "", profile: str = "") -> bool:
        """Whether :meth:`encrypted` would answer at once (nothing left to compile)."""
        try:
            return self.profile(profile) in self.get(name, version).specs
        except HegateError:
            return True  # it fails at once

    def encrypted(self, name: str, version: str = "", profile: str = "") -> tuple[ServedModel, EncryptionSpec]:
        """The model and its spec under ``profile`` ("" for the default), compiled on first use.
        Blocks while it compiles (seconds): call it from a thread unless :meth:`compiled`.

        Raises:
            NotFoundError: unknown, or not served encrypted.
            InvalidArgumentError: an unknown profile, or one the model cannot be compiled under.
        """
        model = self.get(name, version)
        chosen = self.profile(profile)
        if model.spec is None:
            raise NotFoundError(f"model {name!r} is served in plaintext only (the CKKS engine cannot compile it)")
        spec = model.specs.get(chosen)
        if spec is None:
            with self._compiling:
                if chosen not in model.specs:
                    try:
                        model.specs[chosen] = compile_plan(model.artifact.onnx_path, profile=chosen)[0]
                    except HegateError as exc:  # kept: the same request would fail the same way
                        model.specs[chosen] = exc
            spec = model.specs[chosen]
        if isinstance(spec, HegateError):
            raise InvalidArgumentError(f"model {name!r} is not served under the {chosen} profile: {spec}")
        return model, spec

    def worker_models(self) -> list[ModelRef]:
        """What the encrypted workers load (the default profile's plans at start)."""
        return [
            ModelRef(name=m.name, version=m.version, onnx_path=m.artifact.onnx_path, preload=[self.default_profile])
            for m in self.models()
            if m.spec is not None
        ]
