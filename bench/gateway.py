"""The gateway over loopback, measured against the gateway issue's targets, all in one run.

    python -m bench.gateway            # full run (~2.5 min): a 2-worker then a 1-worker gateway
    python -m bench.gateway --quick    # short durations: a smoke run (~1 min), not figures to quote

The gateway runs as ``hegate serve`` in a subprocess on a temporary repository holding only the
measured model (so it starts fast); the load comes from separate generator processes. The machine
has few cores, shared by the gateway and the load generator, so the generator is made as cheap as
Python allows: raw ``grpc.aio`` calls of pre-serialized requests with nothing deserialized, several
in flight per process. The CPU time of the gateway process (and of its encrypted workers) and of
the generators is read over each measurement window, so a reader sees which side saturates; so is
the rest of the machine's, and a window that shared the cores with a foreign load is measured again.

Measured:

1. plaintext path (Open Inference Protocol, batch 1): latency at 1 call in flight, throughput and
   latency at 32 in flight (from one and from two generator processes), the SDK's own latency, and
   the numba kernels' time per call in-process, to split model time from transport time;
2. encrypted path through the sync SDK (encrypt, RPC, evaluate, decrypt), request by request
   interleaved with the engine in-process (encrypt, evaluate, decrypt) on the same inputs;
3. encrypted throughput at 4 in flight with 2 workers and with 1 worker (two gateway starts),
   from a pool of ciphertexts encrypted beforehand under one session's keys;
4. key registration (fresh keys each time, so the gateway cannot reuse content-addressed keys).

Results go to ``bench/results/gateway.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench.loadgen import LoadGenerators, LoadSpec
from bench.report import provenance, write
from bench.server import Server, machine_busy_seconds, repository_with
from gateway.api import hegate_v1_pb2 as hv1
from gateway.api import hegate_v1_pb2_grpc as hv1_grpc

# TenSEAL, numba and the datasets are imported inside the parts that use them: the generator
# processes import this module too (``spawn``), and they should start light.

MODEL = "mnist-cnn-eps3"
PLAINTEXT_METHOD = "/inference.GRPCInferenceService/ModelInfer"
ENCRYPTED_METHOD = "/hegate.v1.EncryptedInference/Infer"
PLAINTEXT_LEVELS = [(1, 1), (8, 1), (32, 1), (32, 2)]  # (calls in flight, generator processes)
ENCRYPTED_IN_FLIGHT = 4
WORKER_COUNTS = (2, 1)  # 2 = the default (one per core) first; the ratio is 2 over 1
REQUEST_POOL = 64  # distinct plaintext images, sent round-robin
CIPHERTEXT_POOL = 16  # distinct ciphertexts, sent round-robin
FOREIGN_CORES = 0.1  # more than this busy outside the gateway and the generators: measure the window again
ATTEMPTS = 3
TARGETS = {  # the gateway issue's targets
    "plaintext_p50_ms": ("<=", 1.0),
    "plaintext_requests_per_second": (">=", 4000),
    "encrypted_over_engine": ("<=", 1.2),
    "two_worker_speedup": (">=", 1.8),
    "registration_seconds": ("<", 2.0),
}


@dataclass(frozen=True)
class Durations:
    """How long each part runs; ``--quick`` shrinks everything for a smoke run."""

    warmup_seconds: float
    plaintext_seconds: float
    sdk_seconds: float
    encrypted_seconds: float
    encrypted_requests: int
    kernel_calls: int
    registrations: int


FULL = Durations(
    warmup_seconds=2.0,
    plaintext_seconds=10.0,
    sdk_seconds=3.0,
    encrypted_seconds=20.0,
    encrypted_requests=30,
    kernel_calls=20_000,
    registrations=3,
)
QUICK = Durations(
    warmup_seconds=0.5,
    plaintext_seconds=2.0,
    sdk_seconds=0.5,
    encrypted_seconds=5.0,
    encrypted_requests=5,
    kernel_calls=2_000,
    registrations=1,
)


def _ms(seconds: np.ndarray | list[float], q: float, digits: int = 3) -> float:
    """Percentile ``q`` of durations in seconds, in milliseconds: plaintext figures need 3 decimals."""
    return round(1000 * float(np.percentile(seconds, q)), digits)


# -- the load, from bench.loadgen's processes ----------------------------------------------------


def load(
    server: Server,
    method: str,
    requests: list[bytes],
    *,
    in_flight: int,
    generators: int,
    warmup: float,
    seconds: float,
    server_timings: bool = False,
    request_metadata: tuple[tuple[tuple[str, str], ...], ...] = (),
) -> dict:
    """Throughput, latency percentiles and CPU use of ``in_flight`` calls spread over
    ``generators`` processes (:mod:`bench.loadgen`), over ``seconds`` after ``warmup`` seconds of
    the same load; the gateway's CPU counters are read at the window's start and end.
    ``server_timings``: read each response as a ``hegate.v1.InferResponse`` for the queue and
    compute times the server reports. ``request_metadata``: each request's own metadata (its tenant's API key).

    Raises:
        RuntimeError: any call failed (a failed call must not pass as a fast one).
    """
    spec = LoadSpec(
        target=server.target,
        method=method,
        requests=requests,
        in_flight=in_flight,
        generators=generators,
        keep_responses=server_timings,
        request_metadata=request_metadata,
    )
    readings: list[tuple[tuple[float, float, float], float]] = []
    with LoadGenerators(spec) as load_generators:
        result = load_generators.run(
            warmup=warmup,
            seconds=seconds,
            during=lambda: readings.append((server.cpu_seconds(), machine_busy_seconds())),
        )
    if result.errors:
        raise RuntimeError(f"calls failed during the load: {result.errors}")
    (before, machine_before), (after, machine_after) = readings
    latencies = result.latencies
    count = len(latencies)
    loop_cores, server_cores, worker_cores = ((a - b) / seconds for a, b in zip(after, before, strict=True))
    generator_cores = result.generator_cpu_seconds / seconds
    other_cores = (machine_after - machine_before) / seconds - server_cores - worker_cores - generator_cores
    row = {
        "in_flight": in_flight,
        "generators": generators,
        "seconds": seconds,
        "requests": count,
        "requests_per_second": round(count / seconds, 1),
        "p50_ms": _ms(latencies, 50),
        "p95_ms": _ms(latencies, 95),
        "p99_ms": _ms(latencies, 99),
        "gateway_cpu_cores": round(server_cores, 2),
        "gateway_loop_cpu_cores": round(loop_cores, 2),
        "worker_cpu_cores": round(worker_cores, 2),
        "generator_cpu_cores": round(generator_cores, 2),
        "other_cpu_cores": round(max(0.0, other_cores), 2),
        "gateway_cpu_ms_per_request": round(1000 * server_cores * seconds / max(count, 1), 3),
    }
    if server_timings:
        timings = np.array(
            [(t.queue_ms, t.compute_ms) for t in (hv1.InferResponse.FromString(r).timings for r in result.responses)]
        )
        row["server_queue_ms_p50"] = round(float(np.median(timings[:, 0])), 1)
        row["server_compute_ms_p50"] = round(float(np.median(timings[:, 1])), 1)
    return row


def quiet_load(server: Server, method: str, requests: list[bytes], **options: float | int | bool) -> dict:
    """:func:`load`, measured again (up to ``ATTEMPTS`` times in all) while the rest of the machine
    used more than ``FOREIGN_CORES`` during the window: the cores are shared with whoever else works
    here, and a window that overlapped someone's test run says little about the gateway."""
    rows: list[dict] = []
    while len(rows) < ATTEMPTS and (not rows or rows[-1]["other_cpu_cores"] > FOREIGN_CORES):
        if rows:
            print(f"  {rows[-1]['other_cpu_cores']} cores busy elsewhere in the window; measuring again", flush=True)
        rows.append(load(server, method, requests, **options))
    return {**rows[-1], "attempts": len(rows)}


# -- the parts --------------------------------------------------------------------------------


def plaintext(server: Server, model: str, x: np.ndarray, durations: Durations) -> dict:
    """Every plaintext level, the SDK's latency, and the kernels' own time per call in-process
    (the same backend the gateway runs inline in its event loop)."""
    from gateway.client import HegateClient
    from gateway.client.protocol import infer_request
    from kernels import load_backend
    from models.repository import ModelRepository

    backend = load_backend(ModelRepository(server.repository).get(model).onnx_path)
    with HegateClient(server.target) as client:
        info = client.model(model)
        requests = [infer_request(info, row[None]).SerializeToString() for row in x[:REQUEST_POOL]]
        matches = bool(np.array_equal(client.predict(model, x[:8]), backend.predict_logits(x[:8])))
        sdk = []
        stop = time.monotonic() + durations.warmup_seconds
        while time.monotonic() < stop:
            client.predict(model, x[:1])
        stop = time.monotonic() + durations.sdk_seconds
        while time.monotonic() < stop:
            started = time.perf_counter()
            client.predict(model, x[len(sdk) % REQUEST_POOL][None])
            sdk.append(time.perf_counter() - started)
    levels = []
    for in_flight, generators in PLAINTEXT_LEVELS:
        before = server.compute_seconds("plaintext")
        levels.append(
            quiet_load(
                server,
                PLAINTEXT_METHOD,
                requests,
                in_flight=in_flight,
                generators=generators,
                warmup=durations.warmup_seconds,
                seconds=durations.plaintext_seconds,
            )
        )
        after = server.compute_seconds("plaintext")
        levels[-1]["servicer_ms_mean"] = round(1000 * (after[0] - before[0]) / max(1, after[1] - before[1]), 4)
        print(f"  plaintext {in_flight} in flight from {generators}: {levels[-1]}", flush=True)

    one = x[:1]
    for _ in range(200):
        backend.predict_logits(one)
    kernel = []
    for i in range(durations.kernel_calls):
        row = x[i % REQUEST_POOL][None]
        started = time.perf_counter()
        backend.predict_logits(row)
        kernel.append(time.perf_counter() - started)
    return {
        "levels": levels,
        "matches_kernels": matches,
        "sdk_calls": len(sdk),
        "sdk_p50_ms": _ms(sdk, 50),
        "sdk_p99_ms": _ms(sdk, 99),
        "kernel_backend": backend.backend,
        "kernel_calls": len(kernel),
        "kernel_p50_ms": _ms(kernel, 50, 4),
        "kernel_mean_ms": round(1000 * float(np.mean(kernel)), 4),
    }


def registration(server: Server, model: str, count: int) -> dict:
    """Seconds to upload and register fresh keys (new keys each time: the gateway keeps keys under
    their content hash and would skip the workers' load for keys it already holds)."""
    from gateway.client import HegateClient

    seconds, sizes = [], []
    with HegateClient(server.target) as client:
        for _ in range(count):
            with client.encrypted_session(model) as session:
                seconds.append(session.registration_seconds)
                sizes.append(session.key_bytes)
    return {
        "workers": server.workers,
        "registrations": count,
        "seconds_p50": round(float(np.median(seconds)), 3),
        "seconds_max": round(max(seconds), 3),
        "key_bytes": int(np.median(sizes)),
        "key_mib": round(float(np.median(sizes)) / 2**20, 1),
    }


def encrypted_latency(server: Server, model: str, x: np.ndarray, requests: int) -> dict:
    """The SDK's encrypt + RPC + decrypt against the engine's encrypt + evaluate + decrypt in this
    process, request by request on the same inputs: alternating them exposes both to the same
    background, so their ratio is the gateway's own cost."""
    from gateway.client import HegateClient
    from gateway.he.client import ClientKeys
    from gateway.he.plan import EncryptedModel
    from models.repository import ModelRepository

    engine = EncryptedModel(ModelRepository(server.repository).get(model).onnx_path)
    engine_client = ClientKeys(engine.spec)
    engine_keys = engine.load_keys(*engine_client.evaluation_keys())

    def in_process(row: np.ndarray) -> tuple[np.ndarray, float]:
        ciphertext = engine_client.encrypt(row)
        started = time.perf_counter()
        result = engine.evaluate(ciphertext, engine_keys)
        evaluate = time.perf_counter() - started
        return engine_client.decrypt(result, len(row)), evaluate

    gateway_s, engine_s, evaluate_s, timings, agree = [], [], [], [], []
    with HegateClient(server.target) as client, client.encrypted_session(model) as session:
        session.predict(x[:1])
        in_process(x[:1])
        for i in range(requests):
            row = x[i : i + 1]
            started = time.perf_counter()
            prediction = session.predict(row)
            gateway_s.append(time.perf_counter() - started)
            timings.append(asdict(prediction.timings))
            started = time.perf_counter()
            logits, evaluate = in_process(row)
            engine_s.append(time.perf_counter() - started)
            evaluate_s.append(evaluate)
            agree.append(int(prediction.logits.argmax() == logits.argmax()))
    gateway_p50, engine_p50 = float(np.median(gateway_s)), float(np.median(engine_s))
    return {
        "requests": requests,
        "gateway_ms_p50": _ms(gateway_s, 50, 1),
        "gateway_ms_p95": _ms(gateway_s, 95, 1),
        "engine_ms_p50": _ms(engine_s, 50, 1),
        "engine_evaluate_ms_p50": _ms(evaluate_s, 50, 1),
        "encrypted_over_engine": round(gateway_p50 / engine_p50, 3),
        **{f"{key}_p50": round(float(np.median([t[key] for t in timings])), 1) for key in timings[0]},
        "argmax_agreement": float(np.mean(agree)),
    }


def encrypted_throughput(server: Server, model: str, x: np.ndarray, durations: Durations) -> dict:
    """Requests per second at ``ENCRYPTED_IN_FLIGHT`` in flight. The ciphertexts are encrypted
    beforehand under one session's keys and sent as bytes, so the client's share of the cores is
    the RPC only; each is decrypted once first, to check that the gateway really evaluates it."""
    from gateway.client import HegateClient
    from gateway.client.protocol import encrypted_request

    with HegateClient(server.target) as client, client.encrypted_session(model) as session:
        rows = x[:CIPHERTEXT_POOL]
        requests = [
            encrypted_request(session.model, session.key_id, session.keys.encrypt(row[None]), 1) for row in rows
        ]
        stub = hv1_grpc.EncryptedInferenceStub(client.channel)
        decrypted = np.stack([session.keys.decrypt(stub.Infer(request).ciphertext, 1)[0] for request in requests])
        expected = client.predict(model, rows)
        row = quiet_load(
            server,
            ENCRYPTED_METHOD,
            [request.SerializeToString() for request in requests],
            in_flight=ENCRYPTED_IN_FLIGHT,
            generators=1,
            warmup=durations.warmup_seconds,
            seconds=durations.encrypted_seconds,
            server_timings=True,
        )
    row["workers"] = server.workers
    row["argmax_agreement"] = float(np.mean(decrypted.argmax(1) == expected.argmax(1)))
    return row


# -- the report ---------------------------------------------------------------------------------


def check_targets(result: dict) -> list[dict]:
    """Each target of the gateway issue with its measured value, and the condition it was measured
    under (the throughput target takes the better of the two generator layouts: the load generator
    is not the gateway)."""
    levels = result["plaintext"]["levels"]
    single = next(level for level in levels if level["in_flight"] == 1)
    busiest = max((level for level in levels if level["in_flight"] == 32), key=lambda r: r["requests_per_second"])
    throughput = {row["workers"]: row["requests_per_second"] for row in result["encrypted_throughput"]}
    default = next(r for r in result["registration"] if r["workers"] == WORKER_COUNTS[0])
    values = {
        "plaintext_p50_ms": (single["p50_ms"], "1 in flight"),
        "plaintext_requests_per_second": (
            busiest["requests_per_second"],
            f"32 in flight, {busiest['generators']} generator process(es)",
        ),
        "encrypted_over_engine": (result["encrypted_latency"]["encrypted_over_engine"], "gateway p50 / engine p50"),
        "two_worker_speedup": (round(throughput[2] / throughput[1], 2), "requests/s, 2 workers / 1 worker"),
        "registration_seconds": (
            default["seconds_p50"],
            f"p50 of {default['registrations']}, {default['workers']} workers",
        ),
    }
    checks = []
    for key, (op, target) in TARGETS.items():
        value, note = values[key]
        ok = {"<=": value <= target, ">=": value >= target, "<": value < target}[op]
        checks.append({"figure": key, "value": value, "target": f"{op} {target}", "met": ok, "note": note})
    return checks


def markdown(result: dict) -> str:
    """The tables, and the sentences that say where the time and the cores go: the figures alone
    do not tell a reader whether the gateway or the load generator ran out of CPU."""
    p = result["plaintext"]
    e = result["encrypted_latency"]
    windows = [*p["levels"], *result["encrypted_throughput"]]
    lines = [
        "# Gateway",
        "",
        f"`{result['command']}` on {result['date']}, {result['machine']}; load average "
        f"{result['load_average_at_start']} at the start. `hegate serve` in a subprocess on loopback, "
        f"serving only {result['model']}; the load from separate processes (raw `grpc.aio` calls of "
        "pre-serialized requests, nothing deserialized), sharing the same cores with the gateway. "
        "CPU columns: cores used during the window (1.0 = one core busy all the time), read from `/proc`; "
        "other CPU: the rest of the machine's busy time (this script's idle parent, the OS, anything else "
        f"running); a window with more than {FOREIGN_CORES} cores of it is measured again, up to {ATTEMPTS} times "
        f"({sum(r['attempts'] - 1 for r in windows)} repeated in this run; the largest share left in a reported "
        f"window: {max(r['other_cpu_cores'] for r in windows)} cores).",
        "",
        f"## Plaintext path (Open Inference Protocol, batch 1, {p['levels'][0]['seconds']} s per level)",
        "",
        "| in flight | generator processes | requests/s | p50 | p95 | p99 | gateway CPU (its event loop) "
        "| gateway CPU per request | servicer per request (mean) | generator CPU | other CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in p["levels"]:
        lines.append(
            f"| {r['in_flight']} | {r['generators']} | {r['requests_per_second']:,.0f} | {r['p50_ms']} ms "
            f"| {r['p95_ms']} ms | {r['p99_ms']} ms | {r['gateway_cpu_cores']} ({r['gateway_loop_cpu_cores']}) "
            f"| {r['gateway_cpu_ms_per_request']} ms | {r['servicer_ms_mean']} ms | {r['generator_cpu_cores']} "
            f"| {r['other_cpu_cores']} |"
        )
    single = next(r for r in p["levels"] if r["in_flight"] == 1)
    busiest = max((r for r in p["levels"] if r["in_flight"] == 32), key=lambda r: r["requests_per_second"])
    cores = os.cpu_count()
    lines += [
        "",
        f"Where the time goes at 1 in flight: the {p['kernel_backend']} kernels take {p['kernel_p50_ms']} ms per "
        f"call in-process (p50 of {p['kernel_calls']:,} calls, batch 1; mean {p['kernel_mean_ms']} ms); the "
        f"servicer (request decoding, kernels, response encoding: the gateway's `hegate_compute_seconds`) "
        f"{single['servicer_ms_mean']} ms on average; the whole RPC {single['p50_ms']} ms p50. The model is "
        f"{p['kernel_p50_ms'] / single['p50_ms']:.0%} of the latency, the servicer "
        f"{single['servicer_ms_mean'] / single['p50_ms']:.0%}; the rest is gRPC (both ends), protobuf and the "
        f"event loops. Through the sync SDK (`HegateClient.predict`, which also builds the request and reads "
        f"the logits): p50 {p['sdk_p50_ms']} ms, p99 {p['sdk_p99_ms']} ms. The gateway's logits equal the "
        f"kernels' bit for bit: {'yes' if p['matches_kernels'] else 'NO'}.",
        "",
        f"At 32 in flight ({busiest['generators']} generator process(es)) the gateway process used "
        f"{busiest['gateway_cpu_cores']} cores, {busiest['gateway_loop_cpu_cores']} of them in its event-loop "
        f"thread, and the generators {busiest['generator_cpu_cores']}: "
        f"{busiest['gateway_cpu_cores'] + busiest['generator_cpu_cores']:.2f} of the machine's {cores}. The gateway "
        f"spent {busiest['gateway_cpu_ms_per_request']} ms of CPU per request; its event loop, one thread, "
        f"{1000 * busiest['gateway_loop_cpu_cores'] / busiest['requests_per_second']:.3f} ms, which caps it at "
        f"{busiest['requests_per_second'] / max(busiest['gateway_loop_cpu_cores'], 1e-9):,.0f} requests/s "
        "with a core of its own.",
        "",
        f"## Encrypted path ({e['requests']} requests, one at a time)",
        "",
        "| gateway p50 / p95 (SDK: encrypt, RPC, decrypt) | engine in-process p50 (encrypt, evaluate, decrypt) "
        "| ratio | SDK encrypt / call / decrypt p50 | server queue / compute p50 | engine evaluate p50 "
        "| argmax agree |",
        "|---|---|---|---|---|---|---|",
        f"| {e['gateway_ms_p50']} / {e['gateway_ms_p95']} ms | {e['engine_ms_p50']} ms | {e['encrypted_over_engine']} "
        f"| {e['encrypt_ms_p50']} / {e['call_ms_p50']} / {e['decrypt_ms_p50']} ms "
        f"| {e['server_queue_ms_p50']} / {e['server_compute_ms_p50']} ms | {e['engine_evaluate_ms_p50']} ms "
        f"| {e['argmax_agreement']:.0%} |",
        "",
        f"## Encrypted throughput ({ENCRYPTED_IN_FLIGHT} in flight, pre-encrypted ciphertexts, one generator process)",
        "",
        "| workers | requests/s | p50 | p99 | server queue / compute p50 | gateway CPU (its event loop) | workers' CPU "
        "| generator CPU | other CPU | argmax agree |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["encrypted_throughput"]:
        lines.append(
            f"| {r['workers']} | {r['requests_per_second']} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms "
            f"| {r['server_queue_ms_p50']} / {r['server_compute_ms_p50']} ms "
            f"| {r['gateway_cpu_cores']} ({r['gateway_loop_cpu_cores']}) "
            f"| {r['worker_cpu_cores']} | {r['generator_cpu_cores']} | {r['other_cpu_cores']} "
            f"| {r['argmax_agreement']:.0%} |"
        )
    by_workers = {r["workers"]: r for r in result["encrypted_throughput"]}
    two, one = by_workers[2], by_workers[1]
    lines += [
        "",
        f"2 workers / 1 worker: {two['requests_per_second'] / one['requests_per_second']:.2f}x. The workers used "
        f"{two['worker_cpu_cores']} cores with 2 and {one['worker_cpu_cores']} with 1; one evaluation took "
        f"{two['server_compute_ms_p50']} ms p50 with 2 workers busy, {one['server_compute_ms_p50']} ms with 1, "
        f"{e['server_compute_ms_p50']} ms on an idle gateway.",
    ]
    lines += ["", "## Key registration over loopback (fresh keys each time)", ""]
    lines += ["| workers | registrations | seconds p50 / max | uploaded |", "|---|---|---|---|"]
    for r in result["registration"]:
        lines.append(
            f"| {r['workers']} | {r['registrations']} | {r['seconds_p50']} / {r['seconds_max']} s "
            f"| {r['key_mib']} MiB ({r['key_bytes']:,} bytes) |"
        )
    starts = ", ".join(
        f"{seconds} s with {workers} worker{'s' * (int(workers) > 1)}"
        for workers, seconds in result["start_seconds"].items()
    )
    lines += ["", f"Gateway start, to its ready line: {starts}.", ""]
    lines += ["## Targets of the gateway issue", "", "| figure | measured | target | met |", "|---|---|---|---|"]
    for check in result["targets"]:
        met = "yes" if check["met"] else "NO"
        lines.append(f"| {check['figure']} ({check['note']}) | {check['value']} | {check['target']} | {met} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    """Both gateway starts in a row, on the same inputs; the default worker count (one per core)
    first, where the plaintext path, encrypted latency and registration are measured."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MODEL, help="a model that the engine serves encrypted")
    parser.add_argument("--quick", action="store_true", help="short durations, for a smoke run")
    args = parser.parse_args()
    durations = QUICK if args.quick else FULL
    from models.data import load_dataset
    from models.repository import ModelRepository

    result = {
        **provenance("bench.gateway"),
        "model": args.model,
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "durations": asdict(durations),
    }
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        root = Path(tmp)
        repository = repository_with([args.model], root)
        manifest = ModelRepository(repository).get(args.model).manifest
        x = manifest.input.normalization.apply(load_dataset(manifest.dataset).test.x[:REQUEST_POOL])
        result["registration"], result["encrypted_throughput"], result["start_seconds"] = [], [], {}
        for workers in WORKER_COUNTS:
            with Server(repository, workers, root / f"gateway-{workers}.log") as server:
                print(f"gateway with {workers} workers on {server.target}", flush=True)
                result["start_seconds"][workers] = round(server.start_seconds, 1)
                if workers == WORKER_COUNTS[0]:
                    result["plaintext"] = plaintext(server, args.model, x, durations)
                    result["encrypted_latency"] = encrypted_latency(server, args.model, x, durations.encrypted_requests)
                    print(f"  encrypted latency: {result['encrypted_latency']}", flush=True)
                result["registration"].append(registration(server, args.model, durations.registrations))
                result["encrypted_throughput"].append(encrypted_throughput(server, args.model, x, durations))
                print(f"  {result['registration'][-1]}\n  {result['encrypted_throughput'][-1]}", flush=True)
    result["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    result["targets"] = check_targets(result)
    write("gateway", result, markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
