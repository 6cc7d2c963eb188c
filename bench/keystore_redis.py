"""What the Redis key store costs: Redis memory per default-model key set, and put/get latency.

Usage: ``python -m bench.keystore_redis --redis redis://127.0.0.1:6379/15`` against a Redis this
script may fill and empty (it deletes only the keys under its own namespace). Memory is Redis's
``used_memory_dataset`` growth: the stored sets with their index, without the client buffers that an
upload or a read holds while it runs (about one set each, freed afterwards). The key sets are the
default model's real evaluation keys (made once here); further sets reuse their bytes with a few
bytes changed, so each has its own key id and the same size (Redis stores bytes as they are: their
content does not change its memory). Timings are wall clock on this machine, with Redis on loopback:
a get is one store call as a replica that has never seen the keys makes it (script, then the bytes),
without the deserialization into a worker that a cold load adds.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid

import redis

from bench.report import provenance, write
from gateway.he.client import ClientKeys
from gateway.he.plan import EncryptedModel
from gateway.keystore import KeyLimits, KeyRecord, RedisKeyStore, key_id_for
from gateway.settings import BUNDLED_REPOSITORY
from models.repository import ModelRepository

MIB = 1 << 20
MODEL = "mnist-cnn-eps3"


def _records(relin: bytes, galois: bytes, count: int) -> list[KeyRecord]:
    records = []
    for index in range(count):
        variant = index.to_bytes(4, "big") + galois[4:]
        key_id = key_id_for(model_name=MODEL, model_version="1", relin=relin, galois=variant)
        records.append(
            KeyRecord(
                key_id=key_id,
                tenant=f"tenant-{index}",
                model_name=MODEL,
                model_version="1",
                stored_bytes=len(relin) + len(variant),
                resident_bytes=len(relin) + len(variant),
                created_at=0.0,
                last_used_at=0.0,
                relin=relin,
                galois=variant,
            )
        )
    return records


def measure(*, url: str, sets: int, reads: int) -> dict:
    artifact = ModelRepository(BUNDLED_REPOSITORY).get(MODEL)
    relin, galois = ClientKeys(EncryptedModel(artifact.onnx_path).spec).evaluation_keys()
    limits = KeyLimits(budget_bytes=1 << 40, tenant_bytes=1 << 40, tenant_key_sets=1024, ttl_seconds=3600)
    namespace = f"bench:{uuid.uuid4().hex}:"
    writer = RedisKeyStore(url=url, limits=limits, namespace=namespace)
    client = redis.Redis.from_url(url)
    version = client.info("server")["redis_version"]
    try:
        records = _records(relin, galois, sets)
        before = client.info("memory")["used_memory_dataset"]
        put_seconds = []
        for record in records:
            started = time.perf_counter()
            writer.put(record)
            put_seconds.append(time.perf_counter() - started)
        after = client.info("memory")["used_memory_dataset"]
        get_seconds = []
        for index in range(reads):
            record = records[index % sets]
            replica = RedisKeyStore(url=url, limits=limits, namespace=namespace)  # a replica with no connection
            started = time.perf_counter()
            got = replica.get(record.key_id, tenant=record.tenant)
            get_seconds.append(time.perf_counter() - started)
            replica.close()
            assert got.galois == record.galois
        blob = client.memory_usage(f"{namespace}blob:{records[0].key_id}", samples=0)
    finally:
        for key in client.scan_iter(match=f"{namespace}*"):
            client.delete(key)
        writer.close()
        client.close()
    return {
        **provenance("bench.keystore_redis"),
        "model": MODEL,
        "redis_version": version,
        "key_set_mib": (len(relin) + len(galois)) / MIB,
        "sets": sets,
        "used_memory_per_set_mib": (after - before) / sets / MIB,
        "blob_memory_usage_mib": blob / MIB,
        "put_p50_ms": statistics.median(put_seconds) * 1000,
        "get_p50_ms": statistics.median(get_seconds) * 1000,
        "get_max_ms": max(get_seconds) * 1000,
        "reads": reads,
    }


def markdown(result: dict) -> str:
    return (
        "# The Redis key store\n\n"
        f"`{result['command']}` on {result['date']}, {result['machine']}; load average {result['load_average']} "
        f"at the start. Redis {result['redis_version']} on loopback.\n\n"
        "| what | figure |\n|---|---|\n"
        f"| default-model key set ({result['model']}, serialized) | {result['key_set_mib']:.1f} MiB |\n"
        f"| Redis memory per key set (`used_memory_dataset` growth over {result['sets']} sets) | "
        f"{result['used_memory_per_set_mib']:.2f} MiB |\n"
        f"| `MEMORY USAGE` of one set's bytes | {result['blob_memory_usage_mib']:.2f} MiB |\n"
        "| besides, while a set is uploaded or read | about one set per connection doing it (its buffers) |\n"
        f"| put of a new set, p50 of {result['sets']} (hash check, upload, admission) | "
        f"{result['put_p50_ms']:.1f} ms |\n"
        f"| get from a fresh replica, p50 of {result['reads']} (connect, script, bytes) | "
        f"{result['get_p50_ms']:.1f} ms (max {result['get_max_ms']:.1f} ms) |\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--redis", required=True, help="redis:// URL of a Redis this script may write to")
    parser.add_argument("--sets", type=int, default=8, help="key sets to store")
    parser.add_argument("--reads", type=int, default=20, help="gets from fresh replicas")
    args = parser.parse_args()
    result = measure(url=args.redis, sets=args.sets, reads=args.reads)
    write("keystore-redis", result, markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
