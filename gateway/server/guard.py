"""The grpc.aio port's edge: the key check before any work, calls per peer, and the server options.

grpc.aio runs gRPC's C-core, which owns the sockets and the HTTP/2 framing; what Python can add
is its channel arguments (:func:`server_options`) and an interceptor (:class:`EdgeInterceptor`):

- **The key check before the message is read.** The interceptor sees a call's method and
  metadata when it is matched, before its message is read. A refused call gets a handler that
  takes the request as a stream and never reads it (grpc.aio reads a unary request before calling
  its handler), so UNAUTHENTICATED goes out at once and C-core drops the body with the stream.
- **Calls and bytes per peer.** At most ``max_peer_calls`` calls of one peer address (an IPv4
  address or an IPv6 /64) are in flight at once, holding at most ``peer_buffer_bytes`` of request
  messages while their handlers run (``total_buffer_bytes`` for all peers). Calls count until
  they are done, a reply waiting for the client's flow-control window included, so a peer that
  never reads its replies runs into its own limit and nobody else's. grpc.aio reads a unary
  request before its handler and keeps it referenced until the reply has been sent: a client that
  set its window to 0 pinned every request it sent (+348 MB of RSS in 3 s from 4 connections,
  measured with ``bench/attacks.py``). So unary methods are served as request streams read here,
  after the limits allow it. Above them: RESOURCE_EXHAUSTED. ``max_calls`` bounds all peers' calls.
- **The tenant** is bound in the handler's own context, so no servicer sees a call unchecked.
- **Drain on stop.** C-core cancels calls that reached it but were not yet matched to the
  application when the server shuts down, and grpc.aio matches them one at a time: 15 of 16
  encrypted calls sent as SIGTERM arrived were CANCELLED before this (issue 14). :meth:`drain`
  keeps serving for ``DRAIN_MIN_SECONDS`` and then until no call has been matched for
  ``DRAIN_QUIET_SECONDS`` (at most ``DRAIN_LIMIT_SECONDS``, and half the grace), so the calls that
  had arrived are all matched and get the rest of the grace to finish.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from urllib.parse import unquote

import grpc

from gateway.fastpath.edge import peer_key
from gateway.server.auth import Tenants, bind_tenant
from gateway.server.ratelog import RateLimitedLog
from gateway.settings import EdgeLimits
from models.errors import UnauthenticatedError

logger = logging.getLogger(__name__)
refusals = RateLimitedLog(logger, per_second=1.0, burst=10)

KEEPALIVE_SECONDS = 300  # the server pings an idle connection this often, to find dead peers
KEEPALIVE_TIMEOUT_SECONDS = 20
MIN_CLIENT_PING_SECONDS = 300  # C-core's default, stated: a client pinging more often without calls...
PING_STRIKES = 2  # ...gets this many strikes, then GOAWAY ENHANCE_YOUR_CALM ("too_many_pings")
DRAIN_MIN_SECONDS = 0.25  # calls already sent when SIGTERM came are matched well within this
DRAIN_QUIET_SECONDS = 0.05
DRAIN_LIMIT_SECONDS = 1.0


def server_options(limits: EdgeLimits, max_message_bytes: int) -> list[tuple[str, int]]:
    """C-core's channel arguments for the grpc.aio port, from the gateway's edge limits."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second gateway on the same port must fail, not share it
        ("grpc.max_concurrent_streams", limits.max_concurrent_streams),
        ("grpc.max_metadata_size", limits.max_header_bytes),
        ("grpc.max_allowed_incoming_connections", limits.max_connections),
        ("grpc.max_connection_idle_ms", int(limits.idle_seconds * 1000)),
        ("grpc.max_connection_age_ms", int(limits.connection_age_seconds * 1000)),
        ("grpc.max_connection_age_grace_ms", int(limits.request_seconds * 1000)),
        ("grpc.keepalive_time_ms", KEEPALIVE_SECONDS * 1000),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_SECONDS * 1000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_SECONDS * 1000),
        ("grpc.http2.max_ping_strikes", PING_STRIKES),
    ]


def grpc_peer_key(peer: str) -> str:
    """The peer of a grpc.aio ``context.peer()`` string (``ipv4:1.2.3.4:5``, ``ipv6:%5B::1%5D:5``)."""
    kind, _, rest = unquote(peer).partition(":")
    host = rest.rpartition(":")[0].strip("[]") if kind in ("ipv4", "ipv6") else rest
    return peer_key((host,))


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    """The key check, the tenant and the calls-per-peer limit for every call of the grpc.aio port."""

    def __init__(self, tenants: Tenants, limits: EdgeLimits) -> None:
        self._tenants = tenants
        self._limits = limits
        self._calls: Counter[str] = Counter()  # calls in flight per peer
        self._bytes: Counter[str] = Counter()  # request bytes those calls hold
        self.held = 0  # request bytes of all calls in flight
        self._loop = asyncio.get_running_loop()
        self.last_call = self._loop.time()

    async def intercept_service(self, continuation, handler_call_details):
        self.last_call = self._loop.time()
        try:
            tenant = self._tenants.authenticate(handler_call_details.method, handler_call_details.invocation_metadata)
        except UnauthenticatedError as exc:
            handler = await continuation(handler_call_details)
            refusals.info("grpc.aio: %s refused: %s", handler_call_details.method, exc)
            return None if handler is None else _unread_refusal(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return self._guarded(handler, tenant)

    def _enter(self, context) -> str | None:
        """Count a call against its peer's limit until it is done; or the reason it is refused
        (the peer is at its call limit, or already holds its whole byte budget)."""
        peer = grpc_peer_key(context.peer())
        limits = self._limits
        if self._calls[peer] >= limits.max_peer_calls:
            refusal = f"{self._calls[peer]} calls in flight from this address"
        elif self._bytes[peer] >= limits.peer_buffer_bytes:
            refusal = f"this address already holds {self._bytes[peer]} bytes of calls"
        else:
            self._calls[peer] += 1
            context.add_done_callback(lambda _: self._leave(peer))
            return None
        refusals.info("grpc.aio: refusing a call from %s: %s", peer, refusal)
        return f"{refusal}; retry when they finish"

    def _hold(self, context, size: int) -> str | None:
        peer = grpc_peer_key(context.peer())
        if self._bytes[peer] + size > self._limits.peer_buffer_bytes:
            refusal = f"this address already holds {self._bytes[peer]} bytes of calls"
        elif self.held + size > self._limits.total_buffer_bytes:
            refusal = f"the gateway already holds {self.held} bytes of calls"
        else:
            self._bytes[peer] += size
            self.held += size
            return None
        refusals.info("grpc.aio: refusing a call from %s: %s", peer, refusal)
        return f"{refusal}; retry when they finish"

    def _release(self, context, size: int) -> None:
        peer = grpc_peer_key(context.peer())
        self._bytes[peer] -= size
        self.held -= size
        if self._bytes[peer] <= 0:
            del self._bytes[peer]

    def _leave(self, peer: str) -> None:
        self._calls[peer] -= 1
        if self._calls[peer] <= 0:
            del self._calls[peer]

    def _guarded(self, handler: grpc.RpcMethodHandler, tenant: str | None) -> grpc.RpcMethodHandler:
        """The handler, behind the limits. A unary method is served as a request stream that is
        read only once the peer's limits allow it: grpc.aio reads a unary request before its
        handler runs and keeps it referenced until the reply has been sent, and that is how a
        client with a window of 0 pinned every request it sent. Read here, the request lives only
        while the handler runs, and its bytes count only then; the call counts until it is done."""

        def wrap(behaviour, unary: bool):
            async def guarded(request_iterator, context):
                refusal = self._enter(context)
                if refusal is not None:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
                if tenant is not None:
                    bind_tenant(tenant)
                if not unary:
                    return await behaviour(request_iterator, context)
                messages = aiter(request_iterator)
                request = await anext(messages, None)
                if hasattr(messages, "aclose"):  # grpc.aio's receiver keeps the last message's bytes
                    await messages.aclose()
                if request is None:
                    await context.abort(grpc.StatusCode.INTERNAL, "a unary call without its request message")
                size = request.ByteSize()
                refusal = self._hold(context, size)
                if refusal is not None:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
                try:
                    return await behaviour(request, context)
                finally:
                    self._release(context, size)

            return guarded

        if handler.unary_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                wrap(handler.unary_unary, True),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return handler._replace(stream_unary=wrap(handler.stream_unary, False))
        return handler  # streaming replies: open services only (reflection)

    async def drain(self, limit: float) -> None:
        """Keep matching calls for ``DRAIN_MIN_SECONDS``, then until none has arrived for
        ``DRAIN_QUIET_SECONDS``; at most ``limit`` seconds (and ``DRAIN_LIMIT_SECONDS``)."""
        started = self._loop.time()
        deadline = started + min(limit, DRAIN_LIMIT_SECONDS)
        while self._loop.time() < deadline and (
            self._loop.time() - started < DRAIN_MIN_SECONDS or self._loop.time() - self.last_call < DRAIN_QUIET_SECONDS
        ):
            await asyncio.sleep(DRAIN_QUIET_SECONDS / 4)


def _unread_refusal(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that refuses without reading the request, whatever the method's shape."""

    async def refuse(request_iterator, context):
        await context.abort(code, message)

    return grpc.stream_unary_rpc_method_handler(refuse)
