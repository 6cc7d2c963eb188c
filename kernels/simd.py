"""uint8 x int8 -> int32 register tiles, written as LLVM IR that x86 lowers to ``vpmaddubsw``.

Why not plain numba loops: numba's loop vectorizer widens an int8 dot product to 32-bit lanes and
multiplies with ``vpmaddwd`` on half-empty registers (about 35 GMAC/s on this machine's AVX2
core), and a hand-blocked int16 ``vpmaddwd`` kernel reached about 70 GMAC/s. onnxruntime's
AVX2 kernels do better with ``vpmaddubsw`` (32 uint8 x int8 products summed in pairs into
int16) followed by ``vpmaddwd`` against a vector of ones (pairs of int16 summed into int32).
The tiles below emit exactly that computation in portable IR, which the X86 backend matches
to those two instructions: about 90 GMAC/s per core here. On other targets the same IR
compiles to correct, slower code.

Exactness: ``vpmaddubsw`` saturates its int16 pair sums, and the IR spells the saturation out
(``smax``/``smin``) so that its meaning never depends on the instruction chosen. A pair sum
saturates only if ``255 * (|w0| + |w1|) > 32767``; the compiler admits only weights whose
adjacent pairs satisfy ``|w0| + |w1| <= 128`` (every hegate model: weights are 7-bit, see
``models/quantization.py``), so the tiles compute the exact integer products.

The vector of ones is an argument (``ones``, int16[16] of 1) rather than a constant: LLVM
would fold a multiplication by a constant 1 away, and with it the pattern that ``vpmaddwd``
is matched from.

A tile computes ``rows`` (1-4) rows of the uint8 operand against 16 (``x16``) or 8 (``x8``)
columns of the int8 operand, summed over ``nkq`` groups of four k:

* direct tiles (dense layers) read four consecutive k of row ``r`` at ``bcast[r, 4 * kq]``;
* indirect tiles (convolutions) read them at ``plane[bases[r] + groups[kq]]``: each output
  pixel's base offset into the padded input image plus each group's offset in the receptive
  field. That is im2col without the copy (the "indirect convolution" of MLAS and XNNPACK);
* ``vec`` [nkq, >= 4 * (c0 + columns)] int8: row ``kq`` holds, for each column, its four k;
* ``out`` int32: ``out[cr0 + i, cc0 + j] = sum_k a[r0 + i, k] * vec[k, c0 + j]``.

Four consecutive k are loaded as one i32 and splat to every lane (``vpbroadcastd``); loading a
``<4 x i8>`` and shuffling instead lets LLVM fold the even/odd split that ``vpmaddubsw`` is
matched from. Nothing is bounds-checked here; the callers in :mod:`kernels.ops` size every
buffer.

:func:`accumulate_dequantized` is the average pool's inner loop, written here for the same
reason: numba's vectorizer adds alias checks and a scalar remainder to every 8-to-40-element
channel loop, which cost more than the loop itself.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

TILE_ROWS = 4  # rows of the uint8 operand per tile
TILE_COLS = 16  # columns of the int8 operand per wide tile; a narrow tile covers 8
COLUMN_ALIGN = 8  # packed weights have a multiple of 8 columns
K_GROUP = 4  # k values per 32-bit broadcast lane

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32 = ir.FloatType()
_V32I8 = ir.VectorType(_I8, 32)
_V8I8 = ir.VectorType(_I8, 8)
_V16I16 = ir.VectorType(_I16, 16)
_V16I32 = ir.VectorType(_I32, 16)
_V8I32 = ir.VectorType(_I32, 8)
_V8F32 = ir.VectorType(_F32, 8)


def _i64(value: int) -> ir.Constant:
    return ir.Constant(_I64, value)


def _mask(values: list[int]) -> ir.Constant:
    return ir.Constant(ir.VectorType(_I32, len(values)), values)


_EVEN16, _ODD16 = _mask(list(range(0, 32, 2))), _mask(list(range(1, 32, 2)))
_EVEN8, _ODD8 = _mask(list(range(0, 16, 2))), _mask(list(range(1, 16, 2)))
_SPLAT8 = _mask([0] * 8)
_INT16_MIN = ir.Constant(_V16I32, [-32768] * 16)
_INT16_MAX = ir.Constant(_V16I32, [32767] * 16)


class _Args:
    """Typed access to an intrinsic's arguments by name."""

    def __init__(self, context, builder, signature, args, names: tuple[str, ...]) -> None:
        self.context, self.builder = context, builder
        self.values = dict(zip(names, args, strict=True))
        self.types = dict(zip(names, signature.args, strict=True))

    def array(self, name: str):
        return self.context.make_array(self.types[name])(self.context, self.builder, self.values[name])

    def int64(self, name: str) -> ir.Value:
        return self.context.cast(self.builder, self.values[name], self.types[name], types.int64)

    def float32(self, name: str) -> ir.Value:
        return self.context.cast(self.builder, self.values[name], self.types[name], types.float32)


def _bytes(builder, array) -> ir.Value:
    return builder.bitcast(array.data, _I8.as_pointer())


def _emit_tile(builder, a: _Args, *, rows: int, vectors: int, indirect: bool):
    vec, out, ones_arr = a.array("vec"), a.array("out"), a.array("ones")
    r0, c0, nkq, cr0, cc0 = a.int64("r0"), a.int64("c0"), a.int64("nkq"), a.int64("cr0"), a.int64("cc0")
    if indirect:
        plane, bases, groups = a.array("plane"), a.array("bases"), a.array("groups")
        base_ptr = builder.bitcast(bases.data, _I32.as_pointer())
        row_ptrs = []
        for i in range(rows):
            offset = builder.sext(builder.load(builder.gep(base_ptr, [builder.add(r0, _i64(i))])), _I64)
            row_ptrs.append(builder.gep(_bytes(builder, plane), [offset]))
        group_ptr = builder.bitcast(groups.data, _I32.as_pointer())
    else:
        bcast = a.array("bcast")
        stride = builder.extract_value(bcast.strides, 0)
        row_ptrs = [
            builder.gep(_bytes(builder, bcast), [builder.mul(builder.add(r0, _i64(i)), stride)]) for i in range(rows)
        ]
    vec_stride = builder.extract_value(vec.strides, 0)
    vec_base = builder.gep(_bytes(builder, vec), [builder.mul(c0, _i64(K_GROUP))])
    ones = builder.sext(builder.load(builder.bitcast(ones_arr.data, _V16I16.as_pointer()), align=1), _V16I32)
    module = builder.module
    smax = cgutils.get_or_insert_function(module, ir.FunctionType(_V16I32, [_V16I32] * 2), "llvm.smax.v16i32")
    smin = cgutils.get_or_insert_function(module, ir.FunctionType(_V16I32, [_V16I32] * 2), "llvm.smin.v16i32")

    accumulators = []
    for _ in range(rows * vectors):
        slot = cgutils.alloca_once(builder, _V8I32)  # promoted to a register by mem2reg
        builder.store(ir.Constant(_V8I32, None), slot)
        accumulators.append(slot)

    def even_odd(v32: ir.Value, unsigned: bool) -> tuple[ir.Value, ir.Value]:
        extend = builder.zext if unsigned else builder.sext
        even = builder.shuffle_vector(v32, v32, _EVEN16)
        odd = builder.shuffle_vector(v32, v32, _ODD16)
        return extend(even, _V16I32), extend(odd, _V16I32)

    with cgutils.for_range(builder, nkq) as loop:
        kq = loop.index
        if indirect:
            offset = builder.sext(builder.load(builder.gep(group_ptr, [kq])), _I64)
        else:
            offset = builder.mul(kq, _i64(K_GROUP))
        broadcast = []
        for row in row_ptrs:
            word = builder.load(builder.bitcast(builder.gep(row, [offset]), _I32.as_pointer()), align=1)
            lanes = builder.insert_element(ir.Constant(_V8I32, None), word, ir.Constant(_I32, 0))
            splat = builder.bitcast(builder.shuffle_vector(lanes, lanes, _SPLAT8), _V32I8)
            broadcast.append(even_odd(splat, True))
        vec_row = builder.gep(vec_base, [builder.mul(kq, vec_stride)])
        columns = []
        for v in range(vectors):
            pointer = builder.bitcast(builder.gep(vec_row, [_i64(32 * v)]), _V32I8.as_pointer())
            columns.append(even_odd(builder.load(pointer, align=1), False))
        for i, (a_even, a_odd) in enumerate(broadcast):
            for v, (w_even, w_odd) in enumerate(columns):
                pairs = builder.add(
                    builder.mul(a_even, w_even, flags=["nsw"]), builder.mul(a_odd, w_odd, flags=["nsw"]), flags=["nsw"]
                )
                pairs = builder.call(smin, [builder.call(smax, [pairs, _INT16_MIN]), _INT16_MAX])  # vpmaddubsw
                widened = builder.mul(builder.sext(builder.trunc(pairs, _V16I16), _V16I32), ones)
                quads = builder.add(  # vpmaddwd with ones
                    builder.shuffle_vector(widened, widened, _EVEN8), builder.shuffle_vector(widened, widened, _ODD8)
                )
                slot = accumulators[i * vectors + v]
                builder.store(builder.add(builder.load(slot), quads), slot)

    out_stride = builder.extract_value(out.strides, 0)
    for i in range(rows):
        row_offset = builder.add(builder.mul(builder.add(cr0, _i64(i)), out_stride), builder.mul(cc0, _i64(4)))
        row = builder.gep(_bytes(builder, out), [row_offset])
        for v in range(vectors):
            pointer = builder.bitcast(builder.gep(row, [_i64(32 * v)]), _V8I32.as_pointer())
            builder.store(builder.load(accumulators[i * vectors + v]), pointer, align=4)


_DIRECT = ("bcast", "r0", "vec", "c0", "nkq", "out", "cr0", "cc0", "ones")
_INDIRECT = ("plane", "bases", "r0", "groups", "vec", "c0", "nkq", "out", "cr0", "cc0", "ones")
# dtype and dimensions each array argument must have; 1-D ones are read through their data
# pointer and must be contiguous. Anything else fails at compile time, not at run time.
_ARRAYS = {
    "bcast": (types.uint8, 2),
    "plane": (types.uint8, 1),
    "bases": (types.int32, 1),
    "groups": (types.int32, 1),
    "vec": (types.int8, 2),
    "out": (types.int32, 2),
    "ones": (types.int16, 1),
    "acc": (types.float32, 1),
    "src": (types.uint8, 1),
}


def _arrays_ok(names: tuple[str, ...], arg_types) -> bool:
    for name, ty in zip(names, arg_types, strict=True):
        if name not in _ARRAYS:
            if not isinstance(ty, types.Integer | types.Float):
                return False
            continue
        dtype, ndim = _ARRAYS[name]
        if not isinstance(ty, types.Array) or ty.dtype != dtype or ty.ndim != ndim:
            return False
        if ndim == 1 and ty.layout != "C":
            return False
    return True


def _make_tile(rows: int, vectors: int, *, indirect: bool):
    names = _INDIRECT if indirect else _DIRECT

    def typed(arg_types):
        if not _arrays_ok(names, arg_types):
            return None  # numba then reports that no signature matches

        def codegen(context, builder, sig, args):
            _emit_tile(
                builder, _Args(context, builder, sig, args, names), rows=rows, vectors=vectors, indirect=indirect
            )
            return context.get_dummy_value()

        return types.void(*arg_types), codegen

    # numba's @intrinsic wants the typer's parameters spelled out (no *args)
    if indirect:

        def tile(typingctx, plane, bases, r0, groups, vec, c0, nkq, out, cr0, cc0, ones):
            return typed((plane, bases, r0, groups, vec, c0, nkq, out, cr0, cc0, ones))

    else:

        def tile(typingctx, bcast, r0, vec, c0, nkq, out, cr0, cc0, ones):
            return typed((bcast, r0, vec, c0, nkq, out, cr0, cc0, ones))

    tile.__name__ = tile.__qualname__ = f"{'indirect' if indirect else 'tile'}_{rows}x{8 * vectors}"
    return intrinsic(tile)


# Dense layers: uint8 rows x int8 weights packed [k/4, column, 4].
tile_4x16, tile_3x16, tile_2x16, tile_1x16 = (_make_tile(r, 2, indirect=False) for r in (4, 3, 2, 1))
tile_4x8, tile_3x8, tile_2x8, tile_1x8 = (_make_tile(r, 1, indirect=False) for r in (4, 3, 2, 1))
# Convolutions: pixels of a padded image (through base and group offsets) x packed filters.
indirect_4x16, indirect_3x16, indirect_2x16, indirect_1x16 = (_make_tile(r, 2, indirect=True) for r in (4, 3, 2, 1))
indirect_4x8, indirect_3x8, indirect_2x8, indirect_1x8 = (_make_tile(r, 1, indirect=True) for r in (4, 3, 2, 1))


@intrinsic
def accumulate_dequantized(typingctx, acc, src, offset, vectors, zero_point, scale):
    """``acc[i] += float32(src[offset + i] - zero_point) * scale`` for ``i < 8 * vectors``.

    float32 multiply then add per lane, in order (no FMA): the exact float32 sequence of
    onnxruntime's QLinearAveragePool sums.
    """
    names = ("acc", "src", "offset", "vectors", "zero_point", "scale")
    if not _arrays_ok(names, (acc, src, offset, vectors, zero_point, scale)):
        return None
    signature = types.void(acc, src, offset, vectors, zero_point, scale)

    def codegen(context, builder, sig, args):
        a = _Args(context, builder, sig, args, names)
        acc_ptr = builder.bitcast(a.array("acc").data, _V8F32.as_pointer())
        src_ptr = builder.gep(_bytes(builder, a.array("src")), [a.int64("offset")])
        zero = builder.trunc(a.int64("zero_point"), _I32)
        zeros = builder.shuffle_vector(
            builder.insert_element(ir.Constant(_V8I32, None), zero, ir.Constant(_I32, 0)),
            ir.Constant(_V8I32, None),
            _SPLAT8,
        )
        scale = a.float32("scale")
        scales = builder.shuffle_vector(
            builder.insert_element(ir.Constant(_V8F32, None), scale, ir.Constant(_I32, 0)),
            ir.Constant(_V8F32, None),
            _SPLAT8,
        )
        with cgutils.for_range(builder, a.int64("vectors")) as loop:
            v = loop.index
            codes = builder.load(
                builder.bitcast(builder.gep(src_ptr, [builder.mul(v, _i64(8))]), _V8I8.as_pointer()), align=1
            )
            values = builder.fmul(builder.sitofp(builder.sub(builder.zext(codes, _V8I32), zeros), _V8F32), scales)
            slot = builder.gep(acc_ptr, [v])
            builder.store(builder.fadd(builder.load(slot, align=4), values), slot, align=4)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def atomic_add(typingctx, counters, index, value):
    """Atomically add ``value`` to ``counters[index]`` (int64) and return the previous value.

    What lets several threads claim work from one counter without a lock (see
    :mod:`kernels.executor`); ``seq_cst`` also orders the claimed chunk's memory accesses.
    """
    if not (isinstance(counters, types.Array) and counters.dtype == types.int64 and counters.layout == "C"):
        return None
    signature = types.int64(counters, index, value)

    def codegen(context, builder, sig, args):
        a = _Args(context, builder, sig, args, ("counters", "index", "value"))
        base = builder.bitcast(a.array("counters").data, _I64.as_pointer())
        return builder.atomic_rmw("add", builder.gep(base, [a.int64("index")]), a.int64("value"), "seq_cst")

    return signature, codegen
