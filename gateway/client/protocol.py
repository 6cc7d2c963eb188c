"""What both clients share: options, channels, request building, response reading, errors.

Everything here is free of I/O, so the sync and asyncio clients differ only in how they call.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from gateway.api import BACKEND_PARAMETER
from gateway.api import grpc_predict_v2_pb2 as oip
from gateway.api import hegate_v1_pb2 as hv1
from gateway.client.inputs import InputRange
from gateway.he.client import ClientKeys
from gateway.he.plan import EncryptionSpec
from gateway.keystore.base import key_id_for
from gateway.server.auth import API_KEY_HEADER
from gateway.status import error_for
from models.errors import InternalError, InvalidArgumentError, NotFoundError
from models.manifest import Manifest

logger = logging.getLogger(__name__)
CHUNK_BYTES = 1 << 20  # key upload chunks: well under any server's message limit
KEY_ID_HEADER = "hegate-key-id"
"""Request metadata naming the key set a call uses (RegisterKeys, Infer, DeleteKeys), so that an L7
balancer can hash on it and send every call of a key set to the replica that holds it
(``deploy/nginx/``: ``hash $http_hegate_key_id consistent``). Key ids are public-key fingerprints,
not secrets (see :mod:`gateway.keystore.base`), so a balancer's logs may show them."""
Progress = Callable[[int, int], None]  # (bytes sent, bytes in all)


class ClientOptions(BaseModel):
    """Where and how to connect; mirrors the server's TLS and API-key settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = "127.0.0.1:8001"
    fast_path_target: str | None = Field(
        default=None, description="the gateway's fast path (host:port): plaintext calls go there"
    )
    api_key: str | None = None
    tls_ca_file: Path | None = Field(default=None, description="PEM CA that signed the server; enables TLS")
    tls_cert_file: Path | None = Field(default=None, description="client certificate, for mutual TLS")
    tls_key_file: Path | None = None
    timeout_seconds: float = Field(default=60.0, gt=0, description="deadline of each call")
    max_message_bytes: int = 64 << 20

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((API_KEY_HEADER, self.api_key),) if self.api_key else ()

    def keyed_metadata(self, key_id: str) -> tuple[tuple[str, str], ...]:
        """:attr:`metadata` and the key id header (:data:`KEY_ID_HEADER`)."""
        return (*self.metadata, (KEY_ID_HEADER, key_id))

    @property
    def channel_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
        ]

    def open_channel(self, target: str, api=grpc):
        """A channel to ``target`` with these options; ``api`` is ``grpc`` or ``grpc.aio`` (the same
        channel, blocking or asyncio)."""
        credentials = self.credentials()
        if credentials is None:
            return api.insecure_channel(target, options=self.channel_options)
        return api.secure_channel(target, credentials, options=self.channel_options)

    def credentials(self) -> grpc.ChannelCredentials | None:
        if self.tls_ca_file is None:
            return None
        read = lambda path: Path(path).read_bytes() if path else None  # noqa: E731
        return grpc.ssl_channel_credentials(read(self.tls_ca_file), read(self.tls_key_file), read(self.tls_cert_file))


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    manifest: Manifest
    encrypted: bool
    lanes: int  # under the default profile
    profiles: tuple[str, ...] = ()  # the CKKS profiles the gateway offers for it, default first
    input_range: InputRange = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_range", InputRange(self.manifest.input, model=self.name))


@dataclass(frozen=True)
class Timings:
    """Milliseconds: the client's own steps and what the server reports."""

    encrypt_ms: float = 0.0
    call_ms: float = 0.0
    decrypt_ms: float = 0.0
    server_queue_ms: float = 0.0
    server_compute_ms: float = 0.0


@dataclass(frozen=True)
class Prediction:
    """Logits ``[n, classes]`` and what they mean.

    On the encrypted path the logits are rounded to the plan's grid (``ClientKeys.logit_grid``)
    and ``classes`` holds each input's class taken before rounding, so that rounding changes no
    decision (a tie of rounded logits is not a tie of classes); without it, the logits' argmax.
    """

    logits: np.ndarray
    labels: list[str]
    timings: Timings = field(default_factory=Timings)
    classes: np.ndarray | None = None

    @property
    def probabilities(self) -> np.ndarray:
        shifted = np.exp(self.logits - self.logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    @property
    def predicted(self) -> list[str]:
        classes = self.logits.argmax(axis=1) if self.classes is None else self.classes
        return [self.labels[i] for i in classes]


@contextlib.contextmanager
def translated_errors() -> Iterator[None]:
    """gRPC failures become the domain errors that the server raised."""
    try:
        yield
    except grpc.RpcError as exc:
        raise error_for(exc.code(), exc.details() or "") from None


def model_infos(response: hv1.ListModelsResponse) -> list[ModelInfo]:
    return [
        ModelInfo(
            name=m.name,
            version=m.version,
            manifest=Manifest.model_validate_json(m.manifest_json),
            encrypted=m.encrypted,
            lanes=m.lanes,
            profiles=tuple(m.profiles),
        )
        for m in response.models
    ]


class ModelIndex:
    """The models of a gateway by ``name`` (latest version) and by ``name/version``."""

    def __init__(self, infos: list[ModelInfo]) -> None:
        self._by_key = {m.name: m for m in infos} | {f"{m.name}/{m.version}": m for m in infos}

    def find(self, name: str, version: str = "") -> ModelInfo:
        info = self._by_key.get(f"{name}/{version}" if version else name)
        if info is None:
            raise NotFoundError(f"the gateway serves no model {name!r}" + (f" version {version}" if version else ""))
        return info


def model_inputs(model: ModelInfo, x: np.ndarray) -> np.ndarray:
    """Normalized float32 inputs (one, or a batch ``[n, *input_shape]``) as a batch, clipped to
    the model's valid range: every SDK call, plaintext or encrypted, sends its inputs through here.

    Raises:
        InvalidArgumentError: not float32, a shape that is not the model's, NaN or infinite values.
    """
    x = np.asarray(x)
    if x.dtype != np.float32:
        raise InvalidArgumentError(f"inputs must be float32 (normalized, as the manifest says), got {x.dtype}")
    shape = model.manifest.input.shape
    if list(x.shape) == shape:
        x = x[None]
    if list(x.shape[1:]) != shape:
        raise InvalidArgumentError(f"inputs of shape {list(x.shape)} are neither {shape} nor [n, *{shape}]")
    return model.input_range.clip(x)


def infer_request(model: ModelInfo, x: np.ndarray, backend: str | None = None) -> oip.ModelInferRequest:
    """One plaintext request for a batch ``[n, *input_shape]`` (or one input) of normalized inputs;
    ``backend`` ("numba" or "onnxruntime") names the gateway's plaintext backend, None its default."""
    x = np.ascontiguousarray(model_inputs(model, x), dtype="<f4")
    tensor = oip.ModelInferRequest.InferInputTensor(name=model.manifest.input.name, datatype="FP32", shape=x.shape)
    request = oip.ModelInferRequest(
        model_name=model.name, model_version=model.version, inputs=[tensor], raw_input_contents=[x.tobytes()]
    )
    if backend:
        request.parameters[BACKEND_PARAMETER].string_param = backend
    return request


def logits_of(response: oip.ModelInferResponse, backend: str | None = None) -> np.ndarray:
    """The logits of a response; ``backend``: the one the request named, which the gateway must echo.

    Raises:
        InvalidArgumentError: a backend was named and the gateway ignored it (it predates the parameter).
    """
    if backend and BACKEND_PARAMETER not in response.parameters:
        raise InvalidArgumentError(
            f"the gateway ignored the request parameter {BACKEND_PARAMETER!r}: it serves its default backend only"
        )
    output = response.outputs[0]
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(tuple(output.shape)).copy()


def spec_of(response: hv1.GetEncryptionSpecResponse) -> EncryptionSpec:
    return EncryptionSpec.model_validate_json(response.spec_json)


def spec_request(model: str, version: str, profile: str | None) -> hv1.GetEncryptionSpecRequest:
    return hv1.GetEncryptionSpecRequest(model_name=model, model_version=version, profile=profile or "")


def key_chunks(
    model: ModelInfo,
    spec: EncryptionSpec,
    keys: tuple[bytes, bytes, bytes],
    progress: Progress | None = None,
) -> Iterator[hv1.RegisterKeysChunk]:
    """The upload: a header naming ``spec``'s profile, then the relinearization, Galois and (for
    circuit_private) public key bytes in 1 MiB chunks."""
    relin, galois, public = keys
    total = len(relin) + len(galois) + len(public)
    header = hv1.KeysHeader(
        model_name=model.name,
        model_version=model.version,
        format=hv1.KEY_FORMAT_SEAL,
        relin_keys_bytes=len(relin),
        galois_keys_bytes=len(galois),
        total_bytes=total,
        profile=spec.precision,
        public_key_bytes=len(public),
    )
    yield hv1.RegisterKeysChunk(header=header)
    data = memoryview(relin + galois + public)
    for start in range(0, total, CHUNK_BYTES):
        yield hv1.RegisterKeysChunk(data=bytes(data[start : start + CHUNK_BYTES]))
        if progress is not None:
            progress(min(start + CHUNK_BYTES, total), total)


def session_keys(keys: ClientKeys) -> tuple[bytes, bytes, bytes]:
    """What an encrypted session registers: the evaluation keys, and a public key when the spec's
    profile is circuit_private (the other profiles refuse one)."""
    relin, galois = keys.evaluation_keys()
    return relin, galois, keys.public_key() if keys.spec.circuit_privacy is not None else b""


def upload_key_id(model: ModelInfo, spec: EncryptionSpec, keys: tuple[bytes, bytes, bytes]) -> str:
    """The id the gateway will file ``keys`` under: a content hash, computed here before the upload
    so that RegisterKeys already carries it in :data:`KEY_ID_HEADER` (a balancer routes the upload
    to the replica that later serves the key set's calls)."""
    relin, galois, public = keys
    return key_id_for(
        model_name=model.name,
        model_version=model.version,
        relin=relin,
        galois=galois,
        profile=spec.precision,
        public_key=public,
    )


def checked_key_id(*, sent: str, returned: str) -> str:
    """The registered key id, once the gateway's answer agrees with the id the upload was routed by.

    Raises:
        InternalError: the gateway hashed the keys to another id (its key id scheme is not this
            SDK's), so a balancer would send this key set's calls to a replica chosen by the wrong id.
    """
    if returned != sent:
        raise InternalError(
            f"the gateway registered the keys as {returned!r}, but this SDK computed {sent!r}: "
            "the gateway's key id scheme differs from the SDK's (upgrade one of them)"
        )
    return returned


def warn_keys_lost(key_id: str, model: str) -> None:
    """Logged once per re-registration after NOT_FOUND (by either client)."""
    logger.warning(
        "the gateway no longer holds key set %s of %s (expired, evicted, deleted, or a replica that never saw it): "
        "registering keys again",
        key_id,
        model,
    )


def encrypted_request(model: ModelInfo, key_id: str, ciphertext: bytes, count: int) -> hv1.InferRequest:
    return hv1.InferRequest(
        model_name=model.name, model_version=model.version, key_id=key_id, ciphertext=ciphertext, count=count
    )


def batches(x: np.ndarray, shape: list[int], lanes: int) -> list[np.ndarray]:
    """One input or a batch, split into groups that each fit one ciphertext."""
    x = np.asarray(x)
    if list(x.shape) == shape:
        x = x[None]
    return [x[i : i + lanes] for i in range(0, len(x), lanes)]
