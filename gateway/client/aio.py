"""The asyncio client and its encrypted session: the same calls as :mod:`gateway.client.sync`.

Encryption and decryption are CPU work; they run in a thread so the caller's event loop keeps
serving (TenSEAL holds the GIL, so they do not run in parallel with each other).
"""

from __future__ import annotations

import asyncio
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
from gateway.he.client import ClientKeys, DecryptedLogits
from gateway.he.plan import EncryptionSpec
from models.errors import NotFoundError


class AsyncHegateClient:
    """``async with AsyncHegateClient(target, api_key=...) as client: ...``"""

    def __init__(self, target: str = "127.0.0.1:8001", **options) -> None:
        self.options = ClientOptions(target=target, **options)
        self.channel = self.options.open_channel(target, grpc.aio)
        fast = self.options.fast_path_target
        self._fast_channel = self.options.open_channel(fast, grpc.aio) if fast else None
        self._oip = oip_grpc.GRPCInferenceServiceStub(self._fast_channel or self.channel)
        self._hegate = hv1_grpc.EncryptedInferenceStub(self.channel)
        self._index: ModelIndex | None = None

    async def _call(self, method, request):
        with translated_errors():
            return await method(request, metadata=self.options.metadata, timeout=self.options.timeout_seconds)

    async def list_models(self) -> list[ModelInfo]:
        infos = model_infos(await self._call(self._hegate.ListModels, hv1.ListModelsRequest()))
        self._index = ModelIndex(infos)
        return infos

    async def model(self, name: str, version: str = "") -> ModelInfo:
        if self._index is None:
            await self.list_models()
        return self._index.find(name, version)

    async def live(self) -> bool:
        return (await self._call(self._oip.ServerLive, oip.ServerLiveRequest())).live

    async def predict(self, model: str, x: np.ndarray, *, version: str = "", backend: str | None = None) -> np.ndarray:
        request = infer_request(await self.model(model, version), x, backend)
        return logits_of(await self._call(self._oip.ModelInfer, request), backend)

    async def platform(self, model: str, version: str = "") -> str:
        request = oip.ModelMetadataRequest(name=model, version=version)
        return (await self._call(self._oip.ModelMetadata, request)).platform

    async def spec(self, model: str, version: str = "", profile: str | None = None) -> EncryptionSpec:
        return spec_of(await self._call(self._hegate.GetEncryptionSpec, spec_request(model, version, profile)))

    async def encrypted_session(
        self, model: str, *, version: str = "", profile: str | None = None, progress: Progress | None = None
    ) -> AsyncEncryptedSession:
        session = AsyncEncryptedSession(self, await self.model(model, version))
        await session.register(progress, profile=profile)
        return session

    async def delete_keys(self, key_id: str) -> bool:
        """Delete this tenant's key set ``key_id`` from the gateway; False if it held none such."""
        request = hv1.DeleteKeysRequest(key_id=key_id)
        with translated_errors():
            response = await self._hegate.DeleteKeys(
                request, metadata=self.options.keyed_metadata(key_id), timeout=self.options.timeout_seconds
            )
        return response.deleted

    async def close(self) -> None:
        await self.channel.close()
        if self._fast_channel is not None:
            await self._fast_channel.close()

    async def __aenter__(self) -> AsyncHegateClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class AsyncEncryptedSession:
    """Like :class:`~gateway.client.sync.EncryptedSession`: the key id header on every call, and
    one re-registration and one retry after NOT_FOUND, shared by the calls in flight at the time."""

    def __init__(self, client: AsyncHegateClient, model: ModelInfo) -> None:
        self.client = client
        self.model = model
        self.closed = False  # closed sessions never register again: their keys were deleted on purpose
        self.registrations = 0
        self._lock = asyncio.Lock()

    async def register(self, progress: Progress | None = None, *, profile: str | None = None) -> None:
        self.spec = await self.client.spec(self.model.name, self.model.version, profile)
        self.keys = await asyncio.to_thread(ClientKeys, self.spec)
        self._progress = progress
        await self._register()

    async def _register(self) -> None:
        uploaded = await asyncio.to_thread(session_keys, self.keys)
        key_id = upload_key_id(self.model, self.spec, uploaded)
        options = self.client.options
        started = time.perf_counter()
        with translated_errors():
            response = await self.client._hegate.RegisterKeys(
                key_chunks(self.model, self.spec, uploaded, self._progress),
                metadata=options.keyed_metadata(key_id),
                timeout=options.timeout_seconds,
            )
        self.registration_seconds = time.perf_counter() - started
        self.key_id = checked_key_id(sent=key_id, returned=response.key_id)
        self.key_bytes = sum(map(len, uploaded))
        self.registrations += 1

    async def _infer(self, ciphertext: bytes, count: int):
        key_id = self.key_id
        try:
            return await self._infer_with(key_id, ciphertext, count)
        except NotFoundError:
            if self.closed:
                raise
            async with self._lock:
                if self.key_id == key_id:  # the first call in flight to see NOT_FOUND re-registers
                    warn_keys_lost(key_id, self.model.name)
                    await self._register()
            return await self._infer_with(self.key_id, ciphertext, count)

    async def _infer_with(self, key_id: str, ciphertext: bytes, count: int):
        options = self.client.options
        with translated_errors():
            return await self.client._hegate.Infer(
                encrypted_request(self.model, key_id, ciphertext, count),
                metadata=options.keyed_metadata(key_id),
                timeout=options.timeout_seconds,
            )

    @property
    def lanes(self) -> int:
        return self.spec.packing.lanes

    async def _one(self, batch: np.ndarray) -> tuple[DecryptedLogits, np.ndarray]:
        started = time.perf_counter()
        ciphertext = await asyncio.to_thread(self.keys.encrypt, batch)
        encrypted = time.perf_counter()
        response = await self._infer(ciphertext, len(batch))
        called = time.perf_counter()
        decrypted = await asyncio.to_thread(self.keys.decrypt_classified, response.ciphertext, len(batch))
        server = response.timings
        steps = [encrypted - started, called - encrypted, time.perf_counter() - called]
        return decrypted, np.array([*steps, server.queue_ms / 1e3, server.compute_ms / 1e3])

    async def predict(self, x: np.ndarray) -> Prediction:
        """Like :meth:`EncryptedSession.predict`; the ciphertexts of a large batch travel concurrently."""
        groups = batches(model_inputs(self.model, x), self.spec.input_shape, self.lanes)
        results = await asyncio.gather(*(self._one(b) for b in groups))
        totals = sum(t for _, t in results)
        return Prediction(
            logits=np.concatenate([decrypted.logits for decrypted, _ in results]),
            labels=self.model.manifest.output.labels,
            timings=Timings(*(float(v) for v in 1e3 * totals)),
            classes=np.concatenate([decrypted.classes for decrypted, _ in results]),
        )

    async def close(self) -> None:
        self.closed = True
        await self.client.delete_keys(self.key_id)

    async def __aenter__(self) -> AsyncEncryptedSession:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
