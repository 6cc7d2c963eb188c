"""A key store on a Redis server: durable across restarts, shared by every gateway replica that names it.

Layout (every key under one prefix, ``hegate:keys:`` by default):

- ``blob:<key id>``: a hash with the serialized ``relin``, ``galois`` and ``public_key`` bytes, stored
  once per key id however many tenants register it (the id is the SHA-256 of the bytes, the model and
  the profile, and :meth:`RedisKeyStore.put` recomputes it, so two records with one id hold one content).
- ``refs:<key id>``: which tenants hold that key id (sorted set, score: when each one's record expires);
  the bytes go when the last of them does.
- the index: ``meta`` (hash: ``<key id>:<tenant>`` -> the entry as JSON, without bytes), ``used`` (sorted
  set: least recently used first, across tenants), ``tenant:<tenant>`` (the same order within a tenant),
  ``expiry`` (sorted set: when each record's time to live runs out), ``tenants`` (hash: tenant -> resident
  bytes held) and ``seq`` (the use counter that orders ``used``: a clock can tie, a counter cannot).

Redis expires the bytes of a key id when the last record using them expires, so abandoned keys vanish
even if no replica runs again. The index (a few hundred bytes per record) expires as one unit, an hour
after its latest record, so that it never refers to entries Redis has dropped and so that a replica that
was down or busy meanwhile still finds the expired entries: every operation first drops the records whose
time has run out and reports them to this replica's listeners.

Why Lua scripts (``redis.lua``, one script, an operation per call) and not MULTI/WATCH: an admission
reads the tenant's holdings and order, every tenant's holdings (the budget's fair share) and then
evicts and inserts. Under WATCH each of those keys would have to be watched, and replicas registering
at once would abort each other's transactions and retry without bound; a script runs as one step on
the server, in one round trip, so concurrent admissions from any number of replicas are serialized and
a quota can never be exceeded (``tests/test_keystore_redis.py`` hammers it from threads on two stores).
Redis writes a script's effects to its append-only file as one MULTI/EXEC, so a crash never leaves half
of one. The clock is Redis's own (``TIME`` inside the script), the one that also expires the keys:
replicas with skewed clocks agree on every time to live.

The key bytes (27.6 MiB for the default model) are not passed through the script: :meth:`put` first
asks without them (a key id already stored by any tenant needs no upload), and only on a miss uploads
them to a staging key that expires on its own after a minute, which the admission then renames into
place, or deletes if the registration is refused. A replica that dies mid-upload leaves no record and,
a minute later, no bytes. :meth:`get` reads the bytes with one ``HMGET`` after the script has checked
and touched the tenant's record.

A Redis at its ``maxmemory`` (with ``noeviction``) refuses the upload of new bytes, which becomes
:class:`~models.errors.ResourceExhaustedError`; the script itself may still run there (``allow-oom``),
so the keys Redis holds keep being served, touched, deleted and expired.

Outages: every Redis error that means "cannot be reached right now" (refused or dropped connection, a
timeout, Redis still loading its append-only file, a read-only replica) becomes one
:class:`~models.errors.UnavailableError` naming the store (never its password). Connections are made
on demand, so the store works again as soon as Redis does, without a restart. A call whose reply was
lost (a timeout after Redis ran the script) may have taken effect: every effect is whole, and
registering again is idempotent.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from importlib import resources
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from gateway.keystore.base import (
    KEY_ID_PREFIX,
    DropReason,
    KeyEntry,
    KeyLimits,
    KeyListener,
    KeyRecord,
    check_key_id,
    key_not_found,
)
from gateway.keystore.url import RedisLocation, parse_key_store_url
from models.errors import InternalError, InvalidArgumentError, ResourceExhaustedError, UnavailableError

logger = logging.getLogger(__name__)

MIB = 1 << 20
NAMESPACE = "hegate:keys:"
STAGE_SECONDS = 60  # a staged upload that no admission claims is gone after this
CONNECT_TIMEOUT_SECONDS = 1.0
TIMEOUT_SECONDS = 5.0  # per socket read or write: a 27.6 MiB upload is many of them
SCRIPT = resources.files(__package__).joinpath("redis.lua").read_text()
_KEY_ID = re.compile(rf"{re.escape(KEY_ID_PREFIX)}[0-9a-f]{{64}}")
_ENTRY_FIELDS = ("key_id", "tenant", "model_name", "model_version", "profile", "stored_bytes", "resident_bytes")
_T = TypeVar("_T")


class RedisKeyStore:
    """A :class:`~gateway.keystore.base.KeyStore` on Redis; see the module docstring for what it stores.

    ``namespace`` is the prefix of every key (one Redis database may hold several registries);
    ``connect_timeout_seconds`` and ``timeout_seconds`` bound how long a call waits on a Redis that does
    not answer. Thread-safe. Listeners hear the drops this replica makes or notices (see
    :data:`~gateway.keystore.base.KeyListener`), called in order while the store's lock is held, as in
    the in-memory store, so a drop is reported before a later registration through this object returns.
    """

    def __init__(
        self,
        *,
        url: str,
        limits: KeyLimits,
        namespace: str = NAMESPACE,
        connect_timeout_seconds: float = CONNECT_TIMEOUT_SECONDS,
        timeout_seconds: float = TIMEOUT_SECONDS,
    ) -> None:
        location = parse_key_store_url(url)
        if not isinstance(location, RedisLocation):
            raise InvalidArgumentError(f"RedisKeyStore needs a redis:// or rediss:// URL, got {location!r}")
        self.limits = limits
        self.location = location
        self._prefix = namespace
        self._ttl_ms = -1 if limits.ttl_seconds == float("inf") else max(1, round(limits.ttl_seconds * 1000))
        password = location.password.get_secret_value() if location.password else None
        self._client = redis.Redis(
            host=location.host,
            port=location.port,
            db=location.db,
            username=location.username,
            password=password,
            ssl=location.tls,
            socket_connect_timeout=connect_timeout_seconds,
            socket_timeout=timeout_seconds,
            retry=Retry(NoBackoff(), 0),  # a retried script could apply twice (delete would then answer False)
        )
        self._script = self._client.register_script(SCRIPT)
        self._lock = threading.RLock()
        self._listeners: list[KeyListener] = []

    def __repr__(self) -> str:
        return f"RedisKeyStore({self.location.display}, namespace={self._prefix!r})"

    # -- the KeyStore protocol ---------------------------------------------------------------------

    def put(self, record: KeyRecord) -> tuple[KeyRecord, list[KeyEntry]]:
        """Admit ``record`` atomically across replicas; see :meth:`gateway.keystore.base.KeyStore.put`.

        Raises:
            InvalidArgumentError: ``record.key_id`` is not the id of its keys (two tenants registering
                one id share its bytes, so an id must never name other bytes).
            ResourceExhaustedError: see :class:`~gateway.keystore.base.KeyLimits`.
            UnavailableError: Redis cannot be reached; nothing was admitted.
        """
        check_key_id(record)
        limits, size = self.limits, record.resident_bytes
        for bound, name in ((limits.tenant_bytes, "tenant's quota"), (limits.budget_bytes, "registry's budget")):
            if size > bound:
                raise ResourceExhaustedError(
                    f"keys holding {size / MIB:.1f} MiB once loaded exceed the {name} of {bound / MIB:.1f} MiB "
                    f"({size} > {bound} bytes)"
                )
        entry = json.dumps({name: getattr(record, name) for name in _ENTRY_FIELDS})
        stage = ""
        try:
            for _ in range(2):  # without the bytes, then (if no replica stored them) with them
                with self._changing() as dropped:
                    status, rest = self._run(
                        "put",
                        dropped,
                        record.tenant,
                        record.key_id,
                        entry,
                        self._ttl_ms,
                        limits.budget_bytes,
                        limits.tenant_bytes,
                        limits.tenant_key_sets,
                        stage,
                    )
                    if status == "ok":
                        stage = ""  # claimed or deleted by the script
                        evicted = [_entry(raw) for raw in rest[1]]
                        dropped.extend((victim, DropReason.EVICTED) for victim in evicted)
                        for victim in evicted:
                            logger.info(
                                "evicted key %s of tenant %r (%d resident bytes) for tenant %r's registration",
                                victim.key_id,
                                victim.tenant,
                                victim.resident_bytes,
                                record.tenant,
                            )
                        times = _entry(rest[0]).model_dump(include={"created_at", "last_used_at"})
                        return record.model_copy(update=times), evicted
                    if status == "full":
                        stage = ""
                        total, holders, largest = (int(value) for value in rest[0])
                        raise ResourceExhaustedError(
                            f"the key registry's budget of {limits.budget_bytes / MIB:.1f} MiB is full "
                            f"({total} bytes held by {holders} tenants counting this one; the largest holds "
                            f"{largest} bytes with this set if it is theirs, within its equal share of "
                            f"{limits.budget_bytes // holders}): "
                            f"retry after keys expire or are deleted"
                        )
                if stage:
                    break  # staged, and still missing: the staging key expired before the admission
                stage = self._stage(record)  # need_bytes: no replica holds this key id's bytes yet
            raise InternalError(f"key store {self.location.display}: the staged keys of {record.key_id} vanished")
        finally:
            if stage:  # the admission never ran on them: do not wait for their expiry
                with suppress(UnavailableError):
                    self._call(lambda: self._client.delete(stage))

    def get(self, key_id: str, *, tenant: str) -> KeyRecord:
        """The tenant's record with its bytes, touched; see :meth:`gateway.keystore.base.KeyStore.get`."""
        entry = self.touch(key_id, tenant=tenant)
        relin, galois, public_key = self._call(
            lambda: self._client.hmget(self._key("blob:", key_id), "relin", "galois", "public_key")
        )
        if relin is None or galois is None or public_key is None:
            self._lost(key_id, tenant)
            raise key_not_found()
        return KeyRecord(**entry.model_dump(), relin=relin, galois=galois, public_key=public_key)

    def touch(self, key_id: str, *, tenant: str) -> KeyEntry:
        """Mark the tenant's record as used; see :meth:`gateway.keystore.base.KeyStore.touch`."""
        if not _KEY_ID.fullmatch(key_id):
            raise key_not_found()
        with self._changing() as dropped:
            status, rest = self._run("touch", dropped, tenant, key_id, self._ttl_ms)
            if status != "ok":
                raise key_not_found()
            return _entry(rest[0])

    def delete(self, key_id: str, *, tenant: str) -> bool:
        """Remove the tenant's record; see :meth:`gateway.keystore.base.KeyStore.delete`."""
        if not _KEY_ID.fullmatch(key_id):
            return False
        with self._changing() as dropped:
            status, rest = self._run("delete", dropped, tenant, key_id)
            if status != "ok":
                return False
            dropped.append((_entry(rest[0]), DropReason.DELETED))
            return True

    def expire(self) -> list[KeyEntry]:
        """Drop and return the records whose time to live has run out (every other method does this too)."""
        with self._changing() as dropped:
            self._run("expire", dropped)
            return [entry for entry, _ in dropped]

    def entries(self, *, tenant: str | None = None) -> list[KeyEntry]:
        """Every live entry (of one tenant, or of all), least recently used first, untouched."""
        with self._changing() as dropped:
            _, rest = self._run("entries", dropped, *_scope(tenant))
            return [_entry(raw) for raw in rest[0]]

    def resident_bytes(self, *, tenant: str | None = None) -> int:
        """Resident bytes of the live records (of one tenant, or of all)."""
        with self._changing() as dropped:
            _, rest = self._run("resident", dropped, *_scope(tenant))
            return int(rest[0])

    def add_listener(self, listener: KeyListener) -> Callable[[], None]:
        """Subscribe ``listener`` to every drop this replica makes or notices; the returned function unsubscribes."""
        with self._lock:
            self._listeners.append(listener)

        def remove() -> None:
            with self._lock, suppress(ValueError):  # unsubscribing twice is harmless
                self._listeners.remove(listener)

        return remove

    def close(self) -> None:
        """Close the connections; the records stay in Redis."""
        self._client.close()

    # -- start-up check ------------------------------------------------------------------------------

    def check(self) -> None:
        """Fail now, in one line, if Redis cannot be reached; warn about settings that lose keys.

        Raises:
            UnavailableError: Redis does not answer (or refuses the credentials).
        """
        self._call(self._client.ping)
        try:
            info = self._client.info()
        except redis.RedisError as exc:  # INFO may be disabled on managed Redis: not a reason to stop
            logger.info("key store %s: INFO unavailable (%s); persistence not checked", self.location.display, exc)
            return
        if info.get("maxmemory_policy", "noeviction") != "noeviction":
            logger.warning(
                "key store %s: maxmemory-policy is %s; Redis may drop registered keys behind the store's back "
                "(set noeviction: the store's quotas decide what goes)",
                self.location.display,
                info["maxmemory_policy"],
            )
        if not info.get("aof_enabled"):
            logger.warning(
                "key store %s: Redis runs without its append-only file; keys registered since its last snapshot "
                "are lost when it restarts (run it with --appendonly yes)",
                self.location.display,
            )

    # -- internals -----------------------------------------------------------------------------------

    def _key(self, kind: str, key_id: str) -> str:
        return f"{self._prefix}{kind}{key_id}"

    def _stage(self, record: KeyRecord) -> str:
        """Upload the bytes under a fresh key that expires on its own; the admission claims it."""
        stage = self._key("stage:", f"{record.key_id}:{uuid.uuid4().hex}")
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(stage, mapping={"relin": record.relin, "galois": record.galois, "public_key": record.public_key})
        pipe.pexpire(stage, STAGE_SECONDS * 1000)
        self._call(pipe.execute)
        return stage

    def _lost(self, key_id: str, tenant: str) -> None:
        """The record outlived its bytes: Redis evicted them (or they went between two calls): drop it."""
        with self._changing() as dropped:
            status, rest = self._run("lost", dropped, tenant, key_id)
            if status == "ok":
                entry = _entry(rest[0])
                logger.warning(
                    "key store %s lost the bytes of key %s of tenant %r: is Redis's maxmemory-policy noeviction?",
                    self.location.display,
                    key_id,
                    tenant,
                )
                dropped.append((entry, DropReason.EVICTED))

    def _run(self, op: str, dropped: list[tuple[KeyEntry, DropReason]], *args: Any) -> tuple[str, list[Any]]:
        """Run one operation of the script; collect the expiries it swept into ``dropped``."""
        reply = self._call(lambda: self._script(args=[self._prefix, op, *args]))
        dropped.extend((_entry(raw), DropReason.EXPIRED) for raw in reply[1])
        return reply[0].decode(), reply[2:]

    def _call(self, action: Callable[[], _T]) -> _T:
        """Run one Redis call, with Redis's failures translated into the domain's error tree."""
        try:
            return action()
        except (redis.ConnectionError, redis.TimeoutError, redis.exceptions.ReadOnlyError) as exc:
            raise UnavailableError(f"key store {self.location.display} unavailable: {_one_line(exc)}") from None
        except redis.exceptions.OutOfMemoryError as exc:
            raise ResourceExhaustedError(
                f"key store {self.location.display} is out of memory (Redis maxmemory): {_one_line(exc)}"
            ) from None
        except redis.RedisError as exc:
            logger.exception("key store %s failed", self.location.display)
            raise InternalError(f"key store {self.location.display} failed: {_one_line(exc)}") from None

    @contextmanager
    def _changing(self) -> Iterator[list[tuple[KeyEntry, DropReason]]]:
        """Hold the lock; on the way out, tell the listeners about every drop collected, even after an error."""
        with self._lock:
            dropped: list[tuple[KeyEntry, DropReason]] = []
            try:
                yield dropped
            finally:
                self._notify(dropped)

    def _notify(self, dropped: list[tuple[KeyEntry, DropReason]]) -> None:
        for entry, reason in dropped:
            for listener in tuple(self._listeners):
                try:
                    listener(entry, reason)
                except Exception:
                    logger.exception("key store listener %r failed on %s key %s", listener, reason, entry.key_id)


def _entry(raw: bytes) -> KeyEntry:
    """An entry as the script stores it: JSON, times in Redis's milliseconds."""
    fields = json.loads(raw)
    fields["created_at"] = fields["created_at"] / 1000
    fields["last_used_at"] = fields["last_used_at"] / 1000
    return KeyEntry.model_validate(fields)


def _scope(tenant: str | None) -> tuple[str, str]:
    """Every tenant, or one (whatever its name: the empty string is a tenant, not "all")."""
    return ("all", "") if tenant is None else ("tenant", tenant)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
