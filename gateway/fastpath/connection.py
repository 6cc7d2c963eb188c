"""One client's HTTP/2 connection to the fast path: frames in, unary gRPC calls out, replies back.

An :class:`asyncio.Protocol`, so bytes go from the socket to the handler with no thread hop and
no per-frame objects: ``data_received`` cuts whole frames out of its buffer, a complete request
(headers, then its message up to END_STREAM) becomes one task running the server's handler, and
the reply leaves as HEADERS, DATA and trailers in one write when the peer's flow-control windows
allow (the rest waits for WINDOW_UPDATE).

What a hostile or broken peer can take is bounded here and in :mod:`gateway.fastpath.edge`:
frames above 16 KiB; header lists above ``max_header_bytes``; messages above
``max_message_bytes``; buffered bytes (request bytes until the message is whole, reply bytes that
wait for the client's window) above the connection's, its peer's and the gateway's budgets; more
than ``max_concurrent_streams`` calls; data beyond the windows we granted; control frames beyond
their budgets; a call's whole exchange beyond ``request_seconds``; connections without request
progress for ``idle_seconds`` (control frames are not progress); replies it does not read (reading
stops while our write buffer is full). Each ends the stream or the connection with the error code
that names it; nothing reaches another connection.

A call's API key is checked on its HEADERS, before any of its body is buffered: a call without a
valid one is answered UNAUTHENTICATED at once and its stream reset.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import hpack

from gateway.fastpath.edge import (
    CONTINUATIONS_PER_BLOCK,
    TARPIT_SECONDS,
    WINDOW_UPDATE_CREDIT,
    Edge,
    FrameBudgets,
    Limits,
    peer_key,
)
from gateway.fastpath.frames import (
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    FRAME_HEADER,
    MAX_WINDOW,
    OK_TRAILERS,
    PREFACE,
    RESPONSE_HEADERS,
    UINT32,
    ErrorCode,
    Flag,
    Frame,
    ProtocolError,
    Setting,
    encode_headers,
    frame,
    goaway,
    message_prefix,
    rst_stream,
    settings_frame,
    trailers_only,
    window_update,
)
from gateway.server.ratelog import RateLimitedLog
from models.errors import UnauthenticatedError

logger = logging.getLogger(__name__)
closing_log = RateLimitedLog(logger, per_second=1.0, burst=20)
handler_log = RateLimitedLog(logger, per_second=1.0, burst=10)

STREAM_WINDOW = 1 << 20  # what each call may send before we return credit
CONNECTION_WINDOW = 16 << 20
WRITE_BUFFER_BYTES = 1 << 20  # above this many unsent bytes, stop reading the peer's requests
HPACK_HARD_LIMIT = 4  # hpack gives up past this many times max_header_bytes; below, one call is refused
NOT_GRPC = encode_headers([(":status", "415")])
CONNECTION_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"})
UNREAD_METADATA = frozenset({"content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"})
REQUEST_PSEUDO = frozenset({":method", ":scheme", ":path", ":authority"})
FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9a-z]+")  # RFC 9110 tchar, lower case only (RFC 9113 8.2.1)
FIELD_VALUE_BAD = re.compile(r"[\x00\r\n]")  # RFC 9113 8.2.1: malformed anywhere in a name or value


@dataclass
class Request:
    """A unary call as the server's handler sees it; ``body`` is the gRPC-framed message."""

    path: str
    metadata: list[tuple[str, str]]
    timeout: str | None  # grpc-timeout, counted from ``received_at`` (the loop's clock)
    encoding: str | None
    received_at: float
    tenant: str | None = None  # set by the key check on HEADERS; None for open services
    body: bytearray = field(default_factory=bytearray)


@dataclass(frozen=True)
class Reply:
    """The handler's answer: a serialized message, or an error status (``code`` != OK)."""

    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""
    body: bytes | None = None


Handler = Callable[[Request], Awaitable[Reply]]


@dataclass(frozen=True)
class _Call:
    """What a header block says about the call it opens, or how it is refused: kept with the
    block, so a client's repeated block costs neither validation nor the key check again."""

    path: str = ""
    metadata: list[tuple[str, str]] = field(default_factory=list)
    timeout: str | None = None
    encoding: str | None = None
    tenant: str | None = None
    refusal: bytes | None = None  # a header block that answers the call (415, UNAUTHENTICATED, ...)
    malformed: str = ""  # RFC 9113 8.1.1: a stream error PROTOCOL_ERROR, with this reason


@dataclass
class _Stream:
    id: int
    request: Request
    send_window: int
    opened_at: float
    recv_window: int = STREAM_WINDOW  # what we granted and the peer has not used
    unacked: int = 0  # received bytes not yet credited back on this stream
    held: int = 0  # bytes counted against the budgets (request body, then blocked reply)
    task: asyncio.Task | None = None  # set once the request is whole
    answered: bool = False  # response HEADERS sent
    outgoing: memoryview | None = None  # reply DATA still waiting for window
    end: bytes = b""  # the trailers frame that follows ``outgoing``


class Http2Connection(asyncio.Protocol):
    """The server side of one connection; ``edge`` is the server's shared state (registry of
    connections and peers, budgets, the key check)."""

    def __init__(self, handler: Handler, edge: Edge, tls: ssl.SSLContext | None = None) -> None:
        self._handler = handler
        self._edge = edge
        self._limits: Limits = edge.limits
        self._tls = tls
        self._peer = "?"
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._preface = False
        self._settings_seen = False
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = HPACK_HARD_LIMIT * self._limits.max_header_bytes
        self._cached_block: bytes | None = None  # see _call
        self._cached_call: _Call | None = None
        self._streams: dict[int, _Stream] = {}
        self._blocked: dict[int, _Stream] = {}  # streams with reply data waiting for window
        self._last_stream = 0
        self._block: tuple[int, int, bytearray, int] | None = None  # headers awaiting CONTINUATION
        self._send_window = DEFAULT_WINDOW
        self._recv_window = CONNECTION_WINDOW
        self._peer_stream_window = DEFAULT_WINDOW
        self._peer_max_frame = DEFAULT_MAX_FRAME
        self._unacked = 0
        self._held = 0  # bytes this connection's streams hold against the budgets
        self._going_away = False
        self._write_paused = False
        self._begun = False  # our SETTINGS are out (after the TLS handshake, with TLS)
        self._early: list[bytes] = []
        self._queued = 0  # reply bytes put in the batch being built, not yet written
        self._registered = False
        self._watchdog: asyncio.TimerHandle | None = None
        self.closed = asyncio.Event()

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        if self._transport is not None:  # the TLS transport that start_tls made: see _handshake
            return
        self._loop = asyncio.get_running_loop()
        self._opened = self._last_progress = self._now = self._loop.time()
        self._peer = peer_key(transport.get_extra_info("peername"))
        refusal = self._edge.admit(self, self._peer)
        if refusal is not None:
            self._transport = transport
            if refusal == "penalty" and self._edge.tarpit(self._peer):
                transport.pause_reading()  # a peer cut off for abuse: not read, closed in a while
                self._loop.call_later(TARPIT_SECONDS, self._untarpit, transport)
                return
            if refusal != "penalty" and self._tls is None:
                transport.write(goaway(0, ErrorCode.ENHANCE_YOUR_CALM, refusal))
                transport.close()
            else:
                transport.abort()  # TLS not yet spoken, or the tarpit is full: no answer
            self.closed.set()
            return
        self._registered = True
        self._budgets = FrameBudgets(self._now)
        interval = min(self._limits.request_seconds, self._limits.idle_seconds, self._limits.handshake_seconds)
        self._watch_interval = max(0.05, interval / 4)
        self._watchdog = self._loop.call_later(self._watch_interval, self._watch)
        if self._tls is None:
            self._begin(transport)
        else:
            self._transport = transport
            transport.pause_reading()  # the ClientHello waits for start_tls
            self._handshaking = self._loop.create_task(self._handshake(transport))

    def _untarpit(self, transport: asyncio.Transport) -> None:
        transport.abort()
        self._edge.untarpit(self._peer)
        self.closed.set()

    async def _handshake(self, transport: asyncio.Transport) -> None:
        """TLS after the peer was admitted, so a refused or penalized peer costs no handshake."""
        try:
            secure = await self._loop.start_tls(
                transport,
                self,
                self._tls,
                server_side=True,
                ssl_handshake_timeout=self._limits.handshake_seconds,
            )
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError, asyncio.CancelledError) as exc:
            closing_log.info("fast path: TLS handshake with %s failed: %s", self._peer, exc or type(exc).__name__)
            transport.abort()
            self._gone()
            return
        if secure is None or self._transport is None or self._transport.is_closing():
            self._gone()
            return
        self._begin(secure)

    def _begin(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        transport.set_write_buffer_limits(high=WRITE_BUFFER_BYTES)
        settings = {
            Setting.ENABLE_PUSH: 0,
            Setting.MAX_CONCURRENT_STREAMS: self._limits.max_concurrent_streams,
            Setting.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            Setting.MAX_HEADER_LIST_SIZE: self._limits.max_header_bytes,
        }
        transport.write(settings_frame(settings) + window_update(0, CONNECTION_WINDOW - DEFAULT_WINDOW))
        self._begun = True
        early, self._early = self._early, []
        if early:  # what TLS delivered before start_tls returned its transport
            self.data_received(b"".join(early))

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()

    def _gone(self) -> None:
        if self.closed.is_set():
            return
        if self._watchdog is not None:
            self._watchdog.cancel()
        for stream in list(self._streams.values()):
            if stream.task is not None:
                stream.task.cancel()
            self._release(stream)
        self._streams.clear()
        self._blocked.clear()
        if self._registered:
            self._edge.leave(self, self._peer)
        self.closed.set()

    def pause_writing(self) -> None:
        """The peer is not reading: stop reading its requests, and stop writing reply DATA (it
        waits in the streams, against the budgets), until it catches up."""
        self._write_paused = True
        self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if not self._transport.is_closing():
            self._transport.resume_reading()
            out: list[bytes] = []
            self._flush_blocked(out)
            self._write(out)

    def data_received(self, data: bytes) -> None:
        if not self._begun:
            self._early.append(data)
            return
        out: list[bytes] = []
        self._now = self._loop.time()
        try:
            self._frames(data, out)
        except ProtocolError as exc:
            closing_log.info("fast path: closing a connection from %s: %s", self._peer, exc)
            out.append(goaway(self._last_stream, exc.code, str(exc)))
            self._write(out)
            self._transport.close()
            if exc.code == ErrorCode.ENHANCE_YOUR_CALM:
                self._edge.penalize(self._peer)
            return
        self._write(out)

    # --- frames in ----------------------------------------------------------------------------

    def _frames(self, data: bytes, out: list[bytes]) -> None:
        buffer = self._buffer
        buffer += data
        if not self._preface:
            if len(buffer) < len(PREFACE):
                if not PREFACE.startswith(bytes(buffer)):
                    raise ProtocolError("not an HTTP/2 connection preface")
                return
            if buffer[: len(PREFACE)] != PREFACE:
                raise ProtocolError("not an HTTP/2 connection preface")
            del buffer[: len(PREFACE)]
            self._preface = True
        position, size = 0, len(buffer)
        while size - position >= FRAME_HEADER.size:
            high, low, kind, flags, stream = FRAME_HEADER.unpack_from(buffer, position)
            length = (high << 16) | low
            if length > DEFAULT_MAX_FRAME:
                raise ProtocolError(f"a {length}-byte frame exceeds 16384", ErrorCode.FRAME_SIZE_ERROR)
            end = position + FRAME_HEADER.size + length
            if end > size:
                break
            self._frame(kind, flags, stream & 0x7FFFFFFF, bytes(buffer[position + FRAME_HEADER.size : end]), out)
            position = end
        if position:
            del buffer[:position]
        if self._unacked >= CONNECTION_WINDOW // 4:
            out.append(window_update(0, self._unacked))
            self._recv_window += self._unacked
            self._unacked = 0

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if self._block is not None and kind != Frame.CONTINUATION:
            raise ProtocolError("a header block was interrupted before END_HEADERS")
        if not self._settings_seen and kind != Frame.SETTINGS:
            raise ProtocolError("the connection must start with SETTINGS")
        if kind == Frame.DATA:
            self._data(flags, stream_id, payload, out)
        elif kind == Frame.HEADERS:
            self._headers(flags, stream_id, payload, out)
        elif kind == Frame.CONTINUATION:
            self._continuation(flags, stream_id, payload, out)
        elif kind == Frame.SETTINGS:
            self._settings(flags, stream_id, payload, out)
        elif kind == Frame.WINDOW_UPDATE:
            self._spend(self._budgets.window_update, "WINDOW_UPDATE")
            self._window_update(stream_id, payload, out)
        elif kind == Frame.PING:
            if stream_id != 0:
                raise ProtocolError("PING on a stream")
            if len(payload) != 8:
                raise ProtocolError("PING payload must be 8 bytes", ErrorCode.FRAME_SIZE_ERROR)
            if not flags & Flag.ACK:
                self._spend(self._budgets.ping, "PING")
                out.append(frame(Frame.PING, Flag.ACK, 0, payload))
        elif kind == Frame.RST_STREAM:
            self._reset(stream_id, payload, out)
        elif kind == Frame.PRIORITY:
            self._spend(self._budgets.priority, "PRIORITY")
            if stream_id == 0:
                raise ProtocolError("PRIORITY on stream 0")
            if len(payload) != 5:
                self._abandon(stream_id, ErrorCode.FRAME_SIZE_ERROR, out)
        elif kind == Frame.PUSH_PROMISE:
            raise ProtocolError("clients may not push")
        elif kind == Frame.GOAWAY:
            self._going_away = True
            self._close_if_done()
        # Unknown frame types are ignored, as RFC 9113 asks.

    def _spend(self, allowance, what: str) -> None:
        if not allowance.take(self._now):
            raise ProtocolError(f"too many {what} frames", ErrorCode.ENHANCE_YOUR_CALM)

    def _data(self, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        size = len(payload)  # flow control counts the padding too
        self._unacked += size
        self._recv_window -= size
        if self._recv_window < 0:
            raise ProtocolError("DATA beyond the connection's window", ErrorCode.FLOW_CONTROL_ERROR)
        if stream_id == 0:
            raise ProtocolError("DATA on stream 0")
        if flags & Flag.PADDED:
            payload = _unpad(payload)
        if not payload and not flags & Flag.END_STREAM:
            self._spend(self._budgets.empty_data, "empty DATA")
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id > self._last_stream:
                raise ProtocolError(f"DATA on idle stream {stream_id}")
            return  # a stream we have answered or reset: its late DATA is dropped
        if stream.task is not None:
            self._abandon(stream_id, ErrorCode.STREAM_CLOSED, out)  # DATA after END_STREAM
            return
        stream.recv_window -= size
        if stream.recv_window < 0:
            self._abandon(stream_id, ErrorCode.FLOW_CONTROL_ERROR, out)
            return
        if payload:
            body = stream.request.body
            limit = self._limits.max_message_bytes
            if len(body) + len(payload) > limit + 5:
                message = f"request message larger than the {limit} bytes allowed"
                self._refuse(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, message, out)
                return
            refusal = self._edge.hold(self._peer, self._held, len(payload))
            if refusal is not None:
                self._refuse(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, f"{refusal}; retry when they finish", out)
                return
            self._held += len(payload)
            stream.held += len(payload)
            body += payload
            self._last_progress = self._now
        if flags & Flag.END_STREAM:
            self._start(stream)
            return
        stream.unacked += size
        if stream.unacked >= STREAM_WINDOW // 2:
            out.append(window_update(stream_id, stream.unacked))
            stream.recv_window += stream.unacked
            stream.unacked = 0

    def _headers(self, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if stream_id == 0:
            raise ProtocolError("HEADERS on stream 0")
        if flags & Flag.PADDED:
            payload = _unpad(payload)
        if flags & Flag.PRIORITY:
            if len(payload) < 5:
                raise ProtocolError("HEADERS too short for its priority fields", ErrorCode.FRAME_SIZE_ERROR)
            payload = payload[5:]
        if flags & Flag.END_HEADERS:
            self._header_block(stream_id, flags, payload, out)
        else:
            self._block = (stream_id, flags, bytearray(payload), 0)

    def _continuation(self, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if self._block is None or self._block[0] != stream_id:
            raise ProtocolError("CONTINUATION without the HEADERS it continues")
        _, first_flags, block, count = self._block
        if count >= CONTINUATIONS_PER_BLOCK:
            raise ProtocolError("too many CONTINUATION frames in one header block", ErrorCode.ENHANCE_YOUR_CALM)
        block += payload
        if len(block) > self._limits.max_header_bytes:
            raise ProtocolError("header block too large", ErrorCode.ENHANCE_YOUR_CALM)
        if flags & Flag.END_HEADERS:
            self._block = None
            self._header_block(stream_id, first_flags, bytes(block), out)
        else:
            self._block = (stream_id, first_flags, block, count + 1)

    def _header_block(self, stream_id: int, flags: int, block: bytes, out: list[bytes]) -> None:
        call = self._call(block)
        stream = self._streams.get(stream_id)
        if stream is not None:  # trailers of a request: they must end it
            if stream.task is not None:
                self._abandon(stream_id, ErrorCode.STREAM_CLOSED, out)
            elif not flags & Flag.END_STREAM:
                self._abandon(stream_id, ErrorCode.PROTOCOL_ERROR, out)
            else:
                self._start(stream)
            return
        if stream_id % 2 == 0 or stream_id <= self._last_stream:
            raise ProtocolError(f"stream {stream_id} cannot be opened now")
        self._last_stream = stream_id
        if self._going_away:
            out.append(rst_stream(stream_id, ErrorCode.REFUSED_STREAM))
            return
        ends = bool(flags & Flag.END_STREAM)
        if len(self._streams) >= self._limits.max_concurrent_streams:
            self._spend(self._budgets.refusals, "refused")
            out.append(rst_stream(stream_id, ErrorCode.REFUSED_STREAM))
            return
        if call.malformed:
            self._spend(self._budgets.refusals, "refused")
            handler_log.info("fast path: malformed request from %s: %s", self._peer, call.malformed)
            out.append(rst_stream(stream_id, ErrorCode.PROTOCOL_ERROR))
            return
        if call.refusal is not None:
            self._spend(self._budgets.refusals, "refused")
            self._answer(stream_id, call.refusal, out, reset=not ends)
            return
        request = Request(call.path, call.metadata, call.timeout, call.encoding, self._now, call.tenant)
        stream = _Stream(stream_id, request, self._peer_stream_window, self._now)
        self._streams[stream_id] = stream
        self._last_progress = self._now
        self._budgets.window_update.credit(WINDOW_UPDATE_CREDIT)
        if ends:
            self._start(stream)

    def _call(self, block: bytes) -> _Call:
        """What ``block`` opens, validated and its key checked.

        A client sends the same block for every call to a method once its headers sit in the
        dynamic table; decoding, validating and the key check cost ~20 us in pure Python, so the
        last block that left the table unchanged is remembered with its verdict, and forgotten as
        soon as any block changes the table (an entry added or evicted shows in the table's length
        or its newest entry). The verdict depends on nothing but the header list.
        """
        if block == self._cached_block:
            return self._cached_call
        table = self._decoder.header_table.dynamic_entries
        before = (len(table), table[0] if table else None)
        try:
            raw = self._decoder.decode(block, raw=True)
        except hpack.OversizedHeaderListError as exc:
            raise ProtocolError(f"header list too large: {exc}", ErrorCode.ENHANCE_YOUR_CALM) from None
        except hpack.HPACKError as exc:
            raise ProtocolError(f"undecodable header block: {exc}", ErrorCode.COMPRESSION_ERROR) from None
        headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw]
        call = self._verdict(headers)
        unchanged = len(table) == before[0] and (table[0] if table else None) is before[1]
        self._cached_block, self._cached_call = (block, call) if unchanged else (None, None)
        return call

    def _verdict(self, headers: list[tuple[str, str]]) -> _Call:
        if sum(len(name) + len(value) + 32 for name, value in headers) > self._limits.max_header_bytes:
            message = f"header list larger than the {self._limits.max_header_bytes} bytes allowed"
            return _Call(refusal=trailers_only(grpc.StatusCode.RESOURCE_EXHAUSTED, message))
        call = _parse_call(headers)
        if call.malformed or call.refusal is not None:
            return call
        try:
            tenant = self._edge.tenants.authenticate(call.path, call.metadata)
        except UnauthenticatedError as exc:
            return _Call(refusal=trailers_only(grpc.StatusCode.UNAUTHENTICATED, str(exc)))
        return _Call(call.path, call.metadata, call.timeout, call.encoding, tenant)

    def _settings(self, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if stream_id != 0:
            raise ProtocolError("SETTINGS on a stream")
        if flags & Flag.ACK:
            if payload:
                raise ProtocolError("SETTINGS ACK with a payload", ErrorCode.FRAME_SIZE_ERROR)
            return
        if len(payload) % 6:
            raise ProtocolError("SETTINGS payload is not a list of 6-byte entries", ErrorCode.FRAME_SIZE_ERROR)
        if self._settings_seen:
            self._spend(self._budgets.settings, "SETTINGS")
        self._settings_seen = True
        window = self._peer_stream_window
        for offset in range(0, len(payload), 6):
            key = int.from_bytes(payload[offset : offset + 2], "big")
            value = UINT32.unpack_from(payload, offset + 2)[0]
            if key == Setting.INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError("initial window above 2**31-1", ErrorCode.FLOW_CONTROL_ERROR)
                window = value
            elif key == Setting.MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= (1 << 24) - 1:
                    raise ProtocolError(f"MAX_FRAME_SIZE {value} out of range")
                self._peer_max_frame = value
            elif key == Setting.ENABLE_PUSH and value > 1:
                raise ProtocolError(f"ENABLE_PUSH {value} is neither 0 nor 1")
        delta, self._peer_stream_window = window - self._peer_stream_window, window
        if delta:
            for stream in self._streams.values():
                stream.send_window += delta
                if stream.send_window > MAX_WINDOW:
                    raise ProtocolError("a stream window above 2**31-1", ErrorCode.FLOW_CONTROL_ERROR)
        out.append(frame(Frame.SETTINGS, Flag.ACK, 0))
        self._flush_blocked(out)

    def _window_update(self, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if len(payload) != 4:
            raise ProtocolError("WINDOW_UPDATE payload must be 4 bytes", ErrorCode.FRAME_SIZE_ERROR)
        increment = UINT32.unpack(payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise ProtocolError("WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise ProtocolError("connection window above 2**31-1", ErrorCode.FLOW_CONTROL_ERROR)
            self._flush_blocked(out)
        elif (stream := self._streams.get(stream_id)) is not None:
            stream.send_window += increment
            if increment == 0:
                self._abandon(stream_id, ErrorCode.PROTOCOL_ERROR, out)
            elif stream.send_window > MAX_WINDOW:
                self._abandon(stream_id, ErrorCode.FLOW_CONTROL_ERROR, out)
            else:
                self._flush(stream, out)
        elif stream_id > self._last_stream:
            raise ProtocolError(f"WINDOW_UPDATE on idle stream {stream_id}")

    def _reset(self, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if len(payload) != 4:
            raise ProtocolError("RST_STREAM payload must be 4 bytes", ErrorCode.FRAME_SIZE_ERROR)
        if stream_id == 0 or stream_id > self._last_stream:
            raise ProtocolError(f"RST_STREAM on stream {stream_id}, which was never opened")
        stream = self._streams.get(stream_id)
        if stream is None:
            return  # one we have finished already: nothing to undo, nothing to count
        self._spend(self._budgets.resets, "stream resets")
        if stream.task is not None:
            stream.task.cancel()
        self._close(stream)

    # --- calls --------------------------------------------------------------------------------

    def _start(self, stream: _Stream) -> None:
        stream.task = self._loop.create_task(self._serve(stream))

    async def _serve(self, stream: _Stream) -> None:
        try:
            reply = await self._handler(stream.request)
        except Exception:  # the handler maps every failure itself; this is the net under it
            handler_log.exception("fast path: the handler failed on %s", stream.request.path)
            reply = Reply(grpc.StatusCode.INTERNAL, "internal error; it has been logged")
        if self._streams.get(stream.id) is not stream or self._transport.is_closing():
            return  # reset by the client, timed out, or the connection is gone
        self._release(stream)  # the request's bytes are done with
        out: list[bytes] = []
        self._now = self._loop.time()
        self._last_progress = self._now
        stream.answered = True
        if reply.code != grpc.StatusCode.OK:
            self._answer(stream.id, trailers_only(reply.code, reply.message), out)
            self._close(stream)
        else:
            out.append(frame(Frame.HEADERS, Flag.END_HEADERS, stream.id, RESPONSE_HEADERS))
            stream.outgoing = memoryview(message_prefix(len(reply.body)) + reply.body)
            stream.end = frame(Frame.HEADERS, Flag.END_HEADERS | Flag.END_STREAM, stream.id, OK_TRAILERS)
            self._flush(stream, out)
        self._write(out)

    def _flush(self, stream: _Stream, out: list[bytes]) -> None:
        """Send as much of the stream's reply as both windows allow; the trailers once all is out.
        Reply bytes left waiting for window count against the budgets; past them, the stream is
        reset (the client is not reading what it asked for)."""
        data = stream.outgoing
        if data is None:
            return
        sent = 0
        # a reply of one frame always goes; a longer one stops while our write buffer is full
        room = (
            WRITE_BUFFER_BYTES
            if len(data) <= self._peer_max_frame
            else WRITE_BUFFER_BYTES - self._transport.get_write_buffer_size()
        )
        while data:
            n = min(len(data), self._send_window, stream.send_window, self._peer_max_frame)
            if n <= 0 or self._write_paused or self._queued >= room:
                break
            out.append(frame(Frame.DATA, 0, stream.id, data[:n].tobytes()))
            data = data[n:]
            sent += 1
            self._queued += n
            self._send_window -= n
            stream.send_window -= n
        self._budgets.window_update.credit(WINDOW_UPDATE_CREDIT * sent)
        if data:
            stream.outgoing = data
            self._blocked[stream.id] = stream
            if len(data) < stream.held:  # some of what was held has left
                self._edge.release(self._peer, stream.held - len(data))
                self._held -= stream.held - len(data)
                stream.held = len(data)
            elif len(data) > stream.held:
                more = len(data) - stream.held
                if self._edge.hold(self._peer, self._held, more) is not None:
                    self._abandon(stream.id, ErrorCode.CANCEL, out)
                    return
                self._held += more
                stream.held += more
            return
        stream.outgoing = None
        out.append(stream.end)
        self._close(stream)

    def _flush_blocked(self, out: list[bytes]) -> None:
        for stream in list(self._blocked.values()):
            self._flush(stream, out)

    def _answer(self, stream_id: int, block: bytes, out: list[bytes], *, reset: bool = False) -> None:
        """End a stream with one header block; ``reset`` also stops a request still being sent."""
        out.append(frame(Frame.HEADERS, Flag.END_HEADERS | Flag.END_STREAM, stream_id, block))
        if reset:
            out.append(rst_stream(stream_id, ErrorCode.NO_ERROR))

    def _refuse(self, stream: _Stream, code: grpc.StatusCode, message: str, out: list[bytes]) -> None:
        """Answer a call whose request is still arriving with a status, and stop the rest of it."""
        self._answer(stream.id, trailers_only(code, message), out, reset=True)
        if stream.task is not None:
            stream.task.cancel()
        self._close(stream)

    def _abandon(self, stream_id: int, code: ErrorCode, out: list[bytes]) -> None:
        """A stream error: RST_STREAM with ``code``, any work for it cancelled."""
        out.append(rst_stream(stream_id, code))
        stream = self._streams.get(stream_id)
        if stream is not None:
            if stream.task is not None:
                stream.task.cancel()
            self._close(stream)

    def _release(self, stream: _Stream) -> None:
        """Give back what ``stream`` held against the budgets, and the request's bytes."""
        if stream.held:
            self._edge.release(self._peer, stream.held)
            self._held -= stream.held
            stream.held = 0
        if stream.request.body:
            del stream.request.body[:]

    def _close(self, stream: _Stream) -> None:
        if self._streams.pop(stream.id, None) is not None:
            self._release(stream)
        self._blocked.pop(stream.id, None)
        stream.outgoing = None
        self._close_if_done()

    def _close_if_done(self) -> None:
        """Once going away and idle, hang up: after this callback, so what it writes goes first."""
        if self._going_away and not self._streams:
            self._loop.call_soon(self._transport.close)

    def _write(self, out: list[bytes]) -> None:
        self._queued = 0
        if out and not self._transport.is_closing():
            self._transport.write(b"".join(out))

    def _watch(self) -> None:
        """Every few seconds: end calls whose exchange took too long, close a connection that has
        not finished its handshake in time, made no request progress for too long, or grown old."""
        now = self._now = self._loop.time()
        limits = self._limits
        if not self._settings_seen and now - self._opened > limits.handshake_seconds:
            closing_log.info("fast path: %s did not start HTTP/2 within %g s", self._peer, limits.handshake_seconds)
            self._transport.abort()
            self._gone()
            return
        out: list[bytes] = []
        for stream in list(self._streams.values()):
            if now - stream.opened_at > limits.request_seconds:
                self._expire(stream, out)
        if not self._streams and now - self._last_progress > limits.idle_seconds:
            out.append(goaway(self._last_stream, ErrorCode.NO_ERROR, "idle"))
            self._write(out)
            self._transport.close()
            return
        self._write(out)
        if now - self._opened > limits.connection_age_seconds and not self._going_away:
            self.go_away("connection age")
        self._watchdog = self._loop.call_later(self._watch_interval, self._watch)

    def _expire(self, stream: _Stream, out: list[bytes]) -> None:
        """A call past ``request_seconds``: whatever it holds is released and the stream ended."""
        seconds = f"{self._limits.request_seconds:g} s"
        if stream.task is None:
            message = f"the request did not arrive whole within {seconds}"
            self._refuse(stream, grpc.StatusCode.DEADLINE_EXCEEDED, message, out)
        elif not stream.answered:
            self._refuse(stream, grpc.StatusCode.DEADLINE_EXCEEDED, f"the call did not finish within {seconds}", out)
        else:  # the reply is waiting for a window the client does not open
            self._abandon(stream.id, ErrorCode.CANCEL, out)

    # --- shutdown -----------------------------------------------------------------------------

    def go_away(self, reason: str = "server stopping") -> None:
        """Refuse new calls (GOAWAY), finish the open ones, then close."""
        if self._transport is None or self.closed.is_set():
            return
        if not self._going_away and not self._transport.is_closing() and self._settings_seen:
            self._transport.write(goaway(self._last_stream, ErrorCode.NO_ERROR, reason))
        self._going_away = True
        if not self._settings_seen:
            self._transport.close()
            return
        self._close_if_done()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


def _unpad(payload: bytes) -> bytes:
    if not payload or payload[0] >= len(payload):
        raise ProtocolError("padding longer than the frame")
    return payload[1 : len(payload) - payload[0]]


def _parse_call(headers: list[tuple[str, str]]) -> _Call:
    """The call that a request's headers open; malformed (RFC 9113 8.1.1, 8.2, 8.3) or not gRPC."""
    pseudo: dict[str, str] = {}
    metadata: list[tuple[str, str]] = []
    timeout = encoding = None
    content_type = ""
    regular = False
    for name, value in headers:
        if FIELD_VALUE_BAD.search(value):
            return _Call(malformed=f"header {name!r} has a value with NUL, CR or LF")
        if name.startswith(":"):
            if regular or name in pseudo or name not in REQUEST_PSEUDO:
                return _Call(malformed=f"pseudo-header {name!r} misplaced, repeated or unknown")
            pseudo[name] = value
            continue
        regular = True
        if not FIELD_NAME.fullmatch(name):
            return _Call(malformed=f"header name {name!r} is not a lower-case token")
        if name in CONNECTION_HEADERS or (name == "te" and value != "trailers"):
            return _Call(malformed=f"connection-specific header {name!r}")
        if name == "content-type":
            content_type = value
        elif name == "grpc-timeout":
            timeout = value
        elif name == "grpc-encoding":
            encoding = value
        elif name not in UNREAD_METADATA:
            metadata.append((name, value))
    if pseudo.get(":method") != "POST" or not pseudo.get(":path") or ":scheme" not in pseudo:
        return _Call(malformed="a gRPC call is a POST with :scheme and :path")
    if not content_type.startswith("application/grpc"):
        return _Call(refusal=NOT_GRPC)
    return _Call(pseudo[":path"], metadata, timeout, encoding)
