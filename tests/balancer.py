"""A real nginx (the OS package) in front of real ``hegate serve`` replicas on loopback, for tests.

:class:`Cluster` starts the replicas on ports chosen up front, so that a replica killed and
started again comes back where nginx expects it, and renders ``deploy/nginx/hegate.conf.template``
for a non-daemon nginx with its own prefix, temporary directory and logs. Replicas take extra
flags (``Cluster(..., args=("--key-store", "redis://..."))``). Which replica served a call is read
from nginx's access log (the upstream address of each call, with its key id) and can be checked
against each replica's metrics.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from gateway_harness import GatewayProcess

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "nginx" / "hegate.conf.template"
SERVER_OPTIONS = "max_fails=1 fail_timeout=10s"
START_TIMEOUT_SECONDS = 30.0
LOG_LINE = re.compile(
    r'^\S+ \S+ "(?P<uri>[^"]*)" key=(?P<key>\S*) upstream=(?P<upstream>.*?) status=(?P<status>\d+) '
    r"grpc_status=(?P<grpc_status>\S*) request_time=\S+$"
)


def free_port() -> int:
    """A loopback port free now (the kernel's pick; another process could take it before use)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def render(
    template: str,
    *,
    grpc_servers: list[str],
    fast_path_servers: list[str],
    grpc_listen: str,
    fast_path_listen: str,
    root: Path,
    tls: tuple[Path, Path] | None = None,
) -> str:
    """The template with every placeholder filled; ``tls``: (certificate, key) to terminate TLS in nginx."""
    ssl = " ssl" if tls else ""
    values = {
        "GRPC_SERVERS": " ".join(f"server {s} {SERVER_OPTIONS};" for s in grpc_servers),
        "FAST_PATH_SERVERS": " ".join(f"server {s} {SERVER_OPTIONS};" for s in fast_path_servers),
        "GRPC_LISTEN": f"{grpc_listen}{ssl} http2",
        "FAST_PATH_LISTEN": f"{fast_path_listen}{ssl} http2",
        "TLS": f"ssl_certificate {tls[0]}; ssl_certificate_key {tls[1]};" if tls else "",
        "ERROR_LOG": str(root / "error.log"),
        "ACCESS_LOG": str(root / "access.log"),
        "PID": str(root / "nginx.pid"),
        "TEMP": str(root / "temp"),
    }
    for name, value in values.items():
        template = template.replace(f"@{name}@", value)
    left = re.findall(r"@[A-Z_]+@", template)
    if left:
        raise ValueError(f"unfilled placeholders in the nginx template: {left}")
    return template


@dataclass(frozen=True)
class Served:
    """One call as nginx's access log shows it."""

    method: str  # "Infer", "ModelInfer", ...
    key_id: str  # "-" or "" when the call carried none
    upstreams: tuple[str, ...]  # every replica tried, the last one answered
    grpc_status: str


class Balancer:
    """One nginx process (not a daemon) serving ``config`` from its own prefix directory."""

    def __init__(self, root: Path, config: str, *ports: int) -> None:
        self.root = root
        (root / "temp").mkdir(parents=True, exist_ok=True)
        (root / "nginx.conf").write_text(config)
        directives = "daemon off;"
        if os.geteuid() == 0:
            directives += " user root;"  # pytest's temporary directories are 0700: workers run as the test does
        self._stderr = open(root / "stderr.log", "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [NGINX, "-p", str(root), "-c", str(root / "nginx.conf"), "-g", directives],
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=self._stderr,
            start_new_session=True,
        )
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        for port in ports:
            while not _accepts(port):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start:\n{self.log()}")
                time.sleep(0.05)

    def log(self) -> str:
        return "\n".join(
            path.read_text(errors="replace")
            for path in (self.root / "stderr.log", self.root / "error.log")
            if path.exists()
        )

    def served(self, *, method: str | None = None, count: int = 0) -> list[Served]:
        """Every call nginx has logged so far, in order; first waiting (up to 10 s) until ``count``
        calls of ``method`` are there (nginx logs a call just after its answer has gone out)."""
        deadline = time.monotonic() + 10
        calls = self._read()
        while sum(c.method == method for c in calls) < count and time.monotonic() < deadline:
            time.sleep(0.02)
            calls = self._read()
        return calls

    def upstream_of(self, key_id: str) -> str:
        """The replica that answered the first logged call of ``key_id`` (waiting for it up to 10 s)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            calls = [c for c in self._read() if c.key_id == key_id]
            if calls:
                return calls[0].upstreams[-1]
            time.sleep(0.02)
        raise AssertionError(f"nginx logged no call of {key_id}")

    def _read(self) -> list[Served]:
        path = self.root / "access.log"
        calls = []
        for line in path.read_text().splitlines() if path.exists() else ():
            match = LOG_LINE.match(line)
            if match is None:
                raise AssertionError(f"an access log line in no known format: {line!r}")
            upstreams = tuple(u.strip() for u in re.split(r"[,:] (?=\d)", match["upstream"]) if u.strip())
            calls.append(
                Served(
                    method=match["uri"].rpartition("/")[2],
                    key_id=match["key"],
                    upstreams=upstreams,
                    grpc_status=match["grpc_status"],
                )
            )
        return calls

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: finish the calls in flight
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._stderr.close()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class ReplicaPorts:
    grpc: int
    fast_path: int
    metrics: int

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc}"

    @property
    def fast_path_target(self) -> str:
        return f"127.0.0.1:{self.fast_path}"


class Cluster:
    """``replicas`` gateways behind one nginx; ``args``: extra ``hegate serve`` flags for every replica.

    ``Cluster(root, repository).start()``; clients use :attr:`target` and :attr:`fast_path_target`.
    :meth:`kill` and :meth:`start_replica` take one replica down and up again on its own ports;
    :meth:`stop` then :meth:`start` restarts everything, nginx included, where it was.
    """

    def __init__(
        self,
        root: Path,
        repository: Path,
        *,
        replicas: int = 2,
        args: tuple[str, ...] = (),
        workers: int = 1,
        env: dict[str, str] | None = None,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.root = root
        self.repository = repository
        self.args = args
        self.workers = workers
        self.env = env
        self.tls = tls
        self.ports = [ReplicaPorts(free_port(), free_port(), free_port()) for _ in range(replicas)]
        self.replicas: list[GatewayProcess | None] = [None] * replicas
        self.grpc_port, self.fast_path_port = free_port(), free_port()
        self.balancer: Balancer | None = None
        self._starts = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def fast_path_target(self) -> str:
        return f"127.0.0.1:{self.fast_path_port}"

    def start(self) -> Cluster:
        for index in range(len(self.replicas)):
            self._spawn(index)
        for replica in self.replicas:
            replica.wait_ready()
        self.start_balancer()
        return self

    def start_balancer(self) -> Balancer:
        config = render(
            TEMPLATE.read_text(),
            grpc_servers=[p.grpc_target for p in self.ports],
            fast_path_servers=[p.fast_path_target for p in self.ports],
            grpc_listen=f"127.0.0.1:{self.grpc_port}",
            fast_path_listen=f"127.0.0.1:{self.fast_path_port}",
            root=self.root / "nginx",
            tls=self.tls,
        )
        self.balancer = Balancer(self.root / "nginx", config, self.grpc_port, self.fast_path_port)
        return self.balancer

    def _spawn(self, index: int) -> GatewayProcess:
        ports = self.ports[index]
        self._starts += 1
        flags = (
            *("--address", ports.grpc_target, "--fast-path-port", str(ports.fast_path)),
            *("--metrics-port", str(ports.metrics)),
            *self.args,
        )
        logs = self.root / f"replica-{index}-{self._starts}"
        self.replicas[index] = GatewayProcess(self.repository, logs, *flags, workers=self.workers, env=self.env)
        return self.replicas[index]

    def start_replica(self, index: int) -> GatewayProcess:
        """Start replica ``index`` again on its ports (after :meth:`kill` or :meth:`stop_replica`)."""
        return self._spawn(index).wait_ready()

    def index_of(self, upstream: str) -> int:
        """The replica whose gRPC or fast path port ``upstream`` ("127.0.0.1:port") is."""
        for index, ports in enumerate(self.ports):
            if upstream in (ports.grpc_target, ports.fast_path_target):
                return index
        raise KeyError(upstream)

    def kill(self, index: int) -> None:
        """SIGKILL replica ``index`` and its workers: a crash, no graceful stop."""
        replica = self.replicas[index]
        workers = replica.worker_pids()
        replica.process.kill()
        replica.process.wait(10)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        replica.stop()
        self.replicas[index] = None

    def stop_replica(self, index: int) -> int:
        replica = self.replicas[index]
        self.replicas[index] = None
        return replica.stop() if replica else 0

    def stop(self) -> list[int]:
        """Stop nginx and every replica; the replicas' exit codes (None for killed ones)."""
        if self.balancer is not None:
            self.balancer.stop()
        return [self.stop_replica(index) if r else None for index, r in enumerate(self.replicas)]
