"""The worker pool's bookkeeping around a replacement, without processes: what a new worker is
given and what it is told to forget when the registry changes while it starts.

The end-to-end tests (``test_gateway.py``) kill real workers; the races here are too narrow to
hit from outside, so the pool's process and pipe steps are replaced by recorders.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from gateway.workers.messages import DropKeys
from gateway.workers.pool import StoredKeys, WorkerPool


def _keys(key_id: str) -> StoredKeys:
    return StoredKeys(key_id=key_id, model="m", version="1", profile="standard", relin=b"r", galois=b"g")


def _replacement(registry: dict[str, StoredKeys], during_give) -> tuple[SimpleNamespace, list[str], list[object]]:
    """Run ``_replace`` on a pool whose registry is ``registry``; ``during_give(key_id)`` runs while
    each key set is being given. Returns the worker, the key ids given and the messages sent."""
    given: list[str] = []
    sent: list[object] = []

    async def run() -> SimpleNamespace:
        ready = asyncio.get_running_loop().create_future()
        ready.set_result(None)
        worker = SimpleNamespace(slot=0, ready=ready, accepting=False, process=SimpleNamespace(is_alive=lambda: True))
        pool = WorkerPool([], workers=1, stored_keys=lambda: list(registry.values()))

        async def give(_, keys: StoredKeys) -> None:
            during_give(keys.key_id)
            await asyncio.sleep(0)
            given.append(keys.key_id)

        async def send(_, message: object) -> None:
            sent.append(message)

        pool._spawn = lambda slot: worker
        pool._give_keys = give
        pool._send = send
        await pool._replace(0)
        return worker

    return asyncio.run(run()), given, sent


def test_a_replacement_gets_every_registered_key_and_then_serves():
    registry = {k: _keys(k) for k in ("a", "b")}
    worker, given, sent = _replacement(registry, lambda key_id: None)
    assert given == ["a", "b"] and sent == [] and worker.accepting


def test_keys_deleted_while_a_replacement_is_given_them_are_dropped_from_it():
    registry = {k: _keys(k) for k in ("a", "b", "c")}

    def delete_during_replay(key_id: str) -> None:
        if key_id == "a":  # "b" leaves the registry after the replay listed it, "a" after it was given
            registry.pop("b")
        if key_id == "c":
            registry.pop("a")

    worker, given, sent = _replacement(registry, delete_during_replay)
    assert given == ["a", "b", "c"] and worker.accepting
    assert sent == [DropKeys(key_id="a"), DropKeys(key_id="b")]
