"""The fast path's HTTP/2 server on its own: wire rules, stock gRPC clients, and hostile peers.

The server runs in a thread with its own event loop and a test servicer whose behaviour each
request picks through its ``id``; calls come from grpcio's C-core client (the one tritonclient
uses) and, for what no well-behaved client sends, from raw HTTP/2 bytes on a socket. After every
hostile connection a stock client must still get its answer: one peer cannot harm another.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import random
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote

import grpc
import hpack
import pytest

from gateway.api import grpc_predict_v2_pb2 as oip
from gateway.fastpath.connection import Http2Connection
from gateway.fastpath.edge import Edge, Limits
from gateway.fastpath.frames import (
    PREFACE,
    RESPONSE_HEADERS,
    ErrorCode,
    Flag,
    Frame,
    UnknownEncodingError,
    encode_headers,
    frame,
    grpc_message,
    message_prefix,
    parse_timeout,
    trailers,
)
from gateway.fastpath.server import FastPathServer, Route
from gateway.server.auth import Tenants, current_tenant
from models.errors import InvalidArgumentError, ResourceExhaustedError

METHOD = "/inference.GRPCInferenceService/ModelInfer"
LIVE = "/inference.GRPCInferenceService/ServerLive"
TIMEOUT = 20.0
MAX_MESSAGE = 4 << 20


# -- the wire rules ---------------------------------------------------------------------------


def test_response_headers_and_trailers_decode_with_a_standard_hpack_decoder():
    decoder = hpack.Decoder()
    assert decoder.decode(RESPONSE_HEADERS) == [
        (":status", "200"),
        ("content-type", "application/grpc"),
        ("grpc-accept-encoding", "identity,gzip,deflate"),
    ]
    message = "unknown model 'ü'; 100% sure\nsecond line " + "x" * 300  # non-ASCII, %, newline, > 127 bytes
    decoded = dict(decoder.decode(trailers(grpc.StatusCode.NOT_FOUND, message)))
    assert decoded["grpc-status"] == "5"
    assert unquote(decoded["grpc-message"]) == message
    assert all(32 <= ord(c) < 127 for c in decoded["grpc-message"])  # percent-encoded, as gRPC's spec asks
    assert decoder.decode(encode_headers([("a" * 200, "b" * 7_000)])) == [("a" * 200, "b" * 7_000)]
    assert len(decoder.header_table.dynamic_entries) == 0  # literals without indexing: no state
    long = dict(decoder.decode(trailers(grpc.StatusCode.INTERNAL, "ü" * 5000)))["grpc-message"]
    assert len(long) <= 2048 and unquote(long) == "ü" * (len(long) // 6)  # cut between escapes


@pytest.mark.parametrize(("value", "seconds"), [("100m", 0.1), ("5S", 5.0), ("2H", 7200.0), ("99999999n", 0.099999999)])
def test_grpc_timeouts_parse(value, seconds):
    assert parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", ["", "5", "S", "123456789S", "10x", "-5S", "1.5S"])
def test_malformed_grpc_timeouts_are_refused(value):
    with pytest.raises(InvalidArgumentError, match="grpc-timeout"):
        parse_timeout(value)


def test_a_unary_body_holds_exactly_one_message_compressed_or_not():
    assert grpc_message(message_prefix(3) + b"abc", None, 100) == b"abc"
    assert grpc_message(message_prefix(0), None, 100) == b""
    for body in (b"", b"\x00\x00", message_prefix(4) + b"abc", message_prefix(2) + b"abc"):
        with pytest.raises(InvalidArgumentError, match="message"):
            grpc_message(body, None, 100)
    for encoding, packed in (("gzip", gzip.compress(b"abc" * 30)), ("deflate", zlib.compress(b"abc" * 30))):
        body = b"\x01" + struct.pack(">I", len(packed)) + packed
        assert grpc_message(body, encoding, 100) == b"abc" * 30
        with pytest.raises(ResourceExhaustedError):  # a bomb is inflated no further than the limit
            grpc_message(body, encoding, 89)
        with pytest.raises(InvalidArgumentError, match="truncated"):
            grpc_message(b"\x01" + struct.pack(">I", len(packed) - 4) + packed[:-4], encoding, 100)
    with pytest.raises(InvalidArgumentError, match="corrupt"):
        grpc_message(b"\x01" + struct.pack(">I", 3) + b"abc", "gzip", 100)
    with pytest.raises(UnknownEncodingError, match="snappy"):
        grpc_message(b"\x01" + struct.pack(">I", 3) + b"abc", "snappy", 100)


# -- a server to talk to ----------------------------------------------------------------------


class Behaviour:
    """ModelInfer answers as its request ``id`` says; the log records what the handlers saw."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.tenants: list[str] = []

    async def ModelInfer(self, request, context):
        kind, _, argument = request.id.partition(":")
        if kind == "echo":
            return oip.ModelInferResponse(id=request.id, raw_output_contents=list(request.raw_input_contents))
        if kind == "big":
            return oip.ModelInferResponse(id=request.id, raw_output_contents=[b"\x07" * int(argument)])
        if kind == "sleep":
            await asyncio.sleep(float(argument))
            return oip.ModelInferResponse(id=request.id)
        if kind == "hang":
            try:
                await asyncio.sleep(60)
            finally:
                self.cancelled.set()
        if kind == "abort":
            await context.abort(grpc.StatusCode.NOT_FOUND, argument)
        if kind == "tenant":
            self.tenants.append(current_tenant())
            return oip.ModelInferResponse(id=current_tenant())
        raise RuntimeError("a secret detail that must not reach the caller")

    async def ServerLive(self, request, context):
        return oip.ServerLiveResponse(live=True)


def routes_of(behaviour: Behaviour) -> dict[str, Route]:
    return {
        METHOD: Route(oip.ModelInferRequest.FromString, behaviour.ModelInfer),
        LIVE: Route(oip.ServerLiveRequest.FromString, behaviour.ServerLive),
    }


class Running:
    """A :class:`FastPathServer` on a loopback port, in a thread with its own event loop."""

    def __init__(self, behaviour: Behaviour, *, api_keys: dict[str, str] | None = None, **limits) -> None:
        tenants = Tenants(api_keys or {})
        limits = Limits(max_message_bytes=MAX_MESSAGE, **limits)
        self.server = FastPathServer(routes_of(behaviour), tenants, limits, None)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = self.call(self.server.start("127.0.0.1:0"))
        self.target = f"127.0.0.1:{self.port}"

    def call(self, coroutine, timeout: float = TIMEOUT):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        self.call(self.server.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(TIMEOUT)


@pytest.fixture
def behaviour() -> Behaviour:
    return Behaviour()


@pytest.fixture
def running(behaviour) -> Iterator[Running]:
    server = Running(behaviour, max_concurrent_streams=64)
    yield server
    server.stop()


def stub(target: str, **options):
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)])
    return channel, channel.unary_unary(
        METHOD,
        request_serializer=oip.ModelInferRequest.SerializeToString,
        response_deserializer=oip.ModelInferResponse.FromString,
    )


def infer(target: str, id: str, *, raw: list[bytes] = (), **kwargs) -> oip.ModelInferResponse:
    channel, call = stub(target)
    with channel:
        return call(oip.ModelInferRequest(id=id, raw_input_contents=raw), timeout=TIMEOUT, **kwargs)


def refused(target: str, id: str, code: grpc.StatusCode, **kwargs) -> str:
    with pytest.raises(grpc.RpcError) as failure:
        infer(target, id, **kwargs)
    assert failure.value.code() == code, failure.value.details()
    return failure.value.details()


def assert_serving(server: Running) -> None:
    assert infer(server.target, "echo", raw=[b"still here"]).raw_output_contents == [b"still here"]


# -- stock clients ----------------------------------------------------------------------------


def test_a_stock_client_gets_its_answers(running):
    assert infer(running.target, "echo", raw=[b"a", b"bc"]).raw_output_contents == [b"a", b"bc"]
    with grpc.insecure_channel(running.target) as channel:
        live = channel.unary_unary(LIVE, response_deserializer=oip.ServerLiveResponse.FromString)
        assert live(b"", timeout=TIMEOUT).live


@pytest.mark.parametrize("size", [70_000, 1_000_000, 3_000_000])
def test_messages_larger_than_a_frame_and_a_window_cross_whole_both_ways(running, size):
    payload = bytes(range(256)) * (size // 256)
    assert infer(running.target, "echo", raw=[payload]).raw_output_contents == [payload]
    assert infer(running.target, f"big:{size}").raw_output_contents == [b"\x07" * size]


def test_many_calls_at_once_on_one_connection_each_get_their_own_answer(running):
    channel, call = stub(running.target)
    with channel:
        futures = [call.future(oip.ModelInferRequest(id=f"sleep:0.{i % 3}"), timeout=TIMEOUT) for i in range(48)]
        futures += [call.future(oip.ModelInferRequest(id=f"big:{1000 * i}"), timeout=TIMEOUT) for i in range(48)]
        answers = [f.result() for f in futures]
    assert [a.id for a in answers[:48]] == [f"sleep:0.{i % 3}" for i in range(48)]
    assert [len(a.raw_output_contents[0]) if a.raw_output_contents else 0 for a in answers[48:]] == [
        1000 * i for i in range(48)
    ]


def test_calls_from_many_connections_at_once(running):
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: infer(running.target, "echo", raw=[str(i).encode()]), range(64)))
    assert [r.raw_output_contents[0] for r in results] == [str(i).encode() for i in range(64)]


# -- statuses ---------------------------------------------------------------------------------


def test_an_abort_reaches_the_client_with_its_code_and_exact_message(running):
    message = "model 'ü' not found: 100% sure"
    assert refused(running.target, f"abort:{message}", grpc.StatusCode.NOT_FOUND) == message
    assert_serving(running)


def test_a_handler_bug_is_internal_without_its_details(running, caplog):
    details = refused(running.target, "bug", grpc.StatusCode.INTERNAL)
    assert "secret" not in details and "logged" in details
    assert "a secret detail" in caplog.text  # the traceback is in the server's log
    assert_serving(running)


def test_an_unserved_method_is_unimplemented(running):
    with grpc.insecure_channel(running.target) as channel, pytest.raises(grpc.RpcError) as failure:
        channel.unary_unary("/hegate.v1.EncryptedInference/ListModels")(b"", timeout=TIMEOUT)
    assert failure.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "not served on the fast path" in failure.value.details()


def test_undecodable_bytes_are_an_invalid_argument(running):
    with grpc.insecure_channel(running.target) as channel, pytest.raises(grpc.RpcError) as failure:
        channel.unary_unary(METHOD)(b"\xff\xff\xff", timeout=TIMEOUT)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert_serving(running)


def test_a_message_above_the_limit_is_resource_exhausted_and_the_connection_lives_on(running):
    channel, call = stub(running.target)
    with channel:
        with pytest.raises(grpc.RpcError) as failure:
            call(oip.ModelInferRequest(id="echo", raw_input_contents=[b"\x00" * (MAX_MESSAGE + 1)]), timeout=TIMEOUT)
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert f"{MAX_MESSAGE} bytes" in failure.value.details()
        assert call(oip.ModelInferRequest(id="echo", raw_input_contents=[b"ok"]), timeout=TIMEOUT).raw_output_contents


def test_the_server_stops_work_past_the_callers_deadline(running, behaviour):
    with pytest.raises(grpc.RpcError) as failure:
        channel, call = stub(running.target)
        with channel:
            call(oip.ModelInferRequest(id="hang"), timeout=0.3)
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert behaviour.cancelled.wait(5)
    assert_serving(running)


@pytest.mark.parametrize(
    ("metadata", "message"),
    [((), "missing API key"), ((("x-api-key", "wrong"),), "unknown API key")],
)
def test_api_keys_admit_tenants_and_refuse_the_rest(behaviour, metadata, message):
    server = Running(behaviour, api_keys={"k1": "alice", "k2": "bob"})
    try:
        details = refused(server.target, "tenant", grpc.StatusCode.UNAUTHENTICATED, metadata=metadata)
        assert message in details and behaviour.tenants == []
        assert infer(server.target, "tenant", metadata=(("x-api-key", "k2"),)).id == "bob"
        assert infer(server.target, "tenant", metadata=(("authorization", "Bearer k1"),)).id == "alice"
    finally:
        server.stop()


# -- stopping ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call_id", "grace", "outcome"),
    [("sleep:0.5", 5.0, grpc.StatusCode.OK), ("hang", 0.3, grpc.StatusCode.UNAVAILABLE)],
)
def test_stop_gives_calls_in_flight_the_grace_period_and_then_refuses_all(behaviour, call_id, grace, outcome):
    server = Running(behaviour)
    channel, call = stub(server.target)
    with channel:
        in_flight = call.future(oip.ModelInferRequest(id=call_id), timeout=TIMEOUT)
        time.sleep(0.2)
        started = time.monotonic()
        server.stop(grace=grace)
        assert time.monotonic() - started < 3.0  # the slow call's 0.3 s left, or the 0.3 s grace
        assert in_flight.code() == outcome
    dropped = call_id == "hang"
    assert behaviour.cancelled.wait(5 if dropped else 0) == dropped  # dropped work is cancelled, not left running
    with pytest.raises(grpc.RpcError) as failure:
        infer(server.target, "echo")
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


# -- hostile peers: raw HTTP/2 --------------------------------------------------------------


class Peer:
    """A raw HTTP/2 client: frames out, frames in, nothing checked unless the test checks it."""

    def __init__(self, port: int) -> None:
        # from another loopback address: the penalty for a peer cut off for abuse (ENHANCE_YOUR_CALM)
        # must not fall on the stock clients that check the server still serves (127.0.0.1)
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.2", 0))
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.socket.sendall(data)

    def start(self) -> Peer:
        self.send(PREFACE + frame(Frame.SETTINGS, 0, 0))
        return self

    def headers(
        self, stream: int, *, end_stream: bool = False, content_type: str = "application/grpc", extra=()
    ) -> bytes:
        return self.request_headers(self.encoder, stream, end_stream=end_stream, content_type=content_type, extra=extra)

    @staticmethod
    def request_headers(
        encoder: hpack.Encoder,
        stream: int,
        *,
        end_stream: bool = False,
        content_type: str = "application/grpc",
        extra=(),
    ) -> bytes:
        """A HEADERS frame opening a ModelInfer call on ``stream``."""
        block = encoder.encode(
            [(":method", "POST"), (":scheme", "http"), (":path", METHOD), (":authority", "x"),
             ("content-type", content_type), ("te", "trailers"), *extra]
        )  # fmt: skip
        return frame(Frame.HEADERS, Flag.END_HEADERS | (Flag.END_STREAM if end_stream else 0), stream, block)

    def frames(self) -> Iterator[tuple[int, int, int, bytes]]:
        """Frames as they arrive, until the server closes the connection."""
        while True:
            while len(self.buffer) >= 9:
                length = int.from_bytes(self.buffer[:3], "big")
                if len(self.buffer) < 9 + length:
                    break
                kind, flags, stream = self.buffer[3], self.buffer[4], int.from_bytes(self.buffer[5:9], "big")
                payload, self.buffer = self.buffer[9 : 9 + length], self.buffer[9 + length :]
                yield kind, flags, stream, payload
            try:
                data = self.socket.recv(65536)
            except (TimeoutError, ConnectionResetError):
                return
            if not data:
                return
            self.buffer += data

    def wait_for(self, kind: Frame, stream: int | None = None) -> tuple[int, bytes]:
        for got, flags, on, payload in self.frames():
            if got == kind and (stream is None or on == stream):
                return flags, payload
        raise AssertionError(f"the server closed without sending {kind.name}")

    def goaway_code(self) -> ErrorCode:
        _, payload = self.wait_for(Frame.GOAWAY)
        return ErrorCode(int.from_bytes(payload[4:8], "big"))

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def peer(running) -> Iterator[Peer]:
    connection = Peer(running.port)
    yield connection
    connection.close()
    assert_serving(running)  # whatever this peer did, other clients are served


def test_a_connection_that_is_not_http2_is_closed(peer):
    peer.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert peer.goaway_code() == ErrorCode.PROTOCOL_ERROR
    assert peer.socket.recv(1) == b""  # and hung up


def test_an_oversized_frame_ends_the_connection_with_frame_size_error(peer):
    peer.start().send(peer.headers(1) + struct.pack(">I", 20_000)[1:] + bytes([Frame.DATA, 0]) + struct.pack(">I", 1))
    assert peer.goaway_code() == ErrorCode.FRAME_SIZE_ERROR


def test_a_call_that_is_not_grpc_gets_http_415(peer):
    peer.start().send(peer.headers(1, end_stream=True, content_type="application/json"))
    _, block = peer.wait_for(Frame.HEADERS, stream=1)
    assert peer.decoder.decode(block) == [(":status", "415")]


def test_streams_beyond_the_limit_are_refused_and_the_others_served(behaviour):
    with server_and_peer(behaviour, max_concurrent_streams=2) as (_, peer):
        peer.send(peer.headers(1) + peer.headers(3) + peer.headers(5))
        _, payload = peer.wait_for(Frame.RST_STREAM, stream=5)
        assert ErrorCode(int.from_bytes(payload, "big")) == ErrorCode.REFUSED_STREAM
        body = oip.ModelInferRequest(id="echo").SerializeToString()
        peer.send(frame(Frame.DATA, Flag.END_STREAM, 1, message_prefix(len(body)) + body))
        assert status_of(peer, 1) == ("0", "")


def test_a_flood_of_resets_ends_the_connection(peer):
    peer.start()
    data = b"".join(
        peer.headers(stream) + frame(Frame.RST_STREAM, 0, stream, struct.pack(">I", ErrorCode.CANCEL))
        for stream in range(1, 2 * 1500, 2)
    )
    peer.send(data)
    assert peer.goaway_code() == ErrorCode.ENHANCE_YOUR_CALM


def test_a_header_block_that_never_ends_is_cut_off(peer):
    continuation = frame(Frame.CONTINUATION, 0, 1, b"\x00" * 16_000)
    peer.start().send(frame(Frame.HEADERS, 0, 1, b"\x00" * 100) + continuation + continuation)
    assert peer.goaway_code() == ErrorCode.ENHANCE_YOUR_CALM


@contextlib.contextmanager
def server_and_peer(behaviour: Behaviour, **options) -> Iterator[tuple[Running, Peer]]:
    """A server with its own ``options`` (limits, API keys) and one raw peer connected to it."""
    server = Running(behaviour, **options)
    peer = Peer(server.port).start()
    try:
        yield server, peer
    finally:
        peer.close()
        server.stop()


def code(status: grpc.StatusCode) -> str:
    """``status`` as ``grpc-status`` carries it."""
    return str(status.value[0])


def status_of(peer: Peer, stream: int) -> tuple[str, str]:
    """The gRPC status and message that end ``stream``."""
    while True:
        flags, block = peer.wait_for(Frame.HEADERS, stream=stream)
        fields = dict(peer.decoder.decode(block))
        if flags & Flag.END_STREAM:
            return fields["grpc-status"], unquote(fields.get("grpc-message", ""))


def test_repeated_header_blocks_mean_what_the_dynamic_table_says_now(behaviour):
    """The same block bytes can name other headers once the table has changed: the connection's
    cache of the last block must never answer for a table that moved on."""
    base = encode_headers(
        [(":method", "POST"), (":scheme", "http"), (":path", METHOD), ("content-type", "application/grpc")]
    )

    def indexed_key(key: str) -> bytes:  # literal with incremental indexing: x-api-key becomes entry 62
        return bytes([0x40, 9]) + b"x-api-key" + bytes([len(key)]) + key.encode()

    newest, third = base + b"\xbe", base + b"\xc0"  # "dynamic entry 62 / 64", whatever they hold by then
    body = oip.ModelInferRequest(id="tenant").SerializeToString()
    alice, bob = base + indexed_key("k1"), base + indexed_key("k2")
    # alice twice: the same bytes, and each adds an entry (a decoder that skipped the second would
    # lose step with the client's table and read entry 64 wrongly or not at all)
    sequence = [(alice, "alice"), (alice, "alice"), (newest, "alice"), (newest, "alice"), (bob, "bob"),
                (newest, "bob"), (newest, "bob"), (third, "alice")]  # fmt: skip
    with server_and_peer(behaviour, api_keys={"k1": "alice", "k2": "bob"}) as (_, peer):
        for index, (block, tenant) in enumerate(sequence):
            stream = 2 * index + 1
            peer.send(frame(Frame.HEADERS, Flag.END_HEADERS, stream, block))
            peer.send(frame(Frame.DATA, Flag.END_STREAM, stream, message_prefix(len(body)) + body))
            _, data = peer.wait_for(Frame.DATA, stream=stream)
            assert oip.ModelInferResponse.FromString(data[5:]).id == tenant, index
            assert status_of(peer, stream) == ("0", "")


def test_gzip_messages_are_accepted_and_unknown_encodings_unimplemented(peer):
    body = gzip.compress(oip.ModelInferRequest(id="echo", raw_input_contents=[b"zip" * 1000]).SerializeToString())
    framed = b"\x01" + struct.pack(">I", len(body)) + body
    peer.start().send(
        peer.headers(1, extra=[("grpc-encoding", "gzip")]) + frame(Frame.DATA, Flag.END_STREAM, 1, framed)
    )
    assert status_of(peer, 1) == ("0", "")
    peer.send(peer.headers(3, extra=[("grpc-encoding", "snappy")]) + frame(Frame.DATA, Flag.END_STREAM, 3, framed))
    status, message = status_of(peer, 3)
    assert status == code(grpc.StatusCode.UNIMPLEMENTED) and "identity,gzip,deflate" in message


def test_a_stock_client_may_compress(running):
    for _ in range(2):  # the second call knows the server's grpc-accept-encoding
        answer = infer(running.target, "echo", raw=[b"z" * 10_000], compression=grpc.Compression.Gzip)
        assert answer.raw_output_contents == [b"z" * 10_000]


def test_a_request_that_never_finishes_arriving_is_refused_in_time(behaviour):
    with server_and_peer(behaviour, request_seconds=0.4) as (server, peer):
        peer.send(peer.headers(1) + frame(Frame.DATA, 0, 1, message_prefix(100) + b"x" * 10))
        status, message = status_of(peer, 1)
        assert status == code(grpc.StatusCode.DEADLINE_EXCEEDED) and "0.4 s" in message
        assert_serving(server)


def test_an_idle_connection_is_closed(behaviour):
    with server_and_peer(behaviour, idle_seconds=0.4) as (server, peer):
        _, payload = peer.wait_for(Frame.GOAWAY)
        assert ErrorCode(int.from_bytes(payload[4:8], "big")) == ErrorCode.NO_ERROR and b"idle" in payload
        assert_serving(server)  # a busy connection is not idle: stock clients keep working


def test_one_connection_cannot_hold_more_request_bytes_than_its_budget(behaviour):
    with server_and_peer(behaviour, connection_buffer_bytes=1 << 20) as (server, peer):
        chunk = frame(Frame.DATA, 0, 1, message_prefix(2_000_000) + b"x" * 15_000)
        peer.send(peer.headers(1) + chunk + b"".join(frame(Frame.DATA, 0, 1, b"x" * 16_000) for _ in range(70)))
        status, message = status_of(peer, 1)
        assert status == code(grpc.StatusCode.RESOURCE_EXHAUSTED) and "holds" in message
        assert server.call(_held(server)) == 0  # given back with the stream
        assert_serving(server)


async def _held(server: Running) -> int:
    return server.server.edge.held


def test_connections_beyond_the_limit_are_turned_away(behaviour):
    server = Running(behaviour, max_connections=1, max_peer_connections=1)
    first = Peer(server.port).start()
    try:
        assert Peer(server.port).goaway_code() == ErrorCode.ENHANCE_YOUR_CALM
        body = oip.ModelInferRequest(id="echo").SerializeToString()
        first.send(first.headers(1) + frame(Frame.DATA, Flag.END_STREAM, 1, message_prefix(len(body)) + body))
        assert status_of(first, 1) == ("0", "")
    finally:
        first.close()
        server.stop()


def test_a_peer_that_does_not_read_gets_no_more_written_than_the_budgets_allow(running):
    """A peer that opens its windows wide, asks for 48 MB of replies and reads none: we stop
    writing once our write buffer is full, the replies wait against the connection's budget,
    the calls beyond it are reset, and the peer's own sends stall once we stop reading."""
    raw = socket.create_connection(("127.0.0.1", running.port), timeout=3, source_address=("127.0.0.2", 0))
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    encoder = hpack.Encoder()
    body = oip.ModelInferRequest(id="big:1000000").SerializeToString()
    framed = message_prefix(len(body)) + body
    calls = b"".join(
        Peer.request_headers(encoder, stream) + frame(Frame.DATA, Flag.END_STREAM, stream, framed)
        for stream in range(1, 97, 2)
    )
    wide = frame(Frame.SETTINGS, 0, 0, struct.pack(">HI", 4, (1 << 31) - 1)) + frame(
        Frame.WINDOW_UPDATE, 0, 0, struct.pack(">I", (1 << 31) - 1 - 65_535)
    )
    raw.sendall(PREFACE + wide + calls)
    time.sleep(1.0)

    async def state() -> tuple[int, int]:
        (connection,) = running.server.edge.connections
        return running.server.edge.held, connection._transport.get_write_buffer_size()

    held, unsent = running.call(state())
    assert held <= Limits(max_message_bytes=MAX_MESSAGE).connection_buffer_bytes
    assert unsent <= (1 << 20) + 16_384
    raw.close()


def test_a_peer_that_vanishes_mid_call_harms_nobody(peer):
    body = oip.ModelInferRequest(id="sleep:0.2").SerializeToString()
    peer.start().send(peer.headers(1) + frame(Frame.DATA, 0, 1, message_prefix(len(body) + 100) + body))
    peer.send(peer.headers(3) + frame(Frame.DATA, Flag.END_STREAM, 3, message_prefix(len(body)) + body))
    peer.close()


# -- random frames ----------------------------------------------------------------------------


class FakeTransport(asyncio.Transport):
    """Collects what the connection writes; closing is a flag."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _random_frames(rng: random.Random, count: int) -> bytes:
    """``count`` steps of a client that is mostly well-behaved: whole calls (headers split over
    CONTINUATION or not, bodies padded or split or not), window updates, pings, settings and resets
    on live streams, and now and then a frame of any type, flags, stream and payload."""
    encoder, stream, out = hpack.Encoder(), 1, []
    for _ in range(count):
        action = rng.random()
        if action < 0.5:
            headers = [(":method", "POST"), (":scheme", "http"), (":path", rng.choice([METHOD, METHOD, LIVE, "/x/y"])),
                       ("content-type", rng.choice(["application/grpc"] * 5 + ["text/plain"])),
                       *rng.choice([[], [("grpc-timeout", rng.choice(["1S", "1n", "zz"]))]]),
                       *rng.choice([[], [("grpc-encoding", rng.choice(["gzip", "br"]))]])]  # fmt: skip
            block = encoder.encode(headers)
            if rng.random() < 0.2:
                cut = rng.randrange(len(block))
                out += [
                    frame(Frame.HEADERS, 0, stream, block[:cut]),
                    frame(Frame.CONTINUATION, Flag.END_HEADERS, stream, block[cut:]),
                ]
            else:
                out.append(frame(Frame.HEADERS, Flag.END_HEADERS, stream, block))
            call = rng.choice(["echo", "sleep:0", "big:70000", "abort:x", "tenant"])
            body = oip.ModelInferRequest(id=call).SerializeToString()
            data = message_prefix(len(body)) + body
            if rng.random() < 0.1:
                data = b"\x01" + data[1:]  # flagged compressed
            if rng.random() < 0.3:
                cut = rng.randrange(len(data))
                out.append(frame(Frame.DATA, 0, stream, data[:cut]))
                data = data[cut:]
            if rng.random() < 0.2:
                out.append(frame(Frame.DATA, Flag.END_STREAM | Flag.PADDED, stream, bytes([3]) + data + b"\0\0\0"))
            elif rng.random() < 0.95:
                out.append(frame(Frame.DATA, Flag.END_STREAM, stream, data))
            stream += 2
        elif action < 0.6:
            target = rng.choice([0, stream - 2]) if stream > 1 else 0
            out.append(frame(Frame.WINDOW_UPDATE, 0, target, struct.pack(">I", rng.choice([1, 65_535, 1 << 20]))))
        elif action < 0.7:
            out.append(frame(Frame.PING, 0, 0, rng.randbytes(8)))
        elif action < 0.8:
            setting = rng.choice([(4, rng.choice([0, 1, 65_535, 1 << 20])), (5, 16_384), (1, 4096), (3, 100)])
            out.append(frame(Frame.SETTINGS, 0, 0, struct.pack(">HI", *setting)))
        elif action < 0.95:
            if stream > 1:
                out.append(frame(Frame.RST_STREAM, 0, stream - 2, struct.pack(">I", ErrorCode.CANCEL)))
        else:
            kind, flags = rng.choice([*range(10), 42]), rng.randrange(256)
            target = rng.choice([0, 1, 2, stream, stream - 2, 2**31 - 1])
            out.append(frame(kind, flags, max(0, target), rng.randbytes(rng.choice([0, 4, 5, 8, 9, 30]))))
    return b"".join(out)


def test_random_frame_sequences_end_in_answers_or_a_goaway_never_in_an_exception(behaviour):
    """1,000 seeded random conversations, fed in random slices: the connection may answer, reset
    streams or hang up with GOAWAY, but nothing may raise, in it or in a task it started; and
    many calls are answered (a fuzzer that only ever hits the first check tests nothing)."""
    failures: list[str] = []
    limits = Limits(max_message_bytes=1 << 16, max_concurrent_streams=8)
    server = FastPathServer(routes_of(behaviour), Tenants({}), limits, None)  # for its handler; no socket

    async def run() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: failures.append(str(context)))
        rng = random.Random(7)
        for _ in range(1000):
            connection = Http2Connection(server.handle, Edge(limits, Tenants({})))
            transport = FakeTransport()
            connection.connection_made(transport)
            data = PREFACE + frame(Frame.SETTINGS, 0, 0) + _random_frames(rng, 40)
            position = 0
            while position < len(data) and not transport.closing:
                step = rng.randint(1, 200)
                connection.data_received(data[position : position + step])
                position += step
                if rng.random() < 0.3:
                    await asyncio.sleep(0)
            for _ in range(3):
                await asyncio.sleep(0)
            answers.append(transport.written.count(b"grpc-status"))
            connection.connection_lost(None)
        await asyncio.sleep(0.01)

    answers: list[int] = []
    asyncio.run(run())
    assert failures == []
    assert sum(answers) > 2 * len(answers) and sum(a >= 5 for a in answers) > len(answers) / 4


def test_a_handler_that_raises_still_answers_internal(caplog):
    async def broken(request):
        raise RuntimeError("a bug under the server's own mapping")

    async def run() -> bytes:
        connection = Http2Connection(broken, Edge(Limits(max_message_bytes=MAX_MESSAGE), Tenants({})))
        transport = FakeTransport()
        connection.connection_made(transport)
        body = message_prefix(0)
        connection.data_received(PREFACE + frame(Frame.SETTINGS, 0, 0) + Peer.request_headers(hpack.Encoder(), 1))
        connection.data_received(frame(Frame.DATA, Flag.END_STREAM, 1, body))
        for _ in range(3):
            await asyncio.sleep(0)
        connection.connection_lost(None)
        return bytes(transport.written)

    written = asyncio.run(run())
    assert b"grpc-status\x0213" in written and "a bug under" in caplog.text


def test_stop_waits_for_replies_to_drain_and_aborts_only_what_outlives_the_grace():
    """A connection counts as done when its transport has closed (everything written has left),
    not when its last reply was queued: a slow reader keeps its bytes if it drains within the
    grace period, and only a connection still open at the deadline is cut."""

    class Connection:
        def __init__(self, drains_after: float | None) -> None:
            self.closed = asyncio.Event()
            self.drains_after = drains_after
            self.aborted = False

        def go_away(self) -> None:  # the reply is queued; the transport closes once it has drained
            if self.drains_after is not None:
                asyncio.get_running_loop().call_later(self.drains_after, self.closed.set)

        def abort(self) -> None:
            self.aborted = True

    class Listener:
        def close(self) -> None:
            pass

        async def wait_closed(self) -> None:
            pass

    async def run() -> tuple[Connection, Connection, float]:
        server = FastPathServer({}, Tenants({}), Limits(max_message_bytes=MAX_MESSAGE), None)
        slow, stuck = Connection(drains_after=0.3), Connection(drains_after=None)
        server._server, server.edge.connections = Listener(), {slow, stuck}
        started = time.monotonic()
        await server.stop(grace=1.0)
        return slow, stuck, time.monotonic() - started

    slow, stuck, seconds = asyncio.run(run())
    assert not slow.aborted and slow.closed.is_set()
    assert stuck.aborted and 1.0 <= seconds < 2.0


def test_a_connection_is_closed_only_when_its_transport_is_gone():
    async def nothing(request):
        raise AssertionError("no call is made")

    async def run() -> list[bool]:
        connection = Http2Connection(nothing, Edge(Limits(max_message_bytes=MAX_MESSAGE), Tenants({})))
        transport = FakeTransport()
        connection.connection_made(transport)
        connection.go_away()  # nothing open: it hangs up, after this callback
        await asyncio.sleep(0)
        seen = [transport.closing, connection.closed.is_set()]
        connection.connection_lost(None)  # the transport has flushed what was queued and closed
        return [*seen, connection.closed.is_set()]

    assert asyncio.run(run()) == [True, False, True]


# -- issue 14: the hardened edge ----------------------------------------------------------------


def _echo_call(peer: Peer, stream: int, *, extra=()) -> None:
    body = oip.ModelInferRequest(id="echo").SerializeToString()
    peer.send(
        peer.headers(stream, extra=extra) + frame(Frame.DATA, Flag.END_STREAM, stream, message_prefix(len(body)) + body)
    )


def test_a_zero_grpc_timeout_is_deadline_exceeded(peer):
    _echo_call(peer.start(), 1, extra=[("grpc-timeout", "0n")])
    assert status_of(peer, 1)[0] == code(grpc.StatusCode.DEADLINE_EXCEEDED)


@pytest.mark.parametrize(
    "header", [("x-note", "a\x00b"), ("x-note", "a\rb"), ("x-note", "a\nb"), ("X-Note", "a"), ("te", "gzip")]
)
def test_malformed_headers_reset_the_stream_with_protocol_error(peer, header):
    _echo_call(peer.start(), 1, extra=[header])
    _, payload = peer.wait_for(Frame.RST_STREAM, stream=1)
    assert ErrorCode(int.from_bytes(payload, "big")) == ErrorCode.PROTOCOL_ERROR
    _echo_call(peer, 3)  # the connection lives on
    assert status_of(peer, 3) == ("0", "")


def test_enable_push_other_than_0_or_1_ends_the_connection(peer):
    peer.start().send(frame(Frame.SETTINGS, 0, 0, struct.pack(">HI", 2, 2)))
    assert peer.goaway_code() == ErrorCode.PROTOCOL_ERROR


def test_the_key_is_checked_on_headers_before_any_body_is_held(behaviour):
    with server_and_peer(behaviour, api_keys={"k1": "alice"}) as (server, peer):
        peer.send(peer.headers(1, extra=[("x-api-key", "wrong")]) + frame(Frame.DATA, 0, 1, message_prefix(1 << 20)))
        status, message = status_of(peer, 1)  # answered while the body is still "arriving"
        assert status == code(grpc.StatusCode.UNAUTHENTICATED) and "unknown API key" in message
        peer.wait_for(Frame.RST_STREAM, stream=1)
        assert server.call(_held(server)) == 0 and behaviour.tenants == []
        _echo_call(peer, 3, extra=[("x-api-key", " k1 ")])  # trimmed
        assert status_of(peer, 3) == ("0", "")


def test_a_header_block_of_too_many_continuation_frames_is_cut_off(peer):
    empty = frame(Frame.CONTINUATION, 0, 1, b"")
    peer.start().send(frame(Frame.HEADERS, 0, 1, b"\x83") + empty * 5)
    assert peer.goaway_code() == ErrorCode.ENHANCE_YOUR_CALM


@pytest.mark.parametrize(
    ("kind", "payload"),
    [(Frame.PING, b"12345678"), (Frame.PRIORITY, b"\x00\x00\x00\x00\x10"), (Frame.WINDOW_UPDATE, b"\x00\x00\x00\x01")],
)
def test_control_frame_floods_get_enhance_your_calm_and_the_address_a_penalty(behaviour, kind, payload):
    with server_and_peer(behaviour, penalty_seconds=30) as (server, peer):
        stream = 3 if kind == Frame.PRIORITY else 0
        peer.send(frame(kind, 0, stream, payload) * 2000)
        assert peer.goaway_code() == ErrorCode.ENHANCE_YOUR_CALM
        again = Peer(server.port)  # the same address, refused before anything is said
        assert again.socket.recv(100) == b""
        again.close()
        assert_serving(server)  # 127.0.0.1 is another peer


def test_control_frames_are_not_progress_an_idle_connection_closes_anyway(behaviour):
    with server_and_peer(behaviour, idle_seconds=0.6) as (_, peer):
        started = time.monotonic()
        with contextlib.suppress(OSError):
            for _ in range(30):  # a PING every 0.1 s (within the PING budget), which used to keep it open
                peer.send(frame(Frame.PING, 0, 0, b"12345678"))
                time.sleep(0.1)
        closed = time.monotonic() - started
        _, payload = peer.wait_for(Frame.GOAWAY)
        assert b"idle" in payload and closed < 2.0


def test_a_reply_blocked_by_a_zero_window_is_released_after_the_request_time(behaviour):
    with server_and_peer(behaviour, request_seconds=0.5) as (server, peer):
        peer.send(frame(Frame.SETTINGS, 0, 0, struct.pack(">HI", 4, 0)))
        body = oip.ModelInferRequest(id="big:200000").SerializeToString()
        peer.send(peer.headers(1) + frame(Frame.DATA, Flag.END_STREAM, 1, message_prefix(len(body)) + body))
        peer.wait_for(Frame.HEADERS, stream=1)  # the reply started: headers are not flow-controlled
        assert server.call(_held(server)) > 200_000  # its DATA waits, counted
        _, payload = peer.wait_for(Frame.RST_STREAM, stream=1)
        assert ErrorCode(int.from_bytes(payload, "big")) == ErrorCode.CANCEL
        assert server.call(_held(server)) == 0


def test_one_address_cannot_take_every_connection(behaviour):
    server = Running(behaviour, max_connections=10, max_peer_connections=2)
    peers = [Peer(server.port).start() for _ in range(2)]
    try:
        assert Peer(server.port).goaway_code() == ErrorCode.ENHANCE_YOUR_CALM  # a third from 127.0.0.2
        assert_serving(server)  # 127.0.0.1 still gets in
    finally:
        for peer in peers:
            peer.close()
        server.stop()
