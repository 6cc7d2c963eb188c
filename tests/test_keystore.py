"""The evaluation-key registry: content-hash ids, tenant isolation, per-tenant quotas and a fair-share
budget in resident bytes, TTL from last use, listeners."""

from __future__ import annotations

import inspect
import math
import sys
import threading

import pytest
from pydantic import ValidationError

from gateway.keystore import (
    KEY_NOT_FOUND_MESSAGE,
    DropReason,
    InMemoryKeyStore,
    KeyEntry,
    KeyLimits,
    KeyRecord,
    KeyStore,
    key_id_for,
)
from gateway.keystore.base import KEY_ID_PREFIX
from models.errors import NotFoundError, ResourceExhaustedError


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


def record(
    seed: int,
    *,
    tenant: str = "acme",
    size: int = 100,
    resident: int | None = None,
    model: str = "mlp",
    profile: str = "standard",
    public_key: bytes = b"",
) -> KeyRecord:
    """A checked record as the servicer builds it: ``size`` serialized bytes, ``resident`` (default:
    ``size``) bytes once loaded."""
    material = keys(seed, size)
    return KeyRecord(
        key_id=key_id_for(model_name=model, model_version="1", profile=profile, public_key=public_key, **material),
        tenant=tenant,
        model_name=model,
        model_version="1",
        profile=profile,
        stored_bytes=size + len(public_key),
        resident_bytes=size if resident is None else resident,
        created_at=0.0,
        last_used_at=0.0,
        public_key=public_key,
        **material,
    )


def put(store: InMemoryKeyStore, seed: int, *, tenant: str = "acme", size: int = 100, **kwargs):
    return store.put(record(seed, tenant=tenant, size=size, **kwargs))


def make_store(
    *, budget: int = 300, ttl: float = 60.0, tenant_bytes: int | None = None, tenant_sets: int = 100
) -> tuple[InMemoryKeyStore, FakeClock]:
    """A store whose tenant quota is the whole budget unless given: the budget's rules alone."""
    clock = FakeClock()
    limits = KeyLimits(
        budget_bytes=budget,
        tenant_bytes=budget if tenant_bytes is None else tenant_bytes,
        tenant_key_sets=tenant_sets,
        ttl_seconds=ttl,
    )
    return InMemoryKeyStore(limits=limits, clock=clock), clock


def listen(store: InMemoryKeyStore) -> list[tuple[str, DropReason]]:
    heard: list[tuple[str, DropReason]] = []
    store.add_listener(lambda entry, reason: heard.append((entry.key_id, reason)))
    return heard


def ids(entries) -> list[str]:
    return [entry.key_id for entry in entries]


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


def test_a_stored_record_is_stamped_with_the_stores_clock_and_keeps_its_sizes():
    store, clock = make_store()
    stored, evicted = store.put(record(1, size=120, resident=250))
    assert evicted == []
    assert stored.key_id == key_id_for(model_name="mlp", model_version="1", **keys(1, 120))
    assert (stored.tenant, stored.model_name, stored.model_version) == ("acme", "mlp", "1")
    assert stored.size == stored.stored_bytes == 120 and stored.resident_bytes == 250
    assert stored.created_at == stored.last_used_at == clock.now
    assert store.resident_bytes() == store.resident_bytes(tenant="acme") == 250
    assert store.resident_bytes(tenant="globex") == 0


def test_a_record_binds_its_profile_and_counts_its_public_key():
    store, _ = make_store()
    stored, _ = store.put(record(1, profile="circuit_private", public_key=b"p" * 30))
    assert stored.profile == "circuit_private" and stored.size == 100 + 30
    assert stored.key_id == key_id_for(
        model_name="mlp", model_version="1", profile="circuit_private", public_key=b"p" * 30, **keys(1)
    )
    assert "relin" not in repr(stored)  # tens of MB must never reach a log line


def test_entries_carry_no_bytes():
    store, _ = make_store()
    stored, _ = put(store, 1)
    [entry] = store.entries()
    assert type(entry) is KeyEntry and entry == stored.entry
    assert not {"relin", "galois", "public_key"} & set(entry.model_dump())


def test_the_memory_store_implements_the_protocol():
    members = [name for name in vars(KeyStore) if not name.startswith("_") and callable(vars(KeyStore)[name])]
    expected = {"put", "get", "touch", "delete", "expire", "entries", "resident_bytes", "add_listener", "close"}
    assert expected <= set(members)
    for name in members:
        assert inspect.signature(getattr(InMemoryKeyStore, name)) == inspect.signature(getattr(KeyStore, name)), name
    store, _ = make_store()
    assert isinstance(store.limits, KeyLimits)


@pytest.mark.parametrize(
    "limits",
    [
        {"budget_bytes": 0},
        {"budget_bytes": -5},
        {"tenant_bytes": 0},
        {"tenant_key_sets": 0},
        {"ttl_seconds": 0.0},
        {"ttl_seconds": -1.0},
        {"ttl_seconds": math.nan},
    ],
)
def test_limits_refuse_non_positive_values(limits):
    with pytest.raises(ValidationError):
        KeyLimits(**{"budget_bytes": 100, "tenant_bytes": 100, "tenant_key_sets": 1, "ttl_seconds": 1.0, **limits})


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
    assert store.resident_bytes() == 200 and len(store.entries()) == 2
    assert ids(store.entries())[-1] == first.key_id  # now the most recently used


def test_get_returns_the_tenants_record_and_marks_it_used():
    store, clock = make_store()
    stored, _ = put(store, 1)
    clock.advance(3)
    got = store.get(stored.key_id, tenant="acme")
    assert got.relin == stored.relin and got.galois == stored.galois
    assert got.last_used_at == clock.now and got.created_at == stored.created_at


def test_touch_marks_the_record_used_without_its_bytes():
    store, clock = make_store(budget=200)
    a, _ = put(store, 1)
    clock.advance(1)
    b, _ = put(store, 2)
    clock.advance(3)
    touched = store.touch(a.key_id, tenant="acme")
    assert type(touched) is KeyEntry and touched.last_used_at == clock.now
    assert ids(store.entries()) == [b.key_id, a.key_id]
    with pytest.raises(NotFoundError, match="register the keys again"):
        store.touch(a.key_id, tenant="globex")


def test_another_tenants_id_is_indistinguishable_from_an_unknown_one():
    store, _ = make_store()
    stored, _ = put(store, 1, tenant="acme")
    foreign = not_found_message(store, stored.key_id, "globex")
    unknown = not_found_message(store, KEY_ID_PREFIX + "0" * 64, "acme")
    assert foreign == unknown == KEY_NOT_FOUND_MESSAGE
    assert "register" in foreign and stored.key_id not in foreign
    assert store.delete(stored.key_id, tenant="globex") is False
    assert store.get(stored.key_id, tenant="acme").key_id == stored.key_id


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
    assert store.resident_bytes() == 200 and len(store.entries()) == 2
    assert store.delete(mine.key_id, tenant="acme") is True
    assert store.get(theirs.key_id, tenant="globex").tenant == "globex"
    with pytest.raises(NotFoundError):
        store.get(mine.key_id, tenant="acme")
    assert store.resident_bytes() == 100 and ids(store.entries(tenant="globex")) == [theirs.key_id]


def test_delete_removes_once():
    store, _ = make_store()
    stored, _ = put(store, 1)
    heard = listen(store)
    assert store.delete(stored.key_id, tenant="acme") is True
    assert store.delete(stored.key_id, tenant="acme") is False
    assert store.resident_bytes() == 0 and store.entries() == []
    assert heard == [(stored.key_id, DropReason.DELETED)]
    with pytest.raises(NotFoundError):
        store.get(stored.key_id, tenant="acme")


# --- a tenant's quota ------------------------------------------------------------------------


def test_a_tenant_over_its_byte_quota_evicts_its_own_oldest_sets_only():
    store, clock = make_store(budget=1000, tenant_bytes=250)
    other, _ = put(store, 9, tenant="globex", size=200)
    a, _ = put(store, 1)
    clock.advance(1)
    b, _ = put(store, 2)
    clock.advance(1)
    c, evicted = put(store, 3)  # acme would hold 300 > 250: its oldest goes
    assert ids(evicted) == [a.key_id]
    big, evicted = put(store, 4, size=250)  # needs acme's whole quota
    assert ids(evicted) == [b.key_id, c.key_id]
    assert ids(store.entries()) == [other.key_id, big.key_id]
    assert store.resident_bytes(tenant="acme") == 250 and store.resident_bytes(tenant="globex") == 200


def test_a_tenant_over_its_key_set_count_evicts_its_own_oldest_set():
    store, clock = make_store(budget=1000, tenant_sets=2)
    other, _ = put(store, 9, tenant="globex")
    a, _ = put(store, 1)
    clock.advance(1)
    b, _ = put(store, 2)
    clock.advance(1)
    store.get(a.key_id, tenant="acme")  # a is now acme's most recently used
    c, evicted = put(store, 3)
    assert ids(evicted) == [b.key_id]
    assert set(ids(store.entries())) == {other.key_id, a.key_id, c.key_id}


def test_a_set_larger_than_the_tenant_quota_is_refused_without_evicting():
    store, _ = make_store(budget=10 * 1024 * 1024, tenant_bytes=3 * 1024 * 1024)
    small, _ = put(store, 1)
    heard = listen(store)
    with pytest.raises(ResourceExhaustedError) as caught:
        put(store, 2, resident=4 * 1024 * 1024)
    assert str(caught.value).startswith("keys holding 4.0 MiB once loaded exceed the tenant quota of 3.0 MiB")
    assert store.entries() == [small.entry] and store.resident_bytes() == 100 and heard == []


# --- the budget and its fair share ---------------------------------------------------------------


def test_a_tenant_registering_two_sets_does_not_evict_another_tenants_idle_set():
    """Issue 15: with room for two sets, one LRU across tenants made alice's second set evict bob's
    idle one (the least recently used of all). Now alice's second set displaces alice's first."""
    store, clock = make_store(budget=200)
    bob, _ = put(store, 1, tenant="bob")
    clock.advance(30)  # idle, within its time to live
    first, _ = put(store, 2, tenant="alice")
    clock.advance(1)
    second, evicted = put(store, 3, tenant="alice")
    assert ids(evicted) == [first.key_id]
    assert store.get(bob.key_id, tenant="bob").key_id == bob.key_id
    assert set(ids(store.entries())) == {bob.key_id, second.key_id}


def test_a_full_budget_evicts_from_the_tenant_holding_the_most_above_its_share():
    store, clock = make_store(budget=400)
    a1, _ = put(store, 1, tenant="acme")
    clock.advance(1)
    a2, _ = put(store, 2, tenant="acme")
    clock.advance(1)
    a3, _ = put(store, 3, tenant="acme")
    clock.advance(1)
    g, _ = put(store, 4, tenant="globex")  # full: acme 300, globex 100
    clock.advance(1)
    i, evicted = put(store, 5, tenant="initech")  # share 133: acme (300) gives up its oldest
    assert ids(evicted) == [a1.key_id]
    clock.advance(1)
    _, evicted = put(store, 6, tenant="globex")  # globex would hold 200 > 133, acme 200: acme's oldest again
    assert ids(evicted) == [a2.key_id]
    assert set(ids(store.entries())) == {a3.key_id, g.key_id, i.key_id} | {record(6, tenant="globex").key_id}


def test_a_full_budget_refuses_a_newcomer_larger_than_its_share_without_evicting():
    store, clock = make_store(budget=300)
    put(store, 1, tenant="acme", size=150)
    clock.advance(1)
    put(store, 2, tenant="globex", size=150)
    heard = listen(store)
    before = store.entries()
    with pytest.raises(ResourceExhaustedError) as caught:
        put(store, 3, tenant="initech", size=200)  # acme's set would go (150 > 100), then globex is within 150
    assert "key budget of 0.0 MiB is full" in str(caught.value)
    assert store.entries() == before and heard == []  # the planned eviction of acme's set was not applied


def test_the_newcomers_own_tenant_gives_way_before_tenants_within_their_share():
    store, clock = make_store(budget=300)
    g, _ = put(store, 1, tenant="globex", size=150)
    clock.advance(1)
    a1, _ = put(store, 2, tenant="acme", size=150)
    clock.advance(1)
    a2, evicted = put(store, 3, tenant="acme", size=100)  # acme would hold 250 > share 150; globex holds 150
    assert ids(evicted) == [a1.key_id]
    assert set(ids(store.entries())) == {g.key_id, a2.key_id}


def test_a_tenant_within_its_share_keeps_its_set_though_it_is_the_oldest():
    store, clock = make_store(budget=300)
    g, _ = put(store, 1, tenant="globex")
    clock.advance(1)
    a1, _ = put(store, 2, tenant="acme")
    clock.advance(1)
    a2, _ = put(store, 3, tenant="acme")
    clock.advance(1)
    i, evicted = put(store, 4, tenant="initech")  # share 100: globex holds 100, acme 200
    assert ids(evicted) == [a1.key_id]
    assert set(ids(store.entries())) == {g.key_id, a2.key_id, i.key_id}


def test_a_set_larger_than_the_budget_is_refused_without_evicting():
    store, _ = make_store(budget=3 * 1024 * 1024, tenant_bytes=3 * 1024 * 1024)
    small, _ = put(store, 1)
    with pytest.raises(ResourceExhaustedError) as caught:
        put(store, 2, resident=4 * 1024 * 1024)
    assert "exceed the" in str(caught.value) and "3.0 MiB" in str(caught.value)
    assert store.entries() == [small.entry]


def test_a_get_moves_a_record_to_the_back_of_its_tenants_eviction_line():
    store, clock = make_store(budget=300)
    a, _ = put(store, 1)
    clock.advance(1)
    b, _ = put(store, 2)
    clock.advance(1)
    c, _ = put(store, 3)
    clock.advance(1)
    store.get(a.key_id, tenant="acme")
    _, evicted = put(store, 4)
    assert ids(evicted) == [b.key_id]
    assert set(ids(store.entries())) == {a.key_id, c.key_id, record(4).key_id}


def test_a_large_record_evicts_as_many_as_it_needs_oldest_first():
    store, clock = make_store(budget=300)
    evictable = []
    for seed in (1, 2, 3):
        evictable.append(put(store, seed)[0].key_id)
        clock.advance(1)
    big, evicted = put(store, 9, size=250)
    assert ids(evicted) == evictable
    assert store.entries() == [big.entry] and store.resident_bytes() == 250


def test_a_record_exactly_the_budget_fits():
    store, _ = make_store(budget=300)
    put(store, 1)
    stored, evicted = put(store, 2, size=300)
    assert len(evicted) == 1 and store.entries() == [stored.entry] and store.resident_bytes() == 300


def test_quotas_count_resident_bytes_not_stored_bytes():
    store, _ = make_store(budget=1000, tenant_bytes=500)
    put(store, 1, size=10, resident=400)
    _, evicted = put(store, 2, size=10, resident=200)  # 20 serialized bytes, 600 resident: over the quota
    assert len(evicted) == 1 and store.resident_bytes() == 200


# --- time to live ------------------------------------------------------------------------------


def test_ttl_runs_from_the_last_use():
    store, clock = make_store(ttl=10)
    stored, _ = put(store, 1)
    heard = listen(store)
    clock.advance(9)
    store.get(stored.key_id, tenant="acme")
    clock.advance(9)  # 18 s after registration, 9 s after the last use
    assert store.get(stored.key_id, tenant="acme").last_used_at == clock.now
    clock.advance(9)
    store.touch(stored.key_id, tenant="acme")  # a touch refreshes it too
    clock.advance(10)  # exactly the ttl since the last use
    with pytest.raises(NotFoundError):
        store.get(stored.key_id, tenant="acme")
    assert heard == [(stored.key_id, DropReason.EXPIRED)]
    assert store.resident_bytes() == 0


def test_re_registering_refreshes_the_ttl():
    store, clock = make_store(ttl=10)
    stored, _ = put(store, 1)
    clock.advance(8)
    put(store, 1)
    clock.advance(8)
    assert ids(store.entries()) == [stored.key_id]


def test_expire_drops_only_idle_records_and_returns_them():
    store, clock = make_store(ttl=10)
    old, _ = put(store, 1)
    clock.advance(6)
    fresh, _ = put(store, 2)
    clock.advance(4)
    assert ids(store.expire()) == [old.key_id]
    assert store.expire() == []
    assert store.entries() == [fresh.entry] and store.resident_bytes() == 100


def test_expired_records_are_dropped_lazily_by_any_operation():
    store, clock = make_store(ttl=10)
    stored, _ = put(store, 1)
    heard = listen(store)
    clock.advance(11)
    assert store.resident_bytes() == 0
    assert heard == [(stored.key_id, DropReason.EXPIRED)]


def test_an_infinite_ttl_never_expires():
    store, clock = make_store(ttl=math.inf)
    stored, _ = put(store, 1)
    clock.advance(1e12)
    assert store.expire() == [] and store.entries() == [stored.entry]


# --- listeners ---------------------------------------------------------------------------------


def test_listeners_hear_every_eviction_expiry_and_deletion_once_as_entries():
    store, clock = make_store(budget=200, ttl=10)
    heard = listen(store)
    also: list[object] = []
    store.add_listener(lambda entry, reason: also.append(entry))
    a, _ = put(store, 1)
    clock.advance(1)
    b, _ = put(store, 2)
    clock.advance(1)
    c, evicted = put(store, 3)  # evicts a
    assert ids(evicted) == [a.key_id]
    assert store.delete(c.key_id, tenant="acme")
    clock.advance(20)
    assert ids(store.expire()) == [b.key_id]
    assert heard == [(a.key_id, DropReason.EVICTED), (c.key_id, DropReason.DELETED), (b.key_id, DropReason.EXPIRED)]
    assert ids(also) == [a.key_id, c.key_id, b.key_id] and all(type(entry) is KeyEntry for entry in also)


def test_an_unsubscribed_listener_hears_nothing_more():
    store, _ = make_store()
    heard: list[KeyEntry] = []
    remove = store.add_listener(lambda entry, reason: heard.append(entry))
    first, _ = put(store, 1)
    second, _ = put(store, 2)
    store.delete(first.key_id, tenant="acme")
    remove()
    remove()  # twice is harmless
    store.delete(second.key_id, tenant="acme")
    assert heard == [first.entry]


def test_a_failing_listener_neither_breaks_the_store_nor_silences_the_others():
    store, _ = make_store()

    def broken(entry, reason):
        raise RuntimeError("listener bug")

    store.add_listener(broken)
    heard = listen(store)
    stored, _ = put(store, 1)
    assert store.delete(stored.key_id, tenant="acme") is True
    assert heard == [(stored.key_id, DropReason.DELETED)]
    assert store.resident_bytes() == 0


def test_a_listener_may_read_the_store_without_deadlocking():
    store, _ = make_store(budget=200)
    seen: list[int] = []
    store.add_listener(lambda entry, reason: seen.append(store.resident_bytes()))
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
    store, _ = make_store(budget=budget, tenant_bytes=600, tenant_sets=5)
    store._clock = __import__("time").time  # a real clock: threads interleave for real
    evicted_heard: list[KeyEntry] = []
    store.add_listener(lambda entry, reason: evicted_heard.append(entry) if reason is DropReason.EVICTED else None)
    evicted_returned: list[KeyEntry] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)
    records = {(n, i): record(i, tenant=f"tenant-{n}", size=60 + (i % 5) * 20) for n in range(8) for i in range(12)}

    def client(n: int) -> None:
        tenant = f"tenant-{n}"
        try:
            start.wait()
            for i in range(200):
                try:
                    stored, evicted = store.put(records[n, i % 12])
                except ResourceExhaustedError:
                    continue  # every other tenant within its share: allowed
                evicted_returned.extend(evicted)
                try:
                    got = store.get(stored.key_id, tenant=tenant)
                    assert got.tenant == tenant and got.key_id == stored.key_id
                except NotFoundError:
                    pass  # evicted by another thread in between: allowed
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
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
    live = store.entries()
    assert store.resident_bytes() == sum(entry.resident_bytes for entry in live) <= budget
    for n in range(8):
        mine = store.entries(tenant=f"tenant-{n}")
        assert store.resident_bytes(tenant=f"tenant-{n}") == sum(e.resident_bytes for e in mine) <= 600
        assert len(mine) <= 5
    assert len({(entry.tenant, entry.key_id) for entry in live}) == len(live)
    assert evicted_returned, "the limits were meant to force evictions"
    assert sorted(ids(evicted_heard)) == sorted(ids(evicted_returned))
