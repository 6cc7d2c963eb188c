"""The key tier's targets (issue 15), measured on real ``hegate serve`` processes, all in one run.

    python -m bench.keys                    # every part (~10 min on an idle machine)
    python -m bench.keys --quick            # small counts and short windows: a smoke run, not figures to quote
    python -m bench.keys --parts memory throughput --baseline 515c763
    make bench-keys

The default model (mnist-cnn-eps3, standard profile) throughout; every key set is made by a new
client of its own tenant (one ``--api-key`` per client), as key sets arrive in production, so
per-tenant quotas never refuse the benchmark's own registrations.

1. **Memory per key set.** A gateway with 2, then 4 workers; one warm-up key set (first-use
   allocations are not a key set's cost), then ``K`` fresh key sets, each followed by one encrypted
   call (so the set is resident wherever the gateway keeps it, also when workers load keys lazily)
   and a reading of every worker's PSS and RSS (``/proc/<pid>/smaps_rollup``) and of the gateway
   process's. The figure is the least-squares slope over the ``K + 1`` readings of the workers'
   summed PSS: PSS divides shared pages (libraries, the models) among the processes that map them,
   so a sum over workers counts them once; RSS is reported beside it. The gateway (parent) process
   is reported separately: the in-memory store keeps the serialized bytes there.
2. **Encrypted throughput with 20 clients' keys**, 2 workers, 4 calls in flight (as
   ``bench/results/gateway.md``), requests spread round-robin over the 20 key sets, each
   ciphertext encrypted beforehand under its set; this checkout against ``--baseline`` (default
   515c763, main before the key-tier work), checked out into a temporary ``git worktree`` (removed
   afterwards) and served with ``PYTHONPATH`` pointing at it. Both gateways run side by side and
   are loaded in alternating windows, so the machine's drift hits both.
3. **Cold load from Redis** (needs ``hegate serve --key-store``): a ``redis-server`` on a free
   port in a temporary directory, two replicas on it (1 worker each); each fresh key set is
   registered through replica A, and its first Infer through replica B loads it from Redis. The
   cold-load time is B's ``hegate_key_cold_load_seconds`` histogram if B exposes it (the sum's
   change over that one call), else the first call's latency minus a second (warm) call's; the
   results say which.
4. **Balancer locality** (needs ``deploy/nginx/`` and the deploy harness): nginx in front of 2
   replicas; 20 clients register once through it and make encrypted calls. A call is local when
   the replica that served it (nginx's access log) already held its key set: the replica that
   registered it, or one that served it before. Cold loads per replica from the metrics beside it.

Results go to ``bench/results/keys.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from bench.gateway import ENCRYPTED_IN_FLIGHT, ENCRYPTED_METHOD, load
from bench.report import RESULTS, provenance, target_row, write
from bench.server import (
    Server,
    hegate_command,
    memory_bytes,
    metric_samples,
    repository_with,
)

# TenSEAL, the SDK and the datasets are imported inside the parts: the load generators import
# this module too (``spawn``), and they should start light.

MODEL = "mnist-cnn-eps3"
BASELINE = "515c763"  # main before the key-tier work
REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
HARNESS = REPOSITORY_ROOT / "tests" / "balancer.py"  # replicas behind a real nginx (Cluster)
SERVICES = REPOSITORY_ROOT / "tests" / "services.py"  # a real redis-server (RedisServer)
COLD_LOAD_METRIC = "hegate_key_cold_load_seconds"  # the tier's histogram of loads from the store, if exposed
KEY_BUDGET_MIB = 4096  # above 20 default-model sets under either accounting: no registration here is evicted
SETTLE_SECONDS = 1.0  # after a key set's first call, before reading memory (the worker's load has returned)
MIB = 1 << 20
PARTS = ("memory", "throughput", "cold", "locality")
TARGETS = {  # issue 15
    "worker_mib_per_key_set": ("<=", 64.0),
    "throughput_ratio": (">=", 0.90),
    "cold_load_p50_ms": ("<=", 150.0),
    "locality_share": (">=", 0.95),
}


@dataclass(frozen=True)
class Plan:
    """How much each part does; ``--quick`` shrinks everything for a smoke run."""

    memory_workers: tuple[int, ...]
    memory_key_sets: int
    throughput_clients: int
    throughput_rounds: int  # windows per side, alternating
    throughput_seconds: float
    warmup_seconds: float
    cold_key_sets: int
    locality_clients: int
    locality_calls: int  # encrypted calls per client after its registration


FULL = Plan(
    memory_workers=(2, 4),
    memory_key_sets=5,
    throughput_clients=20,
    throughput_rounds=3,
    throughput_seconds=20.0,
    warmup_seconds=2.0,
    cold_key_sets=15,
    locality_clients=20,
    locality_calls=5,
)
QUICK = Plan(
    memory_workers=(2,),
    memory_key_sets=2,
    throughput_clients=3,
    throughput_rounds=1,
    throughput_seconds=3.0,
    warmup_seconds=0.5,
    cold_key_sets=3,
    locality_clients=3,
    locality_calls=2,
)


# -- tenants, flags, checkouts --------------------------------------------------------------------


def api_key(index: int) -> str:
    return f"bench-keys-{index}"


def tenant_flags(count: int) -> list[str]:
    """``--api-key`` flags for ``count`` tenants: client ``i`` presents :func:`api_key` ``(i)``."""
    return [flag for index in range(count) for flag in ("--api-key", f"{api_key(index)}=client-{index}")]


def environment(checkout: Path) -> dict[str, str]:
    """The environment under which ``hegate serve`` runs ``checkout``'s code: the checkout first on
    ``PYTHONPATH`` (its ``gateway`` package wins; what else the path held stays behind it)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))}


def serve_help(env: dict[str, str]) -> str:
    """``hegate serve --help`` of the checkout ``env`` points at: which flags it has."""
    command = [*hegate_command(), "serve", "--help"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"`hegate serve --help` failed under PYTHONPATH={env['PYTHONPATH']}:\n{done.stderr[-2000:]}")
    return done.stdout


def budget_flags(help_text: str) -> list[str]:
    """A key budget that no registration of this benchmark exceeds, where the gateway has the flag."""
    return ["--key-budget-mib", str(KEY_BUDGET_MIB)] if "--key-budget-mib" in help_text else []


@contextlib.contextmanager
def baseline_checkout(reference: str, root: Path) -> Iterator[tuple[Path, str]]:
    """``reference`` checked out (detached) into a temporary git worktree under ``root``; the
    worktree is removed afterwards. Yields its folder and its short commit."""
    git = ["git", "-C", str(REPOSITORY_ROOT)]
    commit = subprocess.run(
        [*git, "rev-parse", "--short", f"{reference}^{{commit}}"], check=True, capture_output=True, text=True
    ).stdout.strip()
    folder = root / "baseline"
    subprocess.run([*git, "worktree", "add", "--detach", str(folder), commit], check=True, capture_output=True)
    try:
        yield folder, commit
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(folder)], check=False, capture_output=True)


def register(stack: contextlib.ExitStack, target: str, index: int, model: str):
    """A new client of tenant ``index`` and a fresh key set registered through it (an
    :class:`~gateway.client.EncryptedSession`). The session is left open: its keys stay
    registered until the gateway stops; the client closes with ``stack``."""
    from gateway.client import HegateClient

    client = stack.enter_context(HegateClient(target, api_key=api_key(index)))
    return client.encrypted_session(model)


# -- 1. memory per key set ---------------------------------------------------------------------


def memory_reading(server: Server) -> dict[str, int]:
    """Summed PSS and RSS of the gateway's workers, and the gateway process's own, in bytes."""
    workers = server.worker_pids()
    readings = [memory_bytes(pid) for pid in workers]
    parent = memory_bytes(server.process.pid)
    return {
        "worker_processes": len(workers),
        "workers_pss": sum(r["pss"] for r in readings),
        "workers_rss": sum(r["rss"] for r in readings),
        "gateway_pss": parent["pss"],
        "gateway_rss": parent["rss"],
    }


def slope_mib(values: list[int]) -> float:
    """Least-squares growth per step of byte readings taken after 0, 1, ... K steps, in MiB.

    Raises:
        ValueError: fewer than two readings.
    """
    if len(values) < 2:
        raise ValueError("a slope needs at least two readings")
    return round(float(np.polyfit(np.arange(len(values)), np.asarray(values, dtype=np.float64), 1)[0]) / MIB, 1)


def memory(*, repository: Path, root: Path, workers: int, key_sets: int, model: str, x: np.ndarray) -> dict:
    """Readings before and after each of ``key_sets`` fresh key sets on a ``workers``-worker gateway."""
    env = environment(REPOSITORY_ROOT)
    flags = [*tenant_flags(key_sets + 1), *budget_flags(serve_help(env))]
    readings, seconds = [], []
    with (
        Server(repository, workers, root / f"memory-{workers}.log", *flags, env=env) as server,
        contextlib.ExitStack() as clients,
    ):
        for index in range(key_sets + 1):  # set 0 is the warm-up
            session = register(clients, server.target, index, model)
            session.predict(x[index % len(x)][None])
            seconds.append(session.registration_seconds)
            time.sleep(SETTLE_SECONDS)
            readings.append(memory_reading(server))
            print(f"  {workers} workers, {index} key sets after the warm-up: {readings[-1]}", flush=True)
    return {
        "workers": workers,
        "key_sets": key_sets,
        "worker_processes": readings[-1]["worker_processes"],
        "readings": readings,
        "registration_seconds_p50": round(float(np.median(seconds[1:])), 3),
        **{
            f"{side}_{kind}_mib_per_key_set": slope_mib([r[f"{side}_{kind}"] for r in readings])
            for side in ("workers", "gateway")
            for kind in ("pss", "rss")
        },
    }


# -- 2. encrypted throughput with many clients' keys, against a baseline ------------------------


def keyed_requests(
    stack: contextlib.ExitStack, server: Server, *, clients: int, model: str, x: np.ndarray
) -> tuple[list[bytes], list[tuple[tuple[str, str], ...]], float, float]:
    """One key set per client registered on ``server``, each checked by one encrypted call against
    the plaintext path, and one ciphertext per set encrypted beforehand: the requests, each with
    its tenant's metadata, the argmax agreement and the registrations' p50 seconds."""
    from gateway.client.protocol import encrypted_request

    requests, metadata, agree, seconds = [], [], [], []
    for index in range(clients):
        session = register(stack, server.target, index, model)
        row = x[index % len(x)][None]
        prediction = session.predict(row)  # the set's first call: it is loaded wherever the gateway keeps it
        agree.append(int(prediction.logits.argmax() == session.client.predict(model, row).argmax()))
        seconds.append(session.registration_seconds)
        ciphertext = session.keys.encrypt(row)
        requests.append(encrypted_request(session.model, session.key_id, ciphertext, 1).SerializeToString())
        metadata.append(session.client.options.metadata)
    return requests, metadata, float(np.mean(agree)), round(float(np.median(seconds)), 3)


def throughput(*, repository: Path, root: Path, reference: str, plan: Plan, model: str, x: np.ndarray) -> dict:
    """This checkout's encrypted requests/s against ``reference``'s, 2 workers each, alternating windows."""
    with baseline_checkout(reference, root) as (folder, commit):
        theirs = repository_with([model], root / "baseline-models", source=folder / "models" / "bundled")
        sides = {"current": (repository, environment(REPOSITORY_ROOT)), "baseline": (theirs, environment(folder))}
        with contextlib.ExitStack() as stack:
            servers, setups = {}, {}
            for name, (models, env) in sides.items():
                flags = [*tenant_flags(plan.throughput_clients), *budget_flags(serve_help(env))]
                servers[name] = stack.enter_context(Server(models, 2, root / f"throughput-{name}.log", *flags, env=env))
            for name, server in servers.items():
                setups[name] = keyed_requests(stack, server, clients=plan.throughput_clients, model=model, x=x)
                print(f"  {name}: {plan.throughput_clients} key sets registered", flush=True)
            windows: dict[str, list[dict]] = {name: [] for name in servers}
            for index in range(plan.throughput_rounds):
                for name in list(servers) if index % 2 == 0 else list(servers)[::-1]:
                    requests, metadata, _, _ = setups[name]
                    windows[name].append(
                        load(
                            servers[name],
                            ENCRYPTED_METHOD,
                            requests,
                            request_metadata=tuple(metadata),
                            in_flight=ENCRYPTED_IN_FLIGHT,
                            generators=1,
                            warmup=plan.warmup_seconds,
                            seconds=plan.throughput_seconds,
                            server_timings=True,
                        )
                    )
                    print(f"  {name}: {windows[name][-1]['requests_per_second']} requests/s", flush=True)
    mean = {name: float(np.mean([w["requests_per_second"] for w in rows])) for name, rows in windows.items()}
    return {
        "baseline": reference,
        "baseline_commit": commit,
        "clients": plan.throughput_clients,
        "workers": 2,
        "in_flight": ENCRYPTED_IN_FLIGHT,
        "window_seconds": plan.throughput_seconds,
        "windows": windows,
        "requests_per_second": {name: round(value, 1) for name, value in mean.items()},
        "argmax_agreement": {name: setup[2] for name, setup in setups.items()},
        "registration_seconds_p50": {name: setup[3] for name, setup in setups.items()},
        "throughput_ratio": round(mean["current"] / mean["baseline"], 3),
    }


# -- 3. cold load from Redis ---------------------------------------------------------------------


@contextlib.contextmanager
def redis_server(root: Path) -> Iterator:
    """A ``redis-server`` on a free loopback port with its files in ``root``: the tests' launcher
    (``tests/services.py``), so there is one way to start Redis."""
    services = load_harness(SERVICES)
    root.mkdir(parents=True, exist_ok=True)
    server = services.RedisServer(root).start()
    try:
        yield server
    finally:
        server.stop()


def key_store_missing(help_text: str) -> str | None:
    """Why part 3 (and Redis in part 4) cannot run here, or None."""
    if "--key-store" not in help_text:
        return "`hegate serve` has no --key-store flag in this checkout (the redis branch adds it)"
    if shutil.which("redis-server") is None:
        return "no redis-server on PATH (Debian: apt-get install redis-server)"
    return None


def cold_load_seconds(server: Server) -> tuple[float, int] | None:
    """Sum and count of ``server``'s cold-load histogram, or None if it exposes none."""
    sums = metric_samples(server.metrics_url, f"{COLD_LOAD_METRIC}_sum")
    counts = metric_samples(server.metrics_url, f"{COLD_LOAD_METRIC}_count")
    if not sums:
        return None
    return sum(value for _, value in sums), int(sum(value for _, value in counts))


def cold_loads(*, repository: Path, root: Path, key_sets: int, model: str, x: np.ndarray) -> dict:
    """Register through replica A, first Infer through replica B: B's cold-load time per key set."""
    env = environment(REPOSITORY_ROOT)
    help_text = serve_help(env)
    reason = key_store_missing(help_text)
    if reason:
        return {"skipped": reason}
    from gateway.api import hegate_v1_pb2_grpc as hv1_grpc
    from gateway.client import HegateClient
    from gateway.client.protocol import encrypted_request

    rows = []
    with redis_server(root / "redis") as redis:
        flags = [*tenant_flags(key_sets), *budget_flags(help_text), "--key-store", redis.url]
        with (
            Server(repository, 1, root / "replica-a.log", *flags, env=env) as a,
            Server(repository, 1, root / "replica-b.log", *flags, env=env) as b,
            contextlib.ExitStack() as clients,
        ):
            for index in range(key_sets):
                session = register(clients, a.target, index, model)
                row = x[index % len(x)][None]
                request = encrypted_request(session.model, session.key_id, session.keys.encrypt(row), 1)
                other = clients.enter_context(HegateClient(b.target, api_key=api_key(index)))
                stub = hv1_grpc.EncryptedInferenceStub(other.channel)
                calls, metric = [], [cold_load_seconds(b)]
                for _ in range(2):  # cold, then warm
                    started = time.perf_counter()
                    response = stub.Infer(request, metadata=other.options.metadata, timeout=60)
                    calls.append(time.perf_counter() - started)
                    metric.append(cold_load_seconds(b))
                logits = session.keys.decrypt(response.ciphertext, 1)
                before, after = metric[0], metric[1]
                histogram = after[0] - before[0] if before and after and after[1] - before[1] == 1 else None
                rows.append({
                    "first_ms": round(1000 * calls[0], 1),
                    "warm_ms": round(1000 * calls[1], 1),
                    "first_minus_warm_ms": round(1000 * (calls[0] - calls[1]), 1),
                    "histogram_ms": None if histogram is None else round(1000 * histogram, 1),
                    "argmax_agrees": bool(logits.argmax() == session.client.predict(model, row).argmax()),
                })  # fmt: skip
                print(f"  key set {index}: {rows[-1]}", flush=True)
    return summarize_cold_loads(rows)


def summarize_cold_loads(rows: list[dict]) -> dict:
    """p50 and p95 of the cold-load times: the gateway's histogram when every row has it, else the
    first call's latency minus the warm call's (``source`` says which)."""
    from_histogram = all(row["histogram_ms"] is not None for row in rows)
    key, source = (
        ("histogram_ms", f"{COLD_LOAD_METRIC} on replica B (its sum's change over the first call)")
        if from_histogram
        else ("first_minus_warm_ms", "first Infer on replica B minus the second (warm) one")
    )
    values = [row[key] for row in rows]
    return {
        "key_sets": len(rows),
        "source": source,
        "p50_ms": round(float(np.percentile(values, 50)), 1),
        "p95_ms": round(float(np.percentile(values, 95)), 1),
        "first_call_p50_ms": round(float(np.median([row["first_ms"] for row in rows])), 1),
        "warm_call_p50_ms": round(float(np.median([row["warm_ms"] for row in rows])), 1),
        "argmax_agreement": float(np.mean([row["argmax_agrees"] for row in rows])),
        "rows": rows,
    }


# -- 4. balancer locality ------------------------------------------------------------------------


class ServedCall(Protocol):
    """One call as the balancer's access log shows it (the deploy harness's ``Served``)."""

    method: str  # "RegisterKeys", "Infer", ...
    key_id: str  # "" or "-" when the call carried none
    upstreams: tuple[str, ...]  # every replica tried; the last one answered
    grpc_status: str  # "0": OK


def locality_share(calls: Iterable[ServedCall]) -> dict:
    """The share of Infer calls that a replica already holding their key set served, in log order.

    A replica holds a key set once it has registered it or served an Infer with it (it loaded the
    set from the store then, or the client registered again there). A failed Infer is never local.
    """
    holders: dict[str, set[str]] = {}
    infers = local = failed = 0
    per_replica: dict[str, dict[str, int]] = {}
    for call in calls:
        if call.key_id in ("", "-") or not call.upstreams:
            continue
        replica, ok = call.upstreams[-1], call.grpc_status == "0"
        held = holders.setdefault(call.key_id, set())
        if call.method == "RegisterKeys":
            if ok:
                held.add(replica)
        elif call.method == "Infer":
            infers += 1
            counts = per_replica.setdefault(replica, {"infer": 0, "local": 0})
            counts["infer"] += 1
            if not ok:
                failed += 1
            elif replica in held:
                local += 1
                counts["local"] += 1
            else:
                held.add(replica)
    return {
        "infer_calls": infers,
        "local_calls": local,
        "failed_calls": failed,
        "share": round(local / infers, 4) if infers else None,
        "by_replica": per_replica,
    }


def load_harness(path: Path):
    """A harness module of the tests (``Cluster``: replicas behind a real nginx; ``RedisServer``),
    loaded from its file: it lives beside the tests and imports its neighbours. The one place to
    adapt when the harnesses move."""
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("bench_keys_balancer_harness", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def locality(*, repository: Path, root: Path, plan: Plan, model: str, x: np.ndarray, harness: Path = HARNESS) -> dict:
    """20 clients through nginx in front of 2 replicas (Redis-backed when the flag exists)."""
    template = harness.parent.parent / "deploy" / "nginx" / "hegate.conf.template"
    if not harness.exists() or not template.exists():
        return {"skipped": f"{template.relative_to(harness.parent.parent)} or the deploy harness "
                           f"({harness.name}) is not in this checkout (the deploy branch ships them)"}  # fmt: skip
    if shutil.which("nginx") is None:
        return {"skipped": "no nginx on PATH (Debian: apt-get install nginx)"}
    env = environment(REPOSITORY_ROOT)
    help_text = serve_help(env)
    module = load_harness(harness)
    with contextlib.ExitStack() as stack:
        store = "memory"
        flags = [*tenant_flags(plan.locality_clients), *budget_flags(help_text)]
        if key_store_missing(help_text) is None:
            redis = stack.enter_context(redis_server(root / "redis-locality"))
            flags += ["--key-store", redis.url]
            store = "redis"
        cluster = module.Cluster(root / "cluster", repository, replicas=2, args=tuple(flags), workers=1, env=env)
        stack.callback(cluster.stop)
        cluster.start()
        for index in range(plan.locality_clients):
            session = register(stack, cluster.target, index, model)
            for call in range(plan.locality_calls):
                session.predict(x[(index + call) % len(x)][None])
        share = locality_share(cluster.balancer.served())
        cold = {}
        for index, ports in enumerate(cluster.ports):
            counts = metric_samples(f"http://127.0.0.1:{ports.metrics}/metrics", f"{COLD_LOAD_METRIC}_count")
            cold[f"replica-{index}"] = int(sum(value for _, value in counts)) if counts else None
    return {**share, "clients": plan.locality_clients, "calls_per_client": plan.locality_calls,
            "key_store": store, "cold_loads_by_replica": cold}  # fmt: skip


# -- the report ----------------------------------------------------------------------------------


def check_targets(result: dict) -> list[dict]:
    """Each target of issue 15 with its measured value and what the value rests on (or why it is missing)."""
    op, target = TARGETS["worker_mib_per_key_set"]
    rows = []
    memory_rows = {row["workers"]: row for row in result.get("memory", [])}
    for workers in FULL.memory_workers:
        row = memory_rows.get(workers)
        rows.append(
            target_row(
                figure=f"workers' resident MiB per key set, {workers} workers",
                value=row and row["workers_pss_mib_per_key_set"],
                op=op,
                target=target,
                rests_on=(
                    f"slope of the {row['worker_processes']} workers' summed PSS over {row['key_sets']} fresh key "
                    "sets after a warm-up set, one encrypted call each"
                    if row
                    else why_missing(result, "memory", f"{workers} workers not measured in this run")
                ),
            )
        )
    t = result.get("throughput", {})
    op, target = TARGETS["throughput_ratio"]
    rows.append(
        target_row(
            figure="encrypted requests/s, 2 workers, 20 clients' keys: current / baseline",
            value=t.get("throughput_ratio"),
            op=op,
            target=target,
            rests_on=(
                f"mean of {len(t['windows']['current'])} alternating {t['window_seconds']} s windows per side, "
                f"{t['clients']} clients' key sets, {t['in_flight']} in flight, baseline {t['baseline_commit']}"
                if "throughput_ratio" in t
                else why_missing(result, "throughput")
            ),
        )
    )
    c = result.get("cold", {})
    op, target = TARGETS["cold_load_p50_ms"]
    rows.append(
        target_row(
            figure="cold load of a key set from Redis, p50 ms",
            value=c.get("p50_ms"),
            op=op,
            target=target,
            rests_on=f"{c['key_sets']} fresh key sets; {c['source']}" if "p50_ms" in c else why_missing(result, "cold"),
        )
    )
    lo = result.get("locality", {})
    op, target = TARGETS["locality_share"]
    rows.append(
        target_row(
            figure="encrypted calls served by the replica holding their keys (nginx, 2 replicas)",
            value=lo.get("share"),
            op=op,
            target=target,
            rests_on=(
                f"nginx's access log: {lo['local_calls']} of {lo['infer_calls']} Infer calls of {lo['clients']} "
                f"clients, {lo['key_store']} key store"
                if lo.get("share") is not None
                else why_missing(result, "locality")
            ),
        )
    )
    return rows


def why_missing(result: dict, part: str, default: str = "") -> str:
    """Why a part's figure is absent: the part's own skip message, not run, or ``default``."""
    if part not in result:
        return f"not measured: part {part!r} was not run"
    if isinstance(result[part], dict) and "skipped" in result[part]:
        return f"not measured: {result[part]['skipped']}"
    return f"not measured: {default}" if default else "not measured"


def _met(check: dict) -> str:
    return {True: "yes", False: "NO", None: "not measured"}[check["met"]]


def markdown(result: dict) -> str:
    """The targets first, then each part's table, and what every figure rests on."""
    quick = " (--quick: a smoke run, not figures to quote)" if result["quick"] else ""
    lines = [
        "# Key tier (issue 15)",
        "",
        f"`{result['command']}` on {result['date']}, {result['machine']}; load average {result['load_average']} "
        f"at the start, {result['load_average_at_end']} at the end{quick}. {MODEL}, standard profile; every "
        "key set made by a new client of its own tenant. `hegate serve` subprocesses on loopback, sharing the "
        "machine's cores with the clients and with anyone else working on it.",
        "",
        "## Targets",
        "",
        "| figure | measured | target | met |",
        "|---|---|---|---|",
    ]
    for check in result["targets"]:
        value = "-" if check["value"] is None else check["value"]
        lines.append(f"| {check['figure']} | {value} | {check['target']} | {_met(check)} |")
    lines += ["", "What each figure rests on:", ""]
    lines += [f"- {check['figure']}: {check['rests_on']}." for check in result["targets"]]
    if result.get("memory"):
        lines += [
            "",
            "## Memory per key set",
            "",
            "Slopes in MiB per key set (least squares over the readings after a warm-up set and after each "
            "fresh set). Workers: summed over the worker processes (PSS counts a shared page once over them; "
            "RSS in every one). Gateway: the parent process, which the in-memory store keeps serialized bytes in.",
            "",
            "| workers | key sets | worker processes | workers PSS | workers RSS | gateway PSS | gateway RSS "
            "| workers PSS before -> after (MiB) | registration p50 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["memory"]:
            first, last = r["readings"][0]["workers_pss"] / MIB, r["readings"][-1]["workers_pss"] / MIB
            lines.append(
                f"| {r['workers']} | {r['key_sets']} | {r['worker_processes']} | {r['workers_pss_mib_per_key_set']} "
                f"| {r['workers_rss_mib_per_key_set']} | {r['gateway_pss_mib_per_key_set']} "
                f"| {r['gateway_rss_mib_per_key_set']} | {first:.0f} -> {last:.0f} "
                f"| {r['registration_seconds_p50']} s |"
            )
    t = result.get("throughput", {})
    if "throughput_ratio" in t:
        lines += [
            "",
            f"## Encrypted throughput, {t['workers']} workers, {t['clients']} clients' key sets, {t['in_flight']} "
            "in flight",
            "",
            f"Requests round-robin over the key sets, ciphertexts encrypted beforehand, one generator process; "
            f"baseline `{t['baseline']}`"
            + (f" ({t['baseline_commit']})" if t["baseline_commit"] != t["baseline"] else "")
            + f" in a temporary git worktree, serving its own bundled copy of the model; windows of "
            f"{t['window_seconds']} s alternating between the sides.",
            "",
            "| side | requests/s (mean) | windows | p50 per window | server queue / compute p50 | workers' CPU "
            "| other CPU | argmax agree | registration p50 |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, rows in t["windows"].items():
            cells = [
                ", ".join(str(r["requests_per_second"]) for r in rows),
                ", ".join(f"{r['p50_ms']:.0f} ms" for r in rows),
                ", ".join(f"{r['server_queue_ms_p50']} / {r['server_compute_ms_p50']} ms" for r in rows),
                ", ".join(str(r["worker_cpu_cores"]) for r in rows),
                ", ".join(str(r["other_cpu_cores"]) for r in rows),
            ]
            lines.append(
                f"| {name} | {t['requests_per_second'][name]} | {' | '.join(cells)} "
                f"| {t['argmax_agreement'][name]:.0%} | {t['registration_seconds_p50'][name]} s |"
            )
        lines += ["", f"Current / baseline: {t['throughput_ratio']}."]
    c = result.get("cold", {})
    if "p50_ms" in c:
        lines += [
            "",
            "## Cold load from Redis",
            "",
            f"{c['key_sets']} fresh key sets, each registered through replica A; replica B's first Infer loads it "
            f"from Redis. Cold-load time from: {c['source']}. p50 {c['p50_ms']} ms, p95 {c['p95_ms']} ms; B's first "
            f"call p50 {c['first_call_p50_ms']} ms, its warm call {c['warm_call_p50_ms']} ms; argmax agreement with "
            f"the plaintext path {c['argmax_agreement']:.0%}.",
        ]
    lo = result.get("locality", {})
    if lo.get("share") is not None:
        lines += [
            "",
            "## Balancer locality",
            "",
            f"{lo['clients']} clients, {lo['calls_per_client']} encrypted calls each after one registration, through "
            f"nginx to 2 replicas ({lo['key_store']} key store): {lo['local_calls']} of {lo['infer_calls']} Infer "
            f"calls local ({lo['failed_calls']} failed). Per replica: "
            + ", ".join(f"{name} {v['local']}/{v['infer']}" for name, v in sorted(lo["by_replica"].items()))
            + "; cold loads by replica (metrics): "
            + ", ".join(f"{name} {value}" for name, value in lo["cold_loads_by_replica"].items())
            + ".",
        ]
    skipped = [f"- {part}: {result[part]['skipped']}" for part in PARTS if "skipped" in result.get(part, {})]
    if skipped:
        lines += ["", "## Parts not measured", "", *skipped]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    plan = QUICK if args.quick else FULL
    from models.data import load_dataset
    from models.repository import ModelRepository

    result = {**provenance("bench.keys"), "quick": args.quick, "parts": args.parts, "plan": asdict(plan)}
    with tempfile.TemporaryDirectory(prefix="bench-keys-") as tmp:
        root = Path(tmp)
        repository = repository_with([MODEL], root)
        manifest = ModelRepository(repository).get(MODEL).manifest
        x = manifest.input.normalization.apply(load_dataset(manifest.dataset).test.x[:64])
        common = {"repository": repository, "model": MODEL, "x": x}
        if "memory" in args.parts:
            result["memory"] = []
            for workers in plan.memory_workers:
                print(f"memory: {workers} workers", flush=True)
                result["memory"].append(memory(root=root, workers=workers, key_sets=plan.memory_key_sets, **common))
        if "throughput" in args.parts:
            print(f"throughput: this checkout against {args.baseline}", flush=True)
            result["throughput"] = throughput(root=root, reference=args.baseline, plan=plan, **common)
        if "cold" in args.parts:
            print("cold loads from Redis", flush=True)
            result["cold"] = cold_loads(root=root, key_sets=plan.cold_key_sets, **common)
        if "locality" in args.parts:
            print("locality behind nginx", flush=True)
            result["locality"] = locality(root=root, plan=plan, **common)
    result["load_average_at_end"] = f"{os.getloadavg()[0]:.2f}"
    result["targets"] = check_targets(result)
    write("keys", result, markdown(result), directory=args.out)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts and short windows, for a smoke run")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts to run")
    parser.add_argument("--baseline", default=BASELINE, help="git reference to compare throughput with")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where keys.{json,md} go")
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
