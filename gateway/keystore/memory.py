"""A key store in this process's memory: one gateway replica, bounded per tenant and in all, and in idle time.

Records sit in one ordered map from least to most recently used (across all tenants), so the
next expiry is at its front and each tenant's next eviction is its first record in the map: the
time to live runs from the last use, and with a clock that does not run backwards the least
recently used record is also the one idle the longest.

Limits (:class:`~gateway.keystore.base.KeyLimits`) count :attr:`KeyRecord.resident_bytes`, what
a worker holds once the keys are deserialized (the caller measured it). :meth:`put` plans every
eviction first and applies them only if the newcomer then fits, so a refused registration
evicts nothing. The plan, in order:

1. the tenant's own quota (``tenant_bytes``, ``tenant_key_sets``): the tenant's least recently
   used sets go first, never another tenant's;
2. the budget (``budget_bytes``): while the sets together would exceed it, the tenant holding
   the most bytes gives up its least recently used set, but only while it holds more than an
   equal share (budget / tenants holding keys, the newcomer's tenant counted). A tenant's
   holdings count the newcomer in its own tenant, so a tenant over its share makes room from its
   own sets first; a tenant with nothing stored yet has nothing to give. When the largest holder
   is within its share, the registration is refused (RESOURCE_EXHAUSTED), so one tenant never
   flushes another that stays within its share.

Listeners are called while the store's (reentrant) lock is held, after the store has finished
changing: a drop is therefore reported before any later registration of the same keys can
return, and the workers see drop-then-load in that order. Listeners must be quick (hand the
entry to a queue); they may read the store, and an exception in one is logged and swallowed,
because the change it reports has already happened.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from gateway.keystore.base import (
    DropReason,
    KeyEntry,
    KeyLimits,
    KeyListener,
    KeyRecord,
    check_key_id,
    key_not_found,
)
from models.errors import ResourceExhaustedError

logger = logging.getLogger(__name__)

MIB = 1024 * 1024

_Slot = tuple[str, str]  # (tenant, key_id): the same keys registered by two tenants are two records
_Dropped = list[tuple[KeyEntry, DropReason]]


def _mib(size: int) -> str:
    return f"{size / MIB:.1f} MiB"


class InMemoryKeyStore:
    """A thread-safe :class:`~gateway.keystore.base.KeyStore` with per-tenant quotas, a fair-share
    budget and a time to live from the last use.

    ``clock`` is the wall clock by default (records carry wall-clock times, as a shared store's
    do); it must not run backwards (tests pass a fake one). ``limits.ttl_seconds`` may be
    ``math.inf`` to keep records until they are evicted or deleted.
    """

    def __init__(self, *, limits: KeyLimits, clock: Callable[[], float] = time.time) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.RLock()
        self._records: OrderedDict[_Slot, KeyRecord] = OrderedDict()  # least recently used first
        self._tenant_bytes: dict[str, int] = {}
        self._tenant_sets: dict[str, int] = {}
        self._bytes = 0
        self._listeners: list[KeyListener] = []

    # -- the protocol --------------------------------------------------------------------------

    def put(self, record: KeyRecord) -> tuple[KeyRecord, list[KeyEntry]]:
        """Store a checked record; see :meth:`gateway.keystore.base.KeyStore.put`.

        The store stamps ``created_at`` and ``last_used_at`` with its clock (a refreshed record
        keeps its ``created_at``).
        """
        check_key_id(record)  # outside the lock: hashing tens of MB takes a while (hashlib releases the GIL)
        slot = (record.tenant, record.key_id)
        with self._changing() as (now, dropped):
            existing = self._records.get(slot)
            if existing is not None:
                return self._touch(slot, existing, now), []
            victims = self._plan_room(record)
            for victim in victims:
                self._remove((victim.tenant, victim.key_id))
                logger.info(
                    "evicted key %s of tenant %r (%d resident bytes, idle %.0f s) for a set of tenant %r",
                    victim.key_id,
                    victim.tenant,
                    victim.resident_bytes,
                    now - victim.last_used_at,
                    record.tenant,
                )
            evicted = [victim.entry for victim in victims]
            dropped.extend((entry, DropReason.EVICTED) for entry in evicted)
            stored = record.model_copy(update={"created_at": now, "last_used_at": now})
            self._add(slot, stored)
            return stored, evicted

    def get(self, key_id: str, *, tenant: str) -> KeyRecord:
        """The tenant's record, touched; see :meth:`gateway.keystore.base.KeyStore.get`."""
        slot = (tenant, key_id)
        with self._changing() as (now, _):
            record = self._records.get(slot)
            if record is None:
                raise key_not_found()
            return self._touch(slot, record, now)

    def touch(self, key_id: str, *, tenant: str) -> KeyEntry:
        """Mark the tenant's record used; see :meth:`gateway.keystore.base.KeyStore.touch`."""
        slot = (tenant, key_id)
        with self._changing() as (now, _):
            record = self._records.get(slot)
            if record is None:
                raise key_not_found()
            return self._touch(slot, record, now).entry

    def delete(self, key_id: str, *, tenant: str) -> bool:
        """Remove the tenant's record; see :meth:`gateway.keystore.base.KeyStore.delete`."""
        with self._changing() as (_, dropped):
            record = self._remove((tenant, key_id))
            if record is None:
                return False
            dropped.append((record.entry, DropReason.DELETED))
            return True

    def expire(self) -> list[KeyEntry]:
        """Drop and return the entries whose time to live has run out (every other method does this too)."""
        with self._changing() as (_, dropped):
            return [entry for entry, _ in dropped]

    def entries(self, *, tenant: str | None = None) -> list[KeyEntry]:
        """Every live entry (of one tenant, or of all), least recently used first, untouched."""
        with self._changing():
            return [r.entry for r in self._records.values() if tenant is None or r.tenant == tenant]

    def resident_bytes(self, *, tenant: str | None = None) -> int:
        """Resident bytes of the live records (of one tenant, or of all)."""
        with self._changing():
            return self._bytes if tenant is None else self._tenant_bytes.get(tenant, 0)

    def add_listener(self, listener: KeyListener) -> Callable[[], None]:
        """Subscribe ``listener`` to every drop from now on; the returned function unsubscribes it."""
        with self._lock:
            self._listeners.append(listener)

        def remove() -> None:
            with self._lock, suppress(ValueError):  # unsubscribing twice is harmless
                self._listeners.remove(listener)

        return remove

    def close(self) -> None:
        """Nothing to release: the records live and die with this process."""

    # -- limits --------------------------------------------------------------------------------

    def _plan_room(self, record: KeyRecord) -> list[KeyRecord]:
        """The records to evict so that ``record`` fits (applied by the caller), oldest first per tenant.

        Raises:
            ResourceExhaustedError: the set alone exceeds the tenant's quota or the budget, or the
                budget is full and no tenant holds more than its share; nothing is evicted then.
        """
        limits, tenant, size = self.limits, record.tenant, record.resident_bytes
        if size > limits.tenant_bytes or size > limits.budget_bytes:
            limit, name = min((limits.tenant_bytes, "tenant quota"), (limits.budget_bytes, "key budget"))
            raise ResourceExhaustedError(
                f"keys holding {_mib(size)} once loaded exceed the {name} of {_mib(limit)} ({size} > {limit} bytes)"
            )
        queues: dict[str, list[KeyRecord]] = {}  # each tenant's records, least recently used first
        for stored in self._records.values():
            queues.setdefault(stored.tenant, []).append(stored)
        held = {name: sum(r.resident_bytes for r in queue) for name, queue in queues.items()}
        held[tenant] = held.get(tenant, 0) + size  # the newcomer counts in its own tenant
        sets = len(queues.get(tenant, [])) + 1
        victims: list[KeyRecord] = []
        own = queues.get(tenant, [])
        while held[tenant] > limits.tenant_bytes or sets > limits.tenant_key_sets:
            victim = own.pop(0)  # the quota checks above guarantee one is left while over the quota
            victims.append(victim)
            held[tenant] -= victim.resident_bytes
            sets -= 1
        total = sum(held.values())
        while total > limits.budget_bytes:
            holders = [name for name, amount in held.items() if amount > 0]
            share = limits.budget_bytes / len(holders)
            largest = max((name for name in holders if queues.get(name)), key=held.__getitem__, default=None)
            if largest is None or held[largest] <= share:
                logger.info("refused keys of tenant %r (%d resident bytes): the key budget is full", tenant, size)
                raise ResourceExhaustedError(
                    f"the key budget of {_mib(limits.budget_bytes)} is full and no tenant holds more than its "
                    f"share ({_mib(int(share))} each for {len(holders)} tenants): keys holding {_mib(size)} once "
                    f"loaded do not fit; retry later or delete unused keys"
                )
            victim = queues[largest].pop(0)
            victims.append(victim)
            held[largest] -= victim.resident_bytes
            total -= victim.resident_bytes
        return victims

    # -- bookkeeping -----------------------------------------------------------------------------

    @contextmanager
    def _changing(self) -> Iterator[tuple[float, _Dropped]]:
        """Hold the lock, drop what has expired, and tell the listeners about every drop on the way out.

        The body appends its own drops to the yielded list; they are reported even if it raises.
        """
        with self._lock:
            now = self._clock()
            dropped: _Dropped = [(entry, DropReason.EXPIRED) for entry in self._drop_expired(now)]
            try:
                yield now, dropped
            finally:
                self._notify(dropped)

    def _drop_expired(self, now: float) -> list[KeyEntry]:
        expired: list[KeyEntry] = []
        while self._records:
            slot, record = next(iter(self._records.items()))
            if now - record.last_used_at < self.limits.ttl_seconds:
                break  # ordered by last use: every later record is fresher
            self._remove(slot)
            expired.append(record.entry)
            logger.debug(
                "expired key %s of tenant %r after %.0f s idle", record.key_id, record.tenant, now - record.last_used_at
            )
        return expired

    def _add(self, slot: _Slot, record: KeyRecord) -> None:
        self._records[slot] = record
        self._bytes += record.resident_bytes
        self._tenant_bytes[record.tenant] = self._tenant_bytes.get(record.tenant, 0) + record.resident_bytes
        self._tenant_sets[record.tenant] = self._tenant_sets.get(record.tenant, 0) + 1

    def _remove(self, slot: _Slot) -> KeyRecord | None:
        record = self._records.pop(slot, None)
        if record is None:
            return None
        self._bytes -= record.resident_bytes
        self._tenant_bytes[record.tenant] -= record.resident_bytes
        self._tenant_sets[record.tenant] -= 1
        if not self._tenant_sets[record.tenant]:
            del self._tenant_bytes[record.tenant], self._tenant_sets[record.tenant]
        return record

    def _touch(self, slot: _Slot, record: KeyRecord, now: float) -> KeyRecord:
        touched = record.model_copy(update={"last_used_at": now})
        self._records[slot] = touched
        self._records.move_to_end(slot)
        return touched

    def _notify(self, dropped: _Dropped) -> None:
        for entry, reason in dropped:
            for listener in tuple(self._listeners):
                try:
                    listener(entry, reason)
                except Exception:
                    logger.exception("key store listener %r failed on %s key %s", listener, reason, entry.key_id)
