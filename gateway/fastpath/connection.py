"""One client's HTTP/2 connection to the fast path: frames in, unary gRPC calls out, replies back.

An :class:`asyncio.Protocol`, so bytes go from the socket to the handler with no thread hop and
no per-frame objects: ``data_received`` cuts whole frames out of its buffer, a complete request
(headers, then its message up to END_STREAM) becomes one task running the server's handler, and
the reply leaves as HEADERS, DATA and trailers in one write when the peer's flow-control windows
allow (the rest waits for WINDOW_UPDATE).

What a hostile or broken peer can take is bounded here, per connection: frames above 16 KiB,
header lists above ``max_header_bytes``, messages above ``max_message_bytes``, more request bytes
held at once than ``max_buffered_bytes``, more than ``max_streams`` calls, data beyond the windows
we granted, reset floods, requests that never finish arriving (``request_seconds``), connections
that sit idle (``idle_seconds``), and replies it does not read (reading stops while our write
buffer is full). Each ends the stream or the connection with the error code that names it;
nothing reaches another connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
import hpack

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

logger = logging.getLogger(__name__)

STREAM_WINDOW = 1 << 20  # what each call may send before we return credit
CONNECTION_WINDOW = 16 << 20
WRITE_BUFFER_BYTES = 1 << 20  # above this many unsent bytes, stop reading the peer's requests
RESETS_PER_SECOND = 1000  # resets of live calls above this in a second: ENHANCE_YOUR_CALM (rapid reset)
HPACK_HARD_LIMIT = 4  # hpack gives up past this many times max_header_bytes; below, one call is refused
NOT_GRPC = encode_headers([(":status", "415")])
CONNECTION_HEADERS = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"})
UNREAD_METADATA = frozenset({"content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"})


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int
    max_streams: int = 256
    max_header_bytes: int = 16 << 10
    max_buffered_bytes: int = 64 << 20  # request bytes one connection may hold at once
    request_seconds: float = 60.0  # a request must arrive whole within this
    idle_seconds: float = 300.0  # a connection without calls or frames this long is closed
    max_connections: int = 1024


@dataclass
class Request:
    """A unary call as the server's handler sees it; ``body`` is the gRPC-framed message."""

    path: str
    metadata: list[tuple[str, str]]
    timeout: str | None  # grpc-timeout, counted from ``received_at`` (the loop's clock)
    encoding: str | None
    received_at: float
    body: bytearray = field(default_factory=bytearray)


@dataclass(frozen=True)
class Reply:
    """The handler's answer: a serialized message, or an error status (``code`` != OK)."""

    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""
    body: bytes | None = None


Handler = Callable[[Request], Awaitable[Reply]]


@dataclass
class _Stream:
    id: int
    request: Request
    send_window: int
    recv_window: int = STREAM_WINDOW  # what we granted and the peer has not used
    unacked: int = 0  # received bytes not yet credited back on this stream
    task: asyncio.Task | None = None  # set once the request is whole
    outgoing: memoryview | None = None  # reply DATA still waiting for window
    end: bytes = b""  # the trailers frame that follows ``outgoing``


class Http2Connection(asyncio.Protocol):
    """The server side of one connection; ``connections`` is the server's registry of live ones."""

    def __init__(self, handler: Handler, limits: Limits, connections: set[Http2Connection]) -> None:
        self._handler = handler
        self._limits = limits
        self._connections = connections
        self._buffer = bytearray()
        self._preface = False
        self._settings_seen = False
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = HPACK_HARD_LIMIT * limits.max_header_bytes
        self._cached_block: bytes | None = None  # see _decode
        self._cached_headers: list[tuple[str, str]] = []
        self._streams: dict[int, _Stream] = {}
        self._blocked: dict[int, _Stream] = {}  # streams with reply data waiting for window
        self._last_stream = 0
        self._block: tuple[int, int, bytearray] | None = None  # headers awaiting CONTINUATION
        self._send_window = DEFAULT_WINDOW
        self._recv_window = CONNECTION_WINDOW
        self._peer_stream_window = DEFAULT_WINDOW
        self._peer_max_frame = DEFAULT_MAX_FRAME
        self._unacked = 0
        self._buffered = 0  # request bytes held by open streams
        self._resets = (0.0, 0)
        self._going_away = False
        self._watchdog: asyncio.TimerHandle | None = None
        self.closed = asyncio.Event()

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._last_frame = self._loop.time()
        if len(self._connections) >= self._limits.max_connections:
            transport.write(goaway(0, ErrorCode.ENHANCE_YOUR_CALM, "too many connections"))
            transport.close()
            return
        self._connections.add(self)
        transport.set_write_buffer_limits(high=WRITE_BUFFER_BYTES)
        settings = {
            Setting.ENABLE_PUSH: 0,
            Setting.MAX_CONCURRENT_STREAMS: self._limits.max_streams,
            Setting.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            Setting.MAX_HEADER_LIST_SIZE: self._limits.max_header_bytes,
        }
        transport.write(settings_frame(settings) + window_update(0, CONNECTION_WINDOW - DEFAULT_WINDOW))
        self._watch_interval = min(self._limits.request_seconds, self._limits.idle_seconds) / 4
        self._watchdog = self._loop.call_later(self._watch_interval, self._watch)

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        if self._watchdog is not None:
            self._watchdog.cancel()
        for stream in self._streams.values():
            if stream.task is not None:
                stream.task.cancel()
        self._streams.clear()
        self._blocked.clear()
        self.closed.set()

    def pause_writing(self) -> None:
        """The peer is not reading: stop reading its requests until it catches up."""
        self._transport.pause_reading()

    def resume_writing(self) -> None:
        if not self._transport.is_closing():
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        out: list[bytes] = []
        try:
            self._frames(data, out)
        except ProtocolError as exc:
            logger.info("fast path: closing a connection: %s", exc)
            out.append(goaway(self._last_stream, exc.code, str(exc)))
            self._write(out)
            self._transport.close()
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
            self._last_frame = self._loop.time()
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
            self._window_update(stream_id, payload, out)
        elif kind == Frame.PING:
            if stream_id != 0:
                raise ProtocolError("PING on a stream")
            if len(payload) != 8:
                raise ProtocolError("PING payload must be 8 bytes", ErrorCode.FRAME_SIZE_ERROR)
            if not flags & Flag.ACK:
                out.append(frame(Frame.PING, Flag.ACK, 0, payload))
        elif kind == Frame.RST_STREAM:
            self._reset(stream_id, payload, out)
        elif kind == Frame.PRIORITY:
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
        body = stream.request.body
        limit = self._limits.max_message_bytes
        if len(body) + len(payload) > limit + 5:
            message = f"request message larger than the {limit} bytes allowed"
            self._refuse(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, message, out)
            return
        if self._buffered + len(payload) > self._limits.max_buffered_bytes:
            message = f"this connection already holds {self._buffered} bytes of requests; retry when they finish"
            self._refuse(stream, grpc.StatusCode.RESOURCE_EXHAUSTED, message, out)
            return
        body += payload
        self._buffered += len(payload)
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
            self._block = (stream_id, flags, bytearray(payload))

    def _continuation(self, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if self._block is None or self._block[0] != stream_id:
            raise ProtocolError("CONTINUATION without the HEADERS it continues")
        block = self._block[2]
        block += payload
        if len(block) > self._limits.max_header_bytes:
            raise ProtocolError("header block too large", ErrorCode.ENHANCE_YOUR_CALM)
        if flags & Flag.END_HEADERS:
            _, first_flags, _ = self._block
            self._block = None
            self._header_block(stream_id, first_flags, bytes(block), out)

    def _header_block(self, stream_id: int, flags: int, block: bytes, out: list[bytes]) -> None:
        headers = self._decode(block)
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
        if self._going_away or len(self._streams) >= self._limits.max_streams:
            out.append(rst_stream(stream_id, ErrorCode.REFUSED_STREAM))
            return
        ends = bool(flags & Flag.END_STREAM)
        if sum(len(name) + len(value) + 32 for name, value in headers) > self._limits.max_header_bytes:
            message = f"header list larger than the {self._limits.max_header_bytes} bytes allowed"
            self._answer(stream_id, trailers_only(grpc.StatusCode.RESOURCE_EXHAUSTED, message), out, reset=not ends)
            return
        request, refusal = _request(headers, self._loop.time())
        if refusal is not None:
            self._answer(stream_id, refusal, out, reset=not ends)
            return
        stream = _Stream(stream_id, request, self._peer_stream_window)
        self._streams[stream_id] = stream
        if ends:
            self._start(stream)

    def _decode(self, block: bytes) -> list[tuple[str, str]]:
        """The header list of ``block``, names and values as Latin-1 (any bytes decode; ASCII, all
        that gRPC reads, unchanged).

        A client sends the same block for every call to a method once its headers sit in the
        dynamic table; decoding it costs ~14 us in pure Python, so the last block that left the
        table unchanged is remembered with its list, and forgotten as soon as any block changes
        the table (an entry added or evicted shows in the table's length or its newest entry).
        """
        if block == self._cached_block:
            return self._cached_headers
        table = self._decoder.header_table.dynamic_entries
        before = (len(table), table[0] if table else None)
        try:
            raw = self._decoder.decode(block, raw=True)
        except hpack.OversizedHeaderListError as exc:
            raise ProtocolError(f"header list too large: {exc}", ErrorCode.ENHANCE_YOUR_CALM) from None
        except hpack.HPACKError as exc:
            raise ProtocolError(f"undecodable header block: {exc}", ErrorCode.COMPRESSION_ERROR) from None
        headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw]
        unchanged = len(table) == before[0] and (table[0] if table else None) is before[1]
        self._cached_block, self._cached_headers = (block, headers) if unchanged else (None, [])
        return headers

    def _settings(self, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if stream_id != 0:
            raise ProtocolError("SETTINGS on a stream")
        if flags & Flag.ACK:
            if payload:
                raise ProtocolError("SETTINGS ACK with a payload", ErrorCode.FRAME_SIZE_ERROR)
            return
        if len(payload) % 6:
            raise ProtocolError("SETTINGS payload is not a list of 6-byte entries", ErrorCode.FRAME_SIZE_ERROR)
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
        now = self._loop.time()
        second, count = self._resets
        self._resets = (second, count + 1) if now - second < 1.0 else (now, 1)
        if self._resets[1] > RESETS_PER_SECOND:
            raise ProtocolError("too many stream resets", ErrorCode.ENHANCE_YOUR_CALM)
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
            logger.exception("fast path: the handler failed on %s", stream.request.path)
            reply = Reply(grpc.StatusCode.INTERNAL, "internal error; it has been logged")
        if self._streams.get(stream.id) is not stream or self._transport.is_closing():
            return  # reset by the client, or the connection is gone
        out: list[bytes] = []
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
        """Send as much of the stream's reply as both windows allow; the trailers once all is out."""
        data = stream.outgoing
        if data is None:
            return
        while data:
            n = min(len(data), self._send_window, stream.send_window, self._peer_max_frame)
            if n <= 0:
                stream.outgoing = data
                self._blocked[stream.id] = stream
                return
            out.append(frame(Frame.DATA, 0, stream.id, data[:n].tobytes()))
            data = data[n:]
            self._send_window -= n
            stream.send_window -= n
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
        self._close(stream)

    def _abandon(self, stream_id: int, code: ErrorCode, out: list[bytes]) -> None:
        """A stream error: RST_STREAM with ``code``, any work for it cancelled."""
        out.append(rst_stream(stream_id, code))
        stream = self._streams.get(stream_id)
        if stream is not None:
            if stream.task is not None:
                stream.task.cancel()
            self._close(stream)

    def _close(self, stream: _Stream) -> None:
        if self._streams.pop(stream.id, None) is not None:
            self._buffered -= len(stream.request.body)
        self._blocked.pop(stream.id, None)
        self._close_if_done()

    def _close_if_done(self) -> None:
        """Once going away and idle, hang up: after this callback, so what it writes goes first."""
        if self._going_away and not self._streams:
            self._loop.call_soon(self._transport.close)

    def _write(self, out: list[bytes]) -> None:
        if out and not self._transport.is_closing():
            self._transport.write(b"".join(out))

    def _watch(self) -> None:
        """Every few seconds: refuse requests that have taken too long to arrive, close if idle."""
        now = self._loop.time()
        out: list[bytes] = []
        for stream in list(self._streams.values()):
            if stream.task is None and now - stream.request.received_at > self._limits.request_seconds:
                message = f"the request did not arrive whole within {self._limits.request_seconds:g} s"
                self._refuse(stream, grpc.StatusCode.DEADLINE_EXCEEDED, message, out)
        if not self._streams and now - self._last_frame > self._limits.idle_seconds:
            out.append(goaway(self._last_stream, ErrorCode.NO_ERROR, "idle"))
            self._write(out)
            self._transport.close()
            return
        self._write(out)
        self._watchdog = self._loop.call_later(self._watch_interval, self._watch)

    # --- shutdown -----------------------------------------------------------------------------

    def go_away(self) -> None:
        """Refuse new calls (GOAWAY), finish the open ones, then close."""
        if not self._going_away and not self._transport.is_closing():
            self._transport.write(goaway(self._last_stream, ErrorCode.NO_ERROR, "server stopping"))
        self._going_away = True
        self._close_if_done()

    def abort(self) -> None:
        self._transport.abort()


def _unpad(payload: bytes) -> bytes:
    if not payload or payload[0] >= len(payload):
        raise ProtocolError("padding longer than the frame")
    return payload[1 : len(payload) - payload[0]]


def _request(headers: list[tuple[str, str]], now: float) -> tuple[Request | None, bytes | None]:
    """The call that a request's headers open, or the header block that refuses it."""
    pseudo: dict[str, str] = {}
    metadata: list[tuple[str, str]] = []
    timeout = encoding = None
    content_type = ""
    for name, value in headers:
        if name.startswith(":"):
            if metadata or name in pseudo:
                return None, trailers_only(grpc.StatusCode.INTERNAL, "malformed request: misplaced pseudo-header")
            pseudo[name] = value
        elif name == "content-type":
            content_type = value
        elif name == "grpc-timeout":
            timeout = value
        elif name == "grpc-encoding":
            encoding = value
        elif name in CONNECTION_HEADERS or name != name.lower():
            return None, trailers_only(grpc.StatusCode.INTERNAL, f"malformed request: header {name!r}")
        elif name not in UNREAD_METADATA:
            metadata.append((name, value))
    if not content_type.startswith("application/grpc"):
        return None, NOT_GRPC
    if pseudo.get(":method") != "POST" or not pseudo.get(":path"):
        return None, trailers_only(grpc.StatusCode.INTERNAL, "a gRPC call is a POST with a :path")
    return Request(pseudo[":path"], metadata, timeout, encoding, now), None
