"""The one place that turns the ``key_store`` setting into a store: ``memory`` or a Redis URL."""

from __future__ import annotations

from gateway.keystore.base import KeyLimits, KeyStore
from gateway.keystore.memory import InMemoryKeyStore
from gateway.keystore.redis import RedisKeyStore
from gateway.keystore.url import MEMORY, parse_key_store_url


def open_key_store(url: str, *, limits: KeyLimits) -> KeyStore:
    """The store that ``url`` names, checked: a Redis that cannot be reached stops the caller now.

    ``memory``: this process's :class:`InMemoryKeyStore` (one replica; keys vanish with it).
    ``redis://[[user]:password@]host[:port][/db]`` or ``rediss://...`` (TLS): a :class:`RedisKeyStore`,
    shared by every replica that names the same database.

    Raises:
        InvalidArgumentError: ``url`` is neither.
        UnavailableError: Redis does not answer (one line naming the URL without its password).
    """
    location = parse_key_store_url(url)
    if location == MEMORY:
        return InMemoryKeyStore(limits=limits)
    store = RedisKeyStore(url=url, limits=limits)
    try:
        store.check()
    except BaseException:
        store.close()
        raise
    return store
