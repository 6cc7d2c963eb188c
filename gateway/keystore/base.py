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

from models.errors import NotFoundError

KEY_ID_PREFIX = "k2-"  # bump the digit whenever the hashed encoding changes (k2: the profile and public key)
_HASH_DOMAIN = b"hegate/evaluation-keys/v2"

KEY_NOT_FOUND_MESSAGE = (
    "evaluation keys not registered (unknown, expired or evicted key id); register the keys again, then retry"
)
"""One message for every miss, so a tenant cannot tell another tenant's id from one that never existed."""


class KeyRecord(BaseModel):
    """One tenant's registered evaluation keys for one model version and CKKS profile, as validated bytes.

    The bytes are kept as SEAL serialized them; deserialized keys live in the workers, which the
    owner of the store refills from :meth:`KeyStore.records` when one restarts. Records are
    immutable: touching one replaces it with a copy carrying the new ``last_used_at``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    key_id: str
    tenant: str
    model_name: str
    model_version: str
    profile: str = Field(default="standard", description="the CKKS profile whose spec the keys were made from")
    relin: bytes = Field(repr=False, description="serialized relinearization keys")
    galois: bytes = Field(repr=False, description="serialized Galois keys")
    public_key: bytes = Field(default=b"", repr=False, description="serialized public key (circuit_private only)")
    created_at: float = Field(description="store clock reading at first registration")
    last_used_at: float = Field(description="store clock reading at the last put or get; the TTL runs from here")

    @property
    def size(self) -> int:
        """Bytes this record counts against the store's budget (the key bytes; metadata is noise)."""
        return len(self.relin) + len(self.galois) + len(self.public_key)


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


def key_not_found() -> NotFoundError:
    """The one error every store raises for a key id the asking tenant cannot use."""
    return NotFoundError(KEY_NOT_FOUND_MESSAGE)


class DropReason(StrEnum):
    """Why a record left the store, as reported to listeners."""

    EVICTED = "evicted"  # pushed out by a newer registration when the byte budget was full
    EXPIRED = "expired"  # unused for longer than the time to live
    DELETED = "deleted"  # removed on its tenant's request


KeyListener = Callable[[KeyRecord, DropReason], None]
"""Called once for every record that leaves a store, so that mirrors (the workers) drop it too."""


class KeyStore(Protocol):
    """A registry of evaluation-key bytes, bounded in bytes and in time, isolated per tenant.

    Implementations may be local (:class:`~gateway.keystore.memory.InMemoryKeyStore`) or shared
    by several gateway replicas. Every method may first drop records whose time to live has run
    out; listeners hear about those as well as about evictions and deletions.
    """

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
        """Register keys (validated by the caller) and return the stored record and the records evicted for room.

        Registering content the tenant already holds refreshes that record and evicts nothing.
        Raises :class:`~models.errors.ResourceExhaustedError` if the keys alone exceed the budget.
        """
        ...

    def get(self, key_id: str, *, tenant: str) -> KeyRecord:
        """The tenant's record under ``key_id``, marked as just used (it moves to the back of the eviction line).

        Raises :class:`~models.errors.NotFoundError` with :data:`KEY_NOT_FOUND_MESSAGE` for any miss.
        """
        ...

    def delete(self, key_id: str, *, tenant: str) -> bool:
        """Remove the tenant's record under ``key_id``; False if the tenant holds no such record."""
        ...

    def expire(self) -> list[KeyRecord]:
        """Drop every record whose time to live has run out now, and return them."""
        ...

    def stored_bytes(self) -> int:
        """Bytes of live records counted against the budget."""
        ...

    def records(self) -> list[KeyRecord]:
        """Every live record, least recently used first, without touching any (for replaying into a worker)."""
        ...

    def add_listener(self, listener: KeyListener) -> Callable[[], None]:
        """Call ``listener`` for every record that leaves the store from now on; return a function that unsubscribes."""
        ...
