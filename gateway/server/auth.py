"""API keys to tenants, checked once per call before any of its message is read: by
:class:`Tenants`, which the grpc.aio server's interceptor and the fast path
(:mod:`gateway.fastpath`, on the call's HEADERS) both call.

A call presents its key in the ``x-api-key`` metadata header or as ``authorization: Bearer <key>``;
both are trimmed of surrounding white space. Without configured keys every call belongs to the
tenant ``anonymous`` (the loopback default); with keys, a call without a known one is refused with
UNAUTHENTICATED before any servicer runs. Health checks and reflection stay open, as load
balancers and tools expect.

What the key check rests on: the configured keys are kept only as SHA-256 digests, a presented
key is digested, and the digest is compared with every configured one by
:func:`hmac.compare_digest`, all of them every time. Digests have one length, so neither the
comparison's time nor its number reveals how long a configured key is, how much of it a guess
matched, or where in the table it sits.

Failing closed: the tenant travels to the servicer in a context variable that has no default.
:func:`current_tenant` raises UNAUTHENTICATED when no check has set it, so a code path that skipped
the check cannot act as some default tenant. The fast path binds the tenant in the task that runs
the call; the grpc.aio interceptor binds it in the handler it returns.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac

from models.errors import UnauthenticatedError

ANONYMOUS = "anonymous"
API_KEY_HEADER = "x-api-key"
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_tenant: contextvars.ContextVar[str | None] = contextvars.ContextVar("hegate_tenant", default=None)


def current_tenant() -> str:
    """The tenant of the call being served.

    Raises:
        UnauthenticatedError: no key check ran for this call (a bug, refused rather than guessed).
    """
    tenant = _tenant.get()
    if tenant is None:
        raise UnauthenticatedError("no tenant was established for this call")
    return tenant


def bind_tenant(tenant: str) -> None:
    """Make ``tenant`` the current call's tenant (its task or handler context)."""
    _tenant.set(tenant)


def presented_key(metadata) -> str | None:
    """The key a call presents, trimmed: ``x-api-key`` or ``authorization: Bearer``."""
    for key, value in metadata or ():
        if key == API_KEY_HEADER:
            return value.strip()
        if key == "authorization" and value[:7].lower() == "bearer ":
            return value[7:].strip()
    return None


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


class Tenants:
    """API keys to tenants: names a call's tenant, or refuses it."""

    def __init__(self, api_keys: dict[str, str]) -> None:
        self._digests = [(_digest(key), tenant) for key, tenant in api_keys.items()]

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def _tenant_for(self, key: str) -> str | None:
        """Every digest is compared, whatever matched: constant work for a given table."""
        presented = _digest(key)
        found = None
        for digest, tenant in self._digests:
            if hmac.compare_digest(digest, presented):
                found = tenant
        return found

    def authenticate(self, method: str, metadata) -> str | None:
        """The call's tenant; ``None`` for an open service (health, reflection), which needs none.

        Raises:
            UnauthenticatedError: keys are configured and the call has none, or one they do not know.
        """
        if method.startswith(OPEN_SERVICES):
            return None
        if not self._digests:
            return ANONYMOUS
        key = presented_key(metadata)
        tenant = None if key is None else self._tenant_for(key)
        if tenant is None:
            raise UnauthenticatedError("missing API key (x-api-key header)" if key is None else "unknown API key")
        return tenant
