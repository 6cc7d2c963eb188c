"""A real ``hegate serve`` process for the end-to-end tests: start, wait for readiness, inspect, stop.

The gateway runs as its own process (as in production), listening on loopback ports that the
kernel picks; the tests talk to it over gRPC and HTTP exactly like any other client.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.api import grpc_predict_v2_pb2_grpc, hegate_v1_pb2_grpc
from gateway.settings import BUNDLED_REPOSITORY

HEGATE = Path(sys.executable).with_name("hegate")
READY = re.compile(
    r"^hegate: serving .*? on (?P<host>[\d.]+):(?P<port>\d+)(?:, fast path on [\d.]+:(?P<fast>\d+))?"
    r", metrics on http://[\d.]+:(?P<metrics>\d+)/"
)
START_TIMEOUT_SECONDS = 180.0
MODELS = ("mnist-cnn-eps3", "breast-cancer-linear-eps3")


def small_repository(root: Path) -> Path:
    """A model repository holding only the default MNIST model and the breast-cancer model."""
    root.mkdir(parents=True, exist_ok=True)
    for name in MODELS:
        if not (root / name).exists():
            shutil.copytree(BUNDLED_REPOSITORY / name, root / name)
    return root


class GatewayProcess:
    """One ``hegate serve`` subprocess; ``args`` are extra flags, ``env`` extra ``HEGATE_*`` variables."""

    def __init__(
        self, repository: Path, logs: Path, *args: str, workers: int = 1, env: dict[str, str] | None = None
    ) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        environment = {key: value for key, value in os.environ.items() if not key.startswith("HEGATE_")}
        environment.update(env or {})
        command = [str(HEGATE), "serve", "--repo", str(repository), "--address", "127.0.0.1:0", "--metrics-port", "0"]
        command += ["--fast-path-port", "0"]
        command += ["--workers", str(workers), *args]
        self._stdout = open(logs / "stdout.log", "wb")  # noqa: SIM115 - closed in stop()
        self._stderr = open(logs / "stderr.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=self._stderr,
            env=environment,
            start_new_session=True,  # a Ctrl-C meant for pytest must not reach the gateway first
        )
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.fast_path_port: int | None = None
        self._channels: list[grpc.Channel] = []

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stderr(self) -> str:
        return (self.logs / "stderr.log").read_text(errors="replace")

    def wait_ready(self, timeout: float = START_TIMEOUT_SECONDS) -> GatewayProcess:
        """Block until the gateway prints its ready line; fail with its log if it exits or hangs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in (self.logs / "stdout.log").read_text(errors="replace").splitlines():
                match = READY.match(line)
                if match:
                    self.port, self.metrics_port = int(match["port"]), int(match["metrics"])
                    self.fast_path_port = int(match["fast"]) if match["fast"] else None
                    return self
            if self.process.poll() is not None:
                raise RuntimeError(f"hegate serve exited with {self.process.returncode}:\n{self.stderr()[-4000:]}")
            time.sleep(0.1)
        raise RuntimeError(f"hegate serve was not ready after {timeout:.0f} s:\n{self.stderr()[-4000:]}")

    @property
    def fast_path_target(self) -> str:
        return f"127.0.0.1:{self.fast_path_port}"

    def channel(self, target: str | None = None) -> grpc.Channel:
        """A fresh channel to the gateway (or ``target``), closed at :meth:`stop`; no message limit
        on the client side."""
        channel = grpc.insecure_channel(
            target or self.target,
            options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
        )
        self._channels.append(channel)
        return channel

    def stubs(self):
        """``(open inference stub, hegate.v1 stub, health stub)`` on one new channel."""
        channel = self.channel()
        return (
            grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel),
            hegate_v1_pb2_grpc.EncryptedInferenceStub(channel),
            health_pb2_grpc.HealthStub(channel),
        )

    def fast_path_stubs(self):
        """``(open inference stub, health stub)`` on one new channel to the fast path."""
        channel = self.channel(self.fast_path_target)
        return grpc_predict_v2_pb2_grpc.GRPCInferenceServiceStub(channel), health_pb2_grpc.HealthStub(channel)

    def oip_stub(self, front: str):
        """The Open Inference Protocol stub of ``front``: ``"grpc.aio"`` (the main port) or ``"fast path"``."""
        return self.stubs()[0] if front == "grpc.aio" else self.fast_path_stubs()[0]

    def health(self) -> int:
        """The overall health status (no API key sent)."""
        _, _, health = self.stubs()
        return health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as response:
            return response.read().decode()

    def worker_pids(self) -> list[int]:
        """The gateway's worker processes: its ``spawn`` children other than the resource tracker."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            parent = int(stat.rpartition(")")[2].split()[1])
            if parent == self.pid and "multiprocessing.spawn" in cmdline and "resource_tracker" not in cmdline:
                pids.append(int(entry.name))
        return sorted(pids)

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self) -> int:
        """Stop the gateway (SIGTERM, then SIGKILL if it lingers) and return its exit code."""
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._stdout.close()
        self._stderr.close()
        return self.process.returncode


# -- a throwaway PKI for TLS and mutual TLS -------------------------------------------------


def _certificate(subject: str, key, issuer=None, issuer_key=None, *, ca: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def make_pki(root: Path) -> Path:
    """A CA, a server and a client certificate signed by it (``ca``, ``server``, ``client``), and a
    self-signed ``stranger``: ``<name>.crt`` and ``<name>.key`` under ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("hegate test CA", ca_key, ca=True)
    _write(root / "ca", ca, ca_key)
    for name in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(root / name, _certificate(name, key, ca, ca_key), key)
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    _write(root / "stranger", _certificate("stranger", stranger_key), stranger_key)  # self-signed
    return root
