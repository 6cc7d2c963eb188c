"""``hegate bench privacy``: what privacy costs, model by model and path by path.

    hegate bench privacy                      # the bundled models, one gateway it starts (~20 min)
    hegate bench privacy --quick              # one model per dataset, small samples (< 2 min on an idle machine)
    hegate bench privacy --repo my_repo --models mnist-cnn-eps1 mnist-cnn-epsinf
    hegate bench privacy --target 10.0.0.5:8001   # a running gateway: the paths it serves
    hegate bench privacy --target 10.0.0.5:8001 --fast-path 10.0.0.5:8003   # plaintext on its fast path

Every model of the repository (its DP budget, epsilon, is fixed at training) is measured on every
execution path:

* ``plaintext-onnxruntime``: the reference runtime, the server sees the input;
* ``plaintext-numba``: the int8 kernels (bit-identical to it for uint8 models, within a stated
  float32 bound for A16W8 ones), the server sees the input;
* ``encrypted-standard`` and ``encrypted-high``: CKKS at the engine's two precision profiles;
  the server sees neither input nor result;
* ``encrypted-circuit-private``: CKKS whose result is re-randomized and flooded so that it tells
  the client nothing about the model beyond the logits (:mod:`gateway.he.flooding`).

All paths of a model are measured in ONE gateway, started here with its defaults (or the one at
``--target``): the plaintext backend is the request parameter ``backend``, the CKKS profile the
one each session asks for, so nothing but the path differs between rows. The two plaintext
backends are measured in alternating windows (numba, onnxruntime, numba, ...), so that a change
of the machine's load during the run (two cores shared with the load generator and anyone else)
falls on both; the report gives each backend's in-process batch-1 time beside its gateway p50.
Plaintext paths go to the gateway's fast path (the port trusted plaintext callers use;
``--fast-path`` with ``--target``). Everything goes over real gRPC from this process and from
load generator processes (:mod:`bench.loadgen`):

* accuracy: the whole test set on plaintext paths; on encrypted paths a seeded sample of the test
  set (``--sample``), with a 95% Wilson interval, and the largest logit error against the exact
  network beside the plan's stated bound;
* latency p50/p95/p99 with one call in flight, throughput with several (requests of one input);
  encrypted windows count calls (at least a few, even when one call takes a second);
* request and response bytes, evaluation-key bytes, the security level;
* the DP record beside each epsilon: delta, noise multiplier, clipping bound, sample rate, steps,
  as the accountant recorded them at training.

Output: a table on the terminal; ``privacy.{csv,json,md}`` and two plots in ``--out``
(``bench/results`` by default): accuracy against epsilon per path, and latency against accuracy
with the Pareto front of privacy, accuracy and speed.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import math
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from pydantic import BaseModel, ConfigDict

from bench.load import Workload, workload
from bench.loadgen import CHANNEL_OPTIONS, LoadGenerators, LoadResult, LoadSpec
from bench.report import RESULTS, provenance, write
from bench.server import Server, repository_with
from bench.stats import percentiles, wilson_interval
from gateway.api import grpc_predict_v2_pb2 as oip
from gateway.client import HegateClient, ModelInfo
from gateway.client.protocol import encrypted_request, infer_request
from gateway.client.sync import EncryptedSession
from gateway.he.graph import LoweredModel, lower
from gateway.settings import BUNDLED_REPOSITORY
from models.data import Dataset, load_dataset
from models.errors import InvalidArgumentError
from models.extras import require_train_extra
from models.manifest import Manifest
from models.repository import ModelRepository

BACKENDS = ("onnxruntime", "numba")
PROFILES = ("standard", "high", "circuit_private")
PATHS = (*(f"plaintext-{b}" for b in BACKENDS), *(f"encrypted-{p.replace('_', '-')}" for p in PROFILES))
PLAINTEXT_BATCH = 1000  # test images per accuracy request
SAMPLE_SEED = 0
IN_PROCESS_CALLS = 2000  # batch-1 calls per backend for the in-process figure


def path_of_profile(profile: str) -> str:
    return f"encrypted-{profile.replace('_', '-')}"


def profile_of_path(path: str) -> str:
    return path.removeprefix("encrypted-").replace("-", "_")


@dataclass(frozen=True)
class Budget:
    """How long each cell is measured; ``--quick`` shrinks everything to a smoke run."""

    warmup_seconds: float
    seconds: float  # each latency and throughput window, per plaintext backend
    rounds: int  # plaintext windows alternate between the backends this many times
    sample: int  # test inputs per encrypted accuracy figure
    plaintext_in_flight: int
    encrypted_in_flight: int
    encrypted_calls: int  # at least this many calls per encrypted window


FULL = Budget(
    warmup_seconds=1.0,
    seconds=5.0,
    rounds=5,
    sample=500,
    plaintext_in_flight=32,
    encrypted_in_flight=4,
    encrypted_calls=20,
)
QUICK = Budget(
    warmup_seconds=0.1, seconds=1.0, rounds=2, sample=8, plaintext_in_flight=8, encrypted_in_flight=2, encrypted_calls=2
)


class Cell(BaseModel):
    """One model on one path: a row of the table, the CSV and the JSON."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    dataset: str
    architecture: str
    path: str
    input_encrypted: bool
    security: str
    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    accuracy: float
    accuracy_low: float  # 95% Wilson interval; equal to ``accuracy`` for a whole test set
    accuracy_high: float
    accuracy_n: int
    max_logit_error: float  # encrypted: against the exact network on the sample; plaintext: against onnxruntime
    stated_error_bound: float  # encrypted: the plan's logit_error_bound; plaintext: nan
    p50_ms: float
    p95_ms: float
    p99_ms: float
    requests_per_second: float
    in_flight: int
    gateway_cpu_us: float  # plaintext: the gateway main thread's CPU per request, 1 in flight; else nan
    gateway_servicer_us: float  # plaintext: the servicer's time per request (decode, backend, encode), 1 in flight
    in_process_p50_us: float  # plaintext: CPU of the backend's batch-1 call here, in a tight loop; else nan
    in_process_served_p50_us: float  # CPU of a whole request's servicer work here: decode, call, encode
    inputs_per_ciphertext: int
    request_bytes: int
    response_bytes: int
    key_bytes: int
    errors: int
    seconds: float  # this cell's whole measurement


def _architecture(manifest: Manifest) -> str:
    return manifest.training.architecture.split()[0]


def _dp_fields(manifest: Manifest) -> dict:
    dp = manifest.dp
    return {
        "epsilon": dp.epsilon,
        "delta": dp.delta,
        "noise_multiplier": dp.noise_multiplier,
        "max_grad_norm": dp.max_grad_norm,
        "sample_rate": dp.sample_rate,
        "steps": dp.steps,
    }


def _backends_of(client: HegateClient, model: str) -> list[str]:
    """The plaintext backends the gateway serves ``model`` with: each one it serves when asked by
    name; a gateway that serves neither by name (one that predates the request parameter) serves
    its default, named by its platform."""
    x = np.zeros([1, *client.model(model).manifest.input.shape], np.float32)
    served = []
    for backend in BACKENDS:
        with contextlib.suppress(InvalidArgumentError):  # e.g. the kernels refused this model
            client.predict(model, x, backend=backend)
            served.append(backend)
    return served or [client.platform(model).removeprefix("hegate_int8_")]


def paths_of(client: HegateClient, model: str) -> list[str]:
    """The paths a gateway serves ``model`` on: its plaintext backends and its CKKS profiles."""
    paths = [f"plaintext-{backend}" for backend in _backends_of(client, model)]
    info = client.model(model)
    if info.encrypted:
        profiles = info.profiles or (client.spec(model).precision,)  # an older gateway: its one profile
        paths += [path_of_profile(p) for p in profiles]
    return sorted(paths, key=PATHS.index)


def _response_bytes(target: str, method: str, request: bytes, metadata) -> int:
    """The size of one serialized response, read from a raw call (nothing deserialized)."""
    with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
        return len(channel.unary_unary(method)(request, metadata=metadata, timeout=600))


def _summary(result: LoadResult) -> dict:
    return result.summary() if len(result.latencies) else {**result.summary(), "p50_ms": math.nan}


@functools.cache
def _exact(onnx_path: Path) -> LoweredModel:
    """The exact network the encrypted paths approximate (lowering a CNN takes seconds: once)."""
    return lower(onnx_path)


def _in_process_us(onnx_path: Path, backend: str, info: ModelInfo, x: np.ndarray) -> tuple[float, float]:
    """CPU time (p50, us) in this process, through the entry point the gateway calls: the backend's
    batch-1 call in a tight loop, and a whole request's servicer work (decode a ModelInferRequest,
    call, encode the response). The second is more than the sum of its parts for a backend with a
    large working set: its call evicts the decoding's and encoding's code and data from the caches."""
    from gateway.server.tensors import inputs_from_request, output_tensor
    from kernels import OnnxRuntimeModel, load_backend

    model = load_backend(onnx_path, strict=True) if backend == "numba" else OnnxRuntimeModel(onnx_path)
    wire = infer_request(info, x[:1]).SerializeToString()
    name, input_name = info.manifest.output.name, info.manifest.input.name

    def tight() -> None:
        model.predict_logits(x[:1])

    def served() -> None:
        logits = model.predict_logits(inputs_from_request(oip.ModelInferRequest.FromString(wire))[input_name])
        tensor, raw = output_tensor(name, logits)
        oip.ModelInferResponse(outputs=[tensor], raw_output_contents=[raw]).SerializeToString()

    def timed(call) -> float:
        cpu = np.empty(IN_PROCESS_CALLS)
        for i in range(IN_PROCESS_CALLS):
            started = time.thread_time_ns()
            call()
            cpu[i] = time.thread_time_ns() - started
        return percentiles(cpu, (50,))["p50"] / 1e3

    timed(tight)  # warm up
    return timed(tight), timed(served)


def _mark(server: Server, marks: list[tuple[float, float, int]]) -> None:
    """The gateway main thread's CPU seconds and its plaintext servicer's time and calls, now."""
    marks.append((server.cpu_seconds()[0], *server.compute_seconds("plaintext")))


def measure_plaintext(
    client: HegateClient,
    target: str,
    manifest: Manifest,
    onnx_path: Path,
    backends: list[str],
    data: Dataset,
    budget: Budget,
    server: Server | None = None,
) -> list[Cell]:
    """Both plaintext backends of one model, their windows in turns (see the module doc)."""
    model = manifest.name
    started = time.perf_counter()
    x = manifest.input.normalization.apply(data.test.x)
    if client.options.fast_path_target:  # plaintext calls go where the client sends them
        target = client.options.fast_path_target
    logits = {
        b: np.concatenate(
            [client.predict(model, x[i : i + PLAINTEXT_BATCH], backend=b) for i in range(0, len(x), PLAINTEXT_BATCH)]
        )
        for b in backends
    }
    reference = logits.get("onnxruntime")
    works: dict[str, Workload] = {
        b: workload(client, model, plaintext=True, batch=1, inputs=data.test.x[:16], backend=b) for b in backends
    }
    windows: dict[str, dict[str, list[LoadResult]]] = {b: {"latency": [], "load": []} for b in backends}
    with contextlib.ExitStack() as stack:
        generators = {
            b: stack.enter_context(
                LoadGenerators(
                    LoadSpec(
                        target=target,
                        method=works[b].method,
                        requests=works[b].requests,
                        in_flight=budget.plaintext_in_flight,
                        metadata=client.options.metadata,
                    )
                )
            )
            for b in backends
        }
        seconds = budget.seconds / budget.rounds
        # the gateway main thread's CPU, its servicer's time and calls, over the latency windows
        inside = {b: np.zeros(3) if server else np.full(3, math.nan) for b in backends}
        for kind, in_flight in (("latency", 1), ("load", budget.plaintext_in_flight)):
            for round_ in range(budget.rounds):
                for b in backends if round_ % 2 == 0 else backends[::-1]:
                    marks: list[tuple[float, float, int]] = []
                    during = functools.partial(_mark, server, marks) if server and kind == "latency" else None
                    result = generators[b].run(
                        warmup=budget.warmup_seconds, seconds=seconds, in_flight=in_flight, during=during
                    )
                    windows[b][kind].append(result)
                    if marks:
                        inside[b] += np.subtract(marks[1], marks[0])
    cells = []
    info = client.model(model)
    for b in backends:
        tight, served = _in_process_us(onnx_path, b, info, x)
        cpu, servicer, calls = inside[b]
        latency = _summary(LoadResult.merged(windows[b]["latency"]))
        load = LoadResult.merged(windows[b]["load"]).summary()
        correct = int(np.sum(logits[b].argmax(1) == data.test.y))
        deviation = float(np.abs(logits[b] - reference).max()) if reference is not None else math.nan
        cells.append(
            Cell(
                model=model,
                dataset=manifest.dataset,
                architecture=_architecture(manifest),
                path=f"plaintext-{b}",
                input_encrypted=False,
                security="none: the server sees the input",
                **_dp_fields(manifest),
                accuracy=correct / len(x),
                accuracy_low=correct / len(x),
                accuracy_high=correct / len(x),
                accuracy_n=len(x),
                max_logit_error=deviation,
                stated_error_bound=math.nan,
                p50_ms=latency["p50_ms"],
                p95_ms=latency.get("p95_ms", math.nan),
                p99_ms=latency.get("p99_ms", math.nan),
                requests_per_second=load["requests_per_second"],
                in_flight=budget.plaintext_in_flight,
                gateway_cpu_us=1e6 * cpu / calls if calls else math.nan,
                gateway_servicer_us=1e6 * servicer / calls if calls else math.nan,
                in_process_p50_us=tight,
                in_process_served_p50_us=served,
                inputs_per_ciphertext=0,
                request_bytes=len(works[b].requests[0]),
                response_bytes=_response_bytes(target, works[b].method, works[b].requests[0], client.options.metadata),
                key_bytes=0,
                errors=sum(latency["errors"].values()) + sum(load["errors"].values()),
                seconds=round(time.perf_counter() - started, 1),
            )
        )
    return cells


def _unrounded(session: EncryptedSession, x: np.ndarray) -> np.ndarray:
    """One encrypted call's logits before the SDK's rounding, to measure the engine's own error
    (a benchmark's measurement only: applications get the rounded ones, see ``ClientKeys.decrypt``)."""
    client = session.client
    request = encrypted_request(session.model, session.key_id, session.keys.encrypt(x), len(x))
    response = client._call(client._hegate.Infer, request)
    return session.keys.decrypt_unrounded_unsafe(response.ciphertext, len(x))


def measure_encrypted(
    client: HegateClient, target: str, manifest: Manifest, onnx_path: Path, path: str, data: Dataset, budget: Budget
) -> Cell:
    """Accuracy, precision, latency, throughput and bytes of one model under one CKKS profile."""
    model = manifest.name
    started = time.perf_counter()
    x = manifest.input.normalization.apply(data.test.x)
    work = workload(client, model, plaintext=False, batch=1, inputs=data.test.x[:16], profile=profile_of_path(path))
    session = work.session
    try:
        chosen = np.random.default_rng(SAMPLE_SEED).permutation(len(x))[: min(budget.sample, len(x))]
        batches = [chosen[i : i + session.lanes] for i in range(0, len(chosen), session.lanes)]
        timed = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:  # two calls in flight keep both of the gateway's workers busy
            logits = np.concatenate(list(pool.map(lambda b: _unrounded(session, x[b]), batches)))
        per_call = 2 * (time.perf_counter() - timed) / len(batches)
        correct = int(np.sum(logits.argmax(1) == data.test.y[chosen]))  # the SDK's classes: taken before rounding
        low, high = wilson_interval(correct, len(chosen))
        error = float(np.abs(logits - _exact(onnx_path).evaluate(x[chosen])).max())
        calls = max(budget.encrypted_calls, math.ceil(budget.seconds / per_call))
        spec = LoadSpec(
            target=target,
            method=work.method,
            requests=work.requests,
            in_flight=budget.encrypted_in_flight,
            metadata=client.options.metadata,
            keep_responses=True,  # their size: one evaluation less than asking again
        )
        with LoadGenerators(spec) as generators:
            window = generators.run(warmup=budget.warmup_seconds, count=calls, in_flight=1)
            load = generators.run(warmup=budget.warmup_seconds, count=calls * budget.encrypted_in_flight).summary()
        latency = _summary(window)
        response_bytes = len(window.responses[0]) if window.responses else 0
    finally:
        session.close()
    parameters = session.spec.parameters
    security = f"128-bit CKKS, N={parameters.poly_modulus_degree}, {sum(parameters.coeff_modulus_bits)}-bit Q"
    privacy = session.spec.circuit_privacy
    if privacy is not None:
        security += (
            f"; circuit-private: flood 2^{privacy.flooding_bits}, std {privacy.flooding_logit_std:.1e} of a logit, "
            f"statistical distance {privacy.statistical_distance:.1e} + RLWE"
        )
    return Cell(
        model=model,
        dataset=manifest.dataset,
        architecture=_architecture(manifest),
        path=path,
        input_encrypted=True,
        security=security,
        **_dp_fields(manifest),
        accuracy=correct / len(chosen),
        accuracy_low=low,
        accuracy_high=high,
        accuracy_n=len(chosen),
        max_logit_error=error,
        stated_error_bound=session.spec.logit_error_bound,
        p50_ms=latency["p50_ms"],
        p95_ms=latency.get("p95_ms", math.nan),
        p99_ms=latency.get("p99_ms", math.nan),
        requests_per_second=load["requests_per_second"],
        in_flight=budget.encrypted_in_flight,
        gateway_cpu_us=math.nan,
        gateway_servicer_us=math.nan,
        in_process_p50_us=math.nan,
        in_process_served_p50_us=math.nan,
        inputs_per_ciphertext=session.lanes,
        request_bytes=len(work.requests[0]),
        response_bytes=response_bytes,
        key_bytes=work.key_bytes,
        errors=sum(latency["errors"].values()) + sum(load["errors"].values()),
        seconds=round(time.perf_counter() - started, 1),
    )


# -- output --------------------------------------------------------------------------------------


def pareto_optimal(cells: list[Cell]) -> list[bool]:
    """Whether each cell is on the Pareto front of privacy (lower epsilon, encrypted input),
    accuracy and speed (lower p50) among the cells of its dataset: no other cell is at least as
    good on all four and better on one."""

    def key(c: Cell) -> tuple[float, ...]:  # smaller is better everywhere
        return (c.epsilon, -float(c.input_encrypted), -c.accuracy, c.p50_ms)

    optimal = []
    for cell in cells:
        mine = key(cell)
        dominated = any(
            other.dataset == cell.dataset
            and all(o <= m for o, m in zip(key(other), mine, strict=True))
            and key(other) != mine
            for other in cells
        )
        optimal.append(not dominated)
    return optimal


def _epsilon(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}"


def markdown(cells: list[Cell], meta: dict) -> str:
    lines = [
        "# What privacy costs: accuracy, latency, throughput and bytes per DP budget and execution path",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['date']}  ",
        f"Machine: {meta['machine']} (1-minute load average at the start: {meta['load_average']})  ",
        f"Gateway: {meta['gateway']}",
        "",
        "Accuracy: the whole test set on plaintext paths; on encrypted paths a seeded sample (n), with its 95% "
        "Wilson interval; encrypted classes as the SDK takes them, before its rounding. Error: the largest logit "
        "error against the exact network over that sample, before the SDK's rounding (the engine's own), with "
        "the plan's stated bound (encrypted), or against onnxruntime over the test set (plaintext). Latency: one call "
        "in flight, one input per request. Throughput: requests/s with the stated calls in flight. Bytes: one "
        "request, one response, the evaluation keys. Pareto: on the front of privacy (epsilon, encrypted input), "
        "accuracy and p50 latency within the dataset.",
        "",
        "| model | epsilon | path | accuracy | error (bound) | p50 / p95 / p99 ms | req/s (in flight) | request "
        "| response | keys | security | Pareto |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell, optimal in zip(cells, pareto_optimal(cells), strict=True):
        accuracy = f"{100 * cell.accuracy:.2f}%"
        error = f"{cell.max_logit_error:.1e}"
        if cell.input_encrypted:
            accuracy += f" [{100 * cell.accuracy_low:.1f}, {100 * cell.accuracy_high:.1f}] n={cell.accuracy_n}"
            error += f" ({cell.stated_error_bound:.1e})"
        lines.append(
            f"| {cell.model} | {_epsilon(cell.epsilon)} | {cell.path} | {accuracy} | {error} "
            f"| {cell.p50_ms:.3g} / {cell.p95_ms:.3g} / {cell.p99_ms:.3g} "
            f"| {cell.requests_per_second:,.0f} ({cell.in_flight}) | {_size(cell.request_bytes)} "
            f"| {_size(cell.response_bytes)} | {_size(cell.key_bytes) if cell.key_bytes else '-'} "
            f"| {cell.security} | {'yes' if optimal else ''} |"
        )
    lines += _backends_section(cells) + _circuit_private_section(cells)
    lines += [
        "",
        "## DP records (from the accountant at training)",
        "",
        "| model | epsilon | delta | noise multiplier | clipping bound | sample rate | steps |",
        "|---|---|---|---|---|---|---|",
    ]
    for cell in {c.model: c for c in cells}.values():
        lines.append(
            f"| {cell.model} | {_epsilon(cell.epsilon)} | {cell.delta:g} | {cell.noise_multiplier:.3g} "
            f"| {cell.max_grad_norm:g} | {cell.sample_rate:.3g} | {cell.steps} |"
        )
    errors = sum(c.errors for c in cells)
    lines += ["", f"Failed calls over the whole sweep: {errors}.", "", "![](privacy-pareto.png)", ""]
    return "\n".join(lines)


def _pairs(cells: list[Cell], first: str, second: str) -> list[tuple[Cell, Cell]]:
    by = {(c.model, c.path): c for c in cells}
    return [(by[(m, first)], by[(m, second)]) for m, p in by if p == first and (m, second) in by]


def _backends_section(cells: list[Cell]) -> list[str]:
    """Each backend's gateway p50 beside its in-process batch-1 time: what the gateway adds is the
    same for both when the difference in the gateway is the difference in process."""
    pairs = _pairs(cells, "plaintext-numba", "plaintext-onnxruntime")
    if not pairs:
        return []
    lines = [
        "",
        "## The two plaintext backends, in one gateway",
        "",
        "Both backends serve in the same gateway process (the request parameter `backend`), measured in "
        "alternating windows. At one call in flight, per request: the gateway main thread's CPU (event loop, "
        "HTTP/2, servicer, backend) and the servicer's time (decoding, backend, encoding; its compute histogram, "
        "wall time). In this process, CPU through the gateway's entry points: the backend's batch-1 call in a "
        "tight loop, and a request's whole servicer work (decode, call, encode). numba / onnxruntime, and the "
        "difference.",
        "",
        "| model | gateway p50 | gateway CPU | servicer | in process: call | in process: decode, call, encode "
        "| req/s |",
        "|---|---|---|---|---|---|---|",
    ]

    def pair(a: float, b: float, digits: int = 0) -> str:
        return f"{a:.{digits}f} / {b:.{digits}f} us ({b - a:+.{digits}f})"

    for numba, ort in pairs:
        lines.append(
            f"| {numba.model} | {pair(1e3 * numba.p50_ms, 1e3 * ort.p50_ms)} "
            f"| {pair(numba.gateway_cpu_us, ort.gateway_cpu_us)} "
            f"| {pair(numba.gateway_servicer_us, ort.gateway_servicer_us)} "
            f"| {pair(numba.in_process_p50_us, ort.in_process_p50_us, 1)} "
            f"| {pair(numba.in_process_served_p50_us, ort.in_process_served_p50_us, 1)} "
            f"| {numba.requests_per_second:,.0f} / {ort.requests_per_second:,.0f} |"
        )
    lines += [
        "",
        "Until 2026-12-03 this benchmark measured the two backends in two gateways, minutes apart and configured "
        "differently (numba with the standard CKKS profile, onnxruntime with the high one), and compared the "
        "gap with the kernels benchmark's in-process figures, which time onnxruntime's bare `session.run` while "
        "the gateway called it through a wrapper 7 us heavier. Now both run in one gateway in alternating "
        "windows, the wrapper is gone, and the in-process figures go through the gateway's own entry points. "
        "What remains is real: onnxruntime's call costs more than the kernels', and its large working set evicts "
        "the code and data of whatever runs around it, so the same decoding and encoding cost more CPU after it "
        "(compare the two in-process columns), and the gateway runs much more around a call than that "
        "(event loop, HTTP/2 framing, metrics).",
    ]
    return lines


def _circuit_private_section(cells: list[Cell]) -> list[str]:
    """What the circuit-private profile costs against the standard one, model by model."""
    pairs = _pairs(cells, "encrypted-circuit-private", "encrypted-standard")
    if not pairs:
        return []
    lines = [
        "",
        "## What circuit privacy costs (against the standard profile)",
        "",
        "| model | p50 | req/s | request | response | keys | max logit error (stated bound) |",
        "|---|---|---|---|---|---|---|",
    ]
    for private, standard in pairs:
        lines.append(
            f"| {private.model} | {private.p50_ms:.3g} ms ({private.p50_ms / standard.p50_ms:.1f}x) "
            f"| {private.requests_per_second:,.1f} ({private.requests_per_second / standard.requests_per_second:.2f}x) "
            f"| {_size(private.request_bytes)} ({private.request_bytes / standard.request_bytes:.1f}x) "
            f"| {_size(private.response_bytes)} ({private.response_bytes / standard.response_bytes:.1f}x) "
            f"| {_size(private.key_bytes)} ({private.key_bytes / standard.key_bytes:.1f}x) "
            f"| {private.max_logit_error:.1e} ({private.stated_error_bound:.1e}) against "
            f"{standard.max_logit_error:.1e} ({standard.stated_error_bound:.1e}) |"
        )
    return lines


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.1f} KiB"


def write_csv(cells: list[Cell], path: Path) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(Cell.model_fields))
        writer.writeheader()
        writer.writerows(cell.model_dump() for cell in cells)


def plot(cells: list[Cell], directory: Path) -> list[Path]:
    """Accuracy against epsilon per path; latency against accuracy with the Pareto front marked."""
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the plots need matplotlib: pip install -e '.[dev]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({c.dataset for c in cells})
    finite = [c.epsilon for c in cells if math.isfinite(c.epsilon)]
    at_inf = (max(finite) if finite else 1.0) * 3  # where "no DP" sits on the log axis
    colors = {path: f"C{i}" for i, path in enumerate(PATHS)}
    markers = {"cnn": "o", "mlp": "s", "linear": "^"}

    figure, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for axis, dataset in zip(axes[0], datasets, strict=True):
        mine = [c for c in cells if c.dataset == dataset]
        for path in PATHS:
            for arch in sorted({c.architecture for c in mine}):
                line = sorted((c for c in mine if c.path == path and c.architecture == arch), key=lambda c: c.epsilon)
                if not line:
                    continue
                xs = [c.epsilon if math.isfinite(c.epsilon) else at_inf for c in line]
                ys = [100 * c.accuracy for c in line]
                errors = [
                    [100 * (c.accuracy - c.accuracy_low) for c in line],
                    [100 * (c.accuracy_high - c.accuracy) for c in line],
                ]
                axis.errorbar(
                    xs,
                    ys,
                    yerr=errors,
                    marker=markers.get(arch, "x"),
                    color=colors[path],
                    capsize=2,
                    label=f"{arch}, {path}",
                    alpha=0.85,
                )
        axis.set_xscale("log")
        ticks = sorted({c.epsilon for c in mine if math.isfinite(c.epsilon)})
        axis.set_xticks([*ticks, at_inf], [*(f"{t:g}" for t in ticks), "no DP"])
        axis.minorticks_off()
        axis.set(title=dataset, xlabel="epsilon (DP budget; delta in the table)", ylabel="test accuracy (%)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    accuracy_png = directory / "privacy-accuracy.png"
    figure.savefig(accuracy_png, dpi=110)
    plt.close(figure)

    optimal = pareto_optimal(cells)
    figure, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.5), squeeze=False)
    for axis, dataset in zip(axes[0], datasets, strict=True):
        for path in PATHS:
            mine = [(c, o) for c, o in zip(cells, optimal, strict=True) if c.dataset == dataset and c.path == path]
            if not mine:
                continue
            axis.scatter(
                [c.p50_ms for c, _ in mine],
                [100 * c.accuracy for c, _ in mine],
                color=colors[path],
                label=path,
                s=[60 if o else 25 for _, o in mine],
                edgecolors=["black" if o else "none" for _, o in mine],
            )
            for c, o in mine:
                if o:
                    label = f"eps {_epsilon(c.epsilon)}, {c.architecture}"
                    point = (c.p50_ms, 100 * c.accuracy)
                    axis.annotate(label, point, fontsize=6, xytext=(4, 2), textcoords="offset points")
        axis.set_xscale("log")
        axis.set(
            title=f"{dataset}: outlined = Pareto-optimal (epsilon, encryption, accuracy, latency)",
            xlabel="p50 latency, one request (ms, log)",
            ylabel="test accuracy (%)",
        )
        axis.title.set_fontsize(8)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    pareto_png = directory / "privacy-pareto.png"
    figure.savefig(pareto_png, dpi=110)
    plt.close(figure)
    return [accuracy_png, pareto_png]


# -- the command ---------------------------------------------------------------------------------


def _order(cell: Cell) -> tuple:
    return (cell.dataset, cell.architecture, cell.epsilon, PATHS.index(cell.path) if cell.path in PATHS else 9)


def _selected(args: argparse.Namespace, repository: ModelRepository) -> list[str]:
    """``--models``, or every model; ``--quick``: the first model (by name) of each dataset."""
    if args.models:
        return list(args.models)
    names = sorted(repository.names())
    if not args.quick:
        return names
    first: dict[str, str] = {}
    for name in names:
        first.setdefault(repository.get(name).manifest.dataset, name)
    return sorted(first.values())


@contextlib.contextmanager
def _gateway(args: argparse.Namespace, names: list[str]) -> Iterator[tuple[str, str | None, Server | None]]:
    """The addresses to measure, the gateway's and its fast path's: ``--target`` and ``--fast-path``,
    or those of one gateway started here with its defaults, serving ``names`` (and that gateway)."""
    if args.target:
        yield args.target, args.fast_path, None
        return
    with tempfile.TemporaryDirectory() as scratch:
        repository = repository_with(names, Path(scratch), source=args.repo)
        with Server(repository, args.workers, Path(scratch) / "log") as server:
            yield server.target, server.fast_path_target, server


def sweep(args: argparse.Namespace, budget: Budget) -> tuple[list[Cell], str]:
    """Every selected model on every path of one gateway; returns the cells and a description of it."""
    tqdm = require_train_extra("tqdm").tqdm
    repository = ModelRepository(args.repo)
    names = _selected(args, repository)
    artifacts = {name: repository.get(name) for name in names}
    datasets = {a.manifest.dataset: load_dataset(a.manifest.dataset) for a in artifacts.values()}
    cells: list[Cell] = []
    with (
        _gateway(args, names) as (target, fast_path, server),
        HegateClient(target, api_key=args.api_key, fast_path_target=fast_path, timeout_seconds=600) as client,
        tqdm(total=len(names), unit="model", disable=args.no_progress) as bar,
    ):
        for name in names:
            artifact = artifacts[name]
            manifest, data = artifact.manifest, datasets[artifact.manifest.dataset]
            paths = paths_of(client, name)
            backends = [p.removeprefix("plaintext-") for p in paths if p.startswith("plaintext-")]
            bar.set_description(f"{name} plaintext")
            cells += measure_plaintext(client, target, manifest, artifact.onnx_path, backends, data, budget, server)
            for path in (p for p in paths if p.startswith("encrypted-")):
                bar.set_description(f"{name} {path}")
                cells.append(measure_encrypted(client, target, manifest, artifact.onnx_path, path, data, budget))
            bar.update()
    where = args.target or f"one started here with its defaults, {args.workers} encrypted workers, from {args.repo}"
    if not args.target or args.fast_path:
        where += "; plaintext paths on the fast path"
    return sorted(cells, key=_order), where


def run(args: argparse.Namespace) -> int:
    budget = QUICK if args.quick else FULL
    if args.sample:
        budget = Budget(**{**budget.__dict__, "sample": args.sample})
    cells, where = sweep(args, budget)
    meta = {**provenance("gateway.cli"), "gateway": where, "budget": budget.__dict__}
    out = Path(args.out)
    write("privacy", {**meta, "cells": [c.model_dump() for c in cells]}, markdown(cells, meta), directory=out)
    write_csv(cells, out / "privacy.csv")
    for png in plot(cells, out):
        print(f"wrote {png}")
    return 0


def add_parser(commands) -> None:
    privacy = commands.add_parser("privacy", help="sweep models (DP budgets) x paths: accuracy, latency, bytes")
    privacy.add_argument("--repo", type=Path, default=BUNDLED_REPOSITORY, help="model repository (default: bundled)")
    privacy.add_argument("--models", nargs="+", help="only these models (default: every model of the repository)")
    privacy.add_argument("--target", help="host:port of a running gateway, instead of starting one")
    privacy.add_argument(
        "--fast-path", metavar="HOST:PORT", help="with --target: its fast path, for the plaintext paths"
    )
    privacy.add_argument("--workers", type=int, default=2, help="encrypted workers of the gateway started here")
    privacy.add_argument(
        "--quick",
        action="store_true",
        help="one model per dataset (unless --models), small samples, short windows (< 2 min on an idle machine)",
    )
    privacy.add_argument("--sample", type=int, help="encrypted test inputs per accuracy figure (default 500)")
    privacy.add_argument("--out", type=Path, default=RESULTS, help="directory for the CSV, JSON, table and plots")
    privacy.add_argument("--api-key")
    privacy.add_argument("--no-progress", action="store_true", help="no progress bar")
    privacy.set_defaults(handler=run)
