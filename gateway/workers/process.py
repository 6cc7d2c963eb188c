"""A worker process: the encrypted models, the keys it was given, and a loop over its pipe.

Everything here is read-only across requests except the key cache, which only the gateway's
:class:`~gateway.workers.pool.WorkerPool` changes (load and drop messages). One evaluation runs
at a time; requests wait in the pipe.
"""

from __future__ import annotations

import logging
import time
from multiprocessing.connection import Connection

import tenseal.sealapi as seal

from gateway.he.plan import EncryptedModel
from gateway.he.wire import dump
from gateway.workers.messages import (
    DropKeys,
    Evaluate,
    Evaluated,
    Failed,
    KeysLoaded,
    LoadKeys,
    ModelRef,
    ReadContext,
    Ready,
    Reply,
    Shutdown,
)
from models.errors import DeadlineExceededError, HegateError, NotFoundError

logger = logging.getLogger(__name__)

Keys = tuple[seal.RelinKeys, seal.GaloisKeys]


class Worker:
    """The state of one worker: compiled models and deserialized keys."""

    def __init__(self, models: list[ModelRef]) -> None:
        self.models = {(m.name, m.version): EncryptedModel(m.onnx_path, precision=m.precision) for m in models}
        self.keys: dict[str, tuple[tuple[str, str], Keys]] = {}

    def _model(self, name: str, version: str) -> EncryptedModel:
        try:
            return self.models[(name, version)]
        except KeyError:
            raise NotFoundError(f"model {name!r} version {version!r} is not served encrypted") from None

    def load_keys(self, message: LoadKeys) -> KeysLoaded:
        model = self._model(message.model, message.version)
        self.keys[message.key_id] = ((message.model, message.version), model.load_keys(message.relin, message.galois))
        return KeysLoaded(request_id=message.request_id)

    def read_context(self, message: ReadContext) -> KeysLoaded:
        relin, galois = self._model(message.model, message.version).load_context(message.context)
        return KeysLoaded(request_id=message.request_id, relin=dump(relin), galois=dump(galois))

    def evaluate(self, message: Evaluate) -> Evaluated:
        started = time.monotonic()
        if message.deadline is not None and started > message.deadline:
            raise DeadlineExceededError("the deadline passed while the request waited for a worker")
        entry = self.keys.get(message.key_id)
        if entry is None or entry[0] != (message.model, message.version):
            raise NotFoundError(f"key id {message.key_id!r} is not registered for this model; register the keys again")
        result = self._model(message.model, message.version).evaluate(message.ciphertext, entry[1])
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
    connection.send(Ready(models=[f"{name}/{version}" for name, version in worker.models]))
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
