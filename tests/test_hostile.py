"""A hostile peer against real ``hegate serve`` processes (API keys configured), on both ports, with
and without TLS: each attack of issue 14 and its kin, each with a measured ceiling.

The attacker is :mod:`bench.attacks` in its own process, speaking HTTP/2 through the ``h2`` package
(every frame the gateway sends is decoded by it; a frame ``h2`` refuses counts as a protocol
violation) from 127.0.0.2. While it attacks, a stock grpcio client on 127.0.0.1 calls both ports
with a valid key and must be answered every time, and the gateway's resident memory is sampled:
its growth must stay under the ceiling that the gateway's budgets imply (small budgets here, so
that a broken budget shows in a few seconds). Each attack runs 3 s.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
from gateway_harness import GatewayProcess, make_pki, small_repository

from bench.attacks import NEEDS_KEY, AttackProcess, Target, infer_body
from bench.hostile import rss_bytes
from gateway.api import grpc_predict_v2_pb2 as oip
from gateway.api import grpc_predict_v2_pb2_grpc as oip_grpc

KEY, HOSTILE_KEY = "client-key", "hostile-tenant-key"
MIB = 1 << 20
SECONDS = 3.0
LIMITS = {  # small budgets: a broken one shows within the attack's few seconds
    "HEGATE_MAX_MESSAGE_BYTES": str(2 * MIB),
    "HEGATE_LIMITS__CONNECTION_BUFFER_BYTES": str(4 * MIB),
    "HEGATE_LIMITS__PEER_BUFFER_BYTES": str(6 * MIB),
    "HEGATE_LIMITS__TOTAL_BUFFER_BYTES": str(12 * MIB),
    "HEGATE_LIMITS__MAX_PEER_CONNECTIONS": "16",
    "HEGATE_LIMITS__PENALTY_SECONDS": "1",
}
CEILING_MIB = 64  # RSS growth allowed: the 12 MiB budget, what decoding holds meanwhile, allocator slack


@pytest.fixture(scope="module")
def gateways(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    repository = small_repository(root / "repository")
    pki = make_pki(root / "pki")
    keys = ["--api-key", f"{KEY}=client", "--api-key", f"{HOSTILE_KEY}=mallory"]
    tls = ["--tls-cert", str(pki / "server.crt"), "--tls-key", str(pki / "server.key")]
    plain = GatewayProcess(repository, root / "plain", *keys, env=LIMITS)
    secure = GatewayProcess(repository, root / "tls", *keys, *tls, env=LIMITS)
    try:
        yield {"plain": plain.wait_ready(), "tls": secure.wait_ready(), "ca": pki / "ca.crt"}
    finally:
        assert plain.stop() == 0, plain.stderr()[-3000:]
        assert secure.stop() == 0, secure.stderr()[-3000:]


def _channel(target: str, ca: Path | None) -> grpc.Channel:
    if ca is None:
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(ca.read_bytes())
    return grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", "localhost")])


class Legitimate:
    """Calls both ports with a valid key, one after the other, until stopped; counts failures."""

    def __init__(self, gateway: GatewayProcess, ca: Path | None) -> None:
        self.channels = [_channel(t, ca) for t in (gateway.target, gateway.fast_path_target)]
        self.stubs = [oip_grpc.GRPCInferenceServiceStub(c) for c in self.channels]
        self.calls, self.failures = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        request = oip.ModelInferRequest.FromString(infer_body(images=1)[5:])
        while not self._stop.is_set():
            for stub in self.stubs:
                try:
                    stub.ModelInfer(request, metadata=(("x-api-key", KEY),), timeout=5)
                    self.calls += 1
                except grpc.RpcError as exc:
                    self.failures.append(f"{exc.code().name}: {exc.details()}")
            time.sleep(0.05)

    def __enter__(self) -> Legitimate:
        for stub in self.stubs:  # connected before the attack starts
            stub.ModelInfer(oip.ModelInferRequest.FromString(infer_body(images=1)[5:]),
                            metadata=(("x-api-key", KEY),), timeout=30)  # fmt: skip
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for channel in self.channels:
            channel.close()


def under_attack(gateways, transport: str, port: str, attack: str, **target) -> tuple[dict, float]:
    """Run ``attack`` on one port while the legitimate client calls both; its counts, RSS growth."""
    gateway = gateways[transport]
    ca = gateways["ca"] if transport == "tls" else None
    number = gateway.fast_path_port if port == "fast" else gateway.port
    target = Target("127.0.0.1", number, tls_ca=str(ca) if ca else None, message_bytes=2 * MIB,
                    api_key=HOSTILE_KEY if attack in NEEDS_KEY else None, **target)  # fmt: skip
    before = peak = rss_bytes(gateway.pid)
    with Legitimate(gateway, ca) as client, AttackProcess(attack, target, SECONDS) as process:
        deadline = time.monotonic() + SECONDS + 1
        while time.monotonic() < deadline:
            peak = max(peak, rss_bytes(gateway.pid))
            time.sleep(0.1)
        counts = process.result()
    assert client.failures == [], client.failures[:5]
    assert client.calls >= 10  # served all along, not just once
    assert counts.get("protocol_violations", 0) == 0, counts
    growth = (peak - before) / MIB
    assert growth <= CEILING_MIB, (growth, counts)
    return counts, growth


FLOODS = ["ping-flood", "settings-flood", "window-update-flood", "priority-flood", "empty-data-flood",
          "continuation-flood", "rapid-reset"]  # fmt: skip


@pytest.mark.parametrize("attack", FLOODS)
def test_a_control_frame_flood_on_the_fast_path_is_cut_off_with_enhance_your_calm(gateways, attack):
    counts, _ = under_attack(gateways, "plain", "fast", attack)
    assert counts.get("goaway ENHANCE_YOUR_CALM", 0) >= 1, counts
    # cut off after its budget, then refused for the penalty: a few GOAWAYs in 3 s, not one per 1,000 frames
    assert counts["goaway ENHANCE_YOUR_CALM"] <= 1 + SECONDS / 1.0 + 1, counts


@pytest.mark.parametrize("transport", ["plain", "tls"])
def test_window_zero_calls_cannot_pin_memory(gateways, transport):
    """A tenant that sets INITIAL_WINDOW_SIZE 0 and sends full-size calls: the replies never leave,
    but each request is released once parsed and the waiting replies count against the budgets, so
    28 calls of 2 MiB stay under the ceiling (they pinned ~65 MB per connection before)."""
    counts, _ = under_attack(gateways, transport, "fast", "window-zero", connections=4)
    assert counts.get("bodies sent whole", 0) >= 8, counts


def test_window_zero_on_the_grpc_aio_port_is_bounded_per_peer(gateways):
    counts, _ = under_attack(gateways, "plain", "grpc.aio", "window-zero", connections=4)
    assert counts.get("calls started", 0) >= 4, counts


@pytest.mark.parametrize(("transport", "port"), [("plain", "fast"), ("tls", "fast"), ("plain", "grpc.aio")])
def test_bodies_without_a_key_are_refused_before_they_arrive(gateways, transport, port):
    """UNAUTHENTICATED comes back while the body is still being sent. On the fast path no body
    gets through whole; on the grpc.aio port C-core takes up to its flow-control window of a body
    before the refusal reaches the client, so a few 2 MiB bodies can be whole by then."""
    counts, _ = under_attack(gateways, transport, port, "unauthenticated-bodies")
    assert counts.get("grpc-status 16", 0) >= 1, counts
    whole = counts.get("bodies sent whole", 0)
    assert whole == 0 if port == "fast" else whole <= 0.1 * counts["calls started"], counts


@pytest.mark.parametrize("transport", ["plain", "tls"])
def test_one_address_holding_connections_locks_nobody_else_out(gateways, transport):
    counts, _ = under_attack(gateways, transport, "fast", "connection-hog")
    assert counts.get("connections held at the end", 0) <= 16, counts  # its per-address limit


@pytest.mark.parametrize("port", ["fast", "grpc.aio"])
def test_an_overflowing_shape_is_an_invalid_argument_without_a_traceback(gateways, port):
    counts, _ = under_attack(gateways, "plain", port, "huge-shape")
    assert counts.get("grpc-status 3", 0) >= 10 and set(k for k in counts if k.startswith("grpc-status")) == {
        "grpc-status 3"
    }, counts
    log = gateways["plain"].stderr()
    assert "ModelInfer failed" not in log and "array is too big" not in log
