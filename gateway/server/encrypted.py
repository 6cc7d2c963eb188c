"""The ``hegate.v1.EncryptedInference`` servicer: specs, key registration, encrypted inference.

A client names a CKKS profile when it asks for a spec (the default one when it names none) and
again when it registers keys made from that spec: the key set is bound to the model, its
version and the profile, and Infer evaluates under that profile's plan. Keys arrive in chunks
(tens of MB; one message may not exceed the message limit) into a bounded spool
(:mod:`gateway.server.uploads`), are checked and loaded by the worker that owns their key id
(SEAL's validity checks, the model's parameters and rotation steps, no secret key, a public key
exactly when the profile is circuit_private; the worker reports the bytes it holds for them), and
only then stored in the registry under their content hash, bound to the caller's tenant, counted
in those resident bytes. The registry's evictions, expiries and deletions reach the workers
through a listener. Encrypted requests are bounded per model (``queue_limit``) and per tenant and
model (``tenant_queue_limit``), so one tenant cannot fill a model's queue.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Callable
from typing import TypeVar

from gateway.api import hegate_v1_pb2 as pb
from gateway.api import hegate_v1_pb2_grpc as pb_grpc
from gateway.he.plan import EncryptionSpec
from gateway.keystore import DropReason, KeyEntry, KeyRecord, KeyStore, key_id_for, key_not_found
from gateway.server.auth import current_tenant
from gateway.server.inference import observed
from gateway.server.metrics import GatewayMetrics
from gateway.server.ratelog import RateLimitedLog
from gateway.server.rpc import rpc
from gateway.server.serving import ModelStore, ServedModel
from gateway.server.uploads import UploadSpool
from gateway.workers.pool import Fetch, StoredKeys, WorkerPool
from models.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError, UnavailableError

logger = logging.getLogger(__name__)
FORMATS = {pb.KEY_FORMAT_SEAL: "seal", pb.KEY_FORMAT_TENSEAL_CONTEXT: "tenseal_context"}
T = TypeVar("T")


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
    """Converts and delegates: uploads to the spool, keys to the workers and the store, calls to the pool.

    What this replica knows about tenancy: ``_tenancy`` maps a key id to the tenants it has seen
    hold it (registered here, or read from the store on a first call here), with their entries.
    A call whose tenant holds the key id here is served on the keys the workers have loaded and
    only touches the store, to refresh the time to live: a store that cannot be reached then is
    logged (rate-limited) and the call is served, so loaded keys keep serving through a store
    outage. A first call, or a load the workers need, reads the store: UNAVAILABLE while it is down.
    A touch that finds the record gone (deleted or expired through another replica) forgets it
    here and answers NOT_FOUND.
    """

    def __init__(
        self,
        store: ModelStore,
        keys: KeyStore,
        pool: WorkerPool,
        metrics: GatewayMetrics,
        *,
        queue_limit: int,
        tenant_queue_limit: int,
        uploads: UploadSpool,
    ) -> None:
        self.store = store
        self.keys = keys
        self.pool = pool
        self.metrics = metrics
        self.queue_limit = queue_limit
        self.tenant_queue_limit = tenant_queue_limit
        self.uploads = uploads
        self._loop = asyncio.get_running_loop()
        self._tenancy: dict[str, dict[str, KeyEntry]] = {}
        self._tenant_inflight: collections.Counter[tuple[str, str]] = collections.Counter()
        self._store_log = RateLimitedLog(logger)
        self._tasks: set[asyncio.Task] = set()
        keys.add_listener(self._on_dropped)

    # -- the store and what this replica knows -------------------------------------------------

    async def _call_store(self, method: Callable[..., T], *args, **kwargs) -> T:
        """A store call off the event loop (a remote store's round trip must not stall other calls)."""
        return await asyncio.to_thread(method, *args, **kwargs)

    def _remember(self, entry: KeyEntry) -> None:
        self._tenancy.setdefault(entry.key_id, {})[entry.tenant] = entry

    def _on_dropped(self, entry: KeyEntry, reason: DropReason) -> None:
        """Called under the store's lock, maybe from a thread: forget it on the event loop."""
        logger.info("keys %s of tenant %s %s", entry.key_id, entry.tenant, reason.value)
        self._loop.call_soon_threadsafe(self._forget, entry)

    def _forget(self, entry: KeyEntry) -> None:
        """``entry`` left the store: unload its keys unless another tenant holds the same keys here.
        A registration newer than the dropped record (same keys, registered again) is kept."""
        tenants = self._tenancy.get(entry.key_id, {})
        known = tenants.get(entry.tenant)
        if known is not None and known.created_at <= entry.created_at:
            del tenants[entry.tenant]
        if not tenants:
            self._tenancy.pop(entry.key_id, None)
            self._spawn(self.pool.drop_keys(entry.key_id))
        self._spawn(self._refresh_key_bytes())

    def _spawn(self, coroutine) -> None:
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh_key_bytes(self) -> None:
        try:
            self.metrics.key_bytes.set(await self._call_store(self.keys.resident_bytes))
        except UnavailableError as exc:
            self._store_log.warning("key store unavailable; key bytes not updated: %s", exc)

    async def _fetch(self, key_id: str, tenant: str) -> StoredKeys:
        """The tenant's key set from the store (a load on first use)."""
        return stored_keys(await self._call_store(self.keys.get, key_id, tenant=tenant))

    async def fetch_keys(self, key_id: str) -> StoredKeys:
        """A key set from the store through any tenant seen holding it here (a worker's reload).

        Raises:
            NotFoundError: no tenant known here holds it any more.
            UnavailableError: the store cannot be reached.
        """
        for tenant, entry in list(self._tenancy.get(key_id, {}).items()):
            try:
                return await self._fetch(key_id, tenant)
            except NotFoundError:
                self._forget(entry)
        raise key_not_found()

    async def unload_idle(self, *, idle_seconds: float) -> None:
        """Unload key sets idle here for ``idle_seconds``; forget who held those no worker holds."""
        for key_id in await self.pool.unload_idle(idle_seconds=idle_seconds):
            if not self.pool.holds(key_id):
                self._tenancy.pop(key_id, None)
                logger.info("unloaded keys %s after %.0f s unused here", key_id, idle_seconds)

    async def _usable(self, key_id: str, tenant: str) -> tuple[KeyEntry, Fetch]:
        """The tenant's entry for ``key_id`` and how to load its keys if the worker lacks them."""
        entry = self._tenancy.get(key_id, {}).get(tenant)
        if entry is None:
            record = await self._call_store(self.keys.get, key_id, tenant=tenant)
            self._remember(record.entry)
            keys = stored_keys(record)

            async def in_hand() -> StoredKeys:
                return keys

            return record.entry, in_hand
        try:
            await self._call_store(self.keys.touch, key_id, tenant=tenant)
        except UnavailableError as exc:
            self._store_log.warning("key store unavailable; serving loaded keys without refreshing their TTL: %s", exc)
        except NotFoundError:
            self._forget(entry)
            raise
        return entry, functools.partial(self._fetch, key_id, tenant)

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

    @rpc
    async def RegisterKeys(self, request_iterator, context):
        tenant = current_tenant()
        async with self.uploads.receive(request_iterator, tenant=tenant) as upload:
            header = upload.header
            model, spec = await self._encrypted(header.model_name, header.model_version, header.profile)
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
                data = upload.data
                relin, galois, public = (
                    bytes(data[:relin_end]),
                    bytes(data[relin_end:galois_end]),
                    bytes(data[galois_end:]),
                )
            else:
                context_bytes = bytes(upload.data)
        if key_format != "seal":
            relin, galois, public = await self.pool.read_context(
                model=model.name, version=model.version, profile=spec.precision, context=context_bytes
            )
            del context_bytes
        profile = spec.precision
        if spec.circuit_privacy is not None and not public:
            raise InvalidArgumentError(
                f"the circuit_private profile needs the client's public key with its evaluation keys "
                f"(public_key_bytes is 0): the server re-randomizes every result of {model.name} under it"
            )
        key_id = await asyncio.to_thread(  # tens of MB: hashlib releases the GIL meanwhile
            functools.partial(
                key_id_for,
                model_name=model.name,
                model_version=model.version,
                relin=relin,
                galois=galois,
                profile=profile,
                public_key=public,
            )
        )
        keys = StoredKeys(
            key_id=key_id,
            model=model.name,
            version=model.version,
            profile=profile,
            relin=relin,
            galois=galois,
            public_key=public,
        )
        record = await self._register(keys, tenant)
        return pb.RegisterKeysResponse(
            key_id=record.key_id, stored_bytes=record.size, ttl_seconds=self.keys.limits.ttl_seconds
        )

    async def _register(self, keys: StoredKeys, tenant: str) -> KeyRecord:
        """Check the keys and load them in their worker (measuring what it holds), then store them;
        if the store refuses them, unload them unless another tenant here holds the same keys."""
        resident = await self.pool.register(keys)
        now = time.time()
        record = KeyRecord(
            key_id=keys.key_id,
            tenant=tenant,
            model_name=keys.model,
            model_version=keys.version,
            profile=keys.profile,
            stored_bytes=len(keys.relin) + len(keys.galois) + len(keys.public_key),
            resident_bytes=resident,
            created_at=now,
            last_used_at=now,
            relin=keys.relin,
            galois=keys.galois,
            public_key=keys.public_key,
        )
        try:
            stored, _ = await self._call_store(self.keys.put, record)
        except (ResourceExhaustedError, UnavailableError):
            if not self._tenancy.get(keys.key_id):
                await self.pool.drop_keys(keys.key_id)
            raise
        self._remember(stored.entry)
        await self._refresh_key_bytes()
        return stored

    @rpc
    async def DeleteKeys(self, request, context):
        deleted = await self._call_store(self.keys.delete, request.key_id, tenant=current_tenant())
        await self._refresh_key_bytes()
        return pb.DeleteKeysResponse(deleted=deleted)

    @rpc
    async def Infer(self, request, context):
        started = time.monotonic()
        model, _ = self.store.encrypted(request.model_name, request.model_version)  # the default: compiled at start
        with observed(self.metrics, model.name, "encrypted"):
            tenant = current_tenant()
            entry, fetch = await self._usable(request.key_id, tenant)
            if (entry.model_name, entry.model_version) != (model.name, model.version):
                raise InvalidArgumentError(
                    f"key id {request.key_id} was registered for {entry.model_name} version "
                    f"{entry.model_version}, not {model.name} version {model.version}"
                )
            _, spec = self.store.encrypted(model.name, model.version, entry.profile)  # compiled at registration
            count = request.count or 1
            if count > spec.packing.lanes:
                raise InvalidArgumentError(f"{model.name} packs at most {spec.packing.lanes} inputs, got {count}")
            queued = (model.name, tenant)
            if self._tenant_inflight[queued] >= self.tenant_queue_limit:
                raise ResourceExhaustedError(
                    f"tenant {tenant!r} already has {self.tenant_queue_limit} encrypted requests queued or running "
                    f"on {model.name}, its limit (tenant_queue_limit); retry later"
                )
            if model.encrypted_inflight >= self.queue_limit:
                raise ResourceExhaustedError(
                    f"{model.name} already has {self.queue_limit} encrypted requests queued or running; retry later"
                )
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            model.encrypted_inflight += 1
            self._tenant_inflight[queued] += 1
            try:
                result = await self.pool.evaluate(
                    model=model.name,
                    version=model.version,
                    profile=entry.profile,
                    key_id=entry.key_id,
                    ciphertext=request.ciphertext,
                    deadline=deadline,
                    fetch=fetch,
                )
            finally:
                model.encrypted_inflight -= 1
                self._tenant_inflight[queued] -= 1
                if not self._tenant_inflight[queued]:
                    del self._tenant_inflight[queued]
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
