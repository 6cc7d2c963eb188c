"""The evaluation-key registry: content-hash ids, tenant isolation, LRU by bytes, TTL from last use."""

from __future__ import annotations

import inspect
import math
import sys
import threading

import pytest

from gateway.keystore import (
    KEY_NOT_FOUND_MESSAGE,
    DropReason,
    InMemoryKeyStore,
    KeyRecord,
    KeyStore,
    key_id_for,
)
from gateway.keystore.base import KEY_ID_PREFIX
from models.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def keys(seed: int, size: int = 100) -> dict[str, bytes]:
    """Distinct key bytes per seed, ``size`` bytes in all."""
    body = bytes((seed + i) % 256 for i in range(size))
    return {"relin": body[: size // 2], "galois": body[size // 2 :]}


def put(store: InMemoryKeyStore, seed: int, *, tenant: str = "acme", size: int = 100, model: str = "mlp"):
    return store.put(tenant=tenant, model_name=model, model_version="1", **keys(seed, size))


def make_store(*, budget: int = 300, ttl: float = 60.0) -> tuple[InMemoryKeyStore, FakeClock]:
    clock = FakeClock()
    return InMemoryKeyStore(budget_bytes=budget, ttl_seconds=ttl, clock=clock), clock


def listen(store: InMemoryKeyStore) -> list[tuple[str, DropReason]]:
    heard: list[tuple[str, DropReason]] = []
    store.add_listener(lambda record, reason: heard.append((record.key_id, reason)))
    return heard


def not_found_message(store: InMemoryKeyStore, key_id: str, tenant: str) -> str:
    with pytest.raises(NotFoundError) as caught:
        store.get(key_id, tenant=tenant)
    return str(caught.value)


# --- ids ---------------------------------------------------------------------------------------


def test_key_id_is_a_deterministic_prefixed_sha256():
    first = key_id_for(model_name="mlp", model_version="1", **keys(1))
    assert first == key_id_for(model_name="mlp", model_version="1", **keys(1))
    assert first.startswith(KEY_ID_PREFIX) and len(first) == len(KEY_ID_PREFIX) + 64
    int(first[3:], 16)  # hex


@pytest.mark.parametrize(
    "change",
    [
        {"model_name": "cnn"},
        {"model_version": "2"},
        {"relin": b"\x00" + keys(1)["relin"][1:]},
        {"galois": keys(1)["galois"][:-1] + b"\xff"},
        {"galois": keys(1)["galois"] + b"\x00"},
        {"profile": "circuit_private"},
        {"public_key": b"\x01"},
    ],
)
def test_key_id_changes_with_any_byte_the_model_or_the_profile(change):
    base = {"model_name": "mlp", "model_version": "1", **keys(1)}
    assert key_id_for(**base) != key_id_for(**{**base, **change})


def test_key_id_encoding_is_length_prefixed():
    moved = key_id_for(model_name="mlp", model_version="1", relin=b"ab", galois=b"c")
    assert moved != key_id_for(model_name="mlp", model_version="1", relin=b"a", galois=b"bc")
    assert key_id_for(model_name="ml", model_version="p1", relin=b"", galois=b"") != key_id_for(
        model_name="mlp", model_version="1", relin=b"", galois=b""
    )


def test_stored_record_carries_the_content_id_and_its_size():
    store, clock = make_store()
    record, evicted = put(store, 1, size=120)
    assert evicted == []
    assert record.key_id == key_id_for(model_name="mlp", model_version="1", **keys(1, 120))
    assert (record.tenant, record.model_name, record.model_version) == ("acme", "mlp", "1")
    assert record.size == 120 and record.created_at == record.last_used_at == clock.now


def test_a_record_binds_its_profile_and_counts_its_public_key():
    store, _ = make_store()
    record, _ = store.put(
        tenant="acme", model_name="mlp", model_version="1", profile="circuit_private", public_key=b"p" * 30, **keys(1)
    )
    assert record.profile == "circuit_private" and record.size == 100 + 30
    assert record.key_id == key_id_for(
        model_name="mlp", model_version="1", profile="circuit_private", public_key=b"p" * 30, **keys(1)
    )
    assert store.stored_bytes() == 130
    assert "relin" not in repr(record)  # tens of MB must never reach a log line


def test_the_memory_store_implements_the_protocol():
    members = [name for name in vars(KeyStore) if not name.startswith("_")]
    assert {"put", "get", "delete", "expire", "stored_bytes", "records", "add_listener"} <= set(members)
    for name in members:
        assert inspect.signature(getattr(InMemoryKeyStore, name)) == inspect.signature(getattr(KeyStore, name)), name


@pytest.mark.parametrize(("budget", "ttl"), [(0, 1.0), (-5, 1.0), (100, 0.0), (100, -1.0), (100, math.nan)])
def test_constructor_refuses_non_positive_limits(budget, ttl):
    with pytest.raises(InvalidArgumentError):
        InMemoryKeyStore(budget_bytes=budget, ttl_seconds=ttl)


# --- registration, tenants, deletion -----------------------------------------------------------


def test_registering_the_same_keys_again_is_idempotent_and_refreshes():
    store, clock = make_store(budget=200)
    first, _ = put(store, 1)
    put(store, 2)
    clock.advance(5)
    again, evicted = put(store, 1)
    assert evicted == []
    assert again.key_id == first.key_id and again.created_at == first.created_at
    assert again.last_used_at == clock.now
    assert store.stored_bytes() == 200 and len(store.records()) == 2
    assert [record.key_id for record in store.records()][-1] == first.key_id  # now the most recently used


def test_get_returns_the_tenants_record_and_marks_it_used():
    store, clock = make_store()
    record, _ = put(store, 1)
    clock.advance(3)
    got = store.get(record.key_id, tenant="acme")
    assert got.relin == record.relin and got.galois == record.galois
    assert got.last_used_at == clock.now and got.created_at == record.created_at


def test_another_tenants_id_is_indistinguishable_from_an_unknown_one():
    store, _ = make_store()
    record, _ = put(store, 1, tenant="acme")
    foreign = not_found_message(store, record.key_id, "globex")
    unknown = not_found_message(store, KEY_ID_PREFIX + "0" * 64, "acme")
    assert foreign == unknown == KEY_NOT_FOUND_MESSAGE
    assert "register" in foreign and record.key_id not in foreign
    assert store.delete(record.key_id, tenant="globex") is False
    assert store.get(record.key_id, tenant="acme").key_id == record.key_id


def test_expired_and_evicted_ids_give_the_same_message():
    store, clock = make_store(budget=200, ttl=10)
    old, _ = put(store, 1)
    clock.advance(10)
    assert not_found_message(store, old.key_id, "acme") == KEY_NOT_FOUND_MESSAGE
    victim, _ = put(store, 2)
    put(store, 3)
    put(store, 4)
    assert not_found_message(store, victim.key_id, "acme") == KEY_NOT_FOUND_MESSAGE


def test_the_same_keys_from_two_tenants_are_independent_records():
    store, _ = make_store()
    mine, _ = put(store, 1, tenant="acme")
    theirs, _ = put(store, 1, tenant="globex")
    assert mine.key_id == theirs.key_id  # the tenant is not hashed
    assert store.stored_bytes() == 200 and len(store.records()) == 2
    assert store.delete(mine.key_id, tenant="acme") is True
    assert store.get(theirs.key_id, tenant="globex").tenant == "globex"
    with pytest.raises(NotFoundError):
        store.get(mine.key_id, tenant="acme")
    assert store.stored_bytes() == 100


def test_delete_removes_once():
    store, _ = make_store()
    record, _ = put(store, 1)
    heard = listen(store)
    assert store.delete(record.key_id, tenant="acme") is True
    assert store.delete(record.key_id, tenant="acme") is False
    assert store.stored_bytes() == 0 and store.records() == []
    assert heard == [(record.key_id, DropReason.DELETED)]
    with pytest.raises(NotFoundError):
        store.get(record.key_id, tenant="acme")


# --- the byte budget ---------------------------------------------------------------------------


def test_a_full_store_evicts_the_least_recently_used_record_of_any_tenant():
    store, clock = make_store(budget=300)
    a, _ = put(store, 1, tenant="acme")
    clock.advance(1)
    b, _ = put(store, 2, tenant="globex")
    clock.advance(1)
    c, _ = put(store, 3, tenant="acme")
    clock.advance(1)
    d, evicted = put(store, 4, tenant="initech")
    assert [record.key_id for record in evicted] == [a.key_id]
    assert [record.key_id for record in store.records()] == [b.key_id, c.key_id, d.key_id]
    assert store.stored_bytes() == 300


def test_a_get_moves_a_record_to_the_back_of_the_eviction_line():
    store, clock = make_store(budget=300)
    a, _ = put(store, 1)
    clock.advance(1)
    b, _ = put(store, 2)
    clock.advance(1)
    c, _ = put(store, 3)
    clock.advance(1)
    store.get(a.key_id, tenant="acme")
    _, evicted = put(store, 4)
    assert [record.key_id for record in evicted] == [b.key_id]
    assert {record.key_id for record in store.records()} == {
        a.key_id,
        c.key_id,
        key_id_for(model_name="mlp", model_version="1", **keys(4)),
    }


def test_a_large_record_evicts_as_many_as_it_needs_oldest_first():
    store, clock = make_store(budget=300)
    ids = []
    for seed in (1, 2, 3):
        ids.append(put(store, seed)[0].key_id)
        clock.advance(1)
    big, evicted = put(store, 9, size=250)
    assert [record.key_id for record in evicted] == ids
    assert store.records() == [big] and store.stored_bytes() == 250


def test_a_record_exactly_the_budget_fits():
    store, _ = make_store(budget=300)
    put(store, 1)
    record, evicted = put(store, 2, size=300)
    assert len(evicted) == 1 and store.records() == [record] and store.stored_bytes() == 300


def test_keys_larger_than_the_whole_budget_are_refused_without_evicting():
    store, _ = make_store(budget=3 * 1024 * 1024)
    small, _ = put(store, 1)
    heard = listen(store)
    with pytest.raises(ResourceExhaustedError) as caught:
        put(store, 2, size=4 * 1024 * 1024)
    assert str(caught.value).startswith("keys of 4.0 MiB exceed the registry's budget of 3.0 MiB")
    assert store.records() == [small] and store.stored_bytes() == 100 and heard == []


# --- time to live ------------------------------------------------------------------------------


def test_ttl_runs_from_the_last_use():
    store, clock = make_store(ttl=10)
    record, _ = put(store, 1)
    heard = listen(store)
    clock.advance(9)
    store.get(record.key_id, tenant="acme")
    clock.advance(9)  # 18 s after registration, 9 s after the last use
    assert store.get(record.key_id, tenant="acme").last_used_at == clock.now
    clock.advance(10)  # exactly the ttl since the last use
    with pytest.raises(NotFoundError):
        store.get(record.key_id, tenant="acme")
    assert heard == [(record.key_id, DropReason.EXPIRED)]
    assert store.stored_bytes() == 0


def test_re_registering_refreshes_the_ttl():
    store, clock = make_store(ttl=10)
    record, _ = put(store, 1)
    clock.advance(8)
    put(store, 1)
    clock.advance(8)
    assert store.records()[0].key_id == record.key_id


def test_expire_drops_only_idle_records_and_returns_them():
    store, clock = make_store(ttl=10)
    old, _ = put(store, 1)
    clock.advance(6)
    fresh, _ = put(store, 2)
    clock.advance(4)
    assert [record.key_id for record in store.expire()] == [old.key_id]
    assert store.expire() == []
    assert store.records() == [fresh] and store.stored_bytes() == 100


def test_expired_records_are_dropped_lazily_by_any_operation():
    store, clock = make_store(ttl=10)
    record, _ = put(store, 1)
    heard = listen(store)
    clock.advance(11)
    assert store.stored_bytes() == 0
    assert heard == [(record.key_id, DropReason.EXPIRED)]


def test_an_infinite_ttl_never_expires():
    store, clock = make_store(ttl=math.inf)
    record, _ = put(store, 1)
    clock.advance(1e12)
    assert store.expire() == [] and store.records() == [record]


# --- listeners ---------------------------------------------------------------------------------


def test_listeners_hear_every_eviction_expiry_and_deletion_once():
    store, clock = make_store(budget=200, ttl=10)
    heard = listen(store)
    also = listen(store)
    a, _ = put(store, 1)
    clock.advance(1)
    b, _ = put(store, 2)
    clock.advance(1)
    c, evicted = put(store, 3)  # evicts a
    assert [record.key_id for record in evicted] == [a.key_id]
    assert store.delete(c.key_id, tenant="acme")
    clock.advance(20)
    assert [record.key_id for record in store.expire()] == [b.key_id]
    expected = [(a.key_id, DropReason.EVICTED), (c.key_id, DropReason.DELETED), (b.key_id, DropReason.EXPIRED)]
    assert heard == also == expected


def test_an_unsubscribed_listener_hears_nothing_more():
    store, _ = make_store()
    heard: list[KeyRecord] = []
    remove = store.add_listener(lambda record, reason: heard.append(record))
    first, _ = put(store, 1)
    second, _ = put(store, 2)
    store.delete(first.key_id, tenant="acme")
    remove()
    remove()  # twice is harmless
    store.delete(second.key_id, tenant="acme")
    assert heard == [first]


def test_a_failing_listener_neither_breaks_the_store_nor_silences_the_others():
    store, _ = make_store()

    def broken(record, reason):
        raise RuntimeError("listener bug")

    store.add_listener(broken)
    heard = listen(store)
    record, _ = put(store, 1)
    assert store.delete(record.key_id, tenant="acme") is True
    assert heard == [(record.key_id, DropReason.DELETED)]
    assert store.stored_bytes() == 0


def test_a_listener_may_read_the_store_without_deadlocking():
    store, _ = make_store(budget=200)
    seen: list[int] = []
    store.add_listener(lambda record, reason: seen.append(store.stored_bytes()))
    put(store, 1)
    put(store, 2)
    worker = threading.Thread(target=put, args=(store, 3), daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive()
    assert seen == [200]  # the listener saw the store after the change was complete


# --- concurrency -------------------------------------------------------------------------------


def test_concurrent_puts_and_gets_keep_the_accounting_consistent():
    budget = 2_000
    store = InMemoryKeyStore(budget_bytes=budget, ttl_seconds=60.0)
    evicted_heard: list[KeyRecord] = []
    store.add_listener(lambda record, reason: evicted_heard.append(record) if reason is DropReason.EVICTED else None)
    evicted_returned: list[KeyRecord] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def client(tenant: str) -> None:
        try:
            start.wait()
            for i in range(200):
                record, evicted = put(store, i % 12, tenant=tenant, size=60 + (i % 5) * 20)
                evicted_returned.extend(evicted)
                try:
                    got = store.get(record.key_id, tenant=tenant)
                    assert got.tenant == tenant and got.key_id == record.key_id
                except NotFoundError:
                    pass  # evicted by another thread in between: allowed
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=client, args=(f"tenant-{n}",)) for n in range(8)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, so that an unlocked store would interleave
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        sys.setswitchinterval(interval)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    live = store.records()
    assert store.stored_bytes() == sum(record.size for record in live) <= budget
    assert len({(record.tenant, record.key_id) for record in live}) == len(live)
    assert evicted_returned, "the budget was meant to force evictions"
    assert sorted(map(id, evicted_heard)) == sorted(map(id, evicted_returned))
