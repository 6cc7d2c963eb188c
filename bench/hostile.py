"""``hegate bench hostile``: one hostile peer against each port, and what it costs everyone else.

    python -m bench.hostile                      # every attack 60 s (~25 min), and the throughput check
    python -m bench.hostile --quick              # 2 s per attack: a smoke run, not figures to quote
    python -m bench.hostile --duration 20 --attacks ping-flood:fast window-zero:grpc.aio
    make bench-hostile

One gateway (``hegate serve``, 1 encrypted worker, API keys configured) serves mnist-cnn-eps3.
Two legitimate clients, one per port (the fast path and the grpc.aio port), make calls with a
valid key at 1 in flight from their own processes (:mod:`bench.loadgen`) on 127.0.0.1. For each
attack, first an idle window measures both clients' p50/p99 with nothing else happening, then the
attacker (:mod:`bench.attacks`, its own process, from 127.0.0.2) attacks one port for
``--duration`` seconds while both clients are measured again and the gateway's resident memory
(``VmRSS``, every 0.25 s) is sampled. The attacker has no key, except for the two attacks that
need calls the gateway accepts (window-zero and huge-shape: a hostile tenant).

Targets (issue 14): RSS growth <= 128 MiB under any attack; each client's p50 <= 3x its idle
p50, with no errors. And the gateway's own fast-path throughput at 32 in flight within 5% of
``--baseline``'s (default ``main``): two gateways without keys, one from this checkout and one from
``git archive <baseline>`` (nothing of the repository is changed), each serving its own bundled
copy of the model, loaded in alternating windows like ``bench peer``, because this machine's speed
drifts between runs.

Results go to ``bench/results/hostile.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.attacks import ATTACKS, NEEDS_KEY, AttackProcess, Target
from bench.gateway import PLAINTEXT_METHOD
from bench.loadgen import LoadGenerators, LoadResult, LoadSpec
from bench.report import RESULTS, provenance, write
from bench.server import Server, repository_with

MODEL = "mnist-cnn-eps3"
CLIENT_KEY, ATTACKER_KEY = "bench-client-key", "bench-hostile-tenant-key"
PORTS = ("fast", "grpc.aio")
REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ATTACKS = [
    *(f"{name}:fast" for name in ATTACKS),
    *(
        f"{name}:grpc.aio"
        for name in ("window-zero", "connection-hog", "settings-flood", "continuation-flood", "unauthenticated-bodies")
    ),
]
TARGETS = {"rss_growth_mib": 128.0, "p50_ratio": 3.0, "throughput_ratio": 0.95}
MIB = 1 << 20


@dataclass(frozen=True)
class Durations:
    attack_seconds: float
    idle_seconds: float
    warmup_seconds: float
    throughput_seconds: float
    throughput_rounds: int


FULL = Durations(attack_seconds=60.0, idle_seconds=5.0, warmup_seconds=1.0, throughput_seconds=10.0,
                 throughput_rounds=3)  # fmt: skip
QUICK = Durations(attack_seconds=2.0, idle_seconds=1.0, warmup_seconds=0.5, throughput_seconds=2.0,
                  throughput_rounds=1)  # fmt: skip


def rss_bytes(pid: int) -> int:
    """Resident memory of one process, from ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _requests(target: str, api_key: str | None) -> list[bytes]:
    from bench.load import workload
    from gateway.client import HegateClient

    with HegateClient(target, api_key=api_key) as client:
        return workload(client, MODEL, plaintext=True, batch=1).requests


def _both(clients: dict[str, LoadGenerators], seconds: float, warmup: float) -> dict[str, LoadResult]:
    """One window on every client at once."""
    results: dict[str, LoadResult] = {}

    def one(port: str) -> None:
        results[port] = clients[port].run(warmup=warmup, seconds=seconds)

    threads = [threading.Thread(target=one, args=(port,)) for port in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _latency(result: LoadResult) -> dict:
    row = result.summary()
    return {key: row.get(key) for key in ("ok", "requests_per_second", "p50_ms", "p99_ms", "errors")}


def run_attack(name: str, port: str, server: Server, clients: dict[str, LoadGenerators], durations: Durations) -> dict:
    """The idle window, then the attack on ``port`` with both clients and RSS measured."""
    attack, _, _ = name.partition(":")
    idle = _both(clients, durations.idle_seconds, durations.warmup_seconds)
    host, _, number = (server.fast_path_target if port == "fast" else server.target).rpartition(":")
    target = Target(host, int(number), api_key=ATTACKER_KEY if attack in NEEDS_KEY else None)
    pid = server.process.pid
    before = rss_bytes(pid)
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak.append(rss_bytes(pid))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample)
    sampler.start()
    with AttackProcess(attack, target, durations.attack_seconds) as process:
        window = max(0.5, durations.attack_seconds - durations.warmup_seconds - 1.0)
        during = _both(clients, window, durations.warmup_seconds)
        counts = process.result()
    stop.set()
    sampler.join()
    after = rss_bytes(pid)
    time.sleep(min(2.0, durations.idle_seconds))  # penalties run out; the next idle window is idle
    row = {
        "attack": attack,
        "port": port,
        "attacker_has_key": attack in NEEDS_KEY,
        "rss_before_mib": round(before / MIB, 1),
        "rss_peak_mib": round(max(peak) / MIB, 1),
        "rss_after_mib": round(after / MIB, 1),
        "rss_growth_mib": round((max(peak) - before) / MIB, 1),
        "attacker": counts,
    }
    for client in PORTS:
        row[f"{client}_idle"] = _latency(idle[client])
        row[f"{client}_attacked"] = _latency(during[client])
        i, a = row[f"{client}_idle"]["p50_ms"], row[f"{client}_attacked"]["p50_ms"]
        row[f"{client}_p50_ratio"] = round(a / i, 2) if i and a else None
    print(
        f"  {attack} on {port}: RSS +{row['rss_growth_mib']} MiB, p50 fast {row['fast_attacked']['p50_ms']} ms "
        f"({row['fast_p50_ratio']}x), grpc.aio {row['grpc.aio_attacked']['p50_ms']} ms ({row['grpc.aio_p50_ratio']}x)",
        flush=True,
    )
    return row


def baseline_checkout(reference: str, root: Path) -> Path:
    """``git archive <reference>`` of this repository, unpacked under ``root``."""
    folder = root / "baseline"
    folder.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPOSITORY_ROOT), "archive", reference], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def throughput(repository: Path, root: Path, reference: str, durations: Durations) -> dict:
    """This checkout's fast path against ``reference``'s at 32 in flight, alternating windows."""
    folder = baseline_checkout(reference, root)
    git = ["git", "-C", str(REPOSITORY_ROOT), "rev-parse", "--short", reference]
    commit = subprocess.run(git, check=True, capture_output=True, text=True).stdout.strip()
    # each checkout serves its own bundled copy of the model (their manifests' schemas may differ)
    theirs_repository = repository_with([MODEL], root / "baseline-models", source=folder / "models" / "bundled")
    environments = {
        "this": {**os.environ, "PYTHONPATH": str(REPOSITORY_ROOT)},
        reference: {**os.environ, "PYTHONPATH": str(folder)},
    }
    windows: dict[str, list[float]] = {name: [] for name in environments}
    cpu: dict[str, list[float]] = {name: [] for name in environments}  # gateway CPU ms per OK call
    with (
        Server(repository, 1, root / "this.log", env=environments["this"]) as ours,
        Server(theirs_repository, 1, root / "baseline.log", env=environments[reference]) as theirs,
    ):
        requests = _requests(ours.target, None)
        sides = {"this": ours, reference: theirs}
        loads = {}
        for name, server in sides.items():
            spec = LoadSpec(target=server.fast_path_target, method=PLAINTEXT_METHOD, requests=requests, in_flight=32)
            loads[name] = LoadGenerators(spec).__enter__()
        try:
            order = list(sides)
            for index in range(durations.throughput_rounds):
                for name in order if index % 2 == 0 else order[::-1]:
                    readings: list[float] = []
                    result = loads[name].run(
                        warmup=durations.warmup_seconds,
                        seconds=durations.throughput_seconds,
                        during=lambda server=sides[name], out=readings: out.append(server.cpu_seconds()[1]),
                    )
                    windows[name].append(round(result.ok / result.seconds, 1))
                    cpu[name].append(round(1000 * (readings[1] - readings[0]) / max(result.ok, 1), 4))
                    print(
                        f"  32 in flight, {name}: {windows[name][-1]:,.0f} OK/s, {cpu[name][-1]} ms CPU/call",
                        flush=True,
                    )
        finally:
            for load in loads.values():
                load.__exit__()
    mean = {name: sum(values) / len(values) for name, values in windows.items()}
    return {
        "baseline": reference,
        "baseline_commit": commit,
        "windows_requests_per_second": windows,
        "requests_per_second": {name: round(value, 1) for name, value in mean.items()},
        "throughput_ratio": round(mean["this"] / mean[reference], 3),
        "windows_cpu_ms_per_call": cpu,
        "cpu_ms_per_call": {name: round(sum(values) / len(values), 4) for name, values in cpu.items()},
    }


def check_targets(result: dict) -> list[dict]:
    checks = []
    for row in result["attacks"]:
        label = f"{row['attack']} on {row['port']}"
        growth = row["rss_growth_mib"]
        checks.append({"figure": f"{label}: RSS growth MiB", "value": growth, "target": "<= 128",
                       "met": growth <= TARGETS["rss_growth_mib"]})  # fmt: skip
        for client in PORTS:
            ratio, errors = row[f"{client}_p50_ratio"], row[f"{client}_attacked"]["errors"]
            met = ratio is not None and ratio <= TARGETS["p50_ratio"] and not errors
            checks.append({"figure": f"{label}: {client} client p50 / idle, errors", "value": f"{ratio}, {errors or 0}",
                           "target": "<= 3, 0", "met": met})  # fmt: skip
    if "throughput" in result:
        ratio = result["throughput"]["throughput_ratio"]
        checks.append({"figure": f"fast path OK/s at 32 in flight / {result['throughput']['baseline']}'s",
                       "value": ratio, "target": ">= 0.95", "met": ratio >= TARGETS["throughput_ratio"]})  # fmt: skip
    return checks


def _short(counts: dict) -> str:
    keep = [f"{key} {value:,}" for key, value in counts.items() if not key.startswith("violation")]
    return "; ".join(keep[:6])


def markdown(result: dict) -> str:
    d = result["durations"]
    lines = [
        "# One hostile peer against each port",
        "",
        f"`{result['command']}` on {result['date']}, {result['machine']}; load average "
        f"{result['load_average_at_start']} at the start{' (--quick: a smoke run, not figures to quote)' if result['quick'] else ''}. "  # noqa: E501
        f"`hegate serve` (1 encrypted worker, API keys) serving {MODEL}; one legitimate client per port "
        "(1 call in flight, batch 1, a valid key, 127.0.0.1); the attacker from 127.0.0.2, without a key except "
        f"where marked. Each attack: an idle window of {d['idle_seconds']} s, then {d['attack_seconds']} s of attack "
        "with both clients measured and the gateway's RSS sampled every 0.25 s. p50 ratio: attacked over idle.",
        "",
        "| attack | port attacked | RSS before -> peak MiB (growth) "
        "| fast path p50 idle -> attacked (ratio), p99, errors "
        "| grpc.aio p50 idle -> attacked (ratio), p99, errors | the attacker saw |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["attacks"]:
        cells = []
        for client in PORTS:
            i, a = row[f"{client}_idle"], row[f"{client}_attacked"]
            errors = ", ".join(f"{k} {v}" for k, v in (a["errors"] or {}).items()) or "none"
            cells.append(
                f"{i['p50_ms']} -> {a['p50_ms']} ms ({row[f'{client}_p50_ratio']}x), {a['p99_ms']} ms, {errors}"
            )
        key = " (with a key)" if row["attacker_has_key"] else ""
        lines.append(
            f"| {row['attack']}{key} | {row['port']} | {row['rss_before_mib']} -> {row['rss_peak_mib']} "
            f"(+{row['rss_growth_mib']}) | {cells[0]} | {cells[1]} | {_short(row['attacker'])} |"
        )
    if "throughput" in result:
        t = result["throughput"]
        lines += [
            "",
            f"Fast-path throughput at 32 in flight (1 generator, no keys), this checkout against `{t['baseline']}` "
            f"({t.get('baseline_commit', '?')}, `git archive`, serving its own bundled copy of {MODEL}), "
            f"alternating windows of {d['throughput_seconds']} s: "
            + ", ".join(
                f"{name} {value:,} OK/s ({t['windows_requests_per_second'][name]})"
                for name, value in t["requests_per_second"].items()
            )
            + f"; ratio {t['throughput_ratio']}. The gateway's CPU per call in the same windows (robust to "
            "other load on the machine, which throughput is not): "
            + ", ".join(f"{name} {value} ms" for name, value in t.get("cpu_ms_per_call", {}).items())
            + ".",
        ]
    lines += ["", "## Targets (issue 14)", "", "| figure | measured | target | met |", "|---|---|---|---|"]
    for check in result["targets"]:
        met = "yes" if check["met"] else "NO"
        lines.append(f"| {check['figure']} | {check['value']} | {check['target']} | {met} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    durations = QUICK if args.quick else FULL
    if args.duration is not None:
        durations = Durations(**{**asdict(durations), "attack_seconds": args.duration})
    attacks = []
    for item in args.attacks:
        name, _, port = item.partition(":")
        if name not in ATTACKS or port not in PORTS:
            raise SystemExit(f"unknown attack {item!r}: NAME:PORT with NAME in {sorted(ATTACKS)}, PORT in {PORTS}")
        attacks.append((name, port))
    result = {
        **provenance("bench.hostile"),
        "quick": args.quick,
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "durations": asdict(durations),
    }
    if getattr(args, "argv", None) is not None:
        result["command"] = " ".join(["hegate", *args.argv])
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        root = Path(tmp)
        repository = repository_with([MODEL], root)
        if args.baseline != "none":
            print(f"throughput: this checkout against {args.baseline}", flush=True)
            result["throughput"] = throughput(repository, root, args.baseline, durations)
        keys = ["--api-key", f"{CLIENT_KEY}=bench-client", "--api-key", f"{ATTACKER_KEY}=hostile-tenant"]
        with Server(repository, 1, root / "hegate.log", *keys) as server:
            requests = _requests(server.target, CLIENT_KEY)
            clients = {}
            try:
                for port, target in (("fast", server.fast_path_target), ("grpc.aio", server.target)):
                    spec = LoadSpec(target=target, method=PLAINTEXT_METHOD, requests=requests,
                                    metadata=(("x-api-key", CLIENT_KEY),), timeout_seconds=10.0)  # fmt: skip
                    clients[port] = LoadGenerators(spec).__enter__()
                result["attacks"] = [run_attack(name, port, server, clients, durations) for name, port in attacks]
            finally:
                for client in clients.values():
                    client.__exit__()
    result["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    result["targets"] = check_targets(result)
    write("hostile", result, markdown(result), directory=args.out)
    return 0


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, help="seconds per attack (default 60; --quick: 2)")
    parser.add_argument("--quick", action="store_true", help="short windows, for a smoke run")
    parser.add_argument("--attacks", nargs="+", default=DEFAULT_ATTACKS, metavar="NAME:PORT",
                        help=f"default: all on fast, five on grpc.aio; names: {', '.join(ATTACKS)}")  # fmt: skip
    parser.add_argument("--baseline", default="main", help="git reference whose fast path to compare with; none: skip")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where hostile.{json,md} go")


def add_parser(commands) -> None:
    hostile = commands.add_parser("hostile", help="one hostile peer per attack: memory and other clients' latency")
    _arguments(hostile)
    hostile.set_defaults(handler=run)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _arguments(parser)
    return run(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
