"""The pool of ``spawn`` workers: start them, route requests, shard the keys, watch them die, replace them.

Every worker holds every encrypted model (the default profile's plans from its start, another
profile's from the first keys registered for it). Key sets are sharded: a key set is
deserialized in one worker, the owner of its key id by rendezvous hashing over the worker slots
(:mod:`gateway.workers.shards`), and its requests go there. So memory holds one copy of each key
set whatever the number of workers (67.5 MiB for the default model's, see
:attr:`~gateway.he.plan.EvaluationKeys.resident_bytes`), where every worker used to hold a copy of
every set.

A key set the owner has not loaded (registered through another replica, its worker replaced,
unloaded while idle) is fetched from the key store and loaded on first use; concurrent first
uses wait for one load, and ``on_cold_load`` hears how long it took. A replacement worker owns
its predecessor's shard (the same slot) and reloads it from the store as soon as it starts,
while it already takes requests (a request for a key set not reloaded yet loads it itself, or
joins the reload under way). While a slot's worker is being replaced, its key sets are served by
the next slot in their rendezvous order (loading them there), and registrations are checked on
another worker and reach the replacement through its reload.

Hot key sets get a second copy, on purpose: one key set's requests all queue on its owner, so a
single client with several calls in flight would otherwise use one worker of many (the gateway
benchmark's two-worker speed-up, 1.89x with every worker holding every set, would fall to about
1x). When the owner has ``HOT_PENDING`` or more requests outstanding and the next slot's worker
has none, the request goes there (loading the set there once); such extra copies are unloaded
after ``REPLICA_IDLE_SECONDS`` unused. Under load from many clients no worker is idle, so no
copies are made: the memory of one copy per set holds where memory matters.

The event loop never blocks on a pipe: replies are read when the pipe is readable, requests are
written from a thread (a 30 MB key would otherwise stall every other call), and a worker's
death is noticed through its process sentinel. The requests that a dead worker held fail with
:class:`~models.errors.WorkerCrashedError`; the other workers and their keys are untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import multiprocessing
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gateway.he.params import Profile
from gateway.keystore.base import key_not_found
from gateway.workers import process
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
    Shutdown,
)
from gateway.workers.shards import owner_slot, ranked_slots
from models import errors
from models.errors import DeadlineExceededError, HegateError, NotFoundError, UnavailableError, WorkerCrashedError

logger = logging.getLogger(__name__)
START_TIMEOUT_SECONDS = 120.0
HOT_PENDING = 2  # outstanding requests on a key set's owner before an idle second worker takes one
REPLICA_IDLE_SECONDS = 60.0  # an extra (non-owner) copy unused this long is unloaded


@dataclass(frozen=True)
class StoredKeys:
    """What the pool needs to give a worker one registered key set."""

    key_id: str
    model: str
    version: str
    profile: Profile
    relin: bytes
    galois: bytes
    public_key: bytes = b""


Fetch = Callable[[], Awaitable[StoredKeys]]
"""Reads a key set from the key store (the caller's tenant checked), for a load on first use."""


@dataclass
class _Loaded:
    resident_bytes: int
    last_used: float  # time.monotonic()


@dataclass
class _Worker:
    slot: int
    process: multiprocessing.process.BaseProcess
    connection: multiprocessing.connection.Connection
    ready: asyncio.Future
    pending: dict[int, asyncio.Future] = field(default_factory=dict)
    send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    accepting: bool = False
    loaded: dict[str, _Loaded] = field(default_factory=dict)  # what this process holds
    loading: dict[str, asyncio.Future] = field(default_factory=dict)  # key id -> the load under way


class WorkerPool:
    """``workers`` processes serving ``models``, each holding the key sets of its shard.

    ``fetch_keys(key_id)`` reads a key set from the store for a replacement worker's reload;
    ``on_cold_load(seconds)`` hears every load on first use (fetch and deserialization).
    """

    def __init__(
        self,
        models: list[ModelRef],
        *,
        workers: int,
        fetch_keys: Callable[[str], Awaitable[StoredKeys]],
        on_restart: Callable[[], None] = lambda: None,
        on_cold_load: Callable[[float], None] = lambda seconds: None,
    ) -> None:
        if workers < 1:
            raise errors.InvalidArgumentError(f"workers must be at least 1, got {workers}")
        self.models = models
        self.size = workers
        self._fetch_keys = fetch_keys
        self._on_restart = on_restart
        self._on_cold_load = on_cold_load
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker | None] = [None] * workers
        self._shards: list[set[str]] = [set() for _ in range(workers)]  # what each slot should hold
        self._ids = itertools.count(1)
        self._closing = False
        self._tasks: set[asyncio.Task] = set()

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
        for task in list(self._tasks):
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

    # -- keys ------------------------------------------------------------------------------------

    def owner(self, key_id: str) -> int:
        """The slot whose worker holds ``key_id`` (see :mod:`gateway.workers.shards`)."""
        return owner_slot(key_id=key_id, slots=self.size)

    async def register(self, keys: StoredKeys) -> int:
        """Check ``keys`` (SEAL's checks, the spec's rotation steps) and load them in their owner;
        return the bytes the worker holds for them (what the store's limits count).

        Keys the owner holds already (the same content: another tenant registered them) are not
        loaded twice. While the owner is being replaced, another worker checks them and the
        replacement loads them from the store with the rest of its shard.

        Raises:
            InvalidArgumentError: the keys are not valid for the model.
            UnavailableError: no worker is running.
        """
        slot = self.owner(keys.key_id)
        worker = self._workers[slot]
        if worker is not None and worker.accepting:
            return await self._ensure(worker, keys.key_id, _given(keys), cold=False)
        checker = min(self._accepting(), key=lambda w: len(w.pending))
        loaded = await self._call(checker, lambda rid: _load_message(rid, keys, keep=False))
        assert isinstance(loaded, KeysLoaded)
        self._shards[slot].add(keys.key_id)  # the replacement's reload takes it from the store
        return loaded.resident_bytes

    async def drop_keys(self, key_id: str) -> None:
        """Unload ``key_id`` from every worker (evicted, expired or deleted in the registry, or idle)."""
        for shard in self._shards:
            shard.discard(key_id)
        for worker in self._started():
            worker.loading.pop(key_id, None)  # a load under way unloads what it loaded when it ends
            if worker.loaded.pop(key_id, None) is not None:
                with contextlib.suppress(HegateError):  # if it died, its replacement never loads the key
                    await self._send(worker, DropKeys(key_id=key_id))

    async def unload_idle(self, *, idle_seconds: float) -> list[str]:
        """Unload key sets unused here for ``idle_seconds`` (extra copies after at most
        ``REPLICA_IDLE_SECONDS``); return their key ids. A later request loads them again."""
        now = time.monotonic()
        unloaded = []
        for worker in self._started():
            for key_id, loaded in list(worker.loaded.items()):
                owned = self.owner(key_id) == worker.slot
                limit = idle_seconds if owned else min(idle_seconds, REPLICA_IDLE_SECONDS)
                if now - loaded.last_used < limit:
                    continue
                del worker.loaded[key_id]
                if owned:
                    self._shards[worker.slot].discard(key_id)
                unloaded.append(key_id)
                with contextlib.suppress(HegateError):
                    await self._send(worker, DropKeys(key_id=key_id))
        return unloaded

    def holds(self, key_id: str) -> bool:
        """Whether any worker holds ``key_id`` or is loading it."""
        return any(key_id in w.loaded or key_id in w.loading for w in self._started())

    async def held_keys(self) -> dict[int, HeldKeys]:
        """What each running worker process says it holds, by slot (the copies the tests count)."""
        held = {}
        for worker in self._started():
            reply = await self._call(worker, lambda rid: ListKeys(request_id=rid))
            assert isinstance(reply, HeldKeys)
            held[worker.slot] = reply
        return held

    async def _ensure(self, worker: _Worker, key_id: str, fetch: Fetch, *, cold: bool = True) -> int:
        """Have ``worker`` hold ``key_id``, loading it once however many callers ask at the same time.

        Returns its resident bytes. Raises what ``fetch`` or the worker raised.
        """
        loaded = worker.loaded.get(key_id)
        if loaded is not None:
            loaded.last_used = time.monotonic()
            return loaded.resident_bytes
        future = worker.loading.get(key_id)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            worker.loading[key_id] = future
            task = asyncio.get_running_loop().create_task(self._load(worker, key_id, fetch, future, cold=cold))
            self._tasks.add(task)  # held until it ends; cancelled at close, like the replacements
            task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(future)

    async def _load(self, worker: _Worker, key_id: str, fetch: Fetch, future: asyncio.Future, *, cold: bool) -> None:
        started = time.monotonic()
        try:
            keys = await fetch()
            if worker.loading.get(key_id) is not future:
                raise key_not_found()  # dropped while it was read from the store
            loaded = await self._call(worker, lambda rid: _load_message(rid, keys, keep=True))
            assert isinstance(loaded, KeysLoaded)
            if worker.loading.get(key_id) is not future:  # dropped while the worker loaded it
                with contextlib.suppress(HegateError):
                    await self._send(worker, DropKeys(key_id=key_id))
                raise key_not_found()
            worker.loaded[key_id] = _Loaded(loaded.resident_bytes, time.monotonic())
            if self.owner(key_id) == worker.slot:
                self._shards[worker.slot].add(key_id)
            if cold:
                seconds = time.monotonic() - started
                self._on_cold_load(seconds)
                logger.info("loaded key %s into worker %d on first use in %.3f s", key_id, worker.slot, seconds)
            future.set_result(loaded.resident_bytes)
        except Exception as exc:
            future.set_exception(
                exc if isinstance(exc, HegateError) else errors.InternalError(f"key load failed: {exc}")
            )
            future.exception()  # read here too: nobody may be waiting any more
        except asyncio.CancelledError:
            future.set_exception(UnavailableError("the gateway is stopping"))
            future.exception()
            raise
        finally:
            if worker.loading.get(key_id) is future:
                del worker.loading[key_id]

    # -- requests ----------------------------------------------------------------------------

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

    async def evaluate(
        self,
        *,
        model: str,
        version: str,
        profile: Profile,
        key_id: str,
        ciphertext: bytes,
        deadline: float | None,
        fetch: Fetch,
    ) -> Evaluated:
        """Evaluate on the worker that holds ``key_id``, loading it there first if need be (``fetch``).

        Raises:
            DeadlineExceededError: ``deadline`` (monotonic) passed first.
            WorkerCrashedError: the worker died during the evaluation.
            UnavailableError: no worker is running (all are being replaced), or ``fetch`` found the store down.
            NotFoundError, InvalidArgumentError: as the store or the worker raised them.
        """
        worker = self._route(key_id)
        for attempt in range(2):
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                await asyncio.wait_for(self._ensure(worker, key_id, fetch), timeout)
            except TimeoutError:
                raise DeadlineExceededError("the deadline passed while the keys were being loaded") from None
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
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
            except NotFoundError:
                # The worker lost keys the pool thought it held (a drop of an earlier load crossed
                # a reload of the same keys): forget them and load them again, once.
                if attempt or worker.loaded.pop(key_id, None) is None:
                    raise
                continue
            assert isinstance(result, Evaluated)
            return result
        raise AssertionError("unreachable")

    def _route(self, key_id: str) -> _Worker:
        """The owner; the next accepting slot in rendezvous order while the owner is replaced; or
        the next slot when the owner is busy (``HOT_PENDING``) and that one is idle."""
        accepting = [
            worker
            for slot in ranked_slots(key_id=key_id, slots=self.size)
            if (worker := self._workers[slot]) is not None and worker.accepting
        ]
        if not accepting:
            raise UnavailableError("no evaluation worker is running; retry shortly")
        first = accepting[0]
        if len(accepting) > 1 and len(first.pending) >= HOT_PENDING and not accepting[1].pending:
            return accepting[1]
        return first

    def _started(self) -> list[_Worker]:
        """Workers that have loaded the models and are alive (accepting, or about to)."""
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
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _detach(self, worker: _Worker) -> None:
        worker.accepting = False
        if worker.connection.closed:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(worker.process.sentinel)
        loop.remove_reader(worker.connection.fileno())
        worker.connection.close()

    async def _replace(self, slot: int) -> None:
        """Start a new worker in ``slot``: it takes requests as soon as it has loaded the models,
        and reloads its predecessor's shard from the store meanwhile."""
        while not self._closing:
            worker = self._spawn(slot)
            try:
                await asyncio.wait_for(asyncio.shield(worker.ready), START_TIMEOUT_SECONDS)
            except (HegateError, TimeoutError) as exc:
                logger.error("replacement worker %d failed to start: %s", slot, exc)
                await asyncio.sleep(1.0)
                continue
            worker.accepting = True
            logger.info("worker %d replaced; reloading its %d key sets", slot, len(self._shards[slot]))
            await self._reload(worker)
            return

    async def _reload(self, worker: _Worker) -> None:
        """Load the slot's shard into ``worker``, including key sets registered meanwhile, until
        none is left or the worker dies (its own replacement then starts over)."""
        tried: set[str] = set()
        while todo := sorted(self._shards[worker.slot] - tried):
            for key_id in todo:
                tried.add(key_id)
                if worker.connection.closed:
                    return
                try:
                    await self._ensure(worker, key_id, functools.partial(self._fetch_keys, key_id))
                except NotFoundError:  # it left the store meanwhile
                    self._shards[worker.slot].discard(key_id)
                except HegateError as exc:
                    logger.warning("could not reload key %s into worker %d: %s", key_id, worker.slot, exc)
        logger.info("worker %d holds its shard again (%d key sets)", worker.slot, len(worker.loaded))


def _given(keys: StoredKeys) -> Fetch:
    """A fetch that returns keys already in hand (a registration's)."""

    async def fetch() -> StoredKeys:
        return keys

    return fetch


def _load_message(request_id: int, keys: StoredKeys, *, keep: bool) -> LoadKeys:
    return LoadKeys(
        request_id=request_id,
        key_id=keys.key_id,
        model=keys.model,
        version=keys.version,
        profile=keys.profile,
        relin=keys.relin,
        galois=keys.galois,
        public_key=keys.public_key,
        keep=keep,
    )
