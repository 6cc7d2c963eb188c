"""The blocking client and its encrypted session."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np

from gateway.api import grpc_predict_v2_pb2 as oip
from gateway.api import grpc_predict_v2_pb2_grpc as oip_grpc
from gateway.api import hegate_v1_pb2 as hv1
from gateway.api import hegate_v1_pb2_grpc as hv1_grpc
from gateway.client.protocol import (
    ClientOptions,
    ModelIndex,
    ModelInfo,
    Prediction,
    Progress,
    Timings,
    batches,
    checked_key_id,
    encrypted_request,
    infer_request,
    key_chunks,
    logits_of,
    model_infos,
    model_inputs,
    session_keys,
    spec_of,
    spec_request,
    translated_errors,
    upload_key_id,
    warn_keys_lost,
)
from gateway.he.client import ClientKeys
from gateway.he.plan import EncryptionSpec
from models.errors import NotFoundError


class HegateClient:
    """A connection to one gateway. ``HegateClient(target, api_key=..., tls_ca_file=...)``."""

    def __init__(self, target: str = "127.0.0.1:8001", **options) -> None:
        self.options = ClientOptions(target=target, **options)
        self.channel = self.options.open_channel(target, grpc)
        fast = self.options.fast_path_target
        self._fast_channel = self.options.open_channel(fast, grpc) if fast else None
        self._oip = oip_grpc.GRPCInferenceServiceStub(self._fast_channel or self.channel)
        self._hegate = hv1_grpc.EncryptedInferenceStub(self.channel)
        self._index: ModelIndex | None = None

    def _call(self, method, request):
        with translated_errors():
            return method(request, metadata=self.options.metadata, timeout=self.options.timeout_seconds)

    def list_models(self) -> list[ModelInfo]:
        """Every served model with its manifest (DP record, accuracy) and whether it serves encrypted."""
        infos = model_infos(self._call(self._hegate.ListModels, hv1.ListModelsRequest()))
        self._index = ModelIndex(infos)
        return infos

    def model(self, name: str, version: str = "") -> ModelInfo:
        if self._index is None:
            self.list_models()
        return self._index.find(name, version)

    def live(self) -> bool:
        return self._call(self._oip.ServerLive, oip.ServerLiveRequest()).live

    def predict(self, model: str, x: np.ndarray, *, version: str = "", backend: str | None = None) -> np.ndarray:
        """Plaintext logits ``[n, classes]`` for normalized float32 inputs (one, or a batch);
        ``backend`` ("numba" or "onnxruntime") picks the gateway's plaintext backend, None its default."""
        request = infer_request(self.model(model, version), x, backend)
        return logits_of(self._call(self._oip.ModelInfer, request), backend)

    def platform(self, model: str, version: str = "") -> str:
        """The model's Open Inference Protocol platform: ``hegate_int8_<plaintext backend>`` here."""
        request = oip.ModelMetadataRequest(name=model, version=version)
        return self._call(self._oip.ModelMetadata, request).platform

    def spec(self, model: str, version: str = "", profile: str | None = None) -> EncryptionSpec:
        """The model's public encryption spec under ``profile`` (None: the gateway's default)."""
        return spec_of(self._call(self._hegate.GetEncryptionSpec, spec_request(model, version, profile)))

    def encrypted_session(
        self, model: str, *, version: str = "", profile: str | None = None, progress: Progress | None = None
    ) -> EncryptedSession:
        """Make keys for ``model`` here from its public spec under ``profile`` ("standard", "high",
        "circuit_private"; None: the gateway's default) and register them (once)."""
        return EncryptedSession(self, self.model(model, version), profile=profile, progress=progress)

    def delete_keys(self, key_id: str) -> bool:
        """Delete this tenant's key set ``key_id`` from the gateway; False if it held none such."""
        request = hv1.DeleteKeysRequest(key_id=key_id)
        with translated_errors():
            response = self._hegate.DeleteKeys(
                request, metadata=self.options.keyed_metadata(key_id), timeout=self.options.timeout_seconds
            )
        return response.deleted

    def close(self) -> None:
        self.channel.close()
        if self._fast_channel is not None:
            self._fast_channel.close()

    def __enter__(self) -> HegateClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EncryptedSession:
    """A secret key that stays here, its evaluation keys registered on the gateway, and calls.

    Every call names its key set in the ``hegate-key-id`` header (:data:`~gateway.client.protocol.KEY_ID_HEADER`),
    the upload included, so a balancer sends them all to one replica. When the gateway answers an
    Infer with NOT_FOUND (the keys expired, were evicted or deleted, or the call reached a replica
    that never saw them), the session registers fresh evaluation keys made from the same secret key
    once and retries the call once; a second NOT_FOUND is raised, as is any after :meth:`close`.
    Fresh keys, not the first upload's bytes: keeping those would hold 27.6 MiB per session of the
    default model for a rare event, and making them again took 0.54-0.75 s here (three runs,
    2026-12-03). A NOT_FOUND for the model itself (a replica that does not serve it) costs one
    useless upload before it surfaces.
    """

    def __init__(
        self, client: HegateClient, model: ModelInfo, *, profile: str | None = None, progress: Progress | None = None
    ) -> None:
        self.client = client
        self.model = model
        self.spec = client.spec(model.name, model.version, profile)
        self.keys = ClientKeys(self.spec)
        self.closed = False  # closed sessions never register again: their keys were deleted on purpose
        self.registrations = 0  # key uploads so far: 1, plus one per re-registration after NOT_FOUND
        self._progress = progress
        self._lock = threading.Lock()
        self._register()

    def _register(self) -> None:
        uploaded = session_keys(self.keys)
        key_id = upload_key_id(self.model, self.spec, uploaded)
        options = self.client.options
        started = time.perf_counter()
        with translated_errors():
            response = self.client._hegate.RegisterKeys(
                key_chunks(self.model, self.spec, uploaded, self._progress),
                metadata=options.keyed_metadata(key_id),
                timeout=options.timeout_seconds,
            )
        self.registration_seconds = time.perf_counter() - started
        self.key_id = checked_key_id(sent=key_id, returned=response.key_id)
        self.key_bytes = sum(map(len, uploaded))
        self.registrations += 1

    def _infer(self, ciphertext: bytes, count: int):
        """One Infer; on NOT_FOUND the keys are registered again (once, whichever thread got there
        first) and the call is sent once more."""
        key_id = self.key_id
        try:
            return self._infer_with(key_id, ciphertext, count)
        except NotFoundError:
            if self.closed:
                raise
            with self._lock:
                if self.key_id == key_id:  # no other thread has re-registered since this call began
                    warn_keys_lost(key_id, self.model.name)
                    self._register()
            return self._infer_with(self.key_id, ciphertext, count)

    def _infer_with(self, key_id: str, ciphertext: bytes, count: int):
        client = self.client
        with translated_errors():
            return client._hegate.Infer(
                encrypted_request(self.model, key_id, ciphertext, count),
                metadata=client.options.keyed_metadata(key_id),
                timeout=client.options.timeout_seconds,
            )

    @property
    def lanes(self) -> int:
        return self.spec.packing.lanes

    def predict(self, x: np.ndarray) -> Prediction:
        """Encrypt, evaluate on the gateway, decrypt: one input or a batch of any size (each
        ciphertext carries up to ``lanes`` inputs). Inputs are clipped to the model's valid range
        first; the logits come back rounded to the plan's grid (see :class:`Prediction`)."""
        logits, classes, totals = [], [], np.zeros(5)
        for batch in batches(model_inputs(self.model, x), self.spec.input_shape, self.lanes):
            started = time.perf_counter()
            ciphertext = self.keys.encrypt(batch)
            encrypted = time.perf_counter()
            response = self._infer(ciphertext, len(batch))
            called = time.perf_counter()
            decrypted = self.keys.decrypt_classified(response.ciphertext, len(batch))
            logits.append(decrypted.logits)
            classes.append(decrypted.classes)
            done = time.perf_counter()
            server = response.timings
            totals += [
                encrypted - started,
                called - encrypted,
                done - called,
                server.queue_ms / 1e3,
                server.compute_ms / 1e3,
            ]
        return Prediction(
            logits=np.concatenate(logits),
            labels=self.model.manifest.output.labels,
            timings=Timings(*(float(v) for v in 1e3 * totals)),
            classes=np.concatenate(classes),
        )

    def close(self) -> None:
        """Delete the keys from the gateway; later calls fail with NOT_FOUND."""
        self.closed = True
        self.client.delete_keys(self.key_id)

    def __enter__(self) -> EncryptedSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
