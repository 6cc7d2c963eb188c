"""``bench.keys`` without a gateway: the slope, the locality count, the cold-load summary, the
target table and the Markdown on synthetic numbers, and the per-request metadata of the load
generator. The benchmark itself (``make bench-keys``, ``--quick`` for a smoke run) starts real
gateways, Redis and nginx, and is not run here."""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from bench import keys
from bench.loadgen import LoadGenerators, LoadSpec
from bench.report import target_row
from bench.server import memory_bytes

MIB = 1 << 20


@dataclass(frozen=True)
class Call:
    method: str
    key_id: str
    upstreams: tuple[str, ...]
    grpc_status: str = "0"


def memory_row(workers: int, per_set_mib: float) -> dict:
    readings = [
        {
            "worker_processes": workers,
            "workers_pss": int(400 * MIB + i * per_set_mib * MIB),
            "workers_rss": int(500 * MIB + i * per_set_mib * MIB),
            "gateway_pss": int(300 * MIB + i * 28 * MIB),
            "gateway_rss": int(350 * MIB + i * 28 * MIB),
        }
        for i in range(4)
    ]
    return {
        "workers": workers,
        "key_sets": 3,
        "worker_processes": workers,
        "readings": readings,
        "registration_seconds_p50": 0.4,
        **{
            f"{side}_{kind}_mib_per_key_set": keys.slope_mib([r[f"{side}_{kind}"] for r in readings])
            for side in ("workers", "gateway")
            for kind in ("pss", "rss")
        },
    }


def synthetic_result() -> dict:
    window = {"requests_per_second": 30.0, "p50_ms": 130.0, "server_queue_ms_p50": 60.0,
              "server_compute_ms_p50": 58.0, "worker_cpu_cores": 1.9, "other_cpu_cores": 0.1}  # fmt: skip
    return {
        "command": "python -m bench.keys",
        "date": "2026-12-03T00:00:00+00:00",
        "machine": "test machine",
        "load_average": "0.10",
        "load_average_at_end": "0.20",
        "quick": False,
        "memory": [memory_row(2, 70.0), memory_row(4, 60.0)],
        "throughput": {
            "baseline": "515c763",
            "baseline_commit": "515c763",
            "clients": 20,
            "workers": 2,
            "in_flight": 4,
            "window_seconds": 20.0,
            "windows": {"current": [{**window, "requests_per_second": 26.7}], "baseline": [window]},
            "requests_per_second": {"current": 26.7, "baseline": 30.0},
            "argmax_agreement": {"current": 1.0, "baseline": 1.0},
            "registration_seconds_p50": {"current": 0.3, "baseline": 0.3},
            "throughput_ratio": 0.89,
        },
        "cold": {"skipped": "`hegate serve` has no --key-store flag in this checkout"},
    }


def test_the_slope_is_the_growth_per_key_set():
    assert keys.slope_mib([100 * MIB, 164 * MIB, 228 * MIB, 292 * MIB]) == 64.0
    assert keys.slope_mib([0, 10 * MIB]) == 10.0
    with pytest.raises(ValueError):
        keys.slope_mib([MIB])


def test_targets_say_met_missed_and_not_measured():
    checks = {check["figure"]: check for check in keys.check_targets(synthetic_result())}
    memory_two = checks["workers' resident MiB per key set, 2 workers"]
    memory_four = checks["workers' resident MiB per key set, 4 workers"]
    assert (memory_two["value"], memory_two["met"]) == (70.0, False)
    assert (memory_four["value"], memory_four["met"]) == (60.0, True)
    assert "summed PSS over 3 fresh key sets" in memory_two["rests_on"]
    throughput = next(c for c in checks.values() if c["figure"].startswith("encrypted requests/s"))
    assert (throughput["value"], throughput["met"]) == (0.89, False)  # 0.89 < 0.90
    cold = next(c for c in checks.values() if c["figure"].startswith("cold load"))
    assert cold["met"] is None and "--key-store" in cold["rests_on"]
    locality = next(c for c in checks.values() if "replica holding" in c["figure"])
    assert locality["met"] is None and "'locality' was not run" in locality["rests_on"]
    assert len(checks) == 5


def test_the_markdown_has_the_provenance_the_target_table_and_the_reasons():
    result = synthetic_result()
    result["targets"] = keys.check_targets(result)
    text = keys.markdown(result)
    assert "`python -m bench.keys` on 2026-12-03T00:00:00+00:00, test machine; load average 0.10" in text
    assert "| workers' resident MiB per key set, 2 workers | 70.0 | <= 64 | NO |" in text
    assert "| workers' resident MiB per key set, 4 workers | 60.0 | <= 64 | yes |" in text
    assert "| cold load of a key set from Redis, p50 ms | - | <= 150 | not measured |" in text
    assert "- cold: `hegate serve` has no --key-store flag in this checkout" in text
    assert "Current / baseline: 0.89." in text
    assert "| 2 | 3 | 2 | 70.0 | 70.0 | 28.0 | 28.0 | 400 -> 610 | 0.4 s |" in text


def test_a_target_row_without_a_value_is_not_met_nor_missed():
    assert target_row(figure="f", value=None, op="<=", target=1, rests_on="not measured")["met"] is None
    assert target_row(figure="f", value=1.0, op="<=", target=1, rests_on="x")["met"] is True
    assert target_row(figure="f", value=1.0, op="<", target=1, rests_on="x")["met"] is False


def test_a_call_is_local_only_on_a_replica_that_already_held_its_keys():
    a, b = "127.0.0.1:1", "127.0.0.1:2"
    calls = [
        Call("RegisterKeys", "k1", (a,)),
        Call("Infer", "k1", (a,)),  # local
        Call("Infer", "k1", (b,)),  # b loads k1 from the store: not local
        Call("Infer", "k1", (b,)),  # b holds it now: local
        Call("ModelInfer", "-", (a,)),  # no key id: not counted
        Call("RegisterKeys", "k2", (b,), grpc_status="14"),  # failed: b does not hold k2
        Call("Infer", "k2", (a, b)),  # nginx tried a, then b answered; b never registered k2
        Call("Infer", "k2", (b,), grpc_status="5"),  # failed: never local
    ]
    share = keys.locality_share(calls)
    assert (share["infer_calls"], share["local_calls"], share["failed_calls"]) == (5, 2, 1)
    assert share["share"] == 0.4
    assert share["by_replica"] == {a: {"infer": 1, "local": 1}, b: {"infer": 4, "local": 1}}
    assert keys.locality_share([])["share"] is None


def test_cold_loads_come_from_the_histogram_only_when_every_set_has_it():
    rows = [
        {"first_ms": 200.0 + i, "warm_ms": 60.0, "first_minus_warm_ms": 140.0 + i, "histogram_ms": 90.0 + i,
         "argmax_agrees": True}
        for i in range(5)
    ]  # fmt: skip
    summary = keys.summarize_cold_loads(rows)
    assert summary["p50_ms"] == 92.0 and keys.COLD_LOAD_METRIC in summary["source"]
    rows[0]["histogram_ms"] = None
    summary = keys.summarize_cold_loads(rows)
    assert summary["p50_ms"] == 142.0 and "minus" in summary["source"]


def test_each_request_carries_its_own_metadata_after_the_common_one():
    spec = LoadSpec(
        target="127.0.0.1:1",
        method="/x/Y",
        requests=[b"a", b"b"],
        metadata=(("common", "1"),),
        request_metadata=((("x-api-key", "k0"),), (("x-api-key", "k1"),)),
    )
    assert spec.call(3) == (b"b", (("common", "1"), ("x-api-key", "k1")))
    assert LoadSpec(target="t", method="/x/Y", requests=[b"a"]).call(5) == (b"a", ())
    with pytest.raises(ValueError, match="one entry per request"):
        LoadGenerators(LoadSpec(target="t", method="/x/Y", requests=[b"a"], request_metadata=((), ())))


def test_pss_never_exceeds_rss():
    reading = memory_bytes(os.getpid())
    assert 0 < reading["pss"] <= reading["rss"]
    assert memory_bytes(2**22 + 12345) == {"rss": 0, "pss": 0}  # no such process
