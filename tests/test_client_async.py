"""The asyncio SDK against a real gateway: the same answers as the blocking client."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from gateway_harness import GatewayProcess, small_repository

from gateway.client import AsyncHegateClient, HegateClient
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
    np.testing.assert_allclose(result.logits, plain, atol=session.spec.logit_error_bound)
    assert result.predicted == [result.labels[i] for i in plain.argmax(1)]
