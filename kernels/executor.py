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

Instruction sets: every call passes the ISA code of :mod:`kernels.isa`, which the entry points
(``run_serial``, ``run_parallel``) force numba to compile as a literal (``literally``): each ISA
gets its own specialization of the whole interpreter, with the other ISA's branches pruned
before code generation, so a CPU compiles (and caches, under its own signature) only the tiles
it runs. :meth:`NumbaModel.predict_logits` then calls the compiled entry point of its ISA's
specialization directly.

16-bit activations (A16W8 models): operations that read or write a uint16 tensor have opcodes
of their own (``OP_QUANTIZE16`` and up, see :mod:`kernels.program`), which :func:`_run_chunk`
hands to :func:`_run_wide`. Whether a program has any is a second literal, ``wide`` (0 or 1),
compiled like the ISA and resolved when numba types the interpreter (:func:`_ran_wide`): a
uint8 model runs an interpreter without any 16-bit code, as fast to compile and to run as
before 16-bit tensors existed, and only a model with uint16 tensors compiles (and caches) the
one that has it. A uint16 tensor lives in the same uint8 workspace, two bytes a value, viewed as
uint16 rows. A dense layer from uint8 to uint16 runs the same tiles as the uint8 one (on either
ISA) with a 16-bit epilogue; one from uint16 runs a plain loop of exact integer products. Those
layers are exact-integer, not bit-identical to onnxruntime, which runs them in float32 with a
summation order of its own (see :mod:`kernels.arithmetic`); their results still never depend on
the ISA, the thread count or the batch, since exact integer sums have no order.

Reference counts: numba increments and decrements the count of every array argument of every
call, and of every view, with an atomic operation through a function call; the interpreter
hands a dozen arrays down to every operation, which cost about 0.5 us of a 3 us batch-1 call.
The entry points pass :func:`~kernels.simd.borrowed` views instead (no count), which is safe
because the caller holds every array for the whole call and nothing keeps a view beyond it.
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
from numba import literally, njit, prange, types
from numba.extending import overload

from kernels import isa as kernel_isa
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
    GEMM16_FIELDS,
    GEMM_FIELDS,
    GEMM_SUM_ROWS,
    NCHW,
    OP_CONV,
    OP_DEQUANTIZE,
    OP_DEQUANTIZE16,
    OP_ELEMENTWISE,
    OP_GEMM,
    OP_GEMM16,
    OP_GEMM_TO16,
    OP_POOL,
    OP_QUANTIZE,
    OP_QUANTIZE16,
    OP_SQUARE16,
    POOL_FIELDS,
    POOL_GEOMETRY,
    QUANTIZE_FIELDS,
    Program,
    field,
    lower,
)
from kernels.simd import TILE_COLS, atomic_add, borrowed
from models.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

WORKSPACE_BUDGET = 256 * 1024  # bytes of tensors per chunk: about half of this CPU's L2 per core
PARALLEL_MIN_MACS = 2_000_000  # work per worker (~25 us on AVX2 tiles, ~5 on VNNI) below which a thread doesn't pay
ONES = np.ones(16, np.int16)  # see kernels.simd: passed at run time so that LLVM cannot fold it
WIDE = 1  # the ``wide`` literal of a program with 16-bit operations (0: none)
_get_ident = threading.get_ident
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
_H = _columns(GEMM16_FIELDS)
H_K, H_N, H_W, H_B, H_M, H_ZX, H_ZP, H_ACT, H_AZ, H_AF = (_H[k] for k in GEMM16_FIELDS)
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
def _tensor16(workspace, scratch, offsets, strides, tensor, rows):
    """A uint16 tensor's rows: its bytes in the uint8 workspace (offsets are multiples of 4), viewed as uint16."""
    start = scratch + rows * offsets[tensor]
    return workspace[start : start + rows * strides[tensor]].view(np.uint16).reshape(rows, strides[tensor] // 2)


@njit(inline="always")
def _packed(weights, w, kq, n_padded):
    """The weight panels of a Gemm or Conv at ``w``: [panels, kq, TILE_COLS * 4] int8, as packed."""
    panels = (n_padded + TILE_COLS - 1) // TILE_COLS
    return weights[w : w + panels * kq * TILE_COLS * 4].reshape(panels, kq, TILE_COLS * 4)


@njit(cache=True, nogil=True, boundscheck=False)
def _run_wide(op, weights, ints, floats, offsets, strides, scratch, x, out, row0, rows, ws8, ws32, ones, isa):
    """One operation that reads or writes a uint16 tensor (opcodes ``OP_QUANTIZE16`` and up)."""
    kind = op[F_CODE]
    if kind == OP_QUANTIZE16:
        dst = _tensor16(ws8, scratch, offsets, strides, op[F_DST], rows)
        ops.quantize16_rows(x[row0 : row0 + rows], dst, op[Q_FEATURES], floats[op[Q_SCALE]], op[Q_ZP])
        return
    if kind == OP_GEMM_TO16:  # uint8 input: the packed panels and tiles of OP_GEMM
        src8 = _tensor(ws8, scratch, offsets, strides, op[F_SRC], rows)
        dst = _tensor16(ws8, scratch, offsets, strides, op[F_DST], rows)
        kq, n, n_padded, w, af = op[G_KQ], op[G_N], op[G_NP], op[G_W], op[G_AF]
        packed = _packed(weights, w, kq, n_padded)
        sums = ws32[: GEMM_SUM_ROWS * n_padded].reshape(GEMM_SUM_ROWS, n_padded)
        ops.gemm_rows_to16(
            src8, dst, packed, kq, n, n_padded, ints[op[G_B] : op[G_B] + n], floats[op[G_M] : op[G_M] + n],
            op[G_ZP], op[G_ACT], op[G_AZ], floats[af], floats[af + 1], sums, ones, isa,
        )  # fmt: skip
        return
    src = _tensor16(ws8, scratch, offsets, strides, op[F_SRC], rows)
    if kind == OP_DEQUANTIZE16:
        ops.dequantize_rows(src, out[row0 : row0 + rows], op[D_FEATURES], floats[op[D_SCALE]], op[D_ZP], NCHW, 1, 1)
    elif kind == OP_GEMM16:
        k, n, w, af = op[H_K], op[H_N], op[H_W], op[H_AF]
        matrix = weights[w : w + n * k].reshape(n, k)
        bias, multiplier = ints[op[H_B] : op[H_B] + n], floats[op[H_M] : op[H_M] + n]
        if op[F_DST] < 0:  # the last layer, writing float logits
            ops.gemm16_rows_to_float(src, out[row0 : row0 + rows], matrix, bias, multiplier, op[H_ZX], ws32)
        else:
            dst = _tensor16(ws8, scratch, offsets, strides, op[F_DST], rows)
            ops.gemm16_rows(
                src, dst, matrix, bias, multiplier, op[H_ZX], op[H_ZP], op[H_ACT], op[H_AZ], floats[af],
                floats[af + 1], ws32,
            )  # fmt: skip
    elif kind == OP_SQUARE16:
        dst = _tensor16(ws8, scratch, offsets, strides, op[F_DST], rows)
        af = op[E_AF]
        ops.square16_rows(src, dst, op[E_FEATURES], op[E_ZX], op[E_AZ], floats[af], floats[af + 1])


def _ran_wide(op, weights, ints, floats, offsets, strides, scratch, x, out, row0, rows, ws8, ws32, ones, wide, isa):
    """Run ``op`` if it is a 16-bit operation and say whether it was (only ever called compiled)."""
    raise NotImplementedError


@overload(_ran_wide, prefer_literal=True, inline="always")
def _ran_wide_typed(
    op, weights, ints, floats, offsets, strides, scratch, x, out, row0, rows, ws8, ws32, ones, wide, isa
):
    """Chosen at typing time from the literal ``wide``: for a uint8 program, a constant False, so that
    :func:`_run_wide` and its kernels are never even compiled into its interpreter (a branch on the
    literal would still be typed, and compiled, before LLVM dropped it)."""
    if not isinstance(wide, types.IntegerLiteral):
        return None  # numba retries with the literal
    if wide.literal_value != WIDE:

        def uint8_only(
            op, weights, ints, floats, offsets, strides, scratch, x, out, row0, rows, ws8, ws32, ones, wide, isa
        ):
            return False

        return uint8_only

    def run(op, weights, ints, floats, offsets, strides, scratch, x, out, row0, rows, ws8, ws32, ones, wide, isa):
        if op[F_CODE] < OP_QUANTIZE16:
            return False
        _run_wide(op, weights, ints, floats, offsets, strides, scratch, x, out, row0, rows, ws8, ws32, ones, isa)
        return True

    return run


@njit(cache=True, nogil=True, boundscheck=False)
def _run_chunk(
    code, weights, ints, floats, offsets, strides, scratch, x, out, row0, rows, ws8, ws32, wsf, ones, wide, isa
):
    """Run every operation of ``code`` on rows ``row0 .. row0 + rows`` of ``x`` into ``out``.

    ``wide`` (a literal): whether ``code`` may hold 16-bit operations; if not, :func:`_ran_wide` is
    the constant False and the loop is the uint8 interpreter alone.
    """
    for i in range(code.shape[0]):
        op = code[i]
        kind = op[F_CODE]
        if _ran_wide(
            op, weights, ints, floats, offsets, strides, scratch, x, out, row0, rows, ws8, ws32, ones, wide, isa
        ):
            continue
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
            packed = _packed(weights, w, kq, n_padded)
            sums = ws32[: GEMM_SUM_ROWS * n_padded].reshape(GEMM_SUM_ROWS, n_padded)
            ops.gemm_rows_to_float(
                src, out[row0 : row0 + rows], packed, kq, n, n_padded, ints[op[G_B] : op[G_B] + n],
                floats[op[G_M] : op[G_M] + n], sums, ones, isa,
            )  # fmt: skip
            continue
        dst = _tensor(ws8, scratch, offsets, strides, op[F_DST], rows)
        if kind == OP_GEMM:
            kq, n, n_padded, w, af = op[G_KQ], op[G_N], op[G_NP], op[G_W], op[G_AF]
            packed = _packed(weights, w, kq, n_padded)
            sums = ws32[: GEMM_SUM_ROWS * n_padded].reshape(GEMM_SUM_ROWS, n_padded)
            ops.gemm_rows(
                src, dst, packed, kq, n, n_padded, ints[op[G_B] : op[G_B] + n], floats[op[G_M] : op[G_M] + n],
                op[G_ZP], op[G_ACT], op[G_AZ], floats[af], floats[af + 1], sums, ones, isa,
            )  # fmt: skip
        elif kind == OP_CONV:
            kq, n_padded, af = op[C_KQ], op[C_NP], op[C_AF]
            packed = _packed(weights, op[C_WEIGHTS], kq, n_padded)
            tiled = CONV_PIXEL_BLOCK * n_padded
            geometry = op[C_FIRST : C_FIRST + CONV_GEOMETRY]  # a view: no allocation per call
            ops.conv_rows(
                src, dst, packed, ints[op[C_BIAS] : op[C_BIAS] + tiled], floats[op[C_MULT] : op[C_MULT] + tiled],
                ints[op[C_GROUPS] : op[C_GROUPS] + kq], geometry, op[C_ZX], op[C_ZP], op[C_ACT], op[C_AZ],
                floats[af], floats[af + 1], ws8[:scratch], ws32, ones, isa,
            )  # fmt: skip
        elif kind == OP_POOL:
            fo = op[P_FLOATS]
            if op[P_GLOBAL]:
                size = op[P_H] * op[P_W]
                ops.global_pool_rows(src, dst, op[P_LAYOUT], op[P_C], size, op[P_ZX], floats[fo], op[P_ZP])
            else:
                geometry = op[P_FIRST : P_FIRST + POOL_GEOMETRY]
                ops.pool_rows(src, dst, geometry, floats[fo], op[P_ZX], floats[fo + 1], op[P_ZP], wsf)
        elif kind == OP_ELEMENTWISE:
            af = op[E_AF]
            ops.elementwise_rows(src, dst, op[E_FEATURES], op[E_ZX], op[E_ACT], op[E_AZ], floats[af], floats[af + 1])


@njit(inline="always")
def _run_rows(
    code, weights, ints, floats, offsets, strides, scratch, x, out, begin, end, chunk, ws8, ws32, wsf, ones, wide, isa
):
    for row0 in range(begin, end, chunk):
        rows = min(chunk, end - row0)
        _run_chunk(
            code, weights, ints, floats, offsets, strides, scratch, x, out, row0, rows, ws8, ws32, wsf, ones, wide,
            isa,
        )  # fmt: skip


@njit(cache=True, nogil=True, boundscheck=False)
def run_serial(code, weights, ints, floats, offsets, strides, scratch, x, out, chunk, ws8, ws32, wsf, ones, wide, isa):
    """The whole batch on the calling thread, one chunk at a time in workspace row 0.

    ``wide`` and ``isa`` are compiled as literals (see the module docstring): called from Python
    with plain ints, numba retypes the function on every call; :class:`NumbaModel` calls the
    entry point.
    """
    _run_rows(
        borrowed(code), borrowed(weights), borrowed(ints), borrowed(floats), borrowed(offsets), borrowed(strides),
        scratch, borrowed(x), borrowed(out), 0, x.shape[0], chunk, borrowed(ws8[0]), borrowed(ws32[0]),
        borrowed(wsf[0]), borrowed(ones), literally(wide), literally(isa),
    )  # fmt: skip


@njit(cache=True, nogil=True, boundscheck=False)
def _run_claimed(
    code, weights, ints, floats, offsets, strides, scratch, x, out, chunk, counter, ws8, ws32, wsf, ones, wide, isa
):
    """Run chunks claimed one at a time from a shared atomic counter until none is left."""
    n = x.shape[0]
    chunks = (n + chunk - 1) // chunk
    code, weights, ints, floats, offsets, strides, x, out, ws8, ws32, wsf, ones = (
        borrowed(code), borrowed(weights), borrowed(ints), borrowed(floats), borrowed(offsets), borrowed(strides),
        borrowed(x), borrowed(out), borrowed(ws8), borrowed(ws32), borrowed(wsf), borrowed(ones),
    )  # fmt: skip
    while True:
        c = atomic_add(counter, 0, 1)
        if c >= chunks:
            return
        row0 = c * chunk
        rows = min(chunk, n - row0)
        _run_chunk(
            code, weights, ints, floats, offsets, strides, scratch, x, out, row0, rows, ws8, ws32, wsf, ones, wide,
            isa,
        )  # fmt: skip


@njit(cache=True, nogil=True, boundscheck=False, parallel=True)
def run_parallel(
    code, weights, ints, floats, offsets, strides, scratch, x, out, chunk, counter, ws8, ws32, wsf, ones, wide, isa
):
    """One prange iteration per worker (each with its own workspace row); the workers claim chunks
    dynamically, so a worker the OS schedules late finds the work done instead of holding half of it."""
    for w in prange(ws8.shape[0]):
        _run_claimed(
            code, weights, ints, floats, offsets, strides, scratch, x, out, chunk, counter, ws8[w], ws32[w], wsf[w],
            ones, literally(wide), literally(isa),
        )  # fmt: skip


def _compiled_entry(dispatcher, args: tuple):
    """The compiled wrapper of ``dispatcher``'s overload for ``args`` (whose last two, the ``wide`` flag
    and the ISA code, were compiled as literals), or None if there is none.

    Calling it skips numba's per-call type dispatch (about 0.6 us of a 5 us batch-1 call) and,
    with the ISA an int rather than a literal, a retyping on every call; safe here because every
    call passes the same argument types, which predict_logits guarantees.
    """
    signature = (*(dispatcher.typeof_pyval(a) for a in args[:-2]), types.literal(args[-2]), types.literal(args[-1]))
    overload = dispatcher.overloads.get(signature)
    return overload.entry_point if overload is not None else None


class _Workspaces:
    """Scratch buffers per calling thread, so that concurrent requests never share them.

    Keyed by ``threading.get_ident()`` (a dict lookup costs less than a ``threading.local``
    attribute on the batch-1 path); a finished thread's buffers pass to the next thread that
    receives its identifier, never to two live threads at once.
    """

    def __init__(self, scratch_i32: int, scratch_f32: int) -> None:
        self.scratch_i32, self.scratch_f32 = scratch_i32, scratch_f32
        # (uint8, int32, float32 buffers, workers, uint8 bytes per worker): the sizes kept as ints,
        # since comparing them costs less than reading an array's shape on every call
        self.by_thread: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray, int, int]] = {}

    def get(self, workers: int, u8: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        buffers = self.by_thread.get(_get_ident())
        if buffers is None or buffers[3] < workers or buffers[4] < u8:
            workers = max(workers, buffers[3] if buffers is not None else 0)
            u8 = max(u8, buffers[4] if buffers is not None else 0)
            buffers = (
                np.zeros((workers, u8), np.uint8),
                np.zeros((workers, self.scratch_i32), np.int32),
                np.zeros((workers, self.scratch_f32), np.float32),
                workers,
                u8,
            )
            self.by_thread[_get_ident()] = buffers
        return buffers


class NumbaModel:
    """An int8 ONNX model compiled to the numba kernels, with onnxruntime's exact logits.

    (For an A16W8 model, the exact-integer logits of :mod:`kernels.arithmetic`'s 16-bit rules,
    within float32 rounding of onnxruntime's; :attr:`plan` ``.has_16_bit`` tells which.)

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
        isa: ``"avx2"`` or ``"vnni"`` tiles; by default ``$HEGATE_KERNELS_ISA``, else the fastest
            this CPU runs (see :mod:`kernels.isa`). Kept in :attr:`isa`.

    Raises:
        InvalidArgumentError: ``threads`` outside ``1 .. numba.config.NUMBA_NUM_THREADS``, or an
            ``isa`` this CPU cannot run.
        UnsupportedModelError: weights outside the kernels' exact range (see :mod:`kernels.program`).
    """

    backend = "numba"

    def __init__(
        self,
        plan: Plan,
        *,
        threads: int = 1,
        parallel_min_macs: int = PARALLEL_MIN_MACS,
        name: str = "model",
        isa: str | None = None,
    ) -> None:
        if not 1 <= threads <= numba.config.NUMBA_NUM_THREADS:
            raise InvalidArgumentError(
                f"threads must be between 1 and {numba.config.NUMBA_NUM_THREADS} (numba's pool), got {threads}"
            )
        self.isa = kernel_isa.select(isa)
        self._isa_code = kernel_isa.NAMES[self.isa]
        self._wide = WIDE if plan.has_16_bit else 0  # the interpreter with 16-bit operations, or without
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
        self._serial = self._parallel = None  # compiled entry points, found by the first call of each

    @classmethod
    def load(cls, path: Path, *, threads: int = 1, warm_up: bool = True, isa: str | None = None) -> NumbaModel:
        """Compile ``path`` (a ``model.onnx``) and warm the kernels up.

        Raises:
            ModelArtifactError: the file cannot be read as ONNX.
            UnsupportedModelError: the graph uses something the kernels do not implement.
            InvalidArgumentError: ``threads`` outside numba's thread pool, or an ``isa`` this CPU cannot run.
        """
        model = cls(compile_file(Path(path)), threads=threads, name=str(path), isa=isa)
        if warm_up:
            model.warm_up()
        return model

    @classmethod
    def from_onnx(cls, onnx_model, *, threads: int = 1, warm_up: bool = True, isa: str | None = None) -> NumbaModel:
        """Like :meth:`load`, from an in-memory ``onnx.ModelProto``."""
        model = cls(compile_model(onnx_model), threads=threads, name=onnx_model.graph.name or "model", isa=isa)
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
        if batch < self._parallel_batch:  # the common small-batch path, inlined
            workers, chunk = 1, min(batch, self._max_chunk)
        else:
            workers, chunk = self.schedule(batch)
        ws8, ws32, wsf, _, _ = self._workspaces.get(workers, self._scratch_u8 + chunk * self._bytes_per_sample)
        if workers == 1:
            if self._serial is not None:  # the compiled entry point (see _compiled_entry)
                self._serial(*self._program_args, flat, out, chunk, ws8, ws32, wsf, ONES, self._wide, self._isa_code)
                return out
            dispatcher = run_serial
            args = (*self._program_args, flat, out, chunk, ws8, ws32, wsf, ONES, self._wide, self._isa_code)
        else:
            numba.set_num_threads(workers)
            counter = np.zeros(1, np.int64)
            args = (
                *self._program_args, flat, out, chunk, counter, ws8[:workers], ws32[:workers], wsf[:workers], ONES,
                self._wide, self._isa_code,
            )  # fmt: skip
            if self._parallel is not None:
                self._parallel(*args)
                return out
            dispatcher = run_parallel
        # First call (warm_up): through the dispatcher, with a read-only view so that writable and
        # read-only inputs (np.frombuffer of a request) share one compiled signature; the entry
        # point found then takes a writable array as well (same data model), without the 0.3 us
        # of setting the flag on every call.
        flat.flags.writeable = False
        dispatcher(*args)
        entry = _compiled_entry(dispatcher, args)
        if workers == 1:
            self._serial = entry
        else:
            self._parallel = entry
        return out

    def describe(self) -> list[str]:
        """One line per step of the plan."""
        return self.plan.describe()
