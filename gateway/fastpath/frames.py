"""HTTP/2 framing (RFC 9113) and gRPC's wire rules, as far as a unary gRPC server needs them.

Only the server's side: a frame header packs into 9 bytes, response headers are HPACK literals
that never touch the dynamic table (so the encoder keeps no state and a constant block can be
built once), and gRPC's own pieces (the 5-byte message prefix, ``grpc-timeout``, the
percent-encoded ``grpc-message``) are parsed or written here. Request header blocks are decoded
by the ``hpack`` package, which keeps the client's dynamic table.
"""

from __future__ import annotations

import struct
import zlib
from enum import IntEnum
from urllib.parse import quote

import grpc

from models.errors import InvalidArgumentError, ResourceExhaustedError

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEADER = struct.Struct(">BHBBI")  # length (24 bits as 8 + 16), type, flags, stream id
MESSAGE_PREFIX = struct.Struct(">BI")  # gRPC: compressed flag, message length
UINT32 = struct.Struct(">I")
DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_WINDOW = (1 << 31) - 1


class Frame(IntEnum):
    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9


class Flag:
    END_STREAM = 0x1
    ACK = 0x1
    END_HEADERS = 0x4
    PADDED = 0x8
    PRIORITY = 0x20


class Setting(IntEnum):
    HEADER_TABLE_SIZE = 0x1
    ENABLE_PUSH = 0x2
    MAX_CONCURRENT_STREAMS = 0x3
    INITIAL_WINDOW_SIZE = 0x4
    MAX_FRAME_SIZE = 0x5
    MAX_HEADER_LIST_SIZE = 0x6


class ErrorCode(IntEnum):
    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    ENHANCE_YOUR_CALM = 0xB


class ProtocolError(Exception):
    """The peer broke HTTP/2; the connection ends with GOAWAY carrying ``code``."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code


def frame(kind: Frame, flags: int, stream: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return FRAME_HEADER.pack(n >> 16, n & 0xFFFF, kind, flags, stream) + payload


def settings_frame(values: dict[Setting, int]) -> bytes:
    return frame(Frame.SETTINGS, 0, 0, b"".join(struct.pack(">HI", key, value) for key, value in values.items()))


def window_update(stream: int, increment: int) -> bytes:
    return frame(Frame.WINDOW_UPDATE, 0, stream, UINT32.pack(increment))


def rst_stream(stream: int, code: ErrorCode) -> bytes:
    return frame(Frame.RST_STREAM, 0, stream, UINT32.pack(code))


def goaway(last_stream: int, code: ErrorCode, reason: str = "") -> bytes:
    return frame(Frame.GOAWAY, 0, 0, struct.pack(">II", last_stream, code) + reason.encode()[:256])


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541 5.1) whose first byte carries ``first`` above the prefix."""
    top = (1 << prefix_bits) - 1
    if value < top:
        return bytes([first | value])
    out = bytearray([first | top])
    value -= top
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_headers(pairs: list[tuple[str, str]]) -> bytes:
    """Literal header fields without indexing, new names, raw strings: no encoder state at all.

    ``:status: 200`` is static-table entry 8 and goes out as one byte.
    """
    out = bytearray()
    for name, value in pairs:
        if (name, value) == (":status", "200"):
            out.append(0x88)
            continue
        out.append(0x00)
        raw_name, raw_value = name.encode(), value.encode()
        out += _integer(len(raw_name), 7, 0x00) + raw_name + _integer(len(raw_value), 7, 0x00) + raw_value
    return bytes(out)


INFLATE_WBITS = {"gzip": 31, "deflate": 15}  # grpc-encoding -> zlib's framing (gzip; zlib, RFC 1950)
ACCEPT_ENCODING = ",".join(["identity", *INFLATE_WBITS])
RESPONSE_HEADERS = encode_headers(
    [(":status", "200"), ("content-type", "application/grpc"), ("grpc-accept-encoding", ACCEPT_ENCODING)]
)
MAX_STATUS_MESSAGE = 2048  # encoded bytes: well under any client's header list limit (grpc-java's is 8 KiB)
UNESCAPED = " !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~"  # printable ASCII but %, as gRPC's HTTP/2 spec asks


def trailers(code: grpc.StatusCode, message: str = "") -> bytes:
    """The ``grpc-status`` block, with the percent-encoded ``grpc-message`` (cut to 2 KiB)."""
    pairs = [("grpc-status", str(code.value[0]))]
    if message:
        encoded = quote(message, safe=UNESCAPED)
        if len(encoded) > MAX_STATUS_MESSAGE:
            cut = encoded.rfind("%", MAX_STATUS_MESSAGE - 2, MAX_STATUS_MESSAGE)  # not inside an escape
            encoded = encoded[: cut if cut != -1 else MAX_STATUS_MESSAGE]
        pairs.append(("grpc-message", encoded))
    return encode_headers(pairs)


OK_TRAILERS = trailers(grpc.StatusCode.OK)


def trailers_only(code: grpc.StatusCode, message: str) -> bytes:
    """A whole error response in one header block: status, content type and the gRPC status."""
    return RESPONSE_HEADERS + trailers(code, message)


TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def parse_timeout(value: str) -> float:
    """Seconds in a ``grpc-timeout`` value: at most 8 digits and a unit (``100m`` is 0.1 s)."""
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in TIMEOUT_UNITS:
        raise InvalidArgumentError(f"malformed grpc-timeout {value!r}")
    return int(digits) * TIMEOUT_UNITS[unit]


class UnknownEncodingError(Exception):
    """A message compressed with an encoding this server does not offer: UNIMPLEMENTED, as gRPC's
    spec asks (a transport status, so it is not one of the domain errors)."""


def grpc_message(body: bytes | bytearray, encoding: str | None, limit: int) -> bytes:
    """The one message of a unary request body (5-byte prefix, then the bytes), decompressed if
    its flag says so; inflating stops one byte past ``limit``, so a small bomb stays small.

    Raises:
        UnknownEncodingError: compressed, but not with gzip or deflate.
        ResourceExhaustedError: more than ``limit`` bytes once decompressed.
        InvalidArgumentError: not exactly one message, or corrupt compressed data.
    """
    if len(body) < MESSAGE_PREFIX.size:
        raise InvalidArgumentError("the request carries no gRPC message")
    compressed, length = MESSAGE_PREFIX.unpack_from(body)
    if length != len(body) - MESSAGE_PREFIX.size:
        raise InvalidArgumentError("a unary call carries exactly one message")
    message = memoryview(body)[MESSAGE_PREFIX.size :]
    if not compressed:
        return bytes(message)
    wbits = INFLATE_WBITS.get(encoding or "")
    if wbits is None:
        raise UnknownEncodingError(f"grpc-encoding {encoding!r} is not accepted; use one of {ACCEPT_ENCODING}")
    inflater = zlib.decompressobj(wbits)
    try:
        inflated = inflater.decompress(message, limit + 1)
    except zlib.error as exc:
        raise InvalidArgumentError(f"corrupt {encoding} message: {exc}") from None
    if len(inflated) > limit:
        raise ResourceExhaustedError(f"request message larger than the {limit} bytes allowed, once decompressed")
    if not inflater.eof:
        raise InvalidArgumentError(f"truncated {encoding} message")
    return inflated


def message_prefix(length: int) -> bytes:
    return MESSAGE_PREFIX.pack(0, length)
