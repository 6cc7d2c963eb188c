"""Every client of a real gateway: the asyncio SDK (same answers as the blocking one), the key id
header and re-registration after NOT_FOUND (through a recording proxy), gRPC reflection, and the
command line (``hegate models --target``, ``hegate infer``)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from importlib import resources

import numpy as np
import pytest
from gateway_harness import HEGATE, GatewayProcess, small_repository
from grpc_proxy import GrpcProxy

from gateway.api import hegate_v1_pb2 as hv1
from gateway.client import AsyncHegateClient, HegateClient
from gateway.client.protocol import KEY_ID_HEADER, encrypted_request
from gateway.he.client import logit_grid
from models.errors import InternalError, InvalidArgumentError, NotFoundError

MODEL = "breast-cancer-linear-eps3"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    root = tmp_path_factory.mktemp("async")
    process = GatewayProcess(small_repository(root / "repository"), root / "logs", workers=2).wait_ready()
    yield process
    assert process.stop() == 0


def test_async_client_answers_like_the_blocking_one(gateway):
    x = np.random.default_rng(0).normal(size=(100, 30)).astype(np.float32)
    with HegateClient(gateway.target) as client:
        plain = client.predict(MODEL, x)

    async def run():
        async with AsyncHegateClient(gateway.target) as client:
            names = [m.name for m in await client.list_models()]
            logits = await client.predict(MODEL, x)
            chunks = []
            session = await client.encrypted_session(MODEL, progress=lambda sent, total: chunks.append(sent))
            async with session:
                result = await session.predict(x)  # 100 inputs, 64 per ciphertext: two calls in flight
            with pytest.raises(NotFoundError, match="register the keys again"):
                await session.predict(x[:1])
            with pytest.raises(InvalidArgumentError, match="float32"):
                await client.predict(MODEL, x.astype(np.float64))
            return names, logits, result, session, chunks

    names, logits, result, session, chunks = asyncio.run(run())
    assert names == sorted(names) and MODEL in names
    np.testing.assert_array_equal(logits, plain)
    assert result.logits.shape == (100, 2) and session.lanes == 64 and chunks[-1] == session.key_bytes
    np.testing.assert_allclose(result.logits, plain, atol=session.spec.logit_error_bound + session.keys.logit_grid / 2)
    assert result.predicted == [result.labels[i] for i in plain.argmax(1)]


def test_every_path_clips_inputs_to_the_manifests_raw_range(gateway, caplog):
    """The gateway cannot check a ciphertext's range, so the SDK clips first, on every path: an
    input with one feature below ``raw_range`` gets the answers of its clipped copy, and one warning."""
    with HegateClient(gateway.target) as client:
        spec = client.model(MODEL).manifest.input
        raw = np.zeros((2, 30))
        raw[:, 13] = [-300.0, 0.0]  # the same input, out of range and clipped
        x = spec.normalization.apply(raw)
        with caplog.at_level(logging.WARNING, logger="gateway.client.inputs"):
            plain = client.predict(MODEL, x)
            with client.encrypted_session(MODEL) as session:
                encrypted = session.predict(x)

            async def run():
                async with AsyncHegateClient(gateway.target) as aio, await aio.encrypted_session(MODEL) as other:
                    return await aio.predict(MODEL, x), await other.predict(x)

            aio_plain, aio_encrypted = asyncio.run(run())
    np.testing.assert_array_equal(plain[0], plain[1])
    np.testing.assert_array_equal(aio_plain, plain)
    for prediction in (encrypted, aio_encrypted):  # unclipped, the logits would differ by about 3
        np.testing.assert_allclose(prediction.logits[0], prediction.logits[1], atol=session.keys.logit_grid)
    warnings = [r.getMessage() for r in caplog.records if "raw range" in r.getMessage()]
    assert len(warnings) == 2 and all("1 of 60 input values" in w for w in warnings)  # once per client and model


def test_async_sessions_choose_their_profile_and_requests_their_backend(gateway):
    x = np.random.default_rng(1).normal(size=(10, 30)).astype(np.float32)
    with HegateClient(gateway.target) as client:
        plain = client.predict(MODEL, x, backend="numba")

    async def run():
        async with AsyncHegateClient(gateway.target) as client:
            reference = await client.predict(MODEL, x, backend="onnxruntime")
            async with await client.encrypted_session(MODEL, profile="circuit_private") as session:
                return reference, session.spec, (await session.predict(x)).logits

    reference, spec, logits = asyncio.run(run())
    np.testing.assert_array_equal(reference, plain)  # a linear model: both backends exact
    assert spec.precision == "circuit_private" and spec.circuit_privacy is not None
    np.testing.assert_allclose(
        logits, plain, atol=spec.logit_error_bound + logit_grid(bound=spec.logit_error_bound) / 2
    )


def _key_ids(proxy: GrpcProxy, method: str) -> list[str | None]:
    return [call.metadata.get(KEY_ID_HEADER) for call in proxy.of(method)]


def test_every_keyed_call_names_its_key_id_and_lost_keys_are_registered_again_once(gateway, caplog):
    """The header reaches the server on RegisterKeys (computed before the upload), Infer and
    DeleteKeys; keys deleted behind the session's back are registered again, once, and the call
    succeeds."""
    x = np.random.default_rng(2).normal(size=(3, 30)).astype(np.float32)
    with (
        GrpcProxy(gateway.target) as proxy,
        HegateClient(proxy.target) as client,
        HegateClient(gateway.target) as admin,
    ):
        expected = client.predict(MODEL, x)
        session = client.encrypted_session(MODEL)
        first = session.key_id
        assert _key_ids(proxy, "RegisterKeys") == [first] and session.registrations == 1
        session.predict(x)
        assert _key_ids(proxy, "Infer") == [first]
        assert admin.delete_keys(first) is True  # another client object of the same tenant
        with caplog.at_level(logging.WARNING, logger="gateway.client.protocol"):
            result = session.predict(x)
        np.testing.assert_allclose(
            result.logits, expected, atol=session.spec.logit_error_bound + session.keys.logit_grid
        )
        assert session.registrations == 2 and session.key_id != first  # fresh keys from the same secret key
        assert _key_ids(proxy, "RegisterKeys") == [first, session.key_id]
        assert _key_ids(proxy, "Infer") == [first, first, session.key_id]  # NOT_FOUND, then the retry
        assert sum("registering keys again" in r.getMessage() for r in caplog.records) == 1
        session.predict(x)  # no further registration
        session.close()
        assert session.registrations == 2 and _key_ids(proxy, "DeleteKeys") == [session.key_id]
        assert admin.delete_keys(session.key_id) is False  # the session's close reached the gateway
        assert all(KEY_ID_HEADER not in call.metadata for call in proxy.of("ListModels") + proxy.of("ModelInfer"))


def test_a_second_not_found_surfaces_after_one_registration(gateway):
    x = np.zeros((1, 30), np.float32)
    with GrpcProxy(gateway.target) as proxy, HegateClient(proxy.target) as client:
        session = client.encrypted_session(MODEL)
        proxy.faults.refuse["Infer"] = None  # every Infer: NOT_FOUND
        with pytest.raises(NotFoundError):
            session.predict(x)
        assert session.registrations == 2 and len(proxy.of("Infer")) == 2 and len(proxy.of("RegisterKeys")) == 2
        proxy.faults.refuse.clear()
        session.close()


def test_a_key_id_the_sdk_did_not_compute_is_refused(gateway):
    def other_id(response: bytes) -> bytes:
        message = hv1.RegisterKeysResponse.FromString(response)
        message.key_id = "k2-" + "0" * 64
        return message.SerializeToString()

    with GrpcProxy(gateway.target) as proxy, HegateClient(proxy.target) as client:
        proxy.faults.rewrite["RegisterKeys"] = other_id
        with pytest.raises(InternalError, match="key id scheme differs"):
            client.encrypted_session(MODEL)


def test_async_sessions_register_again_once_for_all_calls_in_flight(gateway):
    """Two ciphertexts in flight both meet NOT_FOUND: one re-registration, each call retried once."""
    x = np.random.default_rng(3).normal(size=(100, 30)).astype(np.float32)  # 64 per ciphertext: two calls

    async def run(proxy: GrpcProxy):
        async with (
            AsyncHegateClient(proxy.target) as client,
            AsyncHegateClient(gateway.target) as admin,
            await client.encrypted_session(MODEL) as session,
        ):
            first = session.key_id
            assert await admin.delete_keys(first) is True
            result = await session.predict(x)
            return first, session, result

    with GrpcProxy(gateway.target) as proxy:
        first, session, result = asyncio.run(run(proxy))
        assert result.logits.shape == (100, 2) and session.registrations == 2
        assert _key_ids(proxy, "RegisterKeys") == [first, session.key_id]
        assert sorted(_key_ids(proxy, "Infer")) == sorted([first, first, session.key_id, session.key_id])
        assert _key_ids(proxy, "DeleteKeys") == [session.key_id]


def test_reflection_lists_every_service(gateway):
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    services = set(ProtoReflectionDescriptorDatabase(gateway.channel()).get_services())
    expected = {"inference.GRPCInferenceService", "hegate.v1.EncryptedInference", "grpc.health.v1.Health"}
    assert expected <= services


def _hegate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(HEGATE), *args], capture_output=True, text=True, timeout=300, check=False)


def test_cli_lists_a_running_gateways_models(gateway):
    result = _hegate("models", "--target", gateway.target)
    assert result.returncode == 0, result.stderr
    assert (
        "mnist-cnn-eps3" in result.stdout
        and "encrypted: breast-cancer-linear-eps3 (64 per ciphertext)" in result.stdout
    )


@pytest.mark.parametrize(
    ("sample", "label", "flags"),
    [
        ("mnist-test-0.npy", "7", ()),
        ("mnist-test-1.png", "2", ()),
        ("mnist-test-0.npy", "7", ("--plaintext",)),
        ("mnist-test-1.png", "2", ("--profile", "high")),
    ],
)
def test_cli_infer_classifies_sample_files(gateway, sample, label, flags):
    path = resources.files("gateway") / "samples" / sample
    result = _hegate("infer", str(path), "--target", gateway.target, *flags)
    assert result.returncode == 0, result.stderr
    assert f"[0] label {label}" in result.stdout
    plaintext = "--plaintext" in flags
    assert ("plaintext path" in result.stdout) == plaintext
    assert ("timings: encrypt" in result.stdout) != plaintext
    if not plaintext:
        profile = flags[1] if flags else "standard"  # the gateway's default
        assert f"encrypted path ({profile} profile)" in result.stdout


def test_cli_infer_reports_errors_in_one_line(gateway, tmp_path):
    np.save(tmp_path / "wrong.npy", np.zeros((3, 3)))
    result = _hegate("infer", str(tmp_path / "wrong.npy"), "--target", gateway.target)
    assert (
        result.returncode == 2 and result.stderr.startswith("hegate infer: error:") and "shape [3, 3]" in result.stderr
    )
    result = _hegate("infer", str(tmp_path / "wrong.npy"), "--target", gateway.target, "--model", "nope")
    assert result.returncode == 2 and "no model 'nope'" in result.stderr


def test_a_cancelled_call_is_counted_as_cancelled(gateway):
    with HegateClient(gateway.target) as client, client.encrypted_session("mnist-cnn-eps3") as session:
        info = client.model("mnist-cnn-eps3")
        ciphertext = session.keys.encrypt(np.zeros((1, 1, 28, 28), np.float32))
        _, stub, _ = gateway.stubs()
        call = stub.Infer.future(encrypted_request(info, session.key_id, ciphertext, 1))
        time.sleep(0.02)  # the evaluation takes about 60 ms: cancel while the gateway waits for it
        assert call.cancel()
        line = 'hegate_requests_total{model="mnist-cnn-eps3",path="encrypted",status="CANCELLED"} 1.0'
        deadline = time.monotonic() + 10
        while line not in gateway.metrics() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert line in gateway.metrics()
