"""The fast path's server: hegate's own asyncio HTTP/2 listener for unary gRPC methods.

Why a second server beside grpc.aio: a grpc.aio server that does nothing at all still spends
about 0.23 ms of CPU per call on this kind of machine, more than the whole plaintext inference
(7-100 us), because every event crosses from gRPC's C-core threads to the event loop. Serving
the Open Inference Protocol straight from an asyncio protocol removes that hop and leaves the
same servicers to do the work (``bench/results/peer.md`` measures both).

What it serves is a fixed table of unary methods, each the same servicer method that grpc.aio
serves, called with a :class:`FastPathContext` in place of grpc.aio's. API keys, TLS (mutual
too), the message size limit and the edge limits are the gateway's own settings; streaming
methods, encodings other than gzip and deflate, and anything not in the table get a gRPC status,
never a dropped connection.

TLS is started by each connection after its peer has been admitted (connection limits, penalty),
with ``loop.start_tls``: a refused peer costs no handshake, and a connection still in its handshake
counts against the limits like any other.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from gateway.fastpath.connection import Http2Connection, Reply, Request
from gateway.fastpath.edge import Edge, Limits
from gateway.fastpath.frames import UnknownEncodingError, grpc_message, parse_timeout
from gateway.server.auth import Tenants, bind_tenant
from gateway.server.ratelog import RateLimitedLog
from gateway.settings import TlsSettings
from gateway.status import status_for
from models.errors import HegateError

logger = logging.getLogger(__name__)
failures = RateLimitedLog(logger, per_second=1.0, burst=10)  # a request can trigger one; a flood must not flood the log


class FastPathAbort(grpc.aio.AbortError):
    """Raised by :meth:`FastPathContext.abort`; a grpc.aio abort, so servicer wrappers let it pass."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class FastPathContext:
    """The part of ``grpc.aio.ServicerContext`` that hegate's unary servicers use."""

    def __init__(self, metadata: list[tuple[str, str]], timeout: float | None) -> None:
        self._metadata = tuple(metadata)
        self._deadline = None if timeout is None else time.monotonic() + timeout

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise FastPathAbort(code, details)


@dataclass(frozen=True)
class Route:
    parse: Callable[[bytes], Message]
    method: Callable[[Message, FastPathContext], Awaitable[Message]]


def routes(servicer: object, service: ServiceDescriptor) -> dict[str, Route]:
    """``/package.Service/Method`` -> the servicer's method, for each unary-unary method of ``service``."""
    return {
        f"/{service.full_name}/{method.name}": Route(
            GetMessageClass(method.input_type).FromString, getattr(servicer, method.name)
        )
        for method in service.methods
        if not method.client_streaming and not method.server_streaming
    }


def server_ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """TLS 1.2+ offering only ``h2``; with a client CA, a client certificate is required."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    context.set_alpn_protocols(["h2"])
    if tls.client_ca_file is not None:
        context.load_verify_locations(tls.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class FastPathServer:
    """``await start(address)`` returns the port; ``await stop(grace)`` finishes in-flight calls."""

    def __init__(self, table: dict[str, Route], tenants: Tenants, limits: Limits, tls: TlsSettings | None) -> None:
        self._table = table
        self._limits = limits
        self._ssl = server_ssl_context(tls) if tls is not None else None
        self.edge = Edge(limits, tenants)

    @property
    def _connections(self) -> set[Http2Connection]:
        return self.edge.connections

    async def start(self, address: str) -> int:
        host, _, port = address.rpartition(":")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Http2Connection(self.handle, self.edge, self._ssl),
            host.strip("[]"),
            int(port),
            reuse_address=True,
            backlog=1024,
        )
        return self._server.sockets[0].getsockname()[1]

    async def handle(self, request: Request) -> Reply:
        """One call, start to end: route, parse, run; every failure becomes a status. The key
        was checked on the call's HEADERS: its tenant arrives with the request."""
        route = self._table.get(request.path)
        if route is None:
            return Reply(grpc.StatusCode.UNIMPLEMENTED, f"{request.path} is not served on the fast path")
        if request.tenant is not None:
            bind_tenant(request.tenant)
        try:
            timeout = None
            if request.timeout is not None:  # counted from the call's headers, not from here
                elapsed = asyncio.get_running_loop().time() - request.received_at
                timeout = parse_timeout(request.timeout) - elapsed
                if timeout <= 0:
                    return Reply(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded before the call started")
            message = route.parse(grpc_message(request.body, request.encoding, self._limits.max_message_bytes))
            del request.body[:]  # parsed: its bytes are not needed while the call runs
        except UnknownEncodingError as exc:
            return Reply(grpc.StatusCode.UNIMPLEMENTED, str(exc))
        except HegateError as exc:  # a refused key, a malformed or oversized message
            return Reply(status_for(exc), str(exc))
        except DecodeError as exc:
            return Reply(grpc.StatusCode.INVALID_ARGUMENT, f"undecodable request message: {exc}")
        try:
            async with asyncio.timeout(timeout):
                response = await route.method(message, FastPathContext(request.metadata, timeout))
            return Reply(body=response.SerializeToString())
        except FastPathAbort as exc:
            return Reply(exc.code, exc.details)
        except TimeoutError:
            return Reply(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        except Exception:
            failures.exception("fast path: %s failed", request.path)
            return Reply(grpc.StatusCode.INTERNAL, "internal error; it has been logged")

    async def stop(self, grace: float) -> None:
        """Stop accepting, send GOAWAY, give open calls ``grace`` seconds to finish and their
        replies to drain, then drop whatever connection is left."""
        self._server.close()
        connections = list(self._connections)
        for connection in connections:
            connection.go_away()
        if connections:
            waits = [asyncio.ensure_future(c.closed.wait()) for c in connections]
            _, pending = await asyncio.wait(waits, timeout=grace)
            for wait in pending:
                wait.cancel()
        for connection in connections:
            if not connection.closed.is_set():
                connection.abort()
        await self._server.wait_closed()
