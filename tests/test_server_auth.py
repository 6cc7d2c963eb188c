"""API keys to tenants: the key check both ports share, and failing closed."""

from __future__ import annotations

import asyncio
import contextlib
import hmac

import pytest

from gateway.server import auth
from gateway.server.auth import ANONYMOUS, Tenants, bind_tenant, current_tenant, presented_key
from gateway.server.guard import grpc_peer_key
from models.errors import UnauthenticatedError

METHOD = "/inference.GRPCInferenceService/ModelInfer"


@pytest.mark.parametrize(
    ("metadata", "key"),
    [
        ((("x-api-key", "  k1 "),), "k1"),  # trimmed like a Bearer value (issue 14)
        ((("authorization", "Bearer   k1\t"),), "k1"),
        ((("authorization", "bearer k1"),), "k1"),
        ((("authorization", "Basic k1"),), None),
        ((), None),
    ],
)
def test_presented_keys_are_trimmed(metadata, key):
    assert presented_key(metadata) == key


def test_tenants_from_keys_and_refusals():
    tenants = Tenants({"k1": "alice", "k2": "bob"})
    assert tenants.authenticate(METHOD, [("x-api-key", " k2")]) == "bob"
    assert tenants.authenticate("/grpc.health.v1.Health/Check", []) is None  # open, and no tenant
    with pytest.raises(UnauthenticatedError, match="missing"):
        tenants.authenticate(METHOD, [])
    for wrong in ("k", "k1k1", "", "K1"):
        with pytest.raises(UnauthenticatedError, match="unknown"):
            tenants.authenticate(METHOD, [("x-api-key", wrong)])
    assert Tenants({}).authenticate(METHOD, []) == ANONYMOUS


def test_every_configured_digest_is_compared_whatever_matched(monkeypatch):
    """The work does not depend on which key matched or how much of it: every comparison is of two
    32-byte digests, and there is one per configured key, every time."""
    compared: list[tuple[int, int]] = []
    original = hmac.compare_digest

    def counting(a, b):
        compared.append((len(a), len(b)))
        return original(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    tenants = Tenants({f"key-{i}" * (i + 1): f"t{i}" for i in range(5)})
    for presented in ("key-0", "key-4" * 5, "nope", "x" * 1000):
        compared.clear()
        with contextlib.suppress(UnauthenticatedError):
            tenants.authenticate(METHOD, [("x-api-key", presented)])
        assert compared == [(32, 32)] * 5


def test_a_call_that_skipped_the_check_has_no_tenant():
    """Fail closed: no default tenant; the servicers' current_tenant() refuses instead."""

    async def unchecked() -> str:
        return current_tenant()

    async def checked() -> str:
        bind_tenant("alice")
        return current_tenant()

    with pytest.raises(UnauthenticatedError, match="no tenant"):
        asyncio.run(unchecked())
    assert asyncio.run(checked()) == "alice"


@pytest.mark.parametrize(
    ("peer", "key"),
    [
        ("ipv4:127.0.0.2:5555", "127.0.0.2"),
        ("ipv6:%5B::1%5D:5555", "::/64"),
        ("ipv6:[2001:db8::1:2]:80", "2001:db8::/64"),
        ("ipv6:[::ffff:10.0.0.1]:80", "10.0.0.1"),
        ("unix:/tmp/socket", "/tmp/socket"),
    ],
)
def test_peers_are_addresses_or_ipv6_slash_64s(peer, key):
    assert grpc_peer_key(peer) == key
