"""The pool of ``spawn`` workers: start them, route requests, watch them die, replace them.

Every worker holds every encrypted model (the default profile's plans from its start, another
profile's from the first keys registered for it) and a copy of every registered key, so any
worker can serve any request and requests go to whichever has the fewest outstanding. Keys cross the
process boundary once per worker: when they are registered (checked by one worker, then
copied to the others) and when a replacement worker starts (replayed from the registry).

The event loop never blocks on a pipe: replies are read when the pipe is readable, requests are
written from a thread (a 30 MB key would otherwise stall every other call), and a worker's
death is noticed through its process sentinel. The requests that a dead worker held fail with
:class:`~models.errors.WorkerCrashedError`; registered keys and the other workers are untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from gateway.he.params import Profile
from gateway.workers import process
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
    Shutdown,
)
from models import errors
from models.errors import DeadlineExceededError, HegateError, UnavailableError, WorkerCrashedError

logger = logging.getLogger(__name__)
START_TIMEOUT_SECONDS = 120.0


@dataclass(frozen=True)
class StoredKeys:
    """What the pool needs to give a (new) worker one registered key set."""

    key_id: str
    model: str
    version: str
    profile: Profile
    relin: bytes
    galois: bytes
    public_key: bytes = b""


@dataclass
class _Worker:
    slot: int
    process: multiprocessing.process.BaseProcess
    connection: multiprocessing.connection.Connection
    ready: asyncio.Future
    pending: dict[int, asyncio.Future] = field(default_factory=dict)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    accepting: bool = False


class WorkerPool:
    """``workers`` processes serving ``models``; ``stored_keys`` lists the keys to replay into a new one."""

    def __init__(
        self,
        models: list[ModelRef],
        *,
        workers: int,
        stored_keys: Callable[[], Iterable[StoredKeys]],
        on_restart: Callable[[], None] = lambda: None,
    ) -> None:
        if workers < 1:
            raise errors.InvalidArgumentError(f"workers must be at least 1, got {workers}")
        self.models = models
        self.size = workers
        self._stored_keys = stored_keys
        self._on_restart = on_restart
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker | None] = [None] * workers
        self._ids = itertools.count(1)
        self._closing = False
        self._restarts: set[asyncio.Task] = set()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker and wait until each has loaded the models."""
        for slot in range(self.size):
            self._spawn(slot)
        await asyncio.gather(*(self._wait_ready(w) for w in self._workers if w is not None))

    def _spawn(self, slot: int) -> _Worker:
        loop = asyncio.get_running_loop()
        ours, theirs = self._context.Pipe(duplex=True)
        child = self._context.Process(
            target=process.main, args=(theirs, self.models), name=f"hegate-worker-{slot}", daemon=True
        )
        child.start()
        theirs.close()
        worker = _Worker(slot=slot, process=child, connection=ours, ready=loop.create_future())
        self._workers[slot] = worker
        loop.add_reader(ours.fileno(), self._on_readable, worker)
        loop.add_reader(child.sentinel, self._on_exit, worker)
        return worker

    async def _wait_ready(self, worker: _Worker) -> None:
        await asyncio.wait_for(asyncio.shield(worker.ready), START_TIMEOUT_SECONDS)
        worker.accepting = True

    async def close(self) -> None:
        """Stop every worker: ask politely, then terminate whoever does not leave."""
        self._closing = True
        for task in list(self._restarts):
            task.cancel()
        for worker in self._workers:
            if worker is None or not worker.process.is_alive():
                continue
            worker.accepting = False
            with contextlib.suppress(OSError):
                worker.connection.send(Shutdown())
        for worker in self._workers:
            if worker is None:
                continue
            await asyncio.to_thread(worker.process.join, 5)
            if worker.process.is_alive():
                worker.process.terminate()
            self._detach(worker)

    @property
    def alive(self) -> int:
        return sum(1 for w in self._workers if w is not None and w.accepting)

    # -- requests ----------------------------------------------------------------------------

    async def load_keys(self, keys: StoredKeys) -> None:
        """Check ``keys`` in one worker (SEAL's checks, the spec's rotation steps), then give
        them to every other worker.

        Raises:
            InvalidArgumentError: the keys are not valid for the model.
        """
        first, *others = self._accepting()
        await self._give_keys(first, keys)
        await asyncio.gather(*(self._give_keys(worker, keys) for worker in others))
        # A replacement that started meanwhile may have listed the registry before these keys: give
        # them to every started worker not given them yet, until none is left (the caller stores them next).
        given = [first, *others]
        while missing := [w for w in self._started() if not any(w is g for g in given)]:
            given += missing
            for worker in missing:
                with contextlib.suppress(HegateError):  # if it dies, its own replacement replays the registry
                    await self._give_keys(worker, keys)

    async def read_context(
        self, *, model: str, version: str, profile: Profile, context: bytes
    ) -> tuple[bytes, bytes, bytes]:
        """The relinearization, Galois and (circuit_private) public keys of a public TenSEAL
        context, as SEAL bytes.

        Raises:
            InvalidArgumentError: not a context, one with a secret key, or other parameters.
        """
        loaded = await self._call(
            min(self._accepting(), key=lambda w: len(w.pending)),
            lambda rid: ReadContext(request_id=rid, model=model, version=version, profile=profile, context=context),
        )
        assert isinstance(loaded, KeysLoaded)
        return loaded.relin, loaded.galois, loaded.public_key

    async def _give_keys(self, worker: _Worker, keys: StoredKeys) -> None:
        await self._call(
            worker,
            lambda rid: LoadKeys(
                request_id=rid,
                key_id=keys.key_id,
                model=keys.model,
                version=keys.version,
                profile=keys.profile,
                relin=keys.relin,
                galois=keys.galois,
                public_key=keys.public_key,
            ),
        )

    async def _drop_dropped(self, worker: _Worker, replayed: list[str]) -> None:
        """Drop from a replacement the keys that left the registry while it was being given them
        (deleted, evicted or expired then: :meth:`drop_keys` only reaches accepting workers)."""
        registered = {keys.key_id for keys in self._stored_keys()}
        for key_id in replayed:
            if key_id not in registered:
                with contextlib.suppress(HegateError):  # if it dies, its replacement replays the registry
                    await self._send(worker, DropKeys(key_id=key_id))

    async def drop_keys(self, key_id: str) -> None:
        """Forget ``key_id`` in every worker (evicted, expired or deleted in the registry)."""
        for worker in self._accepting(required=False):
            await self._send(worker, DropKeys(key_id=key_id))

    async def evaluate(
        self, *, model: str, version: str, profile: Profile, key_id: str, ciphertext: bytes, deadline: float | None
    ) -> Evaluated:
        """Evaluate on the least busy worker.

        Raises:
            DeadlineExceededError: ``deadline`` (monotonic) passed first.
            WorkerCrashedError: the worker died during the evaluation.
            UnavailableError: no worker is running (all are being replaced).
            NotFoundError, InvalidArgumentError: as the worker raised them.
        """
        worker = min(self._accepting(), key=lambda w: len(w.pending))
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        result = await self._call(
            worker,
            lambda rid: Evaluate(
                request_id=rid,
                key_id=key_id,
                model=model,
                version=version,
                profile=profile,
                ciphertext=ciphertext,
                sent_at=time.monotonic(),
                deadline=deadline,
            ),
            timeout=timeout,
        )
        assert isinstance(result, Evaluated)
        return result

    def _started(self) -> list[_Worker]:
        """Workers that have loaded the models and are alive: accepting, or being given the registry's keys."""
        return [
            w
            for w in self._workers
            if w is not None and not w.connection.closed and w.ready.done() and w.ready.exception() is None
        ]

    def _accepting(self, required: bool = True) -> list[_Worker]:
        workers = [w for w in self._workers if w is not None and w.accepting]
        if required and not workers:
            raise UnavailableError("no evaluation worker is running; retry shortly")
        return workers

    async def _call(self, worker: _Worker, make: Callable[[int], object], timeout: float | None = None):
        request_id = next(self._ids)
        reply = asyncio.get_running_loop().create_future()
        worker.pending[request_id] = reply
        try:
            await self._send(worker, make(request_id))
            result = await asyncio.wait_for(reply, timeout)
        except TimeoutError:
            raise DeadlineExceededError("the deadline passed before the evaluation finished") from None
        finally:
            worker.pending.pop(request_id, None)
            if reply.done() and not reply.cancelled():
                reply.exception()  # a send that failed leaves the worker's death notice unread: read it
        if isinstance(result, Failed):
            raise getattr(errors, result.error, HegateError)(result.message)
        return result

    async def _send(self, worker: _Worker, message: object) -> None:
        async with worker.send_lock:
            try:
                await asyncio.to_thread(worker.connection.send, message)
            except (OSError, ValueError):  # the pipe closed under us: the worker is dying
                raise WorkerCrashedError("the evaluation worker stopped; it is being replaced") from None

    # -- pipe and process events --------------------------------------------------------------

    def _on_readable(self, worker: _Worker) -> None:
        try:
            while worker.connection.poll():
                message = worker.connection.recv()
                if isinstance(message, Ready):
                    if not worker.ready.done():
                        worker.ready.set_result(message)
                    continue
                future = worker.pending.get(message.request_id)
                if future is not None and not future.done():
                    future.set_result(message)
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(worker.connection.fileno())

    def _on_exit(self, worker: _Worker) -> None:
        worker.process.join(0)  # reap it: the sentinel fired, so it has exited and exitcode becomes known
        code = worker.process.exitcode
        self._detach(worker)
        crashed = WorkerCrashedError(
            f"the evaluation worker died (exit code {code}) during this request; it is being replaced"
        )
        for future in worker.pending.values():
            if not future.done():
                future.set_exception(crashed)
        if not worker.ready.done():  # died while starting: whoever awaits readiness handles it
            worker.ready.set_exception(crashed)
            return
        if self._closing or self._workers[worker.slot] is not worker:
            return
        logger.error("worker %d died with exit code %s; starting a replacement", worker.slot, code)
        self._on_restart()
        task = asyncio.get_running_loop().create_task(self._replace(worker.slot))
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)

    def _detach(self, worker: _Worker) -> None:
        worker.accepting = False
        if worker.connection.closed:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(worker.process.sentinel)
        loop.remove_reader(worker.connection.fileno())
        worker.connection.close()

    async def _replace(self, slot: int) -> None:
        """Start a new worker in ``slot`` and give it every registered key before it serves."""
        while not self._closing:
            worker = self._spawn(slot)
            try:
                await asyncio.wait_for(asyncio.shield(worker.ready), START_TIMEOUT_SECONDS)
                replayed = []
                for keys in list(self._stored_keys()):
                    try:
                        await self._give_keys(worker, keys)
                        replayed.append(keys.key_id)
                    except HegateError as exc:
                        logger.warning("could not replay key %s into worker %d: %s", keys.key_id, slot, exc)
                if worker.process.is_alive():  # a death during the replay has scheduled another replacement
                    worker.accepting = True  # from here on, drop_keys reaches it
                    await self._drop_dropped(worker, replayed)
                    logger.info("worker %d replaced", slot)
                return
            except (HegateError, TimeoutError) as exc:
                logger.error("replacement worker %d failed to start: %s", slot, exc)
                await asyncio.sleep(1.0)
