"""One client's HTTP/2 connection to the fast path: frames in, unary gRPC calls out, replies back.

An :class:`asyncio.Protocol`, so bytes go from the socket to the handler with no thread hop and
no per-frame objects: ``data_received`` cuts whole frames out of its buffer, a complete request
(headers, then its message up to END_STREAM) becomes one task running the server's handler, and
the reply leaves as HEADERS, DATA and trailers in one write when the peer's flow-control windows
allow (the rest waits for WINDOW_UPDATE).

What a hostile or broken peer can do is bounded here: frames above 16 KiB, header blocks above
``max_header_bytes``, messages above ``max_message_bytes``, more than ``max_streams`` calls at
once, floods of resets; each ends the stream or the connection with the HTTP/2 error code that
names it, and never touches another connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
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
RESETS_PER_SECOND = 1000  # more client resets than this in a second: ENHANCE_YOUR_CALM (rapid reset)
NOT_GRPC = encode_headers([(":status", "415")])
UNREAD_METADATA = frozenset({"content-type", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding"})


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int
    max_streams: int = 256
    max_header_bytes: int = 16 << 10


@dataclass
class Request:
    """A unary call as the server's handler sees it; ``body`` is the gRPC-framed message."""

    path: str
    metadata: list[tuple[str, str]]
    timeout: str | None
    body: bytearray = field(default_factory=bytearray)


@dataclass(frozen=True)
class Reply:
    """The handler's answer: a serialized message, or an error status (``code`` != 0)."""

    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""
    body: bytes | None = None


Handler = Callable[[Request], Awaitable[Reply]]


@dataclass
class _Stream:
    id: int
    request: Request | None  # None: refused at its headers; its DATA is dropped
    send_window: int
    unacked: int = 0  # received bytes not yet credited back on this stream
    task: asyncio.Task | None = None
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
        self._decoder = hpack.Decoder()
        self._decoder.max_header_list_size = limits.max_header_bytes
        self._streams: dict[int, _Stream] = {}
        self._last_stream = 0
        self._block: tuple[int, int, bytearray] | None = None  # headers awaiting CONTINUATION
        self._send_window = DEFAULT_WINDOW
        self._peer_stream_window = DEFAULT_WINDOW
        self._peer_max_frame = DEFAULT_MAX_FRAME
        self._unacked = 0
        self._resets = (0.0, 0)
        self._going_away = False
        self.idle = asyncio.Event()
        self.idle.set()

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._connections.add(self)
        settings = {
            Setting.ENABLE_PUSH: 0,
            Setting.MAX_CONCURRENT_STREAMS: self._limits.max_streams,
            Setting.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            Setting.MAX_HEADER_LIST_SIZE: self._limits.max_header_bytes,
        }
        transport.write(settings_frame(settings) + window_update(0, CONNECTION_WINDOW - DEFAULT_WINDOW))

    def connection_lost(self, exc: Exception | None) -> None:
        self._connections.discard(self)
        for stream in self._streams.values():
            if stream.task is not None:
                stream.task.cancel()
        self._streams.clear()
        self.idle.set()

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
        del buffer[:position]
        if self._unacked >= CONNECTION_WINDOW // 4:
            out.append(window_update(0, self._unacked))
            self._unacked = 0

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if self._block is not None and kind != Frame.CONTINUATION:
            raise ProtocolError("a header block was interrupted before END_HEADERS")
        if kind == Frame.DATA:
            self._data(flags, stream_id, payload, out)
        elif kind == Frame.HEADERS:
            self._headers(flags, stream_id, payload, out)
        elif kind == Frame.CONTINUATION:
            self._continuation(flags, stream_id, payload, out)
        elif kind == Frame.SETTINGS:
            if not flags & Flag.ACK:
                self._settings(payload, out)
        elif kind == Frame.WINDOW_UPDATE:
            self._window_update(stream_id, payload, out)
        elif kind == Frame.PING:
            if len(payload) != 8:
                raise ProtocolError("PING payload must be 8 bytes", ErrorCode.FRAME_SIZE_ERROR)
            if not flags & Flag.ACK:
                out.append(frame(Frame.PING, Flag.ACK, 0, payload))
        elif kind == Frame.RST_STREAM:
            self._reset(stream_id)
        elif kind == Frame.PUSH_PROMISE:
            raise ProtocolError("clients may not push")
        elif kind == Frame.GOAWAY:
            self._going_away = True
            self._close_if_done()
        # PRIORITY and unknown frame types are ignored, as RFC 9113 asks.

    def _data(self, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        self._unacked += len(payload)
        if flags & Flag.PADDED:
            payload = _unpad(payload)
        stream = self._streams.get(stream_id)
        if stream is None:
            if stream_id == 0 or stream_id > self._last_stream:
                raise ProtocolError(f"DATA on idle stream {stream_id}")
            return  # a stream we have finished or reset: its late DATA is dropped
        if stream.request is None or stream.task is not None:
            return
        body = stream.request.body
        body += payload
        if len(body) > self._limits.max_message_bytes + 5:
            message = f"request message larger than the {self._limits.max_message_bytes} bytes allowed"
            self._finish(stream, trailers_only(grpc.StatusCode.RESOURCE_EXHAUSTED, message), out, reset=True)
            return
        if flags & Flag.END_STREAM:
            self._start(stream)
            return
        stream.unacked += len(payload)
        if stream.unacked >= STREAM_WINDOW // 2:
            out.append(window_update(stream_id, stream.unacked))
            stream.unacked = 0

    def _headers(self, flags: int, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if stream_id == 0:
            raise ProtocolError("HEADERS on stream 0")
        if flags & Flag.PADDED:
            payload = _unpad(payload)
        if flags & Flag.PRIORITY:
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
        try:
            headers = self._decoder.decode(block)
        except hpack.OversizedHeaderListError as exc:
            raise ProtocolError(f"header list too large: {exc}", ErrorCode.ENHANCE_YOUR_CALM) from None
        except hpack.HPACKError as exc:
            raise ProtocolError(f"undecodable header block: {exc}", ErrorCode.COMPRESSION_ERROR) from None
        stream = self._streams.get(stream_id)
        if stream is not None:  # trailers of a request: its end
            if stream.request is not None and stream.task is None and flags & Flag.END_STREAM:
                self._start(stream)
            return
        if stream_id % 2 == 0 or stream_id <= self._last_stream:
            raise ProtocolError(f"stream {stream_id} cannot be opened now")
        self._last_stream = stream_id
        if self._going_away:
            out.append(rst_stream(stream_id, ErrorCode.REFUSED_STREAM))
            return
        if len(self._streams) >= self._limits.max_streams:
            out.append(rst_stream(stream_id, ErrorCode.REFUSED_STREAM))
            return
        stream = _Stream(stream_id, None, self._peer_stream_window)
        self._streams[stream_id] = stream
        self.idle.clear()
        request, refusal = _request(headers)
        if refusal is not None:
            self._finish(stream, refusal, out, reset=not flags & Flag.END_STREAM)
            return
        stream.request = request
        if flags & Flag.END_STREAM:
            self._start(stream)

    def _settings(self, payload: bytes, out: list[bytes]) -> None:
        if len(payload) % 6:
            raise ProtocolError("SETTINGS payload is not a list of 6-byte entries", ErrorCode.FRAME_SIZE_ERROR)
        for offset in range(0, len(payload), 6):
            key = int.from_bytes(payload[offset : offset + 2], "big")
            value = UINT32.unpack_from(payload, offset + 2)[0]
            if key == Setting.INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError("initial window above 2**31-1", ErrorCode.FLOW_CONTROL_ERROR)
                delta, self._peer_stream_window = value - self._peer_stream_window, value
                for stream in self._streams.values():
                    stream.send_window += delta
            elif key == Setting.MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= (1 << 24) - 1:
                    raise ProtocolError(f"MAX_FRAME_SIZE {value} out of range")
                self._peer_max_frame = value
        out.append(frame(Frame.SETTINGS, Flag.ACK, 0))
        self._flush_all(out)

    def _window_update(self, stream_id: int, payload: bytes, out: list[bytes]) -> None:
        if len(payload) != 4:
            raise ProtocolError("WINDOW_UPDATE payload must be 4 bytes", ErrorCode.FRAME_SIZE_ERROR)
        increment = UINT32.unpack(payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise ProtocolError("connection window above 2**31-1", ErrorCode.FLOW_CONTROL_ERROR)
            self._flush_all(out)
        elif (stream := self._streams.get(stream_id)) is not None:
            stream.send_window += increment
            self._flush(stream, out)

    def _reset(self, stream_id: int) -> None:
        now = time.monotonic()
        second, count = self._resets
        self._resets = (second, count + 1) if now - second < 1.0 else (now, 1)
        if self._resets[1] > RESETS_PER_SECOND:
            raise ProtocolError("too many stream resets", ErrorCode.ENHANCE_YOUR_CALM)
        stream = self._streams.pop(stream_id, None)
        if stream is not None and stream.task is not None:
            stream.task.cancel()
        self._close_if_done()

    # --- calls --------------------------------------------------------------------------------

    def _start(self, stream: _Stream) -> None:
        stream.task = asyncio.get_running_loop().create_task(self._serve(stream))

    async def _serve(self, stream: _Stream) -> None:
        reply = await self._handler(stream.request)
        if self._streams.get(stream.id) is not stream or self._transport.is_closing():
            return  # reset by the client, or the connection is gone
        out: list[bytes] = []
        if reply.code != grpc.StatusCode.OK:
            self._finish(stream, trailers_only(reply.code, reply.message), out)
        else:
            head = frame(Frame.HEADERS, Flag.END_HEADERS, stream.id, RESPONSE_HEADERS)
            out.append(head)
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
                return
            out.append(frame(Frame.DATA, 0, stream.id, data[:n].tobytes()))
            data = data[n:]
            self._send_window -= n
            stream.send_window -= n
        stream.outgoing = None
        out.append(stream.end)
        self._close(stream)

    def _flush_all(self, out: list[bytes]) -> None:
        for stream in list(self._streams.values()):
            self._flush(stream, out)

    def _finish(self, stream: _Stream, block: bytes, out: list[bytes], *, reset: bool = False) -> None:
        """End a stream with one header block; ``reset`` also stops a request still being sent."""
        out.append(frame(Frame.HEADERS, Flag.END_HEADERS | Flag.END_STREAM, stream.id, block))
        if reset:
            out.append(rst_stream(stream.id, ErrorCode.NO_ERROR))
        self._close(stream)

    def _close(self, stream: _Stream) -> None:
        self._streams.pop(stream.id, None)
        self._close_if_done()

    def _close_if_done(self) -> None:
        """Once going away and idle, hang up: after this callback, so what it writes goes first."""
        if not self._streams:
            self.idle.set()
            if self._going_away:
                asyncio.get_running_loop().call_soon(self._transport.close)

    def _write(self, out: list[bytes]) -> None:
        if out and not self._transport.is_closing():
            self._transport.write(b"".join(out))

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


def _request(headers: list[tuple[str, str]]) -> tuple[Request | None, bytes | None]:
    """The call that a request's headers open, or the header block that refuses it."""
    pseudo: dict[str, str] = {}
    metadata: list[tuple[str, str]] = []
    timeout = None
    content_type = ""
    for name, value in headers:
        if name.startswith(":"):
            pseudo[name] = value
        elif name == "content-type":
            content_type = value
        elif name == "grpc-timeout":
            timeout = value
        elif name not in UNREAD_METADATA:
            metadata.append((name, value))
    if not content_type.startswith("application/grpc"):
        return None, NOT_GRPC
    if pseudo.get(":method") != "POST" or not pseudo.get(":path"):
        return None, trailers_only(grpc.StatusCode.INTERNAL, "a gRPC call is a POST with a :path")
    return Request(pseudo[":path"], metadata, timeout), None
