"""TLS and mutual TLS from configuration, end to end: a throwaway CA, a server and a client cert."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from gateway_harness import GatewayProcess, make_pki, small_repository

from gateway.client import HegateClient
from models.errors import HegateError, UnauthenticatedError, UnavailableError

MODEL = "breast-cancer-linear-eps3"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_gateway(pki, tmp_path_factory):
    """A gateway that demands client certificates signed by the CA, and an API key."""
    root = tmp_path_factory.mktemp("mtls")
    gateway = GatewayProcess(
        small_repository(root / "repository"),
        root / "logs",
        "--api-key", "k1=alice",
        "--tls-cert", str(pki / "server.crt"),
        "--tls-key", str(pki / "server.key"),
        "--tls-client-ca", str(pki / "ca.crt"),
    ).wait_ready()  # fmt: skip
    yield gateway
    assert gateway.stop() == 0


def _client(gateway, pki: Path, cert: str | None = "client", api_key: str | None = "k1", **options) -> HegateClient:
    certs = {"tls_cert_file": pki / f"{cert}.crt", "tls_key_file": pki / f"{cert}.key"} if cert else {}
    return HegateClient(
        gateway.target, tls_ca_file=pki / "ca.crt", api_key=api_key, timeout_seconds=20, **certs, **options
    )


def _fast_path_client(gateway, pki: Path, **kwargs) -> HegateClient:
    """Plaintext calls to the fast path, over TLS too."""
    return _client(gateway, pki, fast_path_target=gateway.fast_path_target, **kwargs)


def test_mutual_tls_client_gets_plaintext_and_encrypted_answers(mtls_gateway, pki):
    with _client(mtls_gateway, pki) as client:
        x = np.zeros((1, 30), np.float32)
        plain = client.predict(MODEL, x)
        with client.encrypted_session(MODEL) as session:
            encrypted = session.predict(x)
    tolerance = session.spec.logit_error_bound + session.keys.logit_grid / 2  # rounded to the grid
    np.testing.assert_allclose(encrypted.logits, plain, atol=tolerance)
    with _fast_path_client(mtls_gateway, pki) as client:
        np.testing.assert_array_equal(client.predict(MODEL, x), plain)


@pytest.mark.parametrize("cert", [None, "stranger"])
def test_a_client_without_a_certificate_from_the_ca_cannot_connect(mtls_gateway, pki, cert):
    with _client(mtls_gateway, pki, cert=cert) as client, pytest.raises(UnavailableError):
        client.list_models()
    with _fast_path_client(mtls_gateway, pki, cert=cert) as client, pytest.raises(UnavailableError):
        client.live()


@pytest.mark.parametrize("front", ["grpc.aio", "fast path"])
def test_a_plaintext_channel_cannot_talk_to_a_tls_gateway(mtls_gateway, front):
    target = mtls_gateway.target if front == "grpc.aio" else mtls_gateway.fast_path_target
    with HegateClient(target, api_key="k1", timeout_seconds=5) as client, pytest.raises(HegateError) as error:
        client.live()
    assert error.value.status in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def test_tls_does_not_replace_the_api_key(mtls_gateway, pki):
    with _client(mtls_gateway, pki, api_key=None) as client, pytest.raises(UnauthenticatedError):
        client.list_models()
    with _fast_path_client(mtls_gateway, pki, api_key=None) as client, pytest.raises(UnauthenticatedError):
        client.live()
