"""The ``hegate.v1.EncryptedInference`` servicer: specs, key registration, encrypted inference.

A client names a CKKS profile when it asks for a spec (the default one when it names none) and
again when it registers keys made from that spec: the key set is bound to the model, its
version and the profile, and Infer evaluates under that profile's plan. Keys arrive in chunks
(tens of MB; one message may not exceed the message limit), are checked by a worker (SEAL's
validity checks, the model's parameters and rotation steps, no secret key, a public key exactly
when the profile is circuit_private), and only then stored in the registry under their content
hash, bound to the caller's tenant. The registry's evictions, expiries and deletions reach the
workers through a listener.
"""

from __future__ import annotations

import asyncio
import logging
import time

from gateway.api import hegate_v1_pb2 as pb
from gateway.api import hegate_v1_pb2_grpc as pb_grpc
from gateway.he.plan import EncryptionSpec
from gateway.keystore import DropReason, KeyRecord, KeyStore, key_id_for
from gateway.server.auth import current_tenant
from gateway.server.inference import observed
from gateway.server.metrics import GatewayMetrics
from gateway.server.rpc import rpc
from gateway.server.serving import ModelStore, ServedModel
from gateway.workers.pool import StoredKeys, WorkerPool
from models.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError

logger = logging.getLogger(__name__)
FORMATS = {pb.KEY_FORMAT_SEAL: "seal", pb.KEY_FORMAT_TENSEAL_CONTEXT: "tenseal_context"}


def stored_keys(record: KeyRecord) -> StoredKeys:
    return StoredKeys(
        key_id=record.key_id,
        model=record.model_name,
        version=record.model_version,
        profile=record.profile,
        relin=record.relin,
        galois=record.galois,
        public_key=record.public_key,
    )


class EncryptedServicer(pb_grpc.EncryptedInferenceServicer):
    def __init__(
        self, store: ModelStore, keys: KeyStore, pool: WorkerPool, metrics: GatewayMetrics, *, queue_limit: int
    ) -> None:
        self.store = store
        self.keys = keys
        self.pool = pool
        self.metrics = metrics
        self.queue_limit = queue_limit
        self._loop = asyncio.get_running_loop()
        keys.add_listener(self._on_dropped)

    def _on_dropped(self, record: KeyRecord, reason: DropReason) -> None:
        """Called under the registry's lock: schedule the workers' drop, unless another tenant
        still holds the same (content-addressed) keys."""
        logger.info("keys %s of tenant %s %s", record.key_id, record.tenant, reason.value)
        if not any(other.key_id == record.key_id for other in self.keys.records()):
            self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self.pool.drop_keys(record.key_id)))
        self._loop.call_soon_threadsafe(lambda: self.metrics.key_bytes.set(self.keys.stored_bytes()))

    @rpc
    async def ListModels(self, request, context):
        return pb.ListModelsResponse(
            models=[
                pb.ModelSummary(
                    name=m.name,
                    version=m.version,
                    manifest_json=m.artifact.manifest.model_dump_json(),
                    encrypted=m.spec is not None,
                    lanes=m.spec.packing.lanes if m.spec else 0,
                    privacy=m.artifact.manifest.dp.label,
                    profiles=list(self.store.profiles()) if m.spec else [],
                )
                for m in self.store.models()
            ]
        )

    async def _encrypted(self, name: str, version: str, profile: str) -> tuple[ServedModel, EncryptionSpec]:
        """The store's answer, from a thread when a profile's spec still has to be compiled (seconds)."""
        if self.store.compiled(name, version, profile):
            return self.store.encrypted(name, version, profile)
        return await asyncio.to_thread(self.store.encrypted, name, version, profile)

    @rpc
    async def GetEncryptionSpec(self, request, context):
        model, spec = await self._encrypted(request.model_name, request.model_version, request.profile)
        return pb.GetEncryptionSpecResponse(
            model_name=model.name,
            model_version=model.version,
            spec_json=spec.model_dump_json(),
            plan_version=spec.plan_version,
            profile=spec.precision,
        )

    async def _receive(self, chunks) -> tuple[pb.KeysHeader, bytes]:
        header = None
        parts: list[bytes] = []
        received = 0
        async for chunk in chunks:
            if header is None:
                if chunk.WhichOneof("part") != "header":
                    raise InvalidArgumentError("the first chunk of a key upload must be its header")
                header = chunk.header
                budget = getattr(self.keys, "budget_bytes", None)
                if budget is not None and header.total_bytes > budget:
                    raise ResourceExhaustedError(
                        f"keys of {header.total_bytes / 2**20:.1f} MiB exceed the registry's budget of "
                        f"{budget / 2**20:.1f} MiB"
                    )
                continue
            if chunk.WhichOneof("part") != "data":
                raise InvalidArgumentError("only the first chunk of a key upload may be a header")
            received += len(chunk.data)
            if received > header.total_bytes:
                raise InvalidArgumentError(f"the upload exceeds the {header.total_bytes} bytes its header announced")
            parts.append(chunk.data)
        if header is None:
            raise InvalidArgumentError("empty key upload")
        if received != header.total_bytes:
            raise InvalidArgumentError(f"the upload ended after {received} of {header.total_bytes} bytes")
        return header, b"".join(parts)

    @rpc
    async def RegisterKeys(self, request_iterator, context):
        header, data = await self._receive(request_iterator)
        model, spec = await self._encrypted(header.model_name, header.model_version, header.profile)
        profile = spec.precision
        key_format = FORMATS.get(header.format)
        if key_format is None:
            raise InvalidArgumentError("the key format must be KEY_FORMAT_SEAL or KEY_FORMAT_TENSEAL_CONTEXT")
        if key_format == "seal":
            relin_end = header.relin_keys_bytes
            galois_end = relin_end + header.galois_keys_bytes
            if galois_end + header.public_key_bytes != header.total_bytes:
                raise InvalidArgumentError(
                    "relin_keys_bytes + galois_keys_bytes + public_key_bytes must equal total_bytes"
                )
            relin, galois, public = data[:relin_end], data[relin_end:galois_end], data[galois_end:]
        else:
            relin, galois, public = await self.pool.read_context(
                model=model.name, version=model.version, profile=profile, context=data
            )
        if spec.circuit_privacy is not None and not public:
            raise InvalidArgumentError(
                f"the circuit_private profile needs the client's public key with its evaluation keys "
                f"(public_key_bytes is 0): the server re-randomizes every result of {model.name} under it"
            )
        tenant = current_tenant()
        stored = StoredKeys(
            key_id=key_id_for(
                model_name=model.name,
                model_version=model.version,
                relin=relin,
                galois=galois,
                profile=profile,
                public_key=public,
            ),
            model=model.name,
            version=model.version,
            profile=profile,
            relin=relin,
            galois=galois,
            public_key=public,
        )
        try:
            record = self.keys.get(stored.key_id, tenant=tenant)
        except NotFoundError:
            record = await self._register(stored, tenant)
        return pb.RegisterKeysResponse(
            key_id=record.key_id, stored_bytes=record.size, ttl_seconds=getattr(self.keys, "ttl_seconds", 0.0)
        )

    async def _register(self, keys: StoredKeys, tenant: str) -> KeyRecord:
        """Check and load new keys in the workers, then store them; unless another tenant holds
        the same keys, which the workers then already have."""
        held = any(r.key_id == keys.key_id for r in self.keys.records())
        if not held:
            await self.pool.load_keys(keys)
        try:
            record, _ = self.keys.put(
                tenant=tenant,
                model_name=keys.model,
                model_version=keys.version,
                relin=keys.relin,
                galois=keys.galois,
                profile=keys.profile,
                public_key=keys.public_key,
            )
        except ResourceExhaustedError:
            if not held:
                await self.pool.drop_keys(keys.key_id)
            raise
        self.metrics.key_bytes.set(self.keys.stored_bytes())
        return record

    @rpc
    async def DeleteKeys(self, request, context):
        deleted = self.keys.delete(request.key_id, tenant=current_tenant())
        self.metrics.key_bytes.set(self.keys.stored_bytes())
        return pb.DeleteKeysResponse(deleted=deleted)

    @rpc
    async def Infer(self, request, context):
        started = time.monotonic()
        model, _ = self.store.encrypted(request.model_name, request.model_version)  # the default: compiled at start
        with observed(self.metrics, model.name, "encrypted"):
            record = self.keys.get(request.key_id, tenant=current_tenant())
            if (record.model_name, record.model_version) != (model.name, model.version):
                raise InvalidArgumentError(
                    f"key id {request.key_id} was registered for {record.model_name} version "
                    f"{record.model_version}, not {model.name} version {model.version}"
                )
            _, spec = self.store.encrypted(model.name, model.version, record.profile)  # compiled at registration
            count = request.count or 1
            if count > spec.packing.lanes:
                raise InvalidArgumentError(f"{model.name} packs at most {spec.packing.lanes} inputs, got {count}")
            if model.encrypted_inflight >= self.queue_limit:
                raise ResourceExhaustedError(
                    f"{model.name} already has {self.queue_limit} encrypted requests queued or running; retry later"
                )
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            model.encrypted_inflight += 1
            try:
                result = await self.pool.evaluate(
                    model=model.name,
                    version=model.version,
                    profile=record.profile,
                    key_id=record.key_id,
                    ciphertext=request.ciphertext,
                    deadline=deadline,
                )
            finally:
                model.encrypted_inflight -= 1
            self.metrics.queue_seconds.labels(model.name, "encrypted").observe(result.queue_seconds)
            return pb.InferResponse(
                model_name=model.name,
                model_version=model.version,
                id=request.id,
                ciphertext=result.ciphertext,
                count=count,
                timings=pb.ServerTimings(
                    queue_ms=1000 * result.queue_seconds,
                    compute_ms=1000 * result.compute_seconds,
                    total_ms=1000 * (time.monotonic() - started),
                ),
            )
