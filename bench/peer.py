"""``hegate bench peer``: hegate's plaintext path beside MLServer, the same model, requests and load, one run.

    python -m bench.peer                          # full run (~2 min on an idle machine): 1 and 32 in flight
    python -m bench.peer --quick                  # short windows: a smoke run (~30 s), not figures to quote
    python -m bench.peer --concurrency 1 8 32 --model mnist-cnn-eps1
    hegate bench peer --mlserver-workers 2        # MLServer with an inference pool of 2 processes
    make bench-peer

MLServer runs from its own virtual environment, ``.venv-mlserver`` at the repository root (its
pins, protobuf 6 among them, clash with ours), created on first use from the exact versions of
``bench/mlserver/requirements.txt`` and rebuilt whenever that file changes (a stamp holds its
hash). It serves the model with our runtime, :mod:`bench.mlserver.runtime`: onnxruntime on one
thread, as hegate's kernels run, on the same ``model.onnx`` file. Both servers speak the Open
Inference Protocol over gRPC on loopback; each receives the very same serialized
``ModelInferRequest`` bytes (built by hegate's SDK, inputs in ``raw_input_contents``), and before
any measurement both answer the whole request pool once, their logits compared.

The load comes from :mod:`bench.loadgen` with one ``LoadSpec`` per level that differs only in its
target, closed loop, the same number of generator processes for both (1 by default: on two cores a
second generator process takes CPU from the server it loads; ``bench.gateway`` measured hegate
slower at 32 in flight from 2 than from 1). Windows alternate between the servers in the order
hegate, MLServer, MLServer, hegate, ... so a slow drift in the machine's background load falls on
both alike; each server's windows at a level are pooled. A window in which the rest of the machine
used more than ``bench.gateway.FOREIGN_CORES`` is measured again, as in ``bench.gateway``.

MLServer's configuration, its fastest on this machine: gRPC on loopback, ``debug`` off (with it on,
MLServer adds an access-log interceptor to every call), metrics off (a Prometheus interceptor on
every call; hegate keeps its own metrics on), and ``parallel_workers`` 0: the runtime runs in
MLServer's own event loop, as hegate's plaintext path runs in its own. With an inference pool every
request is also pickled to a worker process and back, while the main process keeps all the gRPC and
decoding work; on two cores the extra process only competes. MLServer's REST server cannot be
turned off in 1.7; it listens on a free port and stays idle. Measured with this script on an
otherwise idle machine (MLServer 1.7.1, mnist-cnn-eps3, 1 generator process, 2 windows of 10 s per
level and server; each row is its own run, beside hegate's figures of that run):

    parallel_workers  metrics  1 in flight: OK/s, p50  32 in flight: OK/s, p50  hegate, same run: OK/s at 1 / 32
    0 (chosen)        off      1,375, 0.718 ms          3,090, 10.5 ms           1,972 / 4,856
    0                 on       1,344, 0.732 ms          2,986, 10.5 ms           1,914 / 5,034
    1 (its default)   off        844, 1.177 ms          1,443, 22.6 ms           1,975 / 5,317
    2                 off        814, 1.220 ms          1,647, 18.3 ms           1,966 / 5,085

hegate is loaded on both of its fronts, as two sides with their own generators: ``hegate``, its
plaintext fast path (:mod:`gateway.fastpath`, the port that trusted plaintext callers use), which
the targets are checked on, and ``hegate-aio``, the same servicer behind its grpc.aio port. A
fourth server, the floor (:mod:`bench.floor`), answers every call with a fixed pre-serialized
response through a bare grpc.aio generic handler; it gets the same windows. Its ratios over
MLServer bound what any Python grpc.aio server can reach here (hegate-aio and MLServer included),
which is why the fast path leaves grpc.aio out.

Results go to ``bench/results/peer.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import grpc
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from bench.floor import FloorProcess
from bench.gateway import ATTEMPTS, FOREIGN_CORES, PLAINTEXT_METHOD
from bench.loadgen import CHANNEL_OPTIONS, LoadGenerators, LoadResult, LoadSpec
from bench.report import provenance, write
from bench.server import Server, cpu_seconds, descendants, free_ports, machine_busy_seconds, repository_with, stop
from gateway.api import grpc_predict_v2_pb2 as oip
from gateway.api import grpc_predict_v2_pb2_grpc as oip_grpc

# The SDK, the model repository and onnxruntime are imported inside the parts that use them: the
# generator processes import this module too (``spawn``), and they should start light.

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
MLSERVER_VENV = REPOSITORY_ROOT / ".venv-mlserver"
REQUIREMENTS = REPOSITORY_ROOT / "bench" / "mlserver" / "requirements.txt"
STAMP_NAME = ".requirements-sha256"
RUNTIME = "bench.mlserver.runtime.OnnxRuntimeModel"
MODEL = "mnist-cnn-eps3"
START_TIMEOUT_SECONDS = 120.0
QUICK_NOTE = " (--quick: a smoke run, not figures to quote)"
HEGATE_WORKERS = 1  # encrypted workers only; the plaintext path runs in the gateway's event loop
SIDES = ("hegate", "hegate-aio", "mlserver", "floor")  # hegate: its fast path; hegate-aio: its grpc.aio port
TARGETS = {  # the peer issue's targets, hegate over MLServer at every level
    "throughput_ratio": (">=", 2.0),
    "p50_ratio": ("<=", 0.5),
}


@dataclass(frozen=True)
class Durations:
    """How long each window runs and how many each server gets per level; ``--quick`` shrinks it."""

    warmup_seconds: float
    window_seconds: float
    rounds: int  # windows per server and level


FULL = Durations(warmup_seconds=2.0, window_seconds=10.0, rounds=2)
QUICK = Durations(warmup_seconds=0.5, window_seconds=2.0, rounds=1)


# -- MLServer's environment and settings -----------------------------------------------------------


def requirements_digest(requirements: Path = REQUIREMENTS) -> str:
    return hashlib.sha256(requirements.read_bytes()).hexdigest()


def ensure_environment(venv: Path = MLSERVER_VENV, requirements: Path = REQUIREMENTS) -> Path:
    """The ``mlserver`` executable of ``venv``, which is (re)built from ``requirements`` when it is
    missing or was built from another version of that file: pinned versions, installed from PyPI.

    Raises:
        subprocess.CalledProcessError: ``venv`` or ``pip`` failed (PyPI unreachable, say).
    """
    stamp = venv / STAMP_NAME
    digest = requirements_digest(requirements)
    executable = venv / "bin" / "mlserver"
    if executable.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return executable
    why = "does not exist" if not venv.exists() else f"was not built from the current {requirements.name}"
    print(f"{venv} {why}: creating it and installing {requirements} from PyPI (a minute or two)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-qq", "-r", str(requirements)], check=True)
    stamp.write_text(digest + "\n")
    print(f"{venv}: ready", flush=True)
    return executable


class MLServerConfig(BaseModel):
    """The MLServer choices this benchmark varies (see the module docstring for what each costs)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    parallel_workers: int = Field(default=0, ge=0, description="inference pool processes; 0: in the server's loop")
    metrics: bool = Field(default=False, description="MLServer's Prometheus endpoint and its per-call interceptor")


class ServerSettings(BaseModel):
    """MLServer's ``settings.json``: the fields of its ``mlserver.settings.Settings`` that we set."""

    model_config = ConfigDict(extra="forbid")

    debug: bool = False  # True adds an access-log interceptor to every call
    host: str = "127.0.0.1"
    http_port: int = Field(gt=0, lt=65536)
    grpc_port: int = Field(gt=0, lt=65536)
    metrics_port: int = Field(gt=0, lt=65536)
    metrics_endpoint: str | None  # None: no metrics server, no per-call Prometheus interceptor
    parallel_workers: int = Field(ge=0)
    load_models_at_startup: bool = True


class ModelParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    uri: str  # absolute path of the model.onnx
    version: str  # hegate's requests name a version; MLServer finds a model only under the version it has


class ModelSettings(BaseModel):
    """MLServer's ``model-settings.json`` for one model served by our runtime."""

    model_config = ConfigDict(extra="forbid")

    name: str
    implementation: str = RUNTIME
    parameters: ModelParameters


class Ports(NamedTuple):
    """MLServer's three listening ports (its REST server always listens, idle here)."""

    http: int
    grpc: int
    metrics: int


def mlserver_folder(
    root: Path, *, model: str, version: str, onnx_path: Path, config: MLServerConfig, ports: Ports
) -> Path:
    """Write what ``mlserver start <folder>`` reads: ``settings.json`` and, below it, the model's
    ``model-settings.json``."""
    folder = root / "mlserver"
    settings = ServerSettings(
        http_port=ports.http,
        grpc_port=ports.grpc,
        metrics_port=ports.metrics,
        metrics_endpoint="/metrics" if config.metrics else None,
        parallel_workers=config.parallel_workers,
    )
    model_settings = ModelSettings(name=model, parameters=ModelParameters(uri=str(onnx_path), version=version))
    (folder / model).mkdir(parents=True)
    (folder / "settings.json").write_text(settings.model_dump_json(indent=2) + "\n")
    (folder / model / "model-settings.json").write_text(model_settings.model_dump_json(indent=2) + "\n")
    return folder


class MLServerProcess:
    """``mlserver start <folder>`` in its own environment and session; ready once the model says so
    over gRPC (``ModelReady``), stopped with SIGTERM (its graceful stop) and killed only if that hangs."""

    def __init__(self, executable: Path, folder: Path, *, model: str, version: str, grpc_port: int, log: Path) -> None:
        self.executable = executable
        self.folder = folder
        self.model = model
        self.version = version
        self.target = f"127.0.0.1:{grpc_port}"
        self.log = log
        self.version_string = ""

    def __enter__(self) -> MLServerProcess:
        env = {**os.environ, "PYTHONPATH": str(REPOSITORY_ROOT)}  # for bench.mlserver.runtime, and nothing of ours
        self._log = self.log.open("w")
        self.process = subprocess.Popen(
            [str(self.executable), "start", str(self.folder)],
            cwd=self.folder,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its inference pool processes stop with it
        )
        try:
            self._wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        with grpc.insecure_channel(self.target) as channel:
            stub = oip_grpc.GRPCInferenceServiceStub(channel)
            while True:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"MLServer did not start; its log:\n{self.log.read_text()[-4000:]}")
                try:
                    request = oip.ModelReadyRequest(name=self.model, version=self.version)
                    if stub.ModelReady(request, timeout=2).ready:
                        metadata = stub.ServerMetadata(oip.ServerMetadataRequest(), timeout=2)
                        self.version_string = f"{metadata.name} {metadata.version}"
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.25)

    def __exit__(self, *exc: object) -> None:
        stop(self.process, group=True)
        self._log.close()

    def cpu_seconds(self) -> tuple[float, float, float]:
        """As :meth:`bench.server.Server.cpu_seconds`: the main thread (MLServer's event loop, where
        the runtime runs with no inference pool), the whole process, and its children (the pool)."""
        pid = self.process.pid
        return cpu_seconds(pid, pid), cpu_seconds(pid), sum(cpu_seconds(child) for child in descendants(pid))


# -- measuring -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Side:
    """One server under test and the load generator processes connected to it (they stay
    connected for every window; a spec that differs between the sides only in its target)."""

    name: str
    server: Server | MLServerProcess | FloorProcess
    load: LoadGenerators


def load_spec(target: str, requests: list[bytes], *, most_in_flight: int, generators: int) -> LoadSpec:
    """The closed-loop spec both sides share but for the target; windows choose their own in-flight count."""
    return LoadSpec(
        target=target, method=PLAINTEXT_METHOD, requests=requests, in_flight=most_in_flight, generators=generators
    )


def window(side: Side, *, in_flight: int, durations: Durations) -> tuple[LoadResult, dict]:
    """One measured window of closed-loop load on one side, with the CPU each party used in it.
    Failed calls are counted by status, not raised: a peer's errors are part of its figures."""
    readings: list[tuple[tuple[float, float, float], float]] = []
    result = side.load.run(
        warmup=durations.warmup_seconds,
        seconds=durations.window_seconds,
        in_flight=in_flight,
        during=lambda: readings.append((side.server.cpu_seconds(), machine_busy_seconds())),
    )
    (before, machine_before), (after, machine_after) = readings
    main, process, children = ((a - b) for a, b in zip(after, before, strict=True))
    other = (machine_after - machine_before) - process - children - result.generator_cpu_seconds
    cpu = {
        "server_cpu_seconds": process + children,
        "server_main_thread_cpu_seconds": main,
        "generator_cpu_seconds": result.generator_cpu_seconds,
        "other_cpu_cores": round(max(0.0, other / result.seconds), 2),
    }
    return result, cpu


def quiet_window(side: Side, *, in_flight: int, durations: Durations) -> tuple[LoadResult, dict]:
    """:func:`window`, measured again (up to ``ATTEMPTS`` in all) while the rest of the machine used
    more than ``FOREIGN_CORES`` in it: the cores are shared with whoever else works here."""
    attempts = 0
    while True:
        attempts += 1
        result, cpu = window(side, in_flight=in_flight, durations=durations)
        if cpu["other_cpu_cores"] <= FOREIGN_CORES or attempts == ATTEMPTS:
            return result, {**cpu, "attempts": attempts}
        print(f"    {cpu['other_cpu_cores']} cores busy elsewhere in the window; measuring again", flush=True)


def pooled(windows: list[tuple[LoadResult, dict]]) -> dict:
    """One server's windows at one level as one: calls, seconds and latencies added up; CPU as
    cores (CPU seconds over window seconds)."""
    statuses: Counter = Counter()
    for result, _ in windows:
        statuses.update(result.statuses)
    merged = LoadResult(
        seconds=sum(result.seconds for result, _ in windows),
        latencies=np.concatenate([result.latencies for result, _ in windows]),
        statuses=statuses,
    )
    seconds = merged.seconds
    total = {key: sum(cpu[key] for _, cpu in windows) for key in windows[0][1] if key.endswith("_cpu_seconds")}
    row = merged.summary()
    row |= {
        "windows_requests_per_second": [round(result.ok / result.seconds, 1) for result, _ in windows],
        "server_cpu_cores": round(total["server_cpu_seconds"] / seconds, 2),
        "server_main_thread_cpu_cores": round(total["server_main_thread_cpu_seconds"] / seconds, 2),
        "server_cpu_ms_per_request": round(1000 * total["server_cpu_seconds"] / max(merged.ok, 1), 3),
        "generator_cpu_cores": round(total["generator_cpu_seconds"] / seconds, 2),
        "other_cpu_cores": max(cpu["other_cpu_cores"] for _, cpu in windows),
        "repeated_windows": sum(cpu["attempts"] - 1 for _, cpu in windows),
    }
    return row


def level(sides: list[Side], *, in_flight: int, durations: Durations) -> dict:
    """Every side at ``in_flight`` calls, windows alternating (A B C C B A ...); hegate over MLServer,
    and the floor over MLServer (what a server doing nothing but gRPC would reach)."""
    windows: dict[str, list[tuple[LoadResult, dict]]] = {side.name: [] for side in sides}
    for round_index in range(durations.rounds):
        for side in sides if round_index % 2 == 0 else sides[::-1]:
            windows[side.name].append(quiet_window(side, in_flight=in_flight, durations=durations))
            result, _ = windows[side.name][-1]
            print(f"  {in_flight} in flight, {side.name}: {result.ok / result.seconds:,.0f} OK/s", flush=True)
    rows = {name: pooled(rows) for name, rows in windows.items()}
    return {
        "in_flight": in_flight,
        **rows,
        **_ratios(rows, "hegate"),
        **_ratios(rows, "hegate-aio", prefix="aio_"),
        **_ratios(rows, "floor", prefix="floor_"),
    }


def _ratios(rows: dict[str, dict], name: str, *, prefix: str = "") -> dict:
    """``name``'s throughput and p50 over MLServer's (none when that side was not measured)."""
    if name not in rows:
        return {}
    side, mlserver = rows[name], rows["mlserver"]
    both = "p50_ms" in side and "p50_ms" in mlserver
    return {
        f"{prefix}throughput_ratio": round(side["requests_per_second"] / max(mlserver["requests_per_second"], 1e-9), 2),
        f"{prefix}p50_ratio": round(side["p50_ms"] / mlserver["p50_ms"], 3) if both else None,
    }


def agreement(targets: dict[str, str], requests: list[bytes]) -> dict:
    """Every request of the pool once to each server: both must answer, with the same logits (the
    same ``model.onnx``; hegate's int8 kernels match onnxruntime's bit for bit). A server that
    answered something else would not be the same work measured.

    Raises:
        RuntimeError: a call failed, or the answers differ in output name, datatype, shape or argmax.
    """
    from gateway.client.protocol import logits_of

    answers: dict[str, list[oip.ModelInferResponse]] = {}
    for name, target in targets.items():
        with grpc.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            call = channel.unary_unary(PLAINTEXT_METHOD)
            try:
                answers[name] = [oip.ModelInferResponse.FromString(call(request, timeout=30)) for request in requests]
            except grpc.RpcError as exc:
                raise RuntimeError(f"{name} failed a request of the pool: {exc.code().name} {exc.details()}") from None
    first = next(iter(answers.values()))
    if {(r.outputs[0].name, r.outputs[0].datatype) for responses in answers.values() for r in responses} != {
        (first[0].outputs[0].name, first[0].outputs[0].datatype)
    }:
        raise RuntimeError("the servers name or type their outputs differently")
    logits = {name: np.concatenate([logits_of(r) for r in responses]) for name, responses in answers.items()}
    a = logits[next(iter(logits))]
    for name, b in logits.items():
        if a.shape != b.shape or not np.array_equal(a.argmax(1), b.argmax(1)):
            raise RuntimeError(f"the servers disagree: {a.argmax(1)} against {name}'s {b.argmax(1)}")
    return {
        "requests": len(requests),
        "output": first[0].outputs[0].name,
        "datatype": first[0].outputs[0].datatype,
        "max_abs_logit_difference": max(float(np.abs(a - b).max()) for b in logits.values()),
        "argmax_agreement": 1.0,
    }


# -- the report ------------------------------------------------------------------------------------


def check_targets(levels: list[dict]) -> list[dict]:
    """Each target at each level, with the measured ratio."""
    checks = []
    for row in levels:
        for key, (op, target) in TARGETS.items():
            value = row[key]
            met = value is not None and (value >= target if op == ">=" else value <= target)
            checks.append(
                {"figure": key, "in_flight": row["in_flight"], "value": value, "target": f"{op} {target}", "met": met}
            )
    return checks


def markdown(result: dict) -> str:
    """The side-by-side table, the ratios against the targets, and where the cores went."""
    config = result["mlserver"]["config"]
    names = [name for name in SIDES if name in result["levels"][0]]
    repeated = sum(row[name]["repeated_windows"] for row in result["levels"] for name in names)
    lines = [
        "# hegate beside MLServer",
        "",
        f"`{result['command']}` on {result['date']}, {result['machine']}; load average "
        f"{result['load_average_at_start']} at the start{QUICK_NOTE if result['quick'] else ''}. "
        f"{result['model']} (its `model.onnx`) served by hegate's plaintext path (`hegate serve`, "
        f"{HEGATE_WORKERS} encrypted worker; row hegate: its fast path, the Open Inference Protocol on hegate's own "
        "asyncio HTTP/2 server; row hegate-aio: the same servicer on its grpc.aio port) and by "
        f"{result['mlserver']['version']} with our onnxruntime runtime "
        f"(`{RUNTIME}`, 1 thread; parallel_workers {config['parallel_workers']}, metrics "
        f"{'on' if config['metrics'] else 'off'}, debug off), both over gRPC on loopback, on the same "
        f"{result['agreement']['requests']} serialized `ModelInferRequest`s (batch 1, `raw_input_contents`). "
        f"Closed loop from {result['generators']} generator process(es) for both; per level each server gets "
        f"{result['durations']['rounds']} window(s) of {result['durations']['window_seconds']} s after "
        f"{result['durations']['warmup_seconds']} s of warm-up, alternating hegate, MLServer, MLServer, hegate, "
        "pooled. MLServer's configuration is its fastest of those measured (the docstring of `bench/peer.py` "
        "has the others). CPU: cores used in the windows (1.0 = one core busy all the time), from `/proc`; the "
        f"machine has {os.cpu_count()}, shared by the server under load, the generators and the idle other server; "
        "other CPU: the rest of the machine's busy time (the idle server, the OS, anyone else's work); a window "
        f"with more than {FOREIGN_CORES} cores of it is measured again, up to {ATTEMPTS} times in all "
        f"({repeated} repeated in this run).",
        "",
        "| in flight | server | OK/s | per window | p50 | p90 | p99 | errors | server CPU (main thread) "
        "| CPU per request | generator CPU | other CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["levels"]:
        for name in names:
            r = row[name]
            errors = ", ".join(f"{code} {n}" for code, n in r["errors"].items()) or "none"
            lines.append(
                f"| {row['in_flight']} | {name} | {r['requests_per_second']:,.0f} "
                f"| {', '.join(f'{v:,.0f}' for v in r['windows_requests_per_second'])} | {r.get('p50_ms', '-')} ms "
                f"| {r.get('p90_ms', '-')} ms | {r.get('p99_ms', '-')} ms | {errors} "
                f"| {r['server_cpu_cores']} ({r['server_main_thread_cpu_cores']}) "
                f"| {r['server_cpu_ms_per_request']} ms "
                f"| {r['generator_cpu_cores']} | {r['other_cpu_cores']} |"
            )
    a = result["agreement"]
    levels = result["levels"]
    lines.append("")
    for row in levels:
        h, m = (row[name] for name in ("hegate", "mlserver"))
        lines.append(
            f"- At {row['in_flight']} in flight each request cost hegate {h['server_cpu_ms_per_request']} ms of CPU "
            f"and MLServer {m['server_cpu_ms_per_request']} ms "
            f"({m['server_cpu_ms_per_request'] / max(h['server_cpu_ms_per_request'], 1e-9):.2f}x); their main "
            f"threads (the event loops) were busy {h['server_main_thread_cpu_cores']} and "
            f"{m['server_main_thread_cpu_cores']} of the time."
        )
    if "hegate-aio" in names:
        lines += [
            "",
            "| in flight | hegate-aio / MLServer throughput | hegate-aio / MLServer p50 |",
            "|---|---|---|",
        ]
        lines += [f"| {row['in_flight']} | {row['aio_throughput_ratio']} | {row['aio_p50_ratio']} |" for row in levels]
    lines += [
        "",
        f"Before the load, each server answered the {a['requests']} requests once: the same output "
        f"(`{a['output']}`, {a['datatype']}), the same argmax everywhere, largest logit difference "
        f"{a['max_abs_logit_difference']:.2g}.",
        "",
        "## Targets of the peer issue (hegate / MLServer)",
        "",
        "| figure | in flight | measured | target | met |",
        "|---|---|---|---|---|",
    ]
    for check in result["targets"]:
        lines.append(
            f"| {check['figure']} | {check['in_flight']} | {check['value']} | {check['target']} "
            f"| {'yes' if check['met'] else 'NO'} |"
        )
    if "floor" in names:
        lines += [
            "",
            "## The floor: a grpc.aio server that does nothing (`bench/floor.py`)",
            "",
            "The same windows against a bare grpc.aio generic handler that answers every call with hegate's "
            "pre-serialized response (no parsing, no model): what gRPC alone costs a Python grpc.aio server here, "
            "and the reason for the fast path (hegate's row), which is not bound by it.",
            "",
            "| in flight | floor / MLServer throughput | floor / MLServer p50 | hegate / floor throughput "
            "| hegate / floor p50 |",
            "|---|---|---|---|---|",
        ]
        for row in result["levels"]:
            h, f = row["hegate"], row["floor"]
            p50 = f"{h['p50_ms'] / f['p50_ms']:.2f}" if "p50_ms" in h and "p50_ms" in f else "-"
            lines.append(
                f"| {row['in_flight']} | {row['floor_throughput_ratio']} | {row['floor_p50_ratio']} "
                f"| {h['requests_per_second'] / max(f['requests_per_second'], 1e-9):.2f} | {p50} |"
            )
    return "\n".join(lines) + "\n"


# -- the command -----------------------------------------------------------------------------------


def side_by_side(root: Path, executable: Path, model: str, config: MLServerConfig, concurrency: list[int],
                 generators: int, durations: Durations) -> dict:  # fmt: skip
    """hegate and MLServer on ``model`` (a repository under ``root`` holding only it), the request
    pool built by hegate's SDK, the agreement check, the floor server answering with hegate's
    response to the pool's first request, then every level."""
    from bench.load import workload
    from gateway.client import HegateClient
    from models.repository import ModelRepository

    repository = repository_with([model], root)
    artifact = ModelRepository(repository).get(model)
    version = str(artifact.manifest.version)
    *mlserver_ports, floor_port = free_ports(4)
    ports = Ports(*mlserver_ports)
    folder = mlserver_folder(
        root, model=model, version=version, onnx_path=artifact.onnx_path, config=config, ports=ports
    )
    mlserver_process = MLServerProcess(
        executable, folder, model=model, version=version, grpc_port=ports.grpc, log=root / "mlserver.log"
    )
    with Server(repository, HEGATE_WORKERS, root / "hegate.log") as hegate, mlserver_process as mlserver:
        print(f"hegate on {hegate.target}, {mlserver.version_string} on {mlserver.target}", flush=True)
        with HegateClient(hegate.target) as client:
            requests = workload(client, model, plaintext=True, batch=1).requests
        result = {
            "mlserver": {"version": mlserver.version_string, "config": config.model_dump()},
            "agreement": agreement(
                {"hegate": hegate.fast_path_target, "hegate-aio": hegate.target, "mlserver": mlserver.target}, requests
            ),
        }
        with grpc.insecure_channel(hegate.target, options=CHANNEL_OPTIONS) as channel:
            response = channel.unary_unary(PLAINTEXT_METHOD)(requests[0], timeout=30)
        with contextlib.ExitStack() as stack:
            floor = stack.enter_context(FloorProcess(floor_port, response, root))
            sides = []
            targets = {"hegate": hegate.fast_path_target, "hegate-aio": hegate.target}
            for name, server in (("hegate", hegate), ("hegate-aio", hegate), ("mlserver", mlserver), ("floor", floor)):
                target = targets.get(name, server.target)
                spec = load_spec(target, requests, most_in_flight=max(concurrency), generators=generators)
                sides.append(Side(name, server, stack.enter_context(LoadGenerators(spec))))
            result["levels"] = [level(sides, in_flight=c, durations=durations) for c in concurrency]
    return result


def run(args: argparse.Namespace) -> int:
    """Set up MLServer's environment, start both servers on the model, check they agree, load
    them level by level, report. Returns 0 whether or not the targets are met: the report says."""
    from models.errors import InvalidArgumentError

    if min(args.concurrency) < args.generators:
        raise InvalidArgumentError("every --concurrency level needs at least one call in flight per generator process")
    durations = QUICK if args.quick else FULL
    config = MLServerConfig(parallel_workers=args.mlserver_workers, metrics=args.mlserver_metrics)
    executable = ensure_environment()
    result = {
        **provenance("bench.peer"),
        "model": args.model,
        "quick": args.quick,
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "generators": args.generators,
        "durations": asdict(durations),
    }
    if getattr(args, "argv", None) is not None:  # through `hegate bench peer`, not `python -m bench.peer`
        result["command"] = shlex.join(["hegate", *args.argv])
    with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp:
        result |= side_by_side(Path(tmp), executable, args.model, config, args.concurrency, args.generators, durations)
    result["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    result["targets"] = check_targets(result["levels"])
    write("peer", result, markdown(result))
    return 0


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=MODEL, help="a model of the bundled repository")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32], help="calls in flight, per level")
    parser.add_argument("--generators", type=int, default=1, help="load generator processes, the same for both")
    parser.add_argument("--mlserver-workers", type=int, default=0, help="MLServer's parallel_workers (0: in its loop)")
    parser.add_argument("--mlserver-metrics", action="store_true", help="turn MLServer's metrics on")
    parser.add_argument("--quick", action="store_true", help="short windows, for a smoke run")


def add_parser(commands) -> None:
    peer = commands.add_parser("peer", help="hegate's plaintext path beside MLServer: throughput and latency ratios")
    _arguments(peer)
    peer.set_defaults(handler=run)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
