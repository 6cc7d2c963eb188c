"""The evaluation-key registry: clients upload keys once and then name them by key id.

``base`` holds the contract (:class:`KeyRecord`, :func:`key_id_for`, the :class:`KeyStore`
protocol); ``memory`` the single-replica store. A store shared by several replicas implements
the same protocol.
"""

from gateway.keystore.base import (
    KEY_NOT_FOUND_MESSAGE,
    DropReason,
    KeyEntry,
    KeyLimits,
    KeyListener,
    KeyRecord,
    KeyStore,
    key_id_for,
    key_not_found,
)
from gateway.keystore.memory import InMemoryKeyStore

__all__ = [
    "KEY_NOT_FOUND_MESSAGE",
    "DropReason",
    "InMemoryKeyStore",
    "KeyEntry",
    "KeyLimits",
    "KeyListener",
    "KeyRecord",
    "KeyStore",
    "key_id_for",
    "key_not_found",
]
