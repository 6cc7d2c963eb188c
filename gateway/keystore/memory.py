"""A key store in this process's memory: one gateway replica, bounded in bytes and in idle time.

Records sit in one ordered map from least to most recently used (across all tenants), so both
the next eviction and the next expiry are at its front: the time to live runs from the last use,
and with a monotonic clock the least recently used record is also the one idle the longest.

Listeners are called while the store's (reentrant) lock is held, after the store has finished
changing: a drop is therefore reported before any later registration of the same keys can
return, and the workers see drop-then-load in that order. Listeners must be quick (hand the
record to a queue); they may read the store, and an exception in one is logged and swallowed,
because the change it reports has already happened.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from gateway.keystore.base import DropReason, KeyListener, KeyRecord, key_id_for, key_not_found
from models.errors import InvalidArgumentError, ResourceExhaustedError

logger = logging.getLogger(__name__)

MIB = 1024 * 1024

_Slot = tuple[str, str]  # (tenant, key_id): the same keys registered by two tenants are two records
_Dropped = list[tuple[KeyRecord, DropReason]]


class InMemoryKeyStore:
    """A thread-safe, LRU-by-bytes, TTL-from-last-use :class:`~gateway.keystore.base.KeyStore`.

    ``clock`` must not run backwards (tests pass a fake one); ``ttl_seconds`` may be ``math.inf``
    to keep records until they are evicted or deleted.
    """

    def __init__(self, *, budget_bytes: int, ttl_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not budget_bytes > 0:
            raise InvalidArgumentError(f"budget_bytes must be positive, got {budget_bytes}")
        if not ttl_seconds > 0:  # also refuses NaN
            raise InvalidArgumentError(f"ttl_seconds must be positive, got {ttl_seconds}")
        self._budget = budget_bytes
        self._ttl = ttl_seconds
        self._clock = clock
        self._lock = threading.RLock()
        self._records: OrderedDict[_Slot, KeyRecord] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._listeners: list[KeyListener] = []

    @property
    def budget_bytes(self) -> int:
        return self._budget

    @property
    def ttl_seconds(self) -> float:
        return self._ttl

    def put(
        self,
        *,
        tenant: str,
        model_name: str,
        model_version: str,
        relin: bytes,
        galois: bytes,
        profile: str = "standard",
        public_key: bytes = b"",
    ) -> tuple[KeyRecord, list[KeyRecord]]:
        """Register keys; see :meth:`gateway.keystore.base.KeyStore.put`."""
        # Hash outside the lock: tens of MB take a while, and hashlib releases the GIL meanwhile.
        key_id = key_id_for(
            model_name=model_name,
            model_version=model_version,
            relin=relin,
            galois=galois,
            profile=profile,
            public_key=public_key,
        )
        size = len(relin) + len(galois) + len(public_key)
        slot = (tenant, key_id)
        with self._changing() as (now, dropped):
            existing = self._records.get(slot)
            if existing is not None:
                return self._touch(slot, existing, now), []
            if size > self._budget:
                logger.info("refused keys of %d bytes for tenant %r: over the budget of %d", size, tenant, self._budget)
                raise ResourceExhaustedError(
                    f"keys of {size / MIB:.1f} MiB exceed the registry's budget of {self._budget / MIB:.1f} MiB "
                    f"({size} > {self._budget} bytes)"
                )
            evicted = self._make_room(size, now)
            dropped.extend((record, DropReason.EVICTED) for record in evicted)
            record = KeyRecord(
                key_id=key_id,
                tenant=tenant,
                model_name=model_name,
                model_version=model_version,
                profile=profile,
                relin=relin,
                galois=galois,
                public_key=public_key,
                created_at=now,
                last_used_at=now,
            )
            self._records[slot] = record
            self._bytes += size
            return record, evicted

    def get(self, key_id: str, *, tenant: str) -> KeyRecord:
        """The tenant's record, touched; see :meth:`gateway.keystore.base.KeyStore.get`."""
        slot = (tenant, key_id)
        with self._changing() as (now, _):
            record = self._records.get(slot)
            if record is None:
                raise key_not_found()
            return self._touch(slot, record, now)

    def delete(self, key_id: str, *, tenant: str) -> bool:
        """Remove the tenant's record; see :meth:`gateway.keystore.base.KeyStore.delete`."""
        with self._changing() as (_, dropped):
            record = self._records.pop((tenant, key_id), None)
            if record is None:
                return False
            self._bytes -= record.size
            dropped.append((record, DropReason.DELETED))
            return True

    def expire(self) -> list[KeyRecord]:
        """Drop and return the records whose time to live has run out (every other method does this too)."""
        with self._changing() as (_, dropped):
            return [record for record, _ in dropped]

    def stored_bytes(self) -> int:
        with self._changing():
            return self._bytes

    def records(self) -> list[KeyRecord]:
        """Every live record, least recently used first, untouched."""
        with self._changing():
            return list(self._records.values())

    def add_listener(self, listener: KeyListener) -> Callable[[], None]:
        """Subscribe ``listener`` to every drop from now on; the returned function unsubscribes it."""
        with self._lock:
            self._listeners.append(listener)

        def remove() -> None:
            with self._lock, suppress(ValueError):  # unsubscribing twice is harmless
                self._listeners.remove(listener)

        return remove

    @contextmanager
    def _changing(self) -> Iterator[tuple[float, _Dropped]]:
        """Hold the lock, drop what has expired, and tell the listeners about every drop on the way out.

        The body appends its own drops to the yielded list; they are reported even if it raises.
        """
        with self._lock:
            now = self._clock()
            dropped: _Dropped = [(record, DropReason.EXPIRED) for record in self._drop_expired(now)]
            try:
                yield now, dropped
            finally:
                self._notify(dropped)

    def _drop_expired(self, now: float) -> list[KeyRecord]:
        expired: list[KeyRecord] = []
        while self._records:
            slot, record = next(iter(self._records.items()))
            if now - record.last_used_at < self._ttl:
                break  # ordered by last use: every later record is fresher
            del self._records[slot]
            self._bytes -= record.size
            expired.append(record)
            logger.debug("expired key %s of tenant %r after %.0f s idle", record.key_id, record.tenant, self._ttl)
        return expired

    def _make_room(self, size: int, now: float) -> list[KeyRecord]:
        evicted: list[KeyRecord] = []
        while self._bytes + size > self._budget:
            _, record = self._records.popitem(last=False)
            self._bytes -= record.size
            evicted.append(record)
            logger.info(
                "evicted key %s of tenant %r (%d bytes, idle %.0f s) to make room for %d bytes",
                record.key_id,
                record.tenant,
                record.size,
                now - record.last_used_at,
                size,
            )
        return evicted

    def _touch(self, slot: _Slot, record: KeyRecord, now: float) -> KeyRecord:
        touched = record.model_copy(update={"last_used_at": now})
        self._records[slot] = touched
        self._records.move_to_end(slot)
        return touched

    def _notify(self, dropped: _Dropped) -> None:
        for record, reason in dropped:
            for listener in tuple(self._listeners):
                try:
                    listener(record, reason)
                except Exception:
                    logger.exception("key store listener %r failed on %s key %s", listener, reason, record.key_id)
