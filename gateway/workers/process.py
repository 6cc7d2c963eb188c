"""A worker process: the encrypted models, the keys of its shard, and a loop over its pipe.

Everything here is read-only across requests except two caches: the keys, which only the
gateway's :class:`~gateway.workers.pool.WorkerPool` changes (load and drop messages; it sends a
worker only the key sets of its shard), and the
encoded plans, one per model version and profile: the preloaded profile's at start, another
profile's when keys for it first arrive (bounded by models x profiles). The largest is the MNIST
CNN's circuit_private plan: about 10 s to encode, 122 MiB, and each of its key sets 494 MiB once
deserialized, from 212 MiB on the wire (measured 2026-12-03 on a busy machine, RSS around
``EncryptedModel`` and ``load_keys``). One evaluation runs at a time; requests wait in the pipe.
"""

from __future__ import annotations

import logging
import time
from multiprocessing.connection import Connection

from gateway.he.params import Profile
from gateway.he.plan import EncryptedModel, EvaluationKeys
from gateway.he.wire import dump
from gateway.workers.messages import (
    DropKeys,
    Evaluate,
    Evaluated,
    Failed,
    HeldKeys,
    KeysLoaded,
    ListKeys,
    LoadKeys,
    ModelRef,
    ReadContext,
    Ready,
    Reply,
    Shutdown,
)
from models.errors import DeadlineExceededError, HegateError, NotFoundError

logger = logging.getLogger(__name__)

PlanKey = tuple[str, str, Profile]  # model, version, profile


class Worker:
    """The state of one worker: compiled models and deserialized keys."""

    def __init__(self, models: list[ModelRef]) -> None:
        self.sources = {(m.name, m.version): m for m in models}
        self.models: dict[PlanKey, EncryptedModel] = {}
        for m in models:
            for profile in m.preload:
                self._model(m.name, m.version, profile)
        self.keys: dict[str, tuple[PlanKey, EvaluationKeys]] = {}

    def _model(self, name: str, version: str, profile: Profile) -> EncryptedModel:
        """The encoded plan, compiled on first use for a profile that was not preloaded."""
        plan = (name, version, profile)
        if plan not in self.models:
            source = self.sources.get((name, version))
            if source is None:
                raise NotFoundError(f"model {name!r} version {version!r} is not served encrypted")
            started = time.monotonic()
            self.models[plan] = EncryptedModel(source.onnx_path, profile=profile)
            logger.info("encoded %s/%s (%s) in %.1f s", name, version, profile, time.monotonic() - started)
        return self.models[plan]

    def load_keys(self, message: LoadKeys) -> KeysLoaded:
        plan = (message.model, message.version, message.profile)
        keys = self._model(*plan).load_keys(message.relin, message.galois, message.public_key)
        if message.keep:
            self.keys[message.key_id] = (plan, keys)
        return KeysLoaded(request_id=message.request_id, resident_bytes=keys.resident_bytes)

    def held(self, message: ListKeys) -> HeldKeys:
        return HeldKeys(
            request_id=message.request_id,
            key_ids=sorted(self.keys),
            resident_bytes=sum(keys.resident_bytes for _, keys in self.keys.values()),
        )

    def read_context(self, message: ReadContext) -> KeysLoaded:
        keys = self._model(message.model, message.version, message.profile).load_context(message.context)
        public = dump(keys.public) if keys.public is not None else b""
        return KeysLoaded(
            request_id=message.request_id, relin=dump(keys.relin), galois=dump(keys.galois), public_key=public
        )

    def evaluate(self, message: Evaluate) -> Evaluated:
        started = time.monotonic()
        if message.deadline is not None and started > message.deadline:
            raise DeadlineExceededError("the deadline passed while the request waited for a worker")
        entry = self.keys.get(message.key_id)
        plan = (message.model, message.version, message.profile)
        if entry is None or entry[0] != plan:
            raise NotFoundError(f"key id {message.key_id!r} is not registered for this model; register the keys again")
        result = self._model(*plan).evaluate(message.ciphertext, entry[1])
        return Evaluated(
            request_id=message.request_id,
            ciphertext=result,
            queue_seconds=max(0.0, started - message.sent_at),
            compute_seconds=time.monotonic() - started,
        )

    def handle(self, message) -> Reply | None:
        try:
            match message:
                case LoadKeys():
                    return self.load_keys(message)
                case ReadContext():
                    return self.read_context(message)
                case ListKeys():
                    return self.held(message)
                case Evaluate():
                    return self.evaluate(message)
                case DropKeys():
                    self.keys.pop(message.key_id, None)
                    return None
        except HegateError as exc:
            return Failed(request_id=message.request_id, error=type(exc).__name__, message=str(exc))
        except Exception as exc:  # a bug or a SEAL error nobody foresaw: fail this request, keep serving
            logger.exception("request %s failed", message.request_id)
            return Failed(request_id=message.request_id, error="InternalError", message=f"evaluation failed: {exc}")
        raise TypeError(f"unexpected message {type(message).__name__}")


def main(connection: Connection, models: list[ModelRef]) -> None:
    """The process entry point (``spawn``): load, announce readiness, serve until told to stop."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s[worker]: %(message)s")
    worker = Worker(models)
    connection.send(Ready(models=[f"{name}/{version}/{profile}" for name, version, profile in worker.models]))
    while True:
        try:
            message = connection.recv()
        except EOFError:  # the gateway is gone
            return
        if isinstance(message, Shutdown):
            return
        reply = worker.handle(message)
        if reply is not None:
            connection.send(reply)
