"""The worker pool: key sets sharded over the workers, loaded on first use, reloaded by a replacement.

The bookkeeping races (a drop that crosses a load, concurrent first uses) are too narrow to hit
from outside, so those tests replace the pool's process and pipe steps with recorders. The last
tests start real ``spawn`` workers (the breast-cancer model: small keys, fast) and ask each
worker process which key sets it holds.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from types import SimpleNamespace

from gateway.he.client import ClientKeys
from gateway.he.plan import EncryptedModel
from gateway.keystore import key_id_for, key_not_found
from gateway.settings import BUNDLED_REPOSITORY
from gateway.workers.messages import DropKeys, Evaluate, Evaluated, KeysLoaded, LoadKeys, ModelRef
from gateway.workers.pool import REPLICA_IDLE_SECONDS, StoredKeys, WorkerPool
from gateway.workers.shards import owner_slot, ranked_slots
from models.data import load_dataset
from models.errors import NotFoundError
from models.manifest import Manifest

CANCER = "breast-cancer-linear-eps3"
REPLACEMENT_SECONDS = 180.0


def _keys(key_id: str) -> StoredKeys:
    return StoredKeys(key_id=key_id, model="m", version="1", profile="standard", relin=b"r", galois=b"g")


# -- rendezvous hashing ---------------------------------------------------------------------------


def test_owners_are_stable_spread_and_move_only_with_the_slot_count():
    ids = [f"k2-{n:064x}" for n in range(400)]
    owners = Counter(owner_slot(key_id=key_id, slots=4) for key_id in ids)
    assert set(owners) == {0, 1, 2, 3} and min(owners.values()) > 60  # about 100 each
    assert all(ranked_slots(key_id=k, slots=4)[0] == owner_slot(key_id=k, slots=4) for k in ids)
    # going from 4 to 5 slots moves only the keys the new slot wins (rendezvous hashing)
    moved = [k for k in ids if owner_slot(key_id=k, slots=5) != owner_slot(key_id=k, slots=4)]
    assert all(owner_slot(key_id=k, slots=5) == 4 for k in moved) and 40 < len(moved) < 130


# -- bookkeeping, with recorders in place of processes ----------------------------------------------


class Recorder:
    """A pool whose workers are namespaces: loads, evaluations and drops are recorded."""

    def __init__(self, registry: dict[str, StoredKeys], *, workers: int = 1) -> None:
        self.registry = registry
        self.fetched: list[str] = []
        self.loaded: list[tuple[int, str]] = []
        self.sent: list[tuple[int, object]] = []
        self.cold: list[float] = []
        self.during_load = lambda key_id: None
        self.pool = WorkerPool([], workers=workers, fetch_keys=self.fetch, on_cold_load=self.cold.append)
        self.pool._call = self.call
        self.pool._send = self.send
        self.pool._spawn = self.spawn

    async def fetch(self, key_id: str) -> StoredKeys:
        self.fetched.append(key_id)
        await asyncio.sleep(0)
        if key_id not in self.registry:
            raise key_not_found()
        return self.registry[key_id]

    def spawn(self, slot: int) -> SimpleNamespace:
        ready = asyncio.get_running_loop().create_future()
        ready.set_result(None)
        worker = SimpleNamespace(
            slot=slot,
            ready=ready,
            accepting=False,
            pending={},
            loaded={},
            loading={},
            connection=SimpleNamespace(closed=False),
            process=SimpleNamespace(is_alive=lambda: True),
        )
        self.pool._workers[slot] = worker
        return worker

    async def call(self, worker, make, timeout=None):
        message = make(0)
        if isinstance(message, LoadKeys):
            self.during_load(message.key_id)
            await asyncio.sleep(0.01)
            self.loaded.append((worker.slot, message.key_id))
            return KeysLoaded(request_id=0, resident_bytes=1000)
        assert isinstance(message, Evaluate)
        if message.key_id not in {key_id for slot, key_id in self.loaded if slot == worker.slot}:
            raise NotFoundError("not loaded")
        return Evaluated(request_id=0, ciphertext=b"c", queue_seconds=0.0, compute_seconds=0.0)

    async def send(self, worker, message) -> None:
        self.sent.append((worker.slot, message))


def test_concurrent_first_uses_coalesce_into_one_fetch_and_one_load():
    registry = {k: _keys(k) for k in ("a", "b")}

    async def run(recorder: Recorder) -> None:
        worker = recorder.spawn(0)
        worker.accepting = True
        calls = [
            recorder.pool.evaluate(
                model="m",
                version="1",
                profile="standard",
                key_id="a",
                ciphertext=b"x",
                deadline=None,
                fetch=lambda: recorder.fetch("a"),
            )
            for _ in range(5)
        ]
        results = await asyncio.gather(*calls)
        assert [r.ciphertext for r in results] == [b"c"] * 5

    recorder = Recorder(registry)
    asyncio.run(run(recorder))
    assert recorder.fetched == ["a"] and recorder.loaded == [(0, "a")] and len(recorder.cold) == 1


def test_a_replacement_reloads_its_slots_shard_from_the_store_and_serves_meanwhile():
    registry = {k: _keys(k) for k in ("a", "b", "c")}
    recorder = Recorder(registry)
    accepting_during_reload: list[bool] = []
    recorder.during_load = lambda key_id: accepting_during_reload.append(recorder.pool._workers[0].accepting)

    async def run() -> None:
        recorder.pool._shards[0] |= {"a", "b", "c"}  # what the dead worker held
        await recorder.pool._replace(0)

    asyncio.run(run())
    assert sorted(recorder.fetched) == ["a", "b", "c"] and sorted(k for _, k in recorder.loaded) == ["a", "b", "c"]
    assert accepting_during_reload == [True] * 3  # it took requests while it reloaded
    assert set(recorder.pool._workers[0].loaded) == {"a", "b", "c"} and len(recorder.cold) == 3


def test_keys_that_left_the_store_or_are_dropped_during_a_reload_are_not_kept():
    registry = {k: _keys(k) for k in ("a", "b", "c")}
    recorder = Recorder(registry)

    async def run() -> None:
        def drop_during_load(key_id: str) -> None:
            if key_id == "b":  # dropped (deleted, evicted, expired) while the worker loads it
                asyncio.get_running_loop().create_task(recorder.pool.drop_keys("b"))

        recorder.during_load = drop_during_load
        registry.pop("c")  # gone from the store before the reload reads it
        recorder.pool._shards[0] |= {"a", "b", "c"}
        await recorder.pool._replace(0)

    asyncio.run(run())
    worker = recorder.pool._workers[0]
    assert set(worker.loaded) == {"a"} and recorder.pool._shards[0] == {"a"}
    assert (0, DropKeys(key_id="b")) in recorder.sent  # loaded after the drop: unloaded again


def test_keys_registered_while_a_slot_is_replaced_reach_the_replacement():
    registry = {k: _keys(k) for k in ("a", "b")}
    recorder = Recorder(registry, workers=2)
    ids = [key_id_for(model_name="m", model_version="1", relin=bytes([n]), galois=b"") for n in range(40)]
    key_id = next(k for k in ids if owner_slot(key_id=k, slots=2) == 0)
    registry[key_id] = _keys(key_id)

    async def run() -> None:
        recorder.spawn(1).accepting = True  # slot 0 is being replaced: no worker there
        resident = await recorder.pool.register(registry[key_id])
        assert resident == 1000 and recorder.loaded == [(1, key_id)]  # checked by the other worker
        await recorder.pool._replace(0)

    asyncio.run(run())
    assert key_id in recorder.pool._workers[0].loaded and key_id not in recorder.pool._workers[1].loaded


def test_a_busy_owner_hands_a_hot_key_set_to_an_idle_worker_and_its_extra_copy_is_unloaded_when_idle():
    key_id = "hot"
    owner, second = ranked_slots(key_id=key_id, slots=2)
    recorder = Recorder({key_id: _keys(key_id)}, workers=2)

    async def run() -> None:
        for slot in (0, 1):
            recorder.spawn(slot).accepting = True
        pool = recorder.pool
        assert pool._route(key_id).slot == owner
        pool._workers[owner].pending = {1: None}
        assert pool._route(key_id).slot == owner  # one outstanding: not hot yet
        pool._workers[owner].pending = {1: None, 2: None}
        assert pool._route(key_id).slot == second  # hot, and the other worker is idle
        pool._workers[second].pending = {3: None}
        assert pool._route(key_id).slot == owner  # the other is busy too: no copy
        pool._workers[owner].pending = pool._workers[second].pending = {}
        for slot in (owner, second):
            await pool._ensure(pool._workers[slot], key_id, lambda: recorder.fetch(key_id))
        for worker in pool._workers:
            for loaded in worker.loaded.values():
                loaded.last_used -= REPLICA_IDLE_SECONDS
        assert await pool.unload_idle(idle_seconds=3600) == [key_id]  # the extra copy only
        assert key_id in pool._workers[owner].loaded and key_id not in pool._workers[second].loaded
        assert recorder.sent == [(second, DropKeys(key_id=key_id))] and pool.holds(key_id)
        pool._workers[owner].loaded[key_id].last_used -= 3600
        assert await pool.unload_idle(idle_seconds=3600) == [key_id] and not pool.holds(key_id)

    asyncio.run(run())


# -- real workers ---------------------------------------------------------------------------------


def _cancer_keys(count: int) -> tuple[list[ClientKeys], list[StoredKeys]]:
    spec = EncryptedModel(BUNDLED_REPOSITORY / CANCER / "1" / "model.onnx").spec
    clients = [ClientKeys(spec) for _ in range(count)]
    stored = []
    for client in clients:
        relin, galois = client.evaluation_keys()
        key_id = key_id_for(model_name=CANCER, model_version="1", relin=relin, galois=galois)
        stored.append(
            StoredKeys(key_id=key_id, model=CANCER, version="1", profile="standard", relin=relin, galois=galois)
        )
    return clients, stored


def _cancer_input():
    manifest = Manifest.model_validate_json((BUNDLED_REPOSITORY / CANCER / "1" / "manifest.json").read_text())
    return manifest.input.normalization.apply(load_dataset(manifest.dataset).test.x[:1])


def test_each_key_set_lives_in_one_worker_and_a_replacement_reloads_its_shard():
    """Six key sets, two workers: every set is held by exactly one worker process (its owner),
    whatever served it; a set registered through "another replica" (only in the store) is loaded
    on first use, once for concurrent calls; a killed worker's replacement reloads its shard
    before any request asks for it. With every worker holding every set, as before, each set
    would be counted twice."""
    clients, stored = _cancer_keys(6)
    store = {keys.key_id: keys for keys in stored}
    x = _cancer_input()

    async def run() -> None:
        fetched: list[str] = []
        cold: list[float] = []

        async def fetch(key_id: str) -> StoredKeys:
            fetched.append(key_id)
            return store[key_id]

        models = [ModelRef(name=CANCER, version="1", onnx_path=BUNDLED_REPOSITORY / CANCER / "1" / "model.onnx")]
        pool = WorkerPool(models, workers=2, fetch_keys=fetch, on_cold_load=cold.append)
        await pool.start()
        try:
            residents = [await pool.register(keys) for keys in stored[:5]]  # the sixth only "in the store"
            assert len(set(residents)) == 1 and residents[0] > 2 * 1024 * 1024  # 2.25 MiB each

            async def infer(index: int):
                keys = stored[index]
                return await pool.evaluate(
                    model=CANCER,
                    version="1",
                    profile="standard",
                    key_id=keys.key_id,
                    ciphertext=clients[index].encrypt(x),
                    deadline=None,
                    fetch=lambda: fetch(keys.key_id),
                )

            for index in range(5):
                for _ in range(3):
                    result = await infer(index)
                    assert clients[index].decrypt(result.ciphertext, 1).shape == (1, 2)
            assert fetched == []  # registered keys are used where they were loaded
            results = await asyncio.gather(*(infer(5) for _ in range(4)))
            assert fetched == [stored[5].key_id] and len(cold) == 1  # one load for four first uses
            assert all(clients[5].decrypt(r.ciphertext, 1).shape == (1, 2) for r in results)

            held = await pool.held_keys()
            copies = Counter(key_id for reply in held.values() for key_id in reply.key_ids)
            assert copies == Counter(store.keys())  # every set exactly once across the workers
            for slot, reply in held.items():
                assert all(pool.owner(key_id) == slot for key_id in reply.key_ids)
                assert reply.resident_bytes == residents[0] * len(reply.key_ids)
            assert set(held) == {0, 1} and all(held[slot].key_ids for slot in (0, 1)), "both workers own a shard"

            victim = pool._workers[0]
            shard = sorted(held[0].key_ids)
            fetched.clear()
            os.kill(victim.process.pid, signal.SIGKILL)
            deadline = time.monotonic() + REPLACEMENT_SECONDS
            while True:
                await asyncio.sleep(0.2)
                worker = pool._workers[0]
                if worker is not victim and worker.accepting and sorted(worker.loaded) == shard:
                    break
                assert time.monotonic() < deadline, "no replacement with its shard in time"
            assert sorted(fetched) == shard  # reloaded from the store, before any request asked
            held = await pool.held_keys()
            assert sorted(held[0].key_ids) == shard
            assert Counter(k for reply in held.values() for k in reply.key_ids) == Counter(store.keys())
        finally:
            await pool.close()

    asyncio.run(run())
