"""The encrypted servicer with its key store down: loaded keys keep serving, loads need the store.

A store shared by replicas (Redis) can go away; the servicer must then keep serving the key sets
its workers hold for the tenant that holds them, and refuse with UNAVAILABLE whatever needs the
store's bytes. The store and the pool here are recorders; the servicer is the real one, called
the way grpc.aio calls it.
"""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import grpc
import pytest

from gateway.api import hegate_v1_pb2 as pb
from gateway.keystore import InMemoryKeyStore, KeyLimits, key_not_found
from gateway.server.auth import bind_tenant
from gateway.server.encrypted import EncryptedServicer
from gateway.server.metrics import GatewayMetrics
from gateway.server.uploads import UploadLimits, UploadSpool
from gateway.workers.messages import Evaluated
from gateway.workers.pool import StoredKeys
from models.errors import UnavailableError

MODEL = "m"
MIB = 1 << 20


class FlakyStore(InMemoryKeyStore):
    """The in-memory store, which can be taken down (every call: UnavailableError) or made to
    forget a record silently (as when another replica deleted it)."""

    def __init__(self) -> None:
        super().__init__(limits=KeyLimits(budget_bytes=MIB, tenant_bytes=MIB, tenant_key_sets=4, ttl_seconds=60))
        self.down = False
        self.calls: list[str] = []

    def __getattribute__(self, name: str):
        attribute = super().__getattribute__(name)
        if name in {"put", "get", "touch", "delete", "expire", "entries", "resident_bytes"}:
            self.calls.append(name)
            if self.down:
                raise UnavailableError("key store redis://10.0.0.9:6379 unreachable")
        return attribute

    def forget_elsewhere(self, key_id: str, tenant: str) -> None:
        with self._lock:
            self._remove((tenant, key_id))


class Pool:
    """Evaluates anything; loads a key set through ``fetch`` when told that its worker lacks it."""

    def __init__(self) -> None:
        self.loaded: set[str] = set()

    async def register(self, keys: StoredKeys) -> int:
        self.loaded.add(keys.key_id)
        return 1000

    async def drop_keys(self, key_id: str) -> None:
        self.loaded.discard(key_id)

    async def evaluate(self, *, key_id: str, fetch, **_) -> Evaluated:
        if key_id not in self.loaded:
            await fetch()
            self.loaded.add(key_id)
        return Evaluated(request_id=0, ciphertext=b"result", queue_seconds=0.0, compute_seconds=0.0)


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details


class Context:
    def time_remaining(self) -> None:
        return None

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)


def _models() -> SimpleNamespace:
    model = SimpleNamespace(name=MODEL, version="1", encrypted_inflight=0)
    spec = SimpleNamespace(precision="standard", circuit_privacy=None, packing=SimpleNamespace(lanes=1))
    return SimpleNamespace(encrypted=lambda name, version="", profile=None: (model, spec), compiled=lambda *args: True)


async def _upload(data: bytes):
    header = pb.KeysHeader(
        model_name=MODEL,
        format=pb.KEY_FORMAT_SEAL,
        relin_keys_bytes=4,
        galois_keys_bytes=len(data) - 4,
        total_bytes=len(data),
    )
    yield pb.RegisterKeysChunk(header=header)
    yield pb.RegisterKeysChunk(data=data)


def _run(scenario) -> None:
    async def main() -> None:
        store, pool = FlakyStore(), Pool()
        limits = UploadLimits(max_bytes=MIB, spool_bytes=MIB, uploads=2, tenant_uploads=1, idle_seconds=5)
        servicer = EncryptedServicer(
            _models(), store, pool, GatewayMetrics(), queue_limit=4, tenant_queue_limit=2, uploads=UploadSpool(limits)
        )
        bind_tenant("acme")
        await scenario(servicer, store, pool)

    asyncio.run(main())


async def _infer(servicer: EncryptedServicer, key_id: str) -> pb.InferResponse:
    request = pb.InferRequest(model_name=MODEL, key_id=key_id, ciphertext=b"x")
    return await servicer.Infer(request, Context())


async def _register(servicer: EncryptedServicer, data: bytes = b"relin-and-galois") -> str:
    return (await servicer.RegisterKeys(_upload(data), Context())).key_id


def test_loaded_keys_serve_through_a_store_outage_and_the_outage_is_logged(caplog):
    async def scenario(servicer, store, pool):
        key_id = await _register(servicer)
        store.down = True
        with caplog.at_level(logging.WARNING, logger="gateway.server.encrypted"):
            for _ in range(3):
                assert (await _infer(servicer, key_id)).ciphertext == b"result"
        assert "key store unavailable; serving loaded keys" in caplog.text
        assert "redis://10.0.0.9:6379 unreachable" in caplog.text
        store.down = False
        await _infer(servicer, key_id)
        assert store.calls.count("touch") == 4  # every call touched (or tried to)
        assert "get" not in store.calls  # served from the loaded keys: the bytes were never read

    _run(scenario)


def test_a_load_that_needs_the_store_is_unavailable_while_it_is_down():
    async def scenario(servicer, store, pool):
        key_id = await _register(servicer)
        pool.loaded.clear()  # its worker was replaced, or it was unloaded while idle
        store.down = True
        with pytest.raises(Aborted) as failure:
            await _infer(servicer, key_id)
        assert failure.value.code == grpc.StatusCode.UNAVAILABLE
        store.down = False
        assert (await _infer(servicer, key_id)).ciphertext == b"result"  # loaded again from the store

    _run(scenario)


def test_a_first_call_on_this_replica_reads_the_store_and_is_unavailable_while_it_is_down():
    async def scenario(servicer, store, pool):
        key_id = await _register(servicer)
        servicer._tenancy.clear()  # as on a replica that never saw this key id
        store.down = True
        with pytest.raises(Aborted) as failure:
            await _infer(servicer, key_id)
        assert failure.value.code == grpc.StatusCode.UNAVAILABLE
        store.down = False
        await _infer(servicer, key_id)
        assert key_id in servicer._tenancy  # known here from now on

    _run(scenario)


def test_registration_is_unavailable_while_the_store_is_down_and_keeps_nothing_loaded():
    async def scenario(servicer, store, pool):
        store.down = True
        with pytest.raises(Aborted) as failure:
            await _register(servicer)
        assert failure.value.code == grpc.StatusCode.UNAVAILABLE
        assert pool.loaded == set() and servicer._tenancy == {}

    _run(scenario)


def test_keys_gone_from_the_store_through_another_replica_are_not_found_and_unloaded_here():
    async def scenario(servicer, store, pool):
        key_id = await _register(servicer)
        store.forget_elsewhere(key_id, "acme")
        with pytest.raises(Aborted) as failure:
            await _infer(servicer, key_id)
        assert failure.value.code == grpc.StatusCode.NOT_FOUND and failure.value.details == str(key_not_found())
        await asyncio.sleep(0)  # the unload is a task
        assert pool.loaded == set() and servicer._tenancy == {}

    _run(scenario)


def test_another_tenant_cannot_use_keys_loaded_for_one():
    async def scenario(servicer, store, pool):
        key_id = await _register(servicer)
        bind_tenant("globex")
        with pytest.raises(Aborted) as failure:
            await _infer(servicer, key_id)
        assert failure.value.code == grpc.StatusCode.NOT_FOUND

    _run(scenario)


def test_keys_deleted_then_registered_again_stay_loaded():
    async def scenario(servicer, store, pool):
        key_id = await _register(servicer)
        deleted = await servicer.DeleteKeys(pb.DeleteKeysRequest(key_id=key_id), Context())
        assert deleted.deleted
        await asyncio.sleep(0)  # the listener's unload runs
        assert pool.loaded == set()
        assert await _register(servicer) == key_id
        await asyncio.sleep(0)
        assert pool.loaded == {key_id} and (await _infer(servicer, key_id)).ciphertext == b"result"
        assert store.calls.count("get") == 0

    _run(scenario)
