"""The key registry's contract: what a record is, how its id is made, what every store does.

A key id is a content hash of the evaluation keys and the model they were made for, so a client
that registers the same keys twice gets the same id back and the store keeps one copy. The
tenant is deliberately not hashed: ids are public-key fingerprints, not secrets, and isolation
between tenants comes from the store, which files every record under ``(tenant, key_id)`` and
answers "not found" to anyone but the tenant that registered it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from enum import StrEnum
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field

from models.errors import InvalidArgumentError, NotFoundError

KEY_ID_PREFIX = "k2-"  # bump the digit whenever the hashed encoding changes (k2: the profile and public key)
_HASH_DOMAIN = b"hegate/evaluation-keys/v2"

KEY_NOT_FOUND_MESSAGE = (
    "evaluation keys not registered (unknown, expired or evicted key id); register the keys again, then retry"
)
"""One message for every miss, so a tenant cannot tell another tenant's id from one that never existed."""


class KeyLimits(BaseModel):
    """What the registry may hold, in the bytes that the workers hold (see :attr:`KeyRecord.resident_bytes`).

    A store enforces these at :meth:`KeyStore.put`. Quotas make tenants independent: a registration
    that takes a tenant over its quota evicts that tenant's own least recently used key sets, never
    another tenant's. The global budget protects the machine: when it is full, the newcomer evicts
    the least recently used set of the tenant holding the most bytes, and only while that tenant
    holds more than an equal share (budget / tenants holding keys, the newcomer's tenant counted);
    otherwise the registration is refused (RESOURCE_EXHAUSTED). One tenant can thus never flush
    another tenant that stays within its share.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    budget_bytes: int = Field(gt=0, description="resident bytes of every tenant's key sets together")
    tenant_bytes: int = Field(gt=0, description="resident bytes of one tenant's key sets")
    tenant_key_sets: int = Field(gt=0, description="key sets one tenant may hold")
    ttl_seconds: float = Field(gt=0, description="a key set unused this long is dropped (math.inf: never)")


class KeyEntry(BaseModel):
    """A registered key set without its bytes: what listings, quotas and routing need."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    key_id: str
    tenant: str
    model_name: str
    model_version: str
    profile: str = Field(default="standard", description="the CKKS profile whose spec the keys were made from")
    stored_bytes: int = Field(ge=0, description="serialized bytes (relin + galois + public key) as stored")
    resident_bytes: int = Field(
        ge=0, description="bytes one worker holds once the keys are deserialized; quotas and the budget count these"
    )
    created_at: float = Field(description="wall clock (time.time()) at first registration: replicas share it")
    last_used_at: float = Field(description="wall clock at the last put, get or touch; the TTL runs from here")


class KeyRecord(KeyEntry):
    """One tenant's registered evaluation keys for one model version and CKKS profile, as validated bytes.

    The bytes are kept as SEAL serialized them; deserialized keys live in the workers (one worker
    per key set), which load them from the store when they first need them. Records are
    immutable: touching one returns a copy carrying the new ``last_used_at``.
    """

    relin: bytes = Field(repr=False, description="serialized relinearization keys")
    galois: bytes = Field(repr=False, description="serialized Galois keys")
    public_key: bytes = Field(default=b"", repr=False, description="serialized public key (circuit_private only)")

    @property
    def size(self) -> int:
        """Serialized bytes of the keys (what the store and the wire carry)."""
        return len(self.relin) + len(self.galois) + len(self.public_key)

    @property
    def entry(self) -> KeyEntry:
        """The record without its bytes."""
        return KeyEntry.model_validate(self.model_dump(include=set(KeyEntry.model_fields)))


def key_id_for(
    *,
    model_name: str,
    model_version: str,
    relin: bytes,
    galois: bytes,
    profile: str = "standard",
    public_key: bytes = b"",
) -> str:
    """The content-addressed id of evaluation keys made for one model version and profile.

    Every field is length-prefixed before hashing so that no two different inputs share an
    encoding (``("ab", "c")`` and ``("a", "bc")`` hash differently). The model and the profile are
    part of the input because the same key bytes registered for another model or profile are a
    different registration (another plan evaluates with them).
    """
    digest = hashlib.sha256(_HASH_DOMAIN)
    for part in (model_name.encode(), model_version.encode(), profile.encode(), relin, galois, public_key):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return KEY_ID_PREFIX + digest.hexdigest()


def check_key_id(record: KeyRecord) -> None:
    """Refuse a record whose key id is not the content hash of its keys: every store files bytes by
    that id, and two tenants registering one id must be registering the same keys.

    Raises:
        InvalidArgumentError: the id does not match (hashing costs ~30 ms for the default model's keys).
    """
    expected = key_id_for(
        model_name=record.model_name,
        model_version=record.model_version,
        relin=record.relin,
        galois=record.galois,
        profile=record.profile,
        public_key=record.public_key,
    )
    if record.key_id != expected:
        raise InvalidArgumentError(f"key id {record.key_id!r} is not the id of the keys it names ({expected})")


def key_not_found() -> NotFoundError:
    """The one error every store raises for a key id the asking tenant cannot use."""
    return NotFoundError(KEY_NOT_FOUND_MESSAGE)


class DropReason(StrEnum):
    """Why a record left the store, as reported to listeners."""

    EVICTED = "evicted"  # pushed out by a newer registration (the tenant's quota, or the budget's fair share)
    EXPIRED = "expired"  # unused for longer than the time to live
    DELETED = "deleted"  # removed on its tenant's request


KeyListener = Callable[[KeyEntry, DropReason], None]
"""Called once for every record this process sees leave a store, so that the workers unload it too.

A store shared by replicas reports the drops this replica made (its evictions and deletions, the
expiries it notices); keys that leave through another replica stay loaded here until they have
been idle for the time to live, and serve only their own tenant meanwhile.
"""


class KeyStore(Protocol):
    """A registry of evaluation-key bytes, bounded by :class:`KeyLimits`, isolated per tenant.

    Implementations: :class:`~gateway.keystore.memory.InMemoryKeyStore` (one replica, the
    default) and :class:`~gateway.keystore.redis.RedisKeyStore` (durable, shared by replicas).
    Every method may first drop records whose time to live has run out; listeners hear about
    those as well as about evictions and deletions. Every method of a remote store raises
    :class:`~models.errors.UnavailableError` when the store cannot be reached (one line that
    names the store, never a traceback), and changes nothing then.
    """

    limits: KeyLimits

    def put(self, record: KeyRecord) -> tuple[KeyRecord, list[KeyEntry]]:
        """Store a checked record (the caller has validated the keys and measured ``resident_bytes``).

        Returns the stored record and the entries evicted to make room (see :class:`KeyLimits`).
        Registering a key id the tenant already holds refreshes that record and evicts nothing.

        Raises:
            ResourceExhaustedError: the set alone exceeds the tenant's quota, or the budget is full
                and no tenant holds more than its share.
            UnavailableError: the store cannot be reached.
        """
        ...

    def get(self, key_id: str, *, tenant: str) -> KeyRecord:
        """The tenant's record under ``key_id`` with its bytes, marked as just used.

        Raises :class:`~models.errors.NotFoundError` with :data:`KEY_NOT_FOUND_MESSAGE` for any miss.
        """
        ...

    def touch(self, key_id: str, *, tenant: str) -> KeyEntry:
        """Mark the tenant's record as just used without reading its bytes (every call that uses loaded keys).

        Raises :class:`~models.errors.NotFoundError` with :data:`KEY_NOT_FOUND_MESSAGE` for any miss.
        """
        ...

    def delete(self, key_id: str, *, tenant: str) -> bool:
        """Remove the tenant's record under ``key_id``; False if the tenant holds no such record."""
        ...

    def expire(self) -> list[KeyEntry]:
        """Drop every record whose time to live has run out now, and return them."""
        ...

    def entries(self, *, tenant: str | None = None) -> list[KeyEntry]:
        """Every live entry (of one tenant, or of all), least recently used first, untouched."""
        ...

    def resident_bytes(self, *, tenant: str | None = None) -> int:
        """Resident bytes of the live records (of one tenant, or of all) counted against the limits."""
        ...

    def add_listener(self, listener: KeyListener) -> Callable[[], None]:
        """Call ``listener`` for every record that leaves the store from now on; return a function that unsubscribes."""
        ...

    def close(self) -> None:
        """Release connections (the records stay where a durable store keeps them)."""
        ...
