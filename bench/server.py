"""A ``hegate serve`` subprocess for the benchmarks, and CPU readings from ``/proc``.

The gateway runs as its own process, as in production, on a port the kernel picks; it is ready
once it prints its serving line, and it is stopped with SIGTERM (its graceful stop), killed only
if that hangs. The CPU readings let a benchmark say which side of a measurement saturates and
whether someone else's load shared the window.
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from gateway.settings import BUNDLED_REPOSITORY

START_TIMEOUT_SECONDS = 180.0
READY_LINE = re.compile(r"^hegate: serving .*? on (?P<host>[^\s:]+):(?P<port>\d+)[,;]")
FAST_PATH = re.compile(r"fast path on (?P<address>[^\s,;]+)[,;]")
METRICS_URL = re.compile(r"metrics on (?P<url>http://\S+/metrics);")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def stop(process: subprocess.Popen, *, group: bool = False) -> None:
    """SIGTERM (a server's graceful stop), then SIGKILL if it has not exited in 30 s; ``group``
    kills the process's whole session too (a server that forks workers, started in its own)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            if group:
                os.killpg(process.pid, signal.SIGKILL)
            else:
                process.kill()
            process.wait()


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that were free a moment ago (for servers that take fixed ports)."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def hegate_command() -> list[str]:
    """The ``hegate`` command of this environment (its console script, else ``python -m gateway.cli``);
    which checkout's code it runs is the ``PYTHONPATH`` it gets."""
    script = Path(sys.executable).with_name("hegate")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gateway.cli"]


def repository_with(models: list[str], root: Path, source: Path = BUNDLED_REPOSITORY) -> Path:
    """A repository under ``root`` holding only ``models`` (every version), so a gateway starts fast."""
    repository = root / "repository"
    for model in models:
        shutil.copytree(source / model, repository / model)
    return repository


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds of one process (or of one of its threads) from ``/proc``: the
    14th and 15th fields of its ``stat``, counted after the command name, which may hold spaces."""
    stat = Path(f"/proc/{pid}/stat") if thread is None else Path(f"/proc/{pid}/task/{thread}/stat")
    try:
        fields = stat.read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores, all processes) from ``/proc/stat``:
    what is left after the gateway's and the generators' share is someone else's load."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, Path("/proc/stat").read_text().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def memory_bytes(pid: int) -> dict[str, int]:
    """Resident (``rss``) and proportional (``pss``) bytes of one process from ``/proc/<pid>/smaps_rollup``.

    PSS divides each shared page by the number of processes mapping it, so summing it over
    processes counts shared libraries once; RSS counts them in every process. Zeros for a process
    that has gone.
    """
    values = {"rss": 0, "pss": 0}
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return values
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name.lower() in values:
            values[name.lower()] = int(rest.split()[0]) * 1024
    return values


def metric_samples(url: str, sample: str) -> list[tuple[dict[str, str], float]]:
    """Every sample named ``sample`` (``hegate_compute_seconds_sum``, ``hegate_requests_total``) on a
    Prometheus ``/metrics`` page, with its labels: empty if the gateway exposes no such metric."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return [
        (dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample
    ]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``: the gateway's encrypted workers and multiprocessing's tracker."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            children += [int(child) for child in (task / "children").read_text().split()]
    return [grandchild for child in children for grandchild in (child, *descendants(child))]


class Server:
    """``hegate serve`` in a subprocess: started on a free port, ready once it prints its line,
    stopped with SIGTERM (the gateway's graceful stop) and killed only if that hangs."""

    def __init__(
        self, repository: Path, workers: int, log: Path, *flags: str, env: dict[str, str] | None = None
    ) -> None:
        self.repository = repository
        self.workers = workers
        self.log = log
        self.flags = flags  # more ``hegate serve`` flags
        self.env = env  # the whole environment of the gateway (another checkout's PYTHONPATH, say)
        self.target = ""
        self.fast_path_target: str | None = None  # the plaintext fast path, if the gateway serves one
        self.metrics_url = ""
        self.start_seconds = 0.0

    def _command(self) -> list[str]:
        return [
            *hegate_command(),
            "serve",
            "--repo",
            str(self.repository),
            "--address",
            "127.0.0.1:0",
            "--workers",
            str(self.workers),
            "--metrics-port",
            "0",
            "--fast-path-port",
            "0",
            *self.flags,
        ]

    def __enter__(self) -> Server:
        started = time.monotonic()
        self._log = self.log.open("w")
        self.process = subprocess.Popen(
            self._command(), stdout=subprocess.PIPE, stderr=self._log, text=True, env=self.env
        )
        deadline = started + START_TIMEOUT_SECONDS
        while not self.target:
            remaining = deadline - time.monotonic()
            readable, _, _ = select.select([self.process.stdout], [], [], max(0.0, remaining))
            line = self.process.stdout.readline() if readable else ""
            match = READY_LINE.match(line)
            if match:
                self.target = f"{match['host']}:{match['port']}"
                fast = FAST_PATH.search(line)
                self.fast_path_target = fast["address"] if fast else None
                metrics = METRICS_URL.search(line)
                self.metrics_url = metrics["url"] if metrics else ""
            elif not line and (remaining <= 0 or self.process.poll() is not None):
                self.__exit__()
                raise RuntimeError(f"hegate serve did not start; its log:\n{self.log.read_text()[-4000:]}")
        self.start_seconds = time.monotonic() - started
        return self

    def __exit__(self, *exc: object) -> None:
        stop(self.process)
        self.process.stdout.close()
        self._log.close()

    def cpu_seconds(self) -> tuple[float, float, float]:
        """CPU seconds so far of the gateway's main thread (its asyncio loop, where the servicers
        and the plaintext kernels run), of the whole gateway process (adding gRPC's own threads),
        and of all its children together (the encrypted workers)."""
        pid = self.process.pid
        children = sum(cpu_seconds(child) for child in descendants(pid))
        return cpu_seconds(pid, pid), cpu_seconds(pid), children

    def compute_seconds(self, path: str) -> tuple[float, int]:
        """Sum and count of the gateway's ``hegate_compute_seconds`` histogram on ``path``
        (plaintext: request decoding, kernels and response encoding, without gRPC's own work)."""
        totals = {
            what: sum(
                value
                for labels, value in metric_samples(self.metrics_url, f"hegate_compute_seconds_{what}")
                if labels.get("path") == path
            )
            for what in ("sum", "count")
        }
        return totals["sum"], int(totals["count"])

    def worker_pids(self) -> list[int]:
        """The gateway's encrypted workers: its descendants but multiprocessing's resource tracker
        (a small helper process that holds no keys)."""
        workers = []
        for pid in descendants(self.process.pid):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    workers.append(pid)
        return workers
