"""Every client of a real gateway: the asyncio SDK (same answers as the blocking one), gRPC
reflection, and the command line (``hegate models --target``, ``hegate infer``)."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from importlib import resources

import numpy as np
import pytest
from gateway_harness import HEGATE, GatewayProcess, small_repository

from gateway.client import AsyncHegateClient, HegateClient
from gateway.client.protocol import encrypted_request
from gateway.he.client import logit_grid
from models.errors import InvalidArgumentError, NotFoundError

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
