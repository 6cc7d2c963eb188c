"""One gateway: the models, the key registry, the workers, the grpc.aio server and the fast
path, started and stopped together.

Start: load and compile every model, start the workers (each loads the encrypted plans), open
the gRPC port (Open Inference Protocol, hegate.v1, health, reflection), the fast path port (the
Open Inference Protocol and health checks on :mod:`gateway.fastpath`, the same servicers) and
the metrics port. Both ports enforce the gateway's edge limits (``settings.limits``): the fast
path itself (:mod:`gateway.fastpath.edge`), the grpc.aio port through C-core's options and an
interceptor (:mod:`gateway.server.guard`). Stop (SIGTERM, SIGINT or :meth:`Gateway.stop`): health
turns NOT_SERVING, the fast path sends GOAWAY, the grpc.aio port first matches the calls that have
reached it (:meth:`~gateway.server.guard.EdgeInterceptor.drain`), both give in-flight calls
``grace_seconds`` to finish, then the workers stop.

Why one event loop for both ports, not a thread or a process each: a thread shares the GIL, so a
flood on one port would still take the other's time, only less predictably; a process of its own
would load every model twice and split the metrics. What made one port starve the other (issue
14: 1.9 -> 240 ms on the grpc.aio port during a frame flood on the fast path) was a flood that
the fast path kept reading; with its frame budgets and the penalty box a flood is cut off after a
few dozen frames, and ``bench/hostile.py`` measures both ports' latency while one is attacked.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gateway.api import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc, hegate_v1_pb2, hegate_v1_pb2_grpc
from gateway.fastpath import FastPathServer, routes
from gateway.fastpath.edge import Limits
from gateway.keystore import open_key_store
from gateway.server.auth import Tenants
from gateway.server.encrypted import EncryptedServicer
from gateway.server.guard import EdgeInterceptor, server_options
from gateway.server.inference import InferenceServicer
from gateway.server.metrics import GatewayMetrics
from gateway.server.serving import ModelStore
from gateway.server.uploads import UploadSpool
from gateway.settings import GatewaySettings
from gateway.workers.pool import WorkerPool
from models.errors import UnavailableError

logger = logging.getLogger(__name__)
EXPIRY_INTERVAL_SECONDS = 30.0
SERVICES = (
    grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    hegate_v1_pb2.DESCRIPTOR.services_by_name["EncryptedInference"].full_name,
)


def _credentials(settings: GatewaySettings) -> grpc.ServerCredentials | None:
    tls = settings.tls
    if tls is None:
        return None
    ca = Path(tls.client_ca_file).read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


class Gateway:
    """Create with settings, ``await start()``, then ``await wait()`` or ``await stop()``."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.metrics = GatewayMetrics()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.fast_path: FastPathServer | None = None
        self.fast_path_port: int | None = None
        self._stopping = False
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        settings = self.settings
        # First: an unreachable Redis stops the start in one line, before minutes of model loading.
        self.keys = await asyncio.to_thread(
            open_key_store, settings.key_store.get_secret_value(), limits=settings.key_limits
        )
        self.store = await asyncio.to_thread(
            ModelStore,
            settings.repository,
            plaintext_backend=settings.plaintext_backend,
            precision=settings.ckks_precision,
        )
        self.pool = WorkerPool(
            self.store.worker_models(),
            workers=settings.workers,
            fetch_keys=lambda key_id: self.encrypted.fetch_keys(key_id),
            on_restart=self.metrics.worker_restarts.inc,
            on_cold_load=self.metrics.key_cold_load_seconds.observe,
        )
        await self.pool.start()
        tenants = Tenants(settings.api_keys)
        self.guard = EdgeInterceptor(tenants, settings.limits)
        self.server = grpc.aio.server(
            interceptors=[self.guard],
            options=server_options(settings.limits, settings.max_message_bytes),
            maximum_concurrent_rpcs=settings.limits.max_calls,
        )
        inference = InferenceServicer(
            self.store,
            self.metrics,
            max_batch=settings.max_batch,
            ready=self.ready,
            allow_non_finite=settings.allow_non_finite_inputs,
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(inference, self.server)
        self.encrypted = EncryptedServicer(
            self.store,
            self.keys,
            self.pool,
            self.metrics,
            queue_limit=settings.queue_limit,
            tenant_queue_limit=settings.tenant_queue_limit,
            uploads=UploadSpool(settings.upload_limits),
        )
        hegate_v1_pb2_grpc.add_EncryptedInferenceServicer_to_server(self.encrypted, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        health_service = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
        reflection.enable_server_reflection((*SERVICES, health_service, reflection.SERVICE_NAME), self.server)
        credentials = _credentials(settings)
        if credentials is None:
            self.port = self.server.add_insecure_port(settings.address)
        else:
            self.port = self.server.add_secure_port(settings.address, credentials)
        await self.server.start()
        if settings.fast_path_port is not None:
            table = routes(inference, grpc_predict_v2_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"])
            table |= routes(self.health, health_pb2.DESCRIPTOR.services_by_name["Health"])
            limits = Limits(**settings.limits.model_dump(), max_message_bytes=settings.max_message_bytes)
            self.fast_path = FastPathServer(table, tenants, limits, settings.tls)
            host = settings.address.rpartition(":")[0]
            self.fast_path_port = await self.fast_path.start(f"{host}:{settings.fast_path_port}")
        for service in ("", *SERVICES):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        if settings.metrics_port is not None:
            host = settings.address.rpartition(":")[0].strip("[]") or "127.0.0.1"
            self.metrics_port = self.metrics.serve(settings.metrics_port, host)
        self._expiry = asyncio.get_running_loop().create_task(self._expire_keys())
        logger.info(
            "hegate listening on %s (port %d, %s; fast path port %s), %d models (%d encrypted), %d workers, metrics %s",
            settings.address,
            self.port,
            "TLS" if credentials else "plaintext transport",
            self.fast_path_port,
            len(self.store.models()),
            len(self.store.worker_models()),
            settings.workers,
            self.metrics_port,
        )

    def ready(self) -> bool:
        return not self._stopping and (self.pool.alive > 0 or not self.store.worker_models())

    async def _expire_keys(self) -> None:
        """Sweep expired records off the loop's thread (a Redis store answers over the network; their
        listeners unload them), then unload key sets idle here; a store outage skips the sweep, not the unloading."""
        while True:
            await asyncio.sleep(EXPIRY_INTERVAL_SECONDS)
            try:
                await asyncio.to_thread(self.keys.expire)
            except UnavailableError as exc:
                logger.warning("key store unavailable; expiry skipped: %s", exc)
            await self.encrypted.unload_idle(idle_seconds=self.settings.key_ttl_seconds)

    async def stop(self) -> None:
        """Stop accepting, let in-flight calls finish within the grace period, stop the workers."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        logger.info("stopping: finishing in-flight requests (grace %.1f s)", self.settings.grace_seconds)
        await self.health.enter_graceful_shutdown()
        self._expiry.cancel()
        grace = self.settings.grace_seconds
        loop = asyncio.get_running_loop()
        started = loop.time()

        async def stop_grpc() -> None:
            await self.guard.drain(grace / 2)
            await self.server.stop(max(0.0, grace - (loop.time() - started)))

        await asyncio.gather(stop_grpc(), *([self.fast_path.stop(grace)] if self.fast_path else []))
        await self.pool.close()
        self.keys.close()
        self.metrics.close()
        self._stopped.set()
        logger.info("stopped")

    async def wait(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: loop.create_task(self.stop()))
        await self._stopped.wait()
