"""A gRPC load generator in its own processes: closed loop (N calls in flight) or open loop
(a target rate), for a duration or a request count, counting every outcome by status code.

Requests are serialized before the run and the method is called without serializers (bytes in,
bytes out), so a generator spends its time in gRPC, not in Python. Generators start, connect
and make one call each before the first measured window is announced, then serve any number of
windows (each with its own concurrency) until they are told to stop; ``time.monotonic`` is the same
clock in every process on Linux, so the window means the same instants everywhere, and the
caller can read CPU counters of other processes around it.

Closed loop, like Triton's perf_analyzer in concurrency mode: each of ``in_flight`` callers sends
its next request when the previous answer arrives. Open loop (``rate``): requests leave on a
fixed schedule whatever the answers do, up to ``in_flight`` outstanding; a send that finds all
slots busy waits, and the delay counts in its latency (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

import grpc
import numpy as np

from bench.stats import percentiles

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
START_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class LoadSpec:
    """What to send and how hard."""

    target: str
    method: str  # "/package.Service/Method"
    requests: list[bytes]  # serialized, sent round-robin
    in_flight: int = 1
    generators: int = 1
    rate: float | None = None  # requests/s over all generators (open loop); None: closed loop
    metadata: tuple[tuple[str, str], ...] = ()
    request_metadata: tuple[tuple[tuple[str, str], ...], ...] = ()  # per request (same index), after ``metadata``
    timeout_seconds: float = 60.0
    keep_responses: bool = False  # return each OK response's bytes (e.g. to read server timings)

    def call(self, index: int) -> tuple[bytes, tuple[tuple[str, str], ...]]:
        """Request ``index`` (round-robin) and the metadata it is sent with: each request may carry its
        own (the API key of the tenant whose key set it names, say)."""
        position = index % len(self.requests)
        own = self.request_metadata[position] if self.request_metadata else ()
        return self.requests[position], self.metadata + own


@dataclass
class LoadResult:
    seconds: float
    latencies: np.ndarray  # of the OK calls completed in the window, seconds
    statuses: Counter = field(default_factory=Counter)  # status name -> count, every call in the window
    generator_cpu_seconds: float = 0.0
    responses: list[bytes] = field(default_factory=list)

    @classmethod
    def merged(cls, results: list[LoadResult]) -> LoadResult:
        """Several windows of one workload as one: their seconds, calls and latencies added up
        (the windows of two workloads measured in turns, so that neither gets the quieter minutes)."""
        statuses: Counter = Counter()
        for result in results:
            statuses.update(result.statuses)
        return cls(
            seconds=sum(r.seconds for r in results),
            latencies=np.concatenate([r.latencies for r in results]),
            statuses=statuses,
            generator_cpu_seconds=sum(r.generator_cpu_seconds for r in results),
            responses=[b for r in results for b in r.responses],
        )

    @property
    def ok(self) -> int:
        return self.statuses.get("OK", 0)

    @property
    def errors(self) -> dict[str, int]:
        return {code: n for code, n in sorted(self.statuses.items()) if code != "OK"}

    def summary(self) -> dict:
        """Throughput and latency percentiles of the OK calls, errors by status code."""
        row = {
            "seconds": round(self.seconds, 3),
            "requests": int(sum(self.statuses.values())),
            "ok": self.ok,
            "requests_per_second": round(self.ok / self.seconds, 1) if self.seconds else 0.0,
            "errors": self.errors,
        }
        if len(self.latencies):
            row |= {f"{k}_ms": round(1000 * v, 3) for k, v in percentiles(self.latencies, (50, 90, 95, 99)).items()}
        return row


def _generator(connection: Connection, spec: LoadSpec, rate: float | None) -> None:
    try:
        asyncio.run(_serve_windows(connection, spec, rate))
    except Exception as exc:  # the parent raises it: a broken generator must not pass as a slow gateway
        connection.send({"error": f"{type(exc).__name__}: {exc}"})


async def _serve_windows(connection: Connection, spec: LoadSpec, rate: float | None) -> None:
    """Connect, then measure each window the parent announces, until it sends None."""
    async with grpc.aio.insecure_channel(spec.target, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(spec.method)
        await channel.channel_ready()
        request, metadata = spec.call(0)
        await call(request, metadata=metadata, timeout=spec.timeout_seconds)
        connection.send("ready")
        while (window := connection.recv()) is not None:
            connection.send(await _window(call, spec, rate, *window))


async def _window(
    call, spec: LoadSpec, rate: float | None, start: float, stop: float, count: int | None, in_flight: int
) -> dict:
    """One measured window: ``in_flight`` calls outstanding, from ``start`` to ``stop`` or ``count``."""
    latencies: list[float] = []
    statuses: Counter = Counter()
    responses: list[bytes] = []
    sent = 0
    slots = asyncio.Semaphore(in_flight)
    cpu: list[float] = []

    def more() -> bool:
        return time.monotonic() < stop if count is None else sent < count

    async def one(index: int, due: float) -> None:
        try:
            request, metadata = spec.call(index)
            response = await call(request, metadata=metadata, timeout=spec.timeout_seconds)
            status = "OK"
        except grpc.aio.AioRpcError as exc:
            response, status = None, exc.code().name
        done = time.monotonic()
        if done >= start and (count is not None or done < stop):
            statuses[status] += 1
            if status == "OK":
                latencies.append(done - due)
                if spec.keep_responses:
                    responses.append(response)

    async def caller() -> None:
        """Closed loop: send, wait for the answer, send the next (no task per call: cheap)."""
        nonlocal sent
        while more():
            index, sent = sent, sent + 1
            await one(index, time.monotonic())

    async def scheduled(index: int, due: float) -> None:
        try:
            await one(index, due)
        finally:
            slots.release()

    async def scheduler() -> None:
        """Open loop: send on the schedule; latency counts from the scheduled instant, so a wait
        for a free slot is in it."""
        nonlocal sent
        tasks = set()
        while more():
            due = start + sent / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            await slots.acquire()
            task = asyncio.create_task(scheduled(sent, due))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        await asyncio.gather(*tasks)

    async def clock() -> None:
        """This process's CPU time at the window's edges (the warm-up's is not the window's)."""
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        cpu.append(time.process_time())
        if count is None:
            await asyncio.sleep(max(0.0, stop - time.monotonic()))
            cpu.append(time.process_time())

    if rate or count is not None:  # a schedule or a fixed number of requests starts with the window
        await asyncio.sleep(max(0.0, start - time.monotonic()))
    load = scheduler() if rate else asyncio.gather(*(caller() for _ in range(in_flight)))
    await asyncio.gather(clock(), load)
    if count is not None:
        cpu.append(time.process_time())
    return {
        "latencies": latencies,
        "statuses": dict(statuses),
        "cpu_seconds": cpu[1] - cpu[0],
        "responses": responses,
        "finished": time.monotonic(),
    }


class LoadGenerators:
    """``with LoadGenerators(spec) as generators: result = generators.run(warmup=1, seconds=10)``.

    The processes start and connect once, then measure any number of windows, each with its own
    number of calls in flight (the spec's by default); they exit with the block. The caller's
    ``during`` callback, if any, runs at the window's start and at its end, to read counters of
    other processes. In count mode the window starts after the warm-up and ends when the last of
    the ``count`` requests has been answered.
    """

    def __init__(self, spec: LoadSpec) -> None:
        if spec.in_flight < spec.generators or spec.generators < 1:
            raise ValueError("need at least one call in flight per generator")
        if spec.request_metadata and len(spec.request_metadata) != len(spec.requests):
            raise ValueError("request_metadata needs one entry per request")
        self.spec = spec
        self._pipes: list[Connection] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []

    def __enter__(self) -> LoadGenerators:
        context = multiprocessing.get_context("spawn")
        spec, n = self.spec, self.spec.generators
        for _ in range(n):
            ours, theirs = context.Pipe()
            rate = spec.rate / n if spec.rate else None
            process = context.Process(target=_generator, args=(theirs, spec, rate), daemon=True)
            process.start()
            theirs.close()
            self._pipes.append(ours)
            self._processes.append(process)
        for pipe in self._pipes:
            if not pipe.poll(START_TIMEOUT_SECONDS):
                raise RuntimeError("a load generator did not connect")
            message = pipe.recv()
            if message != "ready":
                raise RuntimeError(f"load generator failed: {message['error']}")
        return self

    def run(
        self,
        *,
        warmup: float,
        seconds: float | None = None,
        count: int | None = None,
        in_flight: int | None = None,
        during=None,
    ) -> LoadResult:
        """One measured window: ``seconds`` long, or until ``count`` requests have been sent, with
        ``in_flight`` calls outstanding over all generators (default: the spec's)."""
        if (seconds is None) == (count is None):
            raise ValueError("give a duration or a request count")
        in_flight = self.spec.in_flight if in_flight is None else in_flight
        if in_flight < len(self._pipes):
            raise ValueError("need at least one call in flight per generator")
        start = time.monotonic() + warmup
        stop = start + seconds if seconds is not None else float("inf")
        n = len(self._pipes)
        for g, pipe in enumerate(self._pipes):
            share = None if count is None else count // n + (g < count % n)
            pipe.send((start, stop, share, in_flight // n + (g < in_flight % n)))
        time.sleep(max(0.0, start - time.monotonic()))
        if during:
            during()
        if seconds is not None:
            time.sleep(max(0.0, stop - time.monotonic()))
            if during:
                during()
        results = [pipe.recv() for pipe in self._pipes]
        failed = [r["error"] for r in results if "error" in r]
        if failed:
            raise RuntimeError(f"load generator failed: {failed[0]}")
        if seconds is None:
            if during:
                during()
            seconds = max(r["finished"] for r in results) - start
        statuses: Counter = Counter()
        for r in results:
            statuses.update(r["statuses"])
        return LoadResult(
            seconds=seconds,
            latencies=np.concatenate([np.asarray(r["latencies"], dtype=np.float64) for r in results]),
            statuses=statuses,
            generator_cpu_seconds=sum(r["cpu_seconds"] for r in results),
            responses=[b for r in results for b in r["responses"]],
        )

    def __exit__(self, *exc) -> None:
        for pipe in self._pipes:
            with contextlib.suppress(OSError):  # a generator that failed has gone already
                pipe.send(None)
            pipe.close()
        for process in self._processes:
            process.join(30)
            if process.is_alive():
                process.terminate()
