"""Real servers that tests start and stop themselves: today ``redis-server``.

``make test`` installs the Debian packages these need (see the Makefile), so a missing binary is a
failure that says what to install, never a skip: a skipped durability test would pass unnoticed.
"""

from __future__ import annotations

import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

START_SECONDS = 20.0


def free_port() -> int:
    """A loopback port nothing listens on right now (the kernel's pick)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """One ``redis-server`` on loopback with its append-only file in ``directory``.

    :meth:`stop` and :meth:`start` again reuse the port and the directory, so a restart keeps the
    data (``--appendonly yes``; a SIGTERM makes Redis flush the file before it exits).
    """

    def __init__(self, directory: Path, *extra: str, tls: Path | None = None) -> None:
        binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin:/usr/bin")
        if binary is None:
            pytest.fail("redis-server is not installed: `make test` installs it (apt-get install redis-server)")
        self.binary = binary
        self.directory = directory
        self.extra = extra
        self.tls = tls  # a directory with ca.crt, server.crt and server.key: serve TLS only
        self.port = free_port()
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        command = [self.binary, "--bind", "127.0.0.1", "--dir", str(self.directory)]
        if self.tls is None:
            command += ["--port", str(self.port)]
        else:
            command += ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            command += ["--tls-cert-file", str(self.tls / "server.crt"), "--tls-key-file", str(self.tls / "server.key")]
            command += ["--tls-ca-cert-file", str(self.tls / "ca.crt")]
        command += ["--appendonly", "yes", "--save", "", "--maxmemory-policy", "noeviction"]
        command += ["--logfile", "redis.log", *self.extra]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"redis-server exited with {self.process.returncode}:\n{self._log_tail()}")
            if self._answers():
                return self
            time.sleep(0.02)
        self.stop()
        pytest.fail(
            f"redis-server did not answer on port {self.port} within {START_SECONDS:.0f} s:\n{self._log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM (Redis writes its append-only file out and exits), SIGKILL if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def _answers(self) -> bool:
        """True once Redis replies to PING (with PONG, or NOAUTH when a password is required), loaded."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as connection:
                if self.tls is None:
                    connection.sendall(b"PING\r\n")
                    reply = connection.recv(64)
                else:
                    context = ssl.create_default_context(cafile=self.tls / "ca.crt")
                    with context.wrap_socket(connection, server_hostname="127.0.0.1") as wrapped:
                        wrapped.sendall(b"PING\r\n")
                        reply = wrapped.recv(64)
        except OSError:
            return False
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def _log_tail(self) -> str:
        log = self.directory / "redis.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"


@pytest.fixture
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    """A fresh ``redis-server`` (empty, persistent) for one test; stopped afterwards."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()
