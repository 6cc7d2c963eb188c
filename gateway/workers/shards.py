"""Which worker slot owns a key set: rendezvous (highest random weight) hashing of the key id.

Each slot scores ``SHA-256(key id, slot)`` and the key set belongs to the highest score. Why
rendezvous hashing: it needs no ring or table, every replica computes the same owner from the key
id alone, and a slot's shard does not depend on which process fills the slot, so a replacement
worker owns exactly what its predecessor owned. The second-ranked slot is where a key set goes
when its owner is being replaced or is busy with it (see :mod:`gateway.workers.pool`).
"""

from __future__ import annotations

import hashlib


def ranked_slots(*, key_id: str, slots: int) -> list[int]:
    """Every slot in ``range(slots)``, the owner of ``key_id`` first, then by falling score."""
    return sorted(range(slots), key=lambda slot: _score(key_id, slot), reverse=True)


def owner_slot(*, key_id: str, slots: int) -> int:
    """The slot whose worker loads and serves ``key_id``."""
    return max(range(slots), key=lambda slot: _score(key_id, slot))


def _score(key_id: str, slot: int) -> bytes:
    return hashlib.sha256(f"{slot}\x00{key_id}".encode()).digest()
