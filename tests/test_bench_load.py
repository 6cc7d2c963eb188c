"""The load generator and ``hegate bench load`` against a real gateway: counts, rates, statuses."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from gateway_harness import HEGATE, GatewayProcess, small_repository

from bench.load import PLAINTEXT_METHOD, Workload, workload
from bench.loadgen import LoadGenerators, LoadSpec
from gateway.api.grpc_predict_v2_pb2 import ModelInferRequest
from gateway.client import HegateClient
from gateway.client.protocol import KEY_ID_HEADER, infer_request

MODEL = "breast-cancer-linear-eps3"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    root = tmp_path_factory.mktemp("load")
    process = GatewayProcess(small_repository(root / "repository"), root / "logs", "--api-key", "k=alice").wait_ready()
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="module")
def requests(gateway):
    with HegateClient(gateway.target, api_key="k") as client:
        info = client.model(MODEL)
        return [infer_request(info, info.manifest.input.normalization.apply(np.full((1, 30), i))).SerializeToString()
                for i in range(4)]  # fmt: skip


def test_a_request_count_is_sent_exactly_and_every_outcome_counted(gateway, requests):
    spec = LoadSpec(
        gateway.target, PLAINTEXT_METHOD, requests, in_flight=4, generators=2, metadata=(("x-api-key", "k"),)
    )
    with LoadGenerators(spec) as generators:
        result = generators.run(warmup=0.2, count=101)
    summary = result.summary()
    assert summary["requests"] == summary["ok"] == 101 and summary["errors"] == {}
    assert len(result.latencies) == 101 and summary["p50_ms"] <= summary["p99_ms"]


def test_one_start_measures_several_windows_each_with_its_own_concurrency(gateway, requests):
    spec = LoadSpec(
        gateway.target, PLAINTEXT_METHOD, requests, in_flight=4, generators=2, metadata=(("x-api-key", "k"),)
    )
    with LoadGenerators(spec) as generators:
        counts = [generators.run(warmup=0.1, count=n, in_flight=k).ok for n, k in ((20, 2), (31, 5), (7, 4))]
        with pytest.raises(ValueError, match="one call in flight per generator"):
            generators.run(warmup=0.1, count=5, in_flight=1)
    assert counts == [20, 31, 7]


def test_errors_are_counted_by_status_code(gateway, requests):
    """Round-robin over one valid request and three for a model that does not exist: of 12 calls,
    3 succeed and 9 come back NOT_FOUND, counted, not raised."""
    missing = ModelInferRequest.FromString(requests[0])
    missing.model_name = "no-such-model"
    pool = [requests[0], *[missing.SerializeToString()] * 3]
    spec = LoadSpec(gateway.target, PLAINTEXT_METHOD, pool, in_flight=1, metadata=(("x-api-key", "k"),))
    with LoadGenerators(spec) as generators:
        result = generators.run(warmup=0.1, count=12)
    assert result.ok == 3 and result.errors == {"NOT_FOUND": 9} and len(result.latencies) == 3


def test_open_loop_keeps_its_rate(gateway, requests):
    spec = LoadSpec(gateway.target, PLAINTEXT_METHOD, requests, in_flight=8, rate=100.0, metadata=(("x-api-key", "k"),))
    with LoadGenerators(spec) as generators:
        result = generators.run(warmup=0.2, seconds=2.0)
    assert 180 <= result.summary()["requests"] <= 220  # 100/s for 2 s, whatever the latency


def test_cli_reports_levels_and_errors(gateway, tmp_path):
    out = tmp_path / "load.json"
    command = [str(HEGATE), "bench", "load", "--target", gateway.target, "--model", MODEL, "--api-key", "k",
               "--concurrency", "1", "2", "--requests", "20", "--warmup", "0.1", "--json", str(out)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    levels = json.loads(out.read_text())["levels"]
    assert [row["level"] for row in levels] == ["concurrency 1", "concurrency 2"]
    assert all(row["ok"] == 20 and row["errors"] == {} for row in levels)  # encrypted by default
    assert "| concurrency 2 | 20 |" in result.stdout
    bad = subprocess.run(
        [*command[:-2], "--api-key", "wrong"], capture_output=True, text=True, timeout=300, check=False
    )
    assert bad.returncode == 2 and "unknown API key" in bad.stderr
    fast = [*command[:-2], "--plaintext", "--fast-path", gateway.fast_path_target, "--json", str(out)]
    result = subprocess.run(fast, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["target"] == gateway.fast_path_target and report["path"] == "plaintext"
    assert all(row["ok"] == 20 and row["errors"] == {} for row in report["levels"])
    encrypted = subprocess.run(
        [*command, "--fast-path", gateway.fast_path_target], capture_output=True, text=True, timeout=300, check=False
    )
    assert encrypted.returncode == 2 and "--plaintext" in encrypted.stderr


def test_encrypted_load_names_its_key_set_for_a_balancer(gateway):
    with HegateClient(gateway.target, api_key="k") as client:
        work = workload(client, MODEL, plaintext=False, batch=1)
        try:
            assert work.metadata(client.options) == (("x-api-key", "k"), (KEY_ID_HEADER, work.session.key_id))
        finally:
            work.session.close()
        plain = workload(client, MODEL, plaintext=True, batch=1)
        assert plain.metadata(client.options) == (("x-api-key", "k"),) and isinstance(plain, Workload)
