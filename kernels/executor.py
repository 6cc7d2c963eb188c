"""Running a compiled model: one numba call per request, threads only where they pay.

The interpreter (:func:`_run_rows`) walks a :class:`~kernels.program.Program`'s operation table
and calls the kernels of :mod:`kernels.ops`. It is compiled once for every model (a program is
data, not code) and cached on disk (``cache=True``), so loading a second model, or restarting
the process, costs no compilation; :meth:`NumbaModel.load` runs a warm-up so that the first
request is as fast as the hundredth.

Threads: a batch is cut into chunks of rows that fit a workspace (so intermediate tensors stay
in cache), and each worker of a ``prange`` over workers runs the whole network on the chunks it
claims from a shared atomic counter. Claiming matters on a shared machine: with a static split,
a worker the OS schedules late (the other core busy with training) held half the batch and a
batch-64 MLP call took 8 ms instead of 0.1 ms. A parallel region still waits for every worker
to start (about 8 us to wake numba's pool here, milliseconds when the cores are taken), so a
batch runs on the calling thread alone unless each worker gets at least ``parallel_min_macs``
multiply-accumulates, and batch 1 never starts a thread. The thread count is explicit and per
model (``threads``), never numba's default of every core; where other processes keep the cores
busy, ``threads=1`` is the right setting.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange

from kernels import ops
from kernels.compiler import compile_file, compile_model
from kernels.plan import Plan
from kernels.program import (
    CONV_FIELDS,
    CONV_GEOMETRY,
    CONV_PIXEL_BLOCK,
    DEQUANTIZE_FIELDS,
    ELEMENTWISE_FIELDS,
    F_CODE,
    F_DST,
    F_SRC,
    GEMM_FIELDS,
    OP_CONV,
    OP_DEQUANTIZE,
    OP_ELEMENTWISE,
    OP_GEMM,
    OP_POOL,
    OP_QUANTIZE,
    POOL_FIELDS,
    POOL_GEOMETRY,
    QUANTIZE_FIELDS,
    Program,
    field,
    lower,
)
from kernels.simd import TILE_COLS, atomic_add
from models.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

WORKSPACE_BUDGET = 256 * 1024  # bytes of tensors per chunk: about half of this CPU's L2 per core
PARALLEL_MIN_MACS = 2_000_000  # work per worker (~25 us) below which a thread costs more than it gives
ONES = np.ones(16, np.int16)  # see kernels.simd: passed at run time so that LLVM cannot fold it
_FLOAT32 = np.dtype(np.float32)  # native byte order: other orders are refused, numba would misread them


# Operation-row columns, resolved once so that numba sees compile-time constants.
def _columns(names: tuple[str, ...]) -> dict[str, int]:
    return {name: field(names, name) for name in names}


_Q, _D, _E = _columns(QUANTIZE_FIELDS), _columns(DEQUANTIZE_FIELDS), _columns(ELEMENTWISE_FIELDS)
Q_FEATURES, Q_ZP, Q_SCALE = _Q["features"], _Q["zero_point"], _Q["scale"]
D_FEATURES, D_ZP, D_SCALE, D_LAYOUT, D_C, D_CS = (_D[k] for k in DEQUANTIZE_FIELDS)
E_FEATURES, E_ZX, E_ACT, E_AZ, E_AF = (_E[k] for k in ELEMENTWISE_FIELDS)
_G = _columns(GEMM_FIELDS)
G_KQ, G_N, G_NP, G_W, G_B, G_M, G_ZP, G_ACT, G_AZ, G_AF = (_G[k] for k in GEMM_FIELDS)
_C = _columns(CONV_FIELDS)
C_FIRST, C_KQ, C_NP = _C["in_channels"], _C["k_groups"], _C["n_padded"]
C_WEIGHTS, C_BIAS, C_MULT, C_GROUPS = _C["weights"], _C["bias"], _C["multiplier"], _C["group_offsets"]
C_ZX, C_ZP, C_ACT, C_AZ, C_AF = _C["input_zero"], _C["zero_point"], _C["act"], _C["act_zero"], _C["act_floats"]
_P = _columns(POOL_FIELDS)
P_FIRST, P_C, P_H, P_W, P_LAYOUT = _P["channels"], _P["channels"], _P["height"], _P["width"], _P["layout"]
P_GLOBAL, P_FLOATS, P_ZX, P_ZP = _P["is_global"], _P["floats"], _P["input_zero"], _P["zero_point"]


@njit(cache=True, nogil=True, boundscheck=False)
def _tensor(workspace, scratch, offsets, strides, tensor, rows):
    start = scratch + rows * offsets[tensor]
    return workspace[start : start + rows * strides[tensor]].reshape(rows, strides[tensor])


@njit(cache=True, nogil=True, boundscheck=False)
def _run_chunk(code, weights, ints, floats, offsets, strides, scratch, x, out, row0, rows, ws8, ws32, wsf, ones):
    """Run every operation of ``code`` on rows ``row0 .. row0 + rows`` of ``x`` into ``out``."""
    geometry = np.empty(CONV_GEOMETRY, np.int64)
    for i in range(code.shape[0]):
        op = code[i]
        kind = op[F_CODE]
        if kind == OP_QUANTIZE:
            dst = _tensor(ws8, scratch, offsets, strides, op[F_DST], rows)
            ops.quantize_rows(x[row0 : row0 + rows], dst, op[Q_FEATURES], floats[op[Q_SCALE]], op[Q_ZP])
            continue
        src = _tensor(ws8, scratch, offsets, strides, op[F_SRC], rows)
        if kind == OP_DEQUANTIZE:
            ops.dequantize_rows(
                src, out[row0 : row0 + rows], op[D_FEATURES], floats[op[D_SCALE]], op[D_ZP], op[D_LAYOUT], op[D_C],
                op[D_CS],
            )  # fmt: skip
            continue
        if kind == OP_GEMM and op[F_DST] < 0:  # the last layer, writing float logits
            kq, n, n_padded, w = op[G_KQ], op[G_N], op[G_NP], op[G_W]
            panels = (n_padded + TILE_COLS - 1) // TILE_COLS
            packed = weights[w : w + panels * kq * TILE_COLS * 4].reshape(panels, kq, TILE_COLS * 4)
            ops.gemm_rows_to_float(
                src, out[row0 : row0 + rows], packed, kq, n, n_padded, ints[op[G_B] : op[G_B] + n],
                floats[op[G_M] : op[G_M] + n], ws32[: 4 * n_padded].reshape(4, n_padded), ones,
            )  # fmt: skip
            continue
        dst = _tensor(ws8, scratch, offsets, strides, op[F_DST], rows)
        if kind == OP_GEMM:
            kq, n, n_padded, w, af = op[G_KQ], op[G_N], op[G_NP], op[G_W], op[G_AF]
            panels = (n_padded + TILE_COLS - 1) // TILE_COLS
            packed = weights[w : w + panels * kq * TILE_COLS * 4].reshape(panels, kq, TILE_COLS * 4)
            sums = ws32[: 4 * n_padded].reshape(4, n_padded)
            ops.gemm_rows(
                src, dst, packed, kq, n, n_padded, ints[op[G_B] : op[G_B] + n], floats[op[G_M] : op[G_M] + n],
                op[G_ZP], op[G_ACT], op[G_AZ], floats[af], floats[af + 1], sums, ones,
            )  # fmt: skip
        elif kind == OP_CONV:
            kq, n_padded, af = op[C_KQ], op[C_NP], op[C_AF]
            panels = (n_padded + TILE_COLS - 1) // TILE_COLS
            w = op[C_WEIGHTS]
            packed = weights[w : w + panels * kq * TILE_COLS * 4].reshape(panels, kq, TILE_COLS * 4)
            tiled = CONV_PIXEL_BLOCK * n_padded
            for j in range(CONV_GEOMETRY):
                geometry[j] = op[C_FIRST + j]
            ops.conv_rows(
                src, dst, packed, ints[op[C_BIAS] : op[C_BIAS] + tiled], floats[op[C_MULT] : op[C_MULT] + tiled],
                ints[op[C_GROUPS] : op[C_GROUPS] + kq], geometry, op[C_ZX], op[C_ZP], op[C_ACT], op[C_AZ],
                floats[af], floats[af + 1], ws8[:scratch], ws32, ones,
            )  # fmt: skip
        elif kind == OP_POOL:
            fo = op[P_FLOATS]
            if op[P_GLOBAL]:
                size = op[P_H] * op[P_W]
                ops.global_pool_rows(src, dst, op[P_LAYOUT], op[P_C], size, op[P_ZX], floats[fo], op[P_ZP])
            else:
                for j in range(POOL_GEOMETRY):
                    geometry[j] = op[P_FIRST + j]
                ops.pool_rows(src, dst, geometry, floats[fo], op[P_ZX], floats[fo + 1], op[P_ZP], wsf)
        elif kind == OP_ELEMENTWISE:
            af = op[E_AF]
            ops.elementwise_rows(src, dst, op[E_FEATURES], op[E_ZX], op[E_ACT], op[E_AZ], floats[af], floats[af + 1])


@njit(cache=True, nogil=True, boundscheck=False)
def _run_rows(code, weights, ints, floats, offsets, strides, scratch, x, out, begin, end, chunk, ws8, ws32, wsf, ones):
    for row0 in range(begin, end, chunk):
        rows = min(chunk, end - row0)
        _run_chunk(code, weights, ints, floats, offsets, strides, scratch, x, out, row0, rows, ws8, ws32, wsf, ones)


@njit(cache=True, nogil=True, boundscheck=False)
def run_serial(code, weights, ints, floats, offsets, strides, scratch, x, out, chunk, ws8, ws32, wsf, ones):
    """The whole batch on the calling thread, one chunk at a time in workspace row 0."""
    _run_rows(
        code, weights, ints, floats, offsets, strides, scratch, x, out, 0, x.shape[0], chunk, ws8[0], ws32[0], wsf[0],
        ones,
    )  # fmt: skip


@njit(cache=True, nogil=True, boundscheck=False)
def _run_claimed(code, weights, ints, floats, offsets, strides, scratch, x, out, chunk, counter, ws8, ws32, wsf, ones):
    """Run chunks claimed one at a time from a shared atomic counter until none is left."""
    n = x.shape[0]
    chunks = (n + chunk - 1) // chunk
    while True:
        c = atomic_add(counter, 0, 1)
        if c >= chunks:
            return
        row0 = c * chunk
        rows = min(chunk, n - row0)
        _run_chunk(code, weights, ints, floats, offsets, strides, scratch, x, out, row0, rows, ws8, ws32, wsf, ones)


@njit(cache=True, nogil=True, boundscheck=False, parallel=True)
def run_parallel(code, weights, ints, floats, offsets, strides, scratch, x, out, chunk, counter, ws8, ws32, wsf, ones):
    """One prange iteration per worker (each with its own workspace row); the workers claim chunks
    dynamically, so a worker the OS schedules late finds the work done instead of holding half of it."""
    for w in prange(ws8.shape[0]):
        _run_claimed(
            code, weights, ints, floats, offsets, strides, scratch, x, out, chunk, counter, ws8[w], ws32[w], wsf[w],
            ones,
        )  # fmt: skip


def _compiled_entry(dispatcher):
    """The compiled wrapper of a dispatcher's only overload, or the dispatcher itself.

    Calling it skips numba's per-call type dispatch (about 0.6 us of a 5 us batch-1 call); safe
    here because every call passes the same argument types, which predict_logits guarantees.
    """
    overloads = getattr(dispatcher, "overloads", {})
    if len(overloads) != 1:
        return dispatcher
    return getattr(next(iter(overloads.values())), "entry_point", dispatcher)


class _Workspaces:
    """Scratch buffers per calling thread, so that concurrent requests never share them.

    Keyed by ``threading.get_ident()`` (a dict lookup costs less than a ``threading.local``
    attribute on the batch-1 path); a finished thread's buffers pass to the next thread that
    receives its identifier, never to two live threads at once.
    """

    def __init__(self, scratch_i32: int, scratch_f32: int) -> None:
        self.scratch_i32, self.scratch_f32 = scratch_i32, scratch_f32
        self.by_thread: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def get(self, workers: int, u8: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        buffers = self.by_thread.get(threading.get_ident())
        if buffers is None or buffers[0].shape[0] < workers or buffers[0].shape[1] < u8:
            have = buffers[0].shape if buffers is not None else (0, 0)
            workers = max(workers, have[0])
            buffers = (
                np.zeros((workers, max(u8, have[1])), np.uint8),
                np.zeros((workers, self.scratch_i32), np.int32),
                np.zeros((workers, self.scratch_f32), np.float32),
            )
            self.by_thread[threading.get_ident()] = buffers
        return buffers


class NumbaModel:
    """An int8 ONNX model compiled to the numba kernels, with onnxruntime's exact logits.

    Build it with :meth:`load` (a ``model.onnx`` path) or :meth:`from_onnx`; both compile the
    graph, check that every operator is supported and warm the kernels up.

    >>> model = NumbaModel.load(artifact.onnx_path, threads=1)  # doctest: +SKIP
    >>> model.predict_logits(x).shape  # x: float32 [batch, *input_shape]  # doctest: +SKIP
    (batch, classes)

    Args:
        plan: the compiled graph (see :func:`kernels.compiler.compile_model`).
        threads: most threads one call uses (1 = never start a parallel region).
        parallel_min_macs: work a worker must get before a batch is split across threads.
        name: for logs.

    Raises:
        InvalidArgumentError: ``threads`` outside ``1 .. numba.config.NUMBA_NUM_THREADS``.
        UnsupportedModelError: weights outside the kernels' exact range (see :mod:`kernels.program`).
    """

    backend = "numba"

    def __init__(
        self, plan: Plan, *, threads: int = 1, parallel_min_macs: int = PARALLEL_MIN_MACS, name: str = "model"
    ) -> None:
        if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
            raise InvalidArgumentError(
                f"threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} (numba's pool), got {threads}"
            )
        program = lower(plan)
        self.plan = plan
        self.program: Program = program
        self.threads = threads
        self.name = name
        self.input_shape = tuple(plan.input_shape)
        self.num_outputs = plan.num_outputs
        self.warmup_seconds = 0.0
        self._workspaces = _Workspaces(program.scratch_i32, program.scratch_f32)
        # Everything a call needs, computed once: a batch-1 call is a few microseconds.
        self._rows_per_worker = max(1, math.ceil(parallel_min_macs / max(1, program.macs_per_sample)))
        self._parallel_batch = 2 * self._rows_per_worker if threads > 1 else sys.maxsize
        self._scratch_u8 = program.scratch_u8
        self._bytes_per_sample = program.bytes_per_sample
        self._max_chunk = max(1, WORKSPACE_BUDGET // max(1, self._bytes_per_sample))
        self._program_args = (
            program.ops, program.weights, program.ints, program.floats, program.tensor_offsets,
            program.tensor_strides, program.scratch_u8,
        )  # fmt: skip
        self._serial = run_serial

    @classmethod
    def load(cls, path: Path, *, threads: int = 1, warm_up: bool = True) -> NumbaModel:
        """Compile ``path`` (a ``model.onnx``) and warm the kernels up.

        Raises:
            ModelArtifactError: the file cannot be read as ONNX.
            UnsupportedModelError: the graph uses something the kernels do not implement.
            InvalidArgumentError: ``threads`` outside numba's thread pool.
        """
        model = cls(compile_file(Path(path)), threads=threads, name=str(path))
        if warm_up:
            model.warm_up()
        return model

    @classmethod
    def from_onnx(cls, onnx_model, *, threads: int = 1, warm_up: bool = True) -> NumbaModel:
        """Like :meth:`load`, from an in-memory ``onnx.ModelProto``."""
        model = cls(compile_model(onnx_model), threads=threads, name=onnx_model.graph.name or "model")
        if warm_up:
            model.warm_up()
        return model

    def warm_up(self) -> float:
        """Run the single-thread path and, with ``threads > 1``, the parallel one, so that the
        first request finds the machine code compiled (or loaded from the disk cache) and
        numba's thread pool started.

        Returns the seconds it took, also kept in :attr:`warmup_seconds`.
        """
        start = time.perf_counter()
        self.predict_logits(np.zeros((1, *self.input_shape), np.float32))
        self._serial = _compiled_entry(run_serial)
        if self.threads > 1:
            self.predict_logits(np.zeros((self._rows_per_worker * self.threads, *self.input_shape), np.float32))
        self.warmup_seconds = time.perf_counter() - start
        logger.info("numba kernels ready for %s in %.2f s", self.name, self.warmup_seconds)
        return self.warmup_seconds

    def schedule(self, batch: int) -> tuple[int, int]:
        """(workers, rows per chunk) for a batch: one worker unless each gets enough work; with
        several, about four chunks per worker (claimed dynamically) and no chunk below the work
        that pays for a claim."""
        workers = max(1, min(self.threads, batch // self._rows_per_worker))
        if workers == 1:
            chunk = min(batch, self._max_chunk)
        else:
            chunk = min(max(-(-batch // (4 * workers)), self._rows_per_worker // 2), self._max_chunk)
        if chunk >= 8:
            chunk -= chunk % 4  # whole 4-row tiles in the dense layers
        return workers, max(1, chunk)

    def predict_logits(self, x: np.ndarray) -> np.ndarray:
        """Float32 logits ``[batch, classes]`` for normalized float32 inputs ``[batch, *input_shape]``.

        Results for one sample never depend on the rest of its batch.

        Raises:
            InvalidArgumentError: ``x`` is not a float32 array of shape ``[batch, *input_shape]``.
        """
        if not isinstance(x, np.ndarray) or x.dtype != _FLOAT32 or x.shape[1:] != self.input_shape:
            raise InvalidArgumentError(
                f"inputs must be a float32 array of shape [batch, {', '.join(map(str, self.input_shape))}], "
                f"got {type(x).__name__} {getattr(x, 'dtype', '')} {list(getattr(x, 'shape', []))}"
            )
        batch = x.shape[0]
        out = np.empty((batch, self.num_outputs), np.float32)
        if batch == 0:
            return out
        flat = (x if x.flags.c_contiguous else np.ascontiguousarray(x)).reshape(batch, -1)
        # Always a read-only view (free): writable and read-only inputs (np.frombuffer of a request)
        # then share one compiled signature instead of compiling a second one at request time.
        flat.flags.writeable = False
        if batch < self._parallel_batch:  # the common small-batch path, inlined
            workers, chunk = 1, min(batch, self._max_chunk)
        else:
            workers, chunk = self.schedule(batch)
        ws8, ws32, wsf = self._workspaces.get(workers, self._scratch_u8 + chunk * self._bytes_per_sample)
        if workers == 1:
            self._serial(*self._program_args, flat, out, chunk, ws8, ws32, wsf, ONES)
        else:
            numba.set_num_threads(workers)
            counter = np.zeros(1, np.int64)
            run_parallel(
                *self._program_args, flat, out, chunk, counter, ws8[:workers], ws32[:workers], wsf[:workers], ONES
            )
        return out

    def describe(self) -> list[str]:
        """One line per step of the plan."""
        return self.plan.describe()
