"""The key store contract: the rules of ``gateway/keystore/base.py`` on a real Redis and on the in-memory
store (``BOTH_STORES``), then what only a shared, durable store has (replicas, Redis's own expiry, restarts, outages).

The rule tests take a ``make_store(limits)`` fixture (and ``wait(seconds)`` where time matters) and nothing
else of Redis, so that they can be parametrized over every store. Times to live are real and short (1 s):
Redis keeps the clock.
"""

from __future__ import annotations

import os
import threading
import time

import pytest
import redis
from gateway_harness import make_pki
from services import RedisServer, free_port

from gateway.keystore import (
    KEY_NOT_FOUND_MESSAGE,
    DropReason,
    InMemoryKeyStore,
    KeyLimits,
    KeyRecord,
    RedisKeyStore,
    key_id_for,
    open_key_store,
)
from models.errors import InvalidArgumentError, NotFoundError, ResourceExhaustedError, UnavailableError

LIMITS = KeyLimits(budget_bytes=1000, tenant_bytes=600, tenant_key_sets=3, ttl_seconds=3600)
TTL_SECONDS = 1.0


def record(tenant: str, resident: int, *, size: int = 64, model: str = "mnist-cnn-eps3") -> KeyRecord:
    """A record with fresh random keys (so a fresh key id) holding ``resident`` bytes once loaded."""
    relin, galois = os.urandom(size), os.urandom(2 * size)
    key_id = key_id_for(model_name=model, model_version="1", relin=relin, galois=galois)
    return KeyRecord(
        key_id=key_id,
        tenant=tenant,
        model_name=model,
        model_version="1",
        stored_bytes=len(relin) + len(galois),
        resident_bytes=resident,
        created_at=0.0,
        last_used_at=0.0,
        relin=relin,
        galois=galois,
    )


def for_tenant(original: KeyRecord, tenant: str) -> KeyRecord:
    """The same keys registered by another tenant."""
    return original.model_copy(update={"tenant": tenant})


def ids(entries) -> list[str]:
    return [entry.key_id for entry in entries]


class _Clock:
    """The in-memory store's clock for the shared rule tests: wall time that ``wait`` advances at once."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def store_kind(request) -> str:
    """``redis`` unless a rule test is parametrized over every store (``BOTH_STORES``)."""
    return getattr(request, "param", "redis")


@pytest.fixture
def clock() -> _Clock:
    return _Clock()


@pytest.fixture
def make_store(request, store_kind, clock):
    """``make_store(limits)``: a store on this test's Redis (each one a replica of the others), or an
    in-memory store on ``clock`` for the rule tests parametrized over both."""
    stores: list = []

    def make(limits: KeyLimits = LIMITS):
        if store_kind == "memory":
            store = InMemoryKeyStore(limits=limits, clock=clock)
        else:
            store = RedisKeyStore(url=request.getfixturevalue("redis_server").url, limits=limits)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def wait(store_kind, clock):
    """``wait(seconds)``: let the store's clock run. Redis keeps its own, so real time passes; the
    in-memory store's injected clock is advanced instead."""
    return clock.advance if store_kind == "memory" else time.sleep


BOTH_STORES = pytest.mark.parametrize("store_kind", ["redis", "memory"], indirect=True)


@pytest.fixture
def raw(redis_server):
    """A plain client on the test's Redis, to look at what the store left there."""
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


# -- the rules of the contract -----------------------------------------------------------------------


@BOTH_STORES
def test_put_then_get_returns_the_bytes_and_an_entry_timed_by_the_shared_clock(make_store):
    store = make_store()
    before = time.time()
    stored, evicted = store.put(record("alice", 100))
    got = store.get(stored.key_id, tenant="alice")
    assert evicted == []
    assert (got.relin, got.galois, got.public_key) == (stored.relin, stored.galois, stored.public_key)
    assert got.entry.model_dump(exclude={"last_used_at"}) == stored.entry.model_dump(exclude={"last_used_at"})
    assert before - 1 <= stored.created_at <= got.last_used_at <= time.time() + 1  # Redis's clock, same machine
    assert store.entries() == [got.entry] and store.resident_bytes() == 100


@BOTH_STORES
def test_registering_held_keys_again_refreshes_them_and_evicts_nothing(make_store):
    store = make_store()
    first, _ = store.put(record("alice", 100))
    other, _ = store.put(record("alice", 100))
    again, evicted = store.put(first)
    assert evicted == [] and again.created_at == first.created_at and again.last_used_at >= other.last_used_at
    assert ids(store.entries(tenant="alice")) == [other.key_id, first.key_id]  # refreshed: now most recent
    assert store.resident_bytes(tenant="alice") == 200


@BOTH_STORES
def test_a_tenant_reaches_only_its_own_keys_and_every_miss_reads_the_same(make_store):
    store = make_store()
    stored, _ = store.put(record("alice", 100))
    misses = [(stored.key_id, "bob"), ("k2-" + "0" * 64, "alice"), ("../" + stored.key_id, "alice"), ("", "alice")]
    for key_id, tenant in misses:
        for method in (store.get, store.touch):
            with pytest.raises(NotFoundError) as caught:
                method(key_id, tenant=tenant)
            assert str(caught.value) == KEY_NOT_FOUND_MESSAGE
        assert store.delete(key_id, tenant=tenant) is False
    # a tenant whose name embeds another tenant's key id reaches nothing either
    assert store.delete(stored.key_id, tenant=f"{stored.key_id}:alice") is False
    assert store.entries(tenant="bob") == [] and store.resident_bytes(tenant="bob") == 0
    assert ids(store.entries(tenant="alice")) == [stored.key_id]
    assert store.entries(tenant="") == [] and store.resident_bytes(tenant="") == 0  # "" is a tenant, not "all"


@BOTH_STORES
def test_over_its_byte_quota_a_tenant_evicts_its_own_least_recently_used_sets(make_store):
    store = make_store()
    bob, _ = store.put(record("bob", 300))
    a1, _ = store.put(record("alice", 200))
    a2, _ = store.put(record("alice", 200))
    store.touch(a1.key_id, tenant="alice")  # a2 is now alice's least recently used
    a3, evicted = store.put(record("alice", 300))  # 200 + 200 + 300 > 600
    assert ids(evicted) == [a2.key_id] and evicted[0].tenant == "alice"
    assert ids(store.entries(tenant="alice")) == [a1.key_id, a3.key_id]
    assert ids(store.entries(tenant="bob")) == [bob.key_id]
    assert store.resident_bytes(tenant="alice") == 500


@BOTH_STORES
def test_over_its_set_quota_a_tenant_evicts_its_least_recently_used_set(make_store):
    store = make_store(LIMITS.model_copy(update={"tenant_key_sets": 2}))
    a1, _ = store.put(record("alice", 10))
    a2, _ = store.put(record("alice", 10))
    store.get(a1.key_id, tenant="alice")
    _, evicted = store.put(record("alice", 10))
    assert ids(evicted) == [a2.key_id] and len(store.entries(tenant="alice")) == 2


@BOTH_STORES
@pytest.mark.parametrize("resident", [LIMITS.tenant_bytes + 1, LIMITS.budget_bytes + 1])
def test_a_set_larger_than_the_quota_is_refused_and_changes_nothing(make_store, resident):
    store = make_store()
    held, _ = store.put(record("alice", 500))
    with pytest.raises(ResourceExhaustedError, match="quota"):
        store.put(record("alice", resident))
    assert ids(store.entries()) == [held.key_id]


@BOTH_STORES
def test_a_full_budget_evicts_from_the_tenant_above_its_equal_share(make_store):
    store = make_store(LIMITS.model_copy(update={"tenant_bytes": 800, "tenant_key_sets": 5}))
    alice = [store.put(record("alice", 200))[0] for _ in range(3)]  # 600 > 1000 / 2
    bob, _ = store.put(record("bob", 300))  # 900 of 1000
    store.touch(alice[0].key_id, tenant="alice")
    _, evicted = store.put(record("bob", 200))  # 1100: alice, above her share, gives her LRU set
    assert ids(evicted) == [alice[1].key_id]
    assert store.resident_bytes() == 900 and bob.key_id in ids(store.entries(tenant="bob"))


@BOTH_STORES
def test_a_full_budget_where_no_tenant_exceeds_its_share_refuses_and_changes_nothing(make_store):
    store = make_store(LIMITS.model_copy(update={"tenant_bytes": 800}))
    store.put(record("alice", 333))
    store.put(record("bob", 333))
    before = store.entries()
    with pytest.raises(ResourceExhaustedError, match="budget"):
        store.put(record("carol", 400))  # 1066 > 1000; 3 tenants, share 333: only carol's newcomer is above it
    assert store.entries() == before


@BOTH_STORES
def test_at_its_share_a_tenant_replaces_its_own_sets_when_the_budget_is_full(make_store):
    store = make_store(LIMITS.model_copy(update={"tenant_bytes": 800}))
    store.put(record("alice", 500))
    bob, _ = store.put(record("bob", 500))
    _, evicted = store.put(record("bob", 100))  # 1100; share 500; bob with his newcomer holds 600: his own LRU goes
    assert ids(evicted) == [bob.key_id] and store.resident_bytes(tenant="alice") == 500


@BOTH_STORES
def test_a_newcomer_counts_in_the_share_and_evicts_the_largest_holder(make_store):
    store = make_store(LIMITS.model_copy(update={"tenant_bytes": 800}))
    alice = [store.put(record("alice", 250))[0] for _ in range(2)]
    store.put(record("bob", 450))
    _, evicted = store.put(record("carol", 100))  # 1050 > 1000; share 1000 / 3; alice holds 500 > 333
    assert ids(evicted) == [alice[0].key_id]


@BOTH_STORES
def test_entries_list_least_recently_used_first_and_listing_touches_nothing(make_store):
    store = make_store()
    a, _ = store.put(record("alice", 10))
    b, _ = store.put(record("bob", 10))
    c, _ = store.put(record("alice", 10))
    store.touch(a.key_id, tenant="alice")
    for _ in range(2):
        assert ids(store.entries()) == [b.key_id, c.key_id, a.key_id]
        assert ids(store.entries(tenant="alice")) == [c.key_id, a.key_id]
    assert store.resident_bytes() == 30 and store.resident_bytes(tenant="alice") == 20


@BOTH_STORES
def test_listeners_hear_evictions_and_deletions_and_can_leave(make_store):
    store = make_store(LIMITS.model_copy(update={"tenant_key_sets": 1}))
    heard = []
    remove = store.add_listener(lambda entry, reason: heard.append((entry.key_id, reason)))
    store.add_listener(lambda entry, reason: 1 / 0)  # a failing listener is logged, not raised
    first, _ = store.put(record("alice", 10))
    second, evicted = store.put(record("alice", 10))
    assert heard == [(first.key_id, DropReason.EVICTED)] and evicted[0].key_id == first.key_id
    assert store.delete(second.key_id, tenant="alice") is True
    assert heard[-1] == (second.key_id, DropReason.DELETED)
    remove()
    remove()  # twice is harmless
    third, _ = store.put(record("alice", 10))
    store.delete(third.key_id, tenant="alice")
    assert len(heard) == 2


@BOTH_STORES
def test_a_set_unused_for_its_time_to_live_is_dropped_and_reported_and_use_extends_it(make_store, wait):
    store = make_store(LIMITS.model_copy(update={"ttl_seconds": TTL_SECONDS}))
    heard = []
    store.add_listener(lambda entry, reason: heard.append((entry.key_id, reason)))
    kept, _ = store.put(record("alice", 10))
    dropped, _ = store.put(record("bob", 10))
    wait(0.6 * TTL_SECONDS)
    store.touch(kept.key_id, tenant="alice")
    wait(0.6 * TTL_SECONDS)  # dropped: idle 1.2 ttl; kept: 0.6 ttl
    assert ids(store.expire()) == [dropped.key_id]
    assert heard == [(dropped.key_id, DropReason.EXPIRED)]
    with pytest.raises(NotFoundError):
        store.get(dropped.key_id, tenant="bob")
    assert store.get(kept.key_id, tenant="alice").relin == kept.relin
    assert store.expire() == []


@BOTH_STORES
def test_every_method_drops_what_has_expired_first(make_store, wait):
    store = make_store(LIMITS.model_copy(update={"ttl_seconds": TTL_SECONDS}))
    heard = []
    store.add_listener(lambda entry, reason: heard.append(reason))
    store.put(record("alice", 10))
    wait(1.1 * TTL_SECONDS)
    assert store.entries() == [] and heard == [DropReason.EXPIRED]
    assert store.resident_bytes() == 0


# -- what only Redis has ------------------------------------------------------------------------------


def test_two_tenants_registering_one_key_id_share_one_copy_of_its_bytes(make_store, raw):
    store = make_store()
    alice, _ = store.put(record("alice", 100, size=4096))
    bob, _ = store.put(for_tenant(alice, "bob"))
    assert bob.key_id == alice.key_id and store.resident_bytes() == 200  # each tenant's quota counts it
    assert len(raw.keys("hegate:keys:blob:*")) == 1 and raw.keys("hegate:keys:stage:*") == []
    assert store.delete(alice.key_id, tenant="alice")
    assert store.get(bob.key_id, tenant="bob").galois == alice.galois
    assert store.delete(bob.key_id, tenant="bob")
    assert raw.keys("hegate:keys:blob:*") == [] and raw.keys("hegate:keys:refs:*") == []


@BOTH_STORES
def test_a_record_whose_key_id_is_not_its_keys_is_refused(make_store):
    store = make_store()
    genuine = record("alice", 100)
    with pytest.raises(InvalidArgumentError, match="not the id"):
        store.put(genuine.model_copy(update={"galois": os.urandom(128)}))
    assert store.entries() == []


def test_redis_itself_drops_abandoned_keys_when_no_replica_runs(make_store, raw):
    store = make_store(LIMITS.model_copy(update={"ttl_seconds": TTL_SECONDS}))
    store.put(record("alice", 10))
    store.put(record("bob", 10))
    store.close()  # no replica from now on
    assert len(raw.keys("hegate:keys:blob:*")) == 2
    time.sleep(1.1 * TTL_SECONDS)
    assert raw.keys("hegate:keys:blob:*") == [] and raw.keys("hegate:keys:refs:*") == []
    # the index (a few hundred bytes) follows an hour later, so a late replica still reports the expiry
    assert 0 < raw.pttl("hegate:keys:meta") <= 3600_000 and 0 < raw.pttl("hegate:keys:tenant:bob") <= 3600_000
    heard = []
    late = make_store(LIMITS)
    late.add_listener(lambda entry, reason: heard.append(reason))
    assert late.expire() and heard == [DropReason.EXPIRED] * 2
    assert raw.keys("hegate:keys:*") == []


def test_a_time_to_live_of_infinity_keeps_keys_until_evicted(make_store, raw):
    store = make_store(LIMITS.model_copy(update={"ttl_seconds": float("inf")}))
    stored, _ = store.put(record("alice", 10))
    assert raw.pttl(f"hegate:keys:blob:{stored.key_id}") == -1 and raw.pttl("hegate:keys:meta") == -1
    assert raw.pttl("hegate:keys:tenant:alice") == -1
    assert store.expire() == []


def test_two_replicas_share_the_keys_and_each_hears_its_own_drops(make_store):
    one, two = make_store(), make_store()
    heard_one, heard_two = [], []
    one.add_listener(lambda entry, reason: heard_one.append(entry.key_id))
    two.add_listener(lambda entry, reason: heard_two.append(entry.key_id))
    a1, _ = one.put(record("alice", 200))
    a2, _ = one.put(record("alice", 200))
    assert two.get(a1.key_id, tenant="alice").relin == a1.relin  # a1 now used through replica two
    _, evicted = two.put(record("alice", 300))  # over 600: the least recently used is a2, whoever used it
    assert ids(evicted) == [a2.key_id]
    assert heard_two == [a2.key_id] and heard_one == []
    assert one.entries() == two.entries()


def test_concurrent_registrations_from_two_replicas_never_exceed_a_quota(make_store):
    limits = KeyLimits(budget_bytes=800, tenant_bytes=450, tenant_key_sets=5, ttl_seconds=3600)
    replicas = [make_store(limits), make_store(limits)]
    registered, evicted, seen, errors = [], [], [], []
    lock = threading.Lock()

    def register(store: RedisKeyStore, tenant: str) -> None:
        try:
            for i in range(15):
                stored, gone = store.put(record(tenant, 100 + 50 * (i % 2)))  # the byte quota binds first
                held, total = store.resident_bytes(tenant=tenant), store.resident_bytes()
                with lock:
                    registered.append(stored.key_id)
                    evicted.extend(ids(gone))
                    seen.append((held, len(store.entries(tenant=tenant)), total))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=register, args=(store, tenant))
        for store in replicas
        for tenant in ("alice", "alice", "bob")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert all(held <= 450 and sets <= 5 and total <= 800 for held, sets, total in seen), max(seen)
    remaining = ids(replicas[0].entries())
    assert sorted(registered) == sorted(evicted + remaining)  # every set either stayed or was evicted once
    assert len(set(evicted)) == len(evicted)
    assert sum(entry.resident_bytes for entry in replicas[1].entries()) == replicas[0].resident_bytes() <= 800


def test_records_survive_a_redis_restart_without_restarting_the_store(redis_server, make_store):
    store = make_store()
    stored = [store.put(record(tenant, 100, size=1 << 16))[0] for tenant in ("alice", "alice", "bob")]
    before = store.entries()
    redis_server.stop()
    redis_server.start()
    assert store.entries() == before
    for original in stored:
        assert store.get(original.key_id, tenant=original.tenant).galois == original.galois


def test_an_outage_makes_every_method_unavailable_and_loses_nothing(redis_server, make_store):
    store = make_store()
    held, _ = store.put(record("alice", 100))
    newcomer = record("bob", 100)
    redis_server.stop()
    calls = {
        "put": lambda: store.put(newcomer),
        "get": lambda: store.get(held.key_id, tenant="alice"),
        "touch": lambda: store.touch(held.key_id, tenant="alice"),
        "delete": lambda: store.delete(held.key_id, tenant="alice"),
        "expire": store.expire,
        "entries": store.entries,
        "resident_bytes": store.resident_bytes,
    }
    for name, call in calls.items():
        with pytest.raises(UnavailableError) as caught:
            call()
        message = str(caught.value)
        assert f"key store {redis_server.url} unavailable" in message and "\n" not in message, name
    redis_server.start()
    assert ids(store.entries()) == [held.key_id]  # the failed delete deleted nothing, the put put nothing
    assert store.get(held.key_id, tenant="alice").relin == held.relin
    assert store.put(newcomer)[0].key_id == newcomer.key_id


def test_a_password_is_used_and_never_shown(tmp_path):
    server = RedisServer(tmp_path, "--requirepass", "hunter2").start()
    try:
        host = f"127.0.0.1:{server.port}/0"
        with pytest.raises(UnavailableError) as caught:
            open_key_store(f"redis://:wrong-secret@{host}", limits=LIMITS)
        assert "wrong-secret" not in str(caught.value) and f"redis://{host}" in str(caught.value)
        store = open_key_store(f"redis://:hunter2@{host}", limits=LIMITS)
        try:
            assert "hunter2" not in repr(store)
            stored, _ = store.put(record("alice", 10))
            assert store.get(stored.key_id, tenant="alice").relin == stored.relin
        finally:
            store.close()
    finally:
        server.stop()


def test_opening_an_unreachable_redis_fails_at_once_naming_it():
    url = f"redis://127.0.0.1:{free_port()}/3"
    with pytest.raises(UnavailableError, match=f"key store {url} unavailable"):
        open_key_store(url, limits=LIMITS)


def test_a_record_whose_bytes_redis_dropped_is_dropped_and_reported(make_store, raw):
    store = make_store()
    heard = []
    store.add_listener(lambda entry, reason: heard.append((entry.key_id, reason)))
    stored, _ = store.put(record("alice", 10))
    raw.delete(f"hegate:keys:blob:{stored.key_id}")  # what maxmemory-policy allkeys-lru would do
    with pytest.raises(NotFoundError):
        store.get(stored.key_id, tenant="alice")
    assert heard == [(stored.key_id, DropReason.EVICTED)] and store.entries() == []


def test_a_full_redis_refuses_new_bytes_and_keeps_serving_what_it_holds(make_store, raw):
    store = make_store()
    held, _ = store.put(record("alice", 10))
    raw.config_set("maxmemory", 1)  # Redis over its maxmemory (noeviction): it refuses writes that grow it
    try:
        with pytest.raises(ResourceExhaustedError, match="out of memory"):
            store.put(record("alice", 10))
        assert store.get(held.key_id, tenant="alice").relin == held.relin
        assert ids(store.entries()) == [held.key_id] and store.delete(held.key_id, tenant="alice")
    finally:
        raw.config_set("maxmemory", 0)
    assert store.put(record("alice", 10))[1] == [] and raw.keys("hegate:keys:stage:*") == []


def test_opening_warns_when_redis_would_lose_or_evict_keys(tmp_path, caplog):
    server = RedisServer(tmp_path, "--appendonly", "no", "--maxmemory-policy", "allkeys-lru").start()
    try:
        with caplog.at_level("WARNING", logger="gateway.keystore.redis"):
            open_key_store(server.url, limits=LIMITS).close()
        warnings = " ".join(record.getMessage() for record in caplog.records)
        assert "maxmemory-policy is allkeys-lru" in warnings and "--appendonly yes" in warnings
    finally:
        server.stop()


def test_rediss_speaks_tls_and_checks_the_server_certificate(tmp_path, monkeypatch):
    pki = make_pki(tmp_path / "pki")
    server = RedisServer(tmp_path, tls=pki).start()
    try:
        with pytest.raises(UnavailableError, match="certificate verify failed"):
            open_key_store(server.url, limits=LIMITS)  # the test CA is not trusted yet
        monkeypatch.setenv("SSL_CERT_FILE", str(pki / "ca.crt"))  # how a deployment names its CA
        store = open_key_store(server.url, limits=LIMITS)
        try:
            stored, _ = store.put(record("alice", 10))
            assert store.get(stored.key_id, tenant="alice").relin == stored.relin
        finally:
            store.close()
        with pytest.raises(UnavailableError):  # plaintext to a TLS port
            open_key_store(server.url.replace("rediss://", "redis://"), limits=LIMITS)
    finally:
        server.stop()
