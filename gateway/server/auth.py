"""API keys to tenants, checked once per call: by :class:`Tenants`, which the grpc.aio server's
interceptor and the fast path (:mod:`gateway.fastpath`) both call.

A call presents its key in the ``x-api-key`` metadata header or as ``authorization: Bearer <key>``.
Without configured keys every call belongs to the tenant ``anonymous`` (the loopback default);
with keys, a call without a known one is refused with UNAUTHENTICATED before any servicer runs.
Health checks and reflection stay open, as load balancers and tools expect. The tenant travels
to the servicer in a context variable: grpc.aio shares it between interceptor and handler, and
the fast path runs each call in a task of its own.
"""

from __future__ import annotations

import contextvars
import hmac

import grpc

from models.errors import UnauthenticatedError

ANONYMOUS = "anonymous"
API_KEY_HEADER = "x-api-key"
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("hegate_tenant", default=ANONYMOUS)


def current_tenant() -> str:
    """The tenant of the call being served."""
    return _tenant.get()


def presented_key(metadata) -> str | None:
    for key, value in metadata or ():
        if key == API_KEY_HEADER:
            return value
        if key == "authorization" and value.lower().startswith("bearer "):
            return value[7:].strip()
    return None


class Tenants:
    """API keys to tenants: admits a call as its tenant, or refuses it."""

    def __init__(self, api_keys: dict[str, str]) -> None:
        self._keys = dict(api_keys)

    def _tenant_for(self, key: str | None) -> str | None:
        if not self._keys:
            return ANONYMOUS
        if key is None:
            return None
        for known, tenant in self._keys.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                return tenant
        return None

    def admit(self, method: str, metadata) -> None:
        """Make the call's tenant the current one (open services need none).

        Raises:
            UnauthenticatedError: no key, or one the configuration does not know.
        """
        if method.startswith(OPEN_SERVICES):
            return
        key = presented_key(metadata)
        tenant = self._tenant_for(key)
        if tenant is None:
            raise UnauthenticatedError("missing API key (x-api-key header)" if key is None else "unknown API key")
        _tenant.set(tenant)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """:meth:`Tenants.admit` for every call of the grpc.aio server."""

    def __init__(self, tenants: Tenants) -> None:
        self._tenants = tenants

    async def intercept_service(self, continuation, handler_call_details):
        try:
            self._tenants.admit(handler_call_details.method, handler_call_details.invocation_metadata)
        except UnauthenticatedError as exc:
            return _refusal(await continuation(handler_call_details), str(exc))
        return await continuation(handler_call_details)


def _refusal(handler: grpc.RpcMethodHandler | None, message: str) -> grpc.RpcMethodHandler | None:
    """A handler of the same shape as ``handler`` that aborts with UNAUTHENTICATED."""
    if handler is None:
        return None

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(streaming)
    return grpc.unary_unary_rpc_method_handler(unary)
