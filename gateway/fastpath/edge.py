"""What the fast path shares between its connections: who is connected from where, how many bytes
all of them hold, which peers are cut off, and the per-connection budgets for control frames.

Peers. A peer is one IPv4 address, or one IPv6 /64 (a single host can hold a whole /64; an
IPv4-mapped IPv6 address is its IPv4 address). Each peer may hold ``max_peer_connections`` of the
``max_connections`` open connections and ``peer_buffer_bytes`` of the ``total_buffer_bytes``
that all connections may hold (request bytes until their message is whole, reply bytes that wait
for the client's flow-control window), so one peer at its limits leaves the rest to others. A peer
whose connection was ended with ENHANCE_YOUR_CALM is refused for ``penalty_seconds``: its new
connections are not read at all (before TLS or HTTP/2 cost anything) and closed after
``TARPIT_SECONDS``, up to ``max_peer_connections`` of them at a time (beyond, at once). Closing
them at once let a reconnecting attacker come back ~750 times a second, each accept costing the
event loop; held unread, each of its connections stalls it for a second instead.

Control frames. A frame that asks for work but carries no request costs the event loop about a
microsecond; without a budget one connection sent 8.5 million empty CONTINUATION frames and held
the loop at 100% (issue 14). Each kind gets a token bucket per connection, ``burst`` frames at once
and ``per_second`` after that; a connection past any of them gets GOAWAY ENHANCE_YOUR_CALM. The
numbers come from what real clients sent to the fast path, counted frame by frame on its side
(2026-12-03; grpcio 1.85's C-core client, grpc-js 1.14.7 on Node 20, each making 2,000 calls at 1
in flight, 5,000 at 32, 100 calls with 1 MB replies at 4, 50 with 1 MB requests at 4):

- PING: C-core sent 3-6 per run (its BDP probes: one outstanding at a time, spaced by a delay that
  starts at 100 ms and backs off), grpc-js none (keepalive off by default); ``h2`` sends one only
  when its application asks. Budget 32 at once, then 5 a second: 50x C-core's heaviest run rate.
- SETTINGS (not ACK): 1-2 per connection from C-core (it announces a larger window once its BDP
  estimate grows), 1 from grpc-js and from ``h2``. Budget 16, then 2 a second.
- WINDOW_UPDATE: C-core sent 2 per call (stream and connection) whatever the reply size (4,001 for
  2,000 calls); grpc-js about 0.9 per DATA frame it received (5,581 for 6,100 frames of 1 MB
  replies), none for small replies. So the budget grows with our own work: 2 frames for each call
  opened and 2 for each DATA frame we send, on top of 512 at once and 4 a second.
- PRIORITY: none of the three sends any (RFC 9113 deprecates the scheme). Budget 32, then 4 a second.
- empty DATA without END_STREAM: none of the three sends any (an empty DATA that ends a request is
  request progress, and free). Budget 16, then 2 a second.
- CONTINUATION: none of the three needed any for gRPC's header lists; a list at the 16 KiB limit
  fits a HEADERS frame and one CONTINUATION at the smallest frame size a peer may use. Cap: 4
  CONTINUATION frames per header block (and the block's bytes under ``max_header_bytes``).
- RST_STREAM on calls still in flight: a client cancels each call whose deadline passes, so up to
  its call rate. Budget 1,000 at once and 1,000 a second (rapid reset, CVE-2023-44487).
- calls refused before any work (no or unknown API key, malformed headers, not gRPC, beyond the
  stream limit): a stock client that is refused stops or backs off. Budget 64, then 16 a second,
  so an unauthenticated request flood costs one connection's 64 refusals per penalty period.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field

from gateway.server.auth import Tenants
from gateway.settings import EdgeLimits

CONTINUATIONS_PER_BLOCK = 4
TARPIT_SECONDS = 1.0
PEER_TABLE_SWEEP = 4096  # above this many remembered peers, forget those with nothing left to remember


class Limits(EdgeLimits):
    """The gateway's edge limits and its message limit: everything a fast-path connection enforces."""

    max_message_bytes: int


@dataclass(frozen=True)
class Rate:
    """A token bucket's shape: ``burst`` frames at once, ``per_second`` after that."""

    burst: float
    per_second: float


PING = Rate(32, 5)
SETTINGS = Rate(16, 2)
WINDOW_UPDATE = Rate(512, 4)
WINDOW_UPDATE_CREDIT = 2  # per call opened and per DATA frame sent
PRIORITY = Rate(32, 4)
EMPTY_DATA = Rate(16, 2)
RESETS = Rate(1000, 1000)
REFUSALS = Rate(64, 16)


class Allowance:
    """One token bucket; :meth:`take` is False once it is empty. Plain attributes and no calls:
    two WINDOW_UPDATEs per call pass through here, on the fast path's hottest loop."""

    __slots__ = ("_burst", "_last", "_rate", "_tokens")

    def __init__(self, rate: Rate, now: float) -> None:
        self._burst = float(rate.burst)
        self._rate = float(rate.per_second)
        self._tokens = self._burst
        self._last = now

    def take(self, now: float) -> bool:
        tokens = self._tokens + (now - self._last) * self._rate
        if tokens > self._burst:
            tokens = self._burst
        self._last = now
        if tokens < 1.0:
            self._tokens = tokens
            return False
        self._tokens = tokens - 1.0
        return True

    def credit(self, tokens: float) -> None:
        tokens += self._tokens
        self._tokens = tokens if tokens < self._burst else self._burst


class FrameBudgets:
    """One connection's control-frame allowances (see the module docstring for the numbers)."""

    __slots__ = ("empty_data", "ping", "priority", "refusals", "resets", "settings", "window_update")

    def __init__(self, now: float) -> None:
        self.ping = Allowance(PING, now)
        self.settings = Allowance(SETTINGS, now)
        self.window_update = Allowance(WINDOW_UPDATE, now)
        self.priority = Allowance(PRIORITY, now)
        self.empty_data = Allowance(EMPTY_DATA, now)
        self.resets = Allowance(RESETS, now)
        self.refusals = Allowance(REFUSALS, now)


def peer_key(peername: object) -> str:
    """The peer an address belongs to: the IPv4 address, or the IPv6 /64; ``?`` if unknown."""
    host = peername[0] if isinstance(peername, tuple) and peername else None
    if not isinstance(host, str):
        return "?"
    try:
        address = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass
class Peer:
    connections: int = 0
    held: int = 0  # buffered bytes of all its connections
    penalty_until: float = 0.0
    tarpit: int = 0  # refused connections held unread


@dataclass
class Edge:
    """The server-wide state that the fast path's connections share."""

    limits: Limits
    tenants: Tenants
    connections: set = field(default_factory=set)
    peers: dict[str, Peer] = field(default_factory=dict)
    held: int = 0  # buffered bytes of all connections

    def admit(self, connection: object, key: str) -> str | None:
        """Register a new connection of peer ``key``; or the reason it is refused (``"penalty"``
        for a peer still cut off, which gets no answer at all)."""
        now = time.monotonic()
        peer = self.peers.get(key)
        if peer is not None and peer.penalty_until > now:
            return "penalty"
        if len(self.connections) >= self.limits.max_connections:
            return "too many connections"
        if peer is not None and peer.connections >= self.limits.max_peer_connections:
            return "too many connections from this address"
        if peer is None:
            if len(self.peers) >= PEER_TABLE_SWEEP:
                self._sweep(now)
            peer = self.peers[key] = Peer()
        peer.connections += 1
        self.connections.add(connection)
        return None

    def leave(self, connection: object, key: str) -> None:
        """A registered connection has gone."""
        if connection not in self.connections:
            return
        self.connections.discard(connection)
        peer = self.peers.get(key)
        if peer is not None:
            peer.connections -= 1
            self._forget_if_idle(key, peer, time.monotonic())

    def tarpit(self, key: str) -> bool:
        """Whether a penalized peer's refused connection may be held unread (else: close it now)."""
        peer = self.peers.get(key)
        if peer is None or peer.tarpit >= self.limits.max_peer_connections:
            return False
        peer.tarpit += 1
        return True

    def untarpit(self, key: str) -> None:
        peer = self.peers.get(key)
        if peer is not None:
            peer.tarpit -= 1
            self._forget_if_idle(key, peer, time.monotonic())

    def penalize(self, key: str) -> None:
        """Refuse the peer's new connections for ``penalty_seconds``."""
        if self.limits.penalty_seconds > 0:
            peer = self.peers.setdefault(key, Peer())
            peer.penalty_until = time.monotonic() + self.limits.penalty_seconds

    def hold(self, key: str, connection_held: int, size: int) -> str | None:
        """Count ``size`` more bytes against the connection (holding ``connection_held``), its peer
        and the gateway; or name the budget it would exceed (nothing is counted then)."""
        limits = self.limits
        if connection_held + size > limits.connection_buffer_bytes:
            return f"this connection already holds {connection_held} bytes of calls"
        peer = self.peers[key]
        if peer.held + size > limits.peer_buffer_bytes:
            return f"this address already holds {peer.held} bytes of calls"
        if self.held + size > limits.total_buffer_bytes:
            return f"the gateway already holds {self.held} bytes of calls"
        peer.held += size
        self.held += size
        return None

    def release(self, key: str, size: int) -> None:
        if size:
            self.peers[key].held -= size
            self.held -= size

    def _forget_if_idle(self, key: str, peer: Peer, now: float) -> None:
        if peer.connections <= 0 and peer.held <= 0 and peer.tarpit <= 0 and peer.penalty_until <= now:
            del self.peers[key]

    def _sweep(self, now: float) -> None:
        for key, peer in list(self.peers.items()):
            self._forget_if_idle(key, peer, now)
