"""The evaluation-key registry: clients upload keys once and then name them by key id.

``base`` holds the contract (:class:`KeyRecord`, :func:`key_id_for`, the :class:`KeyStore`
protocol); ``memory`` the single-replica store; ``redis`` the durable store shared by replicas;
``factory`` picks one from the ``key_store`` setting (``url`` parses it).
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
from gateway.keystore.factory import open_key_store
from gateway.keystore.memory import InMemoryKeyStore
from gateway.keystore.redis import RedisKeyStore

__all__ = [
    "KEY_NOT_FOUND_MESSAGE",
    "DropReason",
    "InMemoryKeyStore",
    "KeyEntry",
    "KeyLimits",
    "KeyListener",
    "KeyRecord",
    "KeyStore",
    "RedisKeyStore",
    "key_id_for",
    "key_not_found",
    "open_key_store",
]
