"""Prometheus metrics of one gateway, served over HTTP on the metrics port.

Each gateway owns its registry (not prometheus_client's global one), so several gateways in one
process, as in the tests, do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class GatewayMetrics:
    """Requests by model, path and status; queue and compute time; key bytes and cold loads; worker restarts."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hegate_requests",
            "Inference requests by model, path (encrypted/plaintext) and gRPC status",
            ["model", "path", "status"],
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "hegate_queue_seconds",
            "Time a request waited before its computation started",
            ["model", "path"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute_seconds = Histogram(
            "hegate_compute_seconds",
            "Time spent computing a request",
            ["model", "path"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.key_bytes = Gauge(
            "hegate_registered_key_bytes",
            "Resident bytes (in the workers, one copy per set) of the evaluation keys in the registry",
            registry=self.registry,
        )
        self.key_cold_load_seconds = Histogram(
            "hegate_key_cold_load_seconds",
            "Time to read a key set from the store and load it into its worker on first use",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.worker_restarts = Counter(
            "hegate_worker_restarts", "Encrypted workers that died and were replaced", registry=self.registry
        )

    def serve(self, port: int, address: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``port`` (0 picks a free one); returns the port."""
        server, _ = start_http_server(port, addr=address, registry=self.registry)
        self._http = server
        return server.server_port

    def close(self) -> None:
        http = getattr(self, "_http", None)
        if http is not None:
            http.shutdown()
            http.server_close()
