"""uint8 x int8 -> int32 register tiles, written as LLVM IR that x86 lowers to ``vpmaddubsw`` or ``vpdpbusd``.

Why not plain numba loops: numba's loop vectorizer widens an int8 dot product to 32-bit lanes and
multiplies with ``vpmaddwd`` on half-empty registers (about 35 GMAC/s on this machine's AVX2
core), and a hand-blocked int16 ``vpmaddwd`` kernel reached about 70 GMAC/s. onnxruntime's
AVX2 kernels do better with ``vpmaddubsw`` (32 uint8 x int8 products summed in pairs into
int16) followed by ``vpmaddwd`` against a vector of ones (pairs of int16 summed into int32).
The tiles below emit exactly that computation in portable IR, which the X86 backend matches
to those two instructions when it compiles for an AVX2 CPU: about 90 GMAC/s per core on the
AVX2-only EPYC they were tuned on. On other targets the same IR compiles to correct, slower
code; with AVX-512 enabled, LLVM 22 widens to int32 and narrows back with ``vpmovsdw`` instead
(about 47 GMAC/s on an AVX-512 EPYC, where the VNNI tiles below take over).

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

VNNI tiles (:data:`vnni_tile`, :data:`vnni_indirect`): on a CPU with AVX512-VNNI, onnxruntime
runs ``vpdpbusd``, which sums four uint8 x int8 products straight into each int32 lane (64 per
512-bit instruction, no int16 step): the AVX2 tiles reach about 47 GMAC/s there, these about
500 (a 4 x 4-panel tile on the MNIST MLP's first layer, Zen 5). They call that instruction
through its LLVM intrinsic (``llvm.x86.avx512.vpdpbusd.512``): a 512-bit vector of
int32 accumulators covers exactly one packed panel (16 columns x 4 k = 64 bytes), so a tile of
``rows`` x ``panels`` keeps that many accumulators, broadcasts each row's four k once per step
and loads each panel's 64 bytes once per step. Shapes: see :data:`VNNI_SHAPES`; the shape is a
run-time argument that selects one of them through a ``switch``, so that the callers make one
call whatever the shape. :mod:`kernels.isa` decides at run time which tiles run.

Exactness of the VNNI tiles: ``vpdpbusd`` adds the four exact products (at most
``4 * 255 * 128`` in magnitude) to the accumulator with int32 wrap-around, like the AVX2 tiles'
``vpaddd``; it has no int16 step, so it equals the AVX2 tiles exactly when their pair sums do
not saturate, which the pair check above guarantees for every admitted model (and it is kept
for the VNNI path, so that whether a model loads never depends on the CPU). On a target
without AVX512-VNNI the same tiles compile to portable IR with the same exact sums.

:func:`accumulate_dequantized` is the average pool's inner loop, written here for the same
reason: numba's vectorizer adds alias checks and a scalar remainder to every 8-to-40-element
channel loop, which cost more than the loop itself.
"""

from __future__ import annotations

from llvmlite import ir
from llvmlite.binding import llvm_version_info
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
# pointer and must be contiguous, and so must 3-D ones (packed panels, read through their strides
# but assumed 64 bytes per row). Anything else fails at compile time, not at run time.
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
    "weights": (types.int8, 3),
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
        if ndim != 2 and ty.layout != "C":
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


# ---- VNNI tiles --------------------------------------------------------------------------

VNNI_ROWS = 8  # most rows of the uint8 operand per VNNI tile
VNNI_PANELS = 8  # most packed panels (16 columns each, one 512-bit accumulator per row) per VNNI tile
VNNI_ACCUMULATORS = 16  # rows x panels at most: half of the 32 vector registers, the rest for operands
# The tile shapes compiled: powers of two only (any other count is a sum of them), since every
# shape costs about 0.25 s of a cold compile (numba compiles a callee again into each caller).
VNNI_SHAPES = tuple(
    (rows, panels)
    for rows in (1, 2, 4, 8)
    for panels in (1, 2, 4, 8)
    if rows <= VNNI_ROWS and panels <= VNNI_PANELS and rows * panels <= VNNI_ACCUMULATORS
)

_V64I8 = ir.VectorType(_I8, 64)
_SPLAT16 = _mask([0] * 16)
_LOW8 = _mask(list(range(8)))
_QUAD_LANES = [_mask([4 * j + b for j in range(16)]) for b in range(K_GROUP)]


def target_features(context) -> frozenset[str]:
    """The CPU features numba compiles for (its codegen's, which its disk cache is keyed on)."""
    features = context.codegen().magic_tuple()[2]
    return frozenset(f[1:] for f in features.split(",") if f.startswith("+"))


def _dot4(builder, *, native: bool):
    """``acc + sum over 4 bytes of zext(a) * sext(w)`` per int32 lane, for 16 lanes.

    ``vpdpbusd`` when the target has AVX512-VNNI; otherwise the same exact sums in portable IR
    (slow: :mod:`kernels.isa` never selects these tiles on such a CPU, this only keeps any code
    that mentions them compilable there). LLVM 22 declares the intrinsic's byte operands as
    ``<64 x i8>``, earlier versions as ``<16 x i32>`` (the same bits).
    """
    if native:
        byte_type = _V64I8 if llvm_version_info >= (22,) else _V16I32
        fnty = ir.FunctionType(_V16I32, [_V16I32, byte_type, byte_type])
        vpdpbusd = cgutils.get_or_insert_function(builder.module, fnty, "llvm.x86.avx512.vpdpbusd.512")

        def dot(acc, a, w):
            return builder.call(vpdpbusd, [acc, builder.bitcast(a, byte_type), builder.bitcast(w, byte_type)])

        return dot

    wide = ir.VectorType(_I32, 64)

    def portable(acc, a, w):
        products = builder.mul(
            builder.zext(builder.bitcast(a, _V64I8), wide), builder.sext(builder.bitcast(w, _V64I8), wide)
        )
        total = acc
        for lanes in _QUAD_LANES:
            total = builder.add(total, builder.shuffle_vector(products, products, lanes))
        return total

    return portable


def _emit_vnni_shape(builder, a: _Args, *, rows: int, panels: int, indirect: bool, dot) -> None:
    """One (rows, panels) tile: ``rows * panels`` 512-bit accumulators, one ``vpdpbusd`` each per four k."""
    weights, out = a.array("weights"), a.array("out")
    r0, p0, nkq = a.int64("r0"), a.int64("p0"), a.int64("nkq")
    cr0, cc0, cols = a.int64("cr0"), a.int64("cc0"), a.int64("cols")
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
    panel_stride = builder.extract_value(weights.strides, 0)
    kq_stride = builder.extract_value(weights.strides, 1)
    panel_ptrs = [
        builder.gep(_bytes(builder, weights), [builder.mul(builder.add(p0, _i64(v)), panel_stride)])
        for v in range(panels)
    ]
    accumulators = []
    for _ in range(rows * panels):
        slot = cgutils.alloca_once(builder, _V16I32)  # promoted to a register by mem2reg
        builder.store(ir.Constant(_V16I32, None), slot)
        accumulators.append(slot)

    with cgutils.for_range(builder, nkq) as loop:
        kq = loop.index
        if indirect:
            offset = builder.sext(builder.load(builder.gep(group_ptr, [kq])), _I64)
        else:
            offset = builder.mul(kq, _i64(K_GROUP))
        step = builder.mul(kq, kq_stride)
        columns = [
            builder.load(builder.bitcast(builder.gep(ptr, [step]), _V16I32.as_pointer()), align=1) for ptr in panel_ptrs
        ]
        for i, row in enumerate(row_ptrs):
            word = builder.load(builder.bitcast(builder.gep(row, [offset]), _I32.as_pointer()), align=1)
            lanes = builder.insert_element(ir.Constant(_V16I32, None), word, ir.Constant(_I32, 0))
            splat = builder.shuffle_vector(lanes, lanes, _SPLAT16)  # vpbroadcastd
            for v, column in enumerate(columns):
                slot = accumulators[i * panels + v]
                builder.store(dot(builder.load(slot), splat, column), slot)

    # Columns ``cc0 .. cc0 + cols`` of ``out`` exist: 16 per panel, or only the first 8 of the last
    # panel (weights have a multiple of 8 columns; the panel's other 8 are zero padding). One
    # branch per tile rather than per store: fewer basic blocks, which costs compile time.
    out_stride = builder.extract_value(out.strides, 0)
    out_rows = []
    for i in range(rows):
        row_offset = builder.add(builder.mul(builder.add(cr0, _i64(i)), out_stride), builder.mul(cc0, _i64(4)))
        out_rows.append(builder.gep(_bytes(builder, out), [row_offset]))

    def store(v: int, narrow: bool) -> None:
        for i, row in enumerate(out_rows):
            pointer = builder.gep(row, [_i64(4 * TILE_COLS * v)])
            value = builder.load(accumulators[i * panels + v])
            if narrow:
                low = builder.shuffle_vector(value, value, _LOW8)
                builder.store(low, builder.bitcast(pointer, _V8I32.as_pointer()), align=4)
            else:
                builder.store(value, builder.bitcast(pointer, _V16I32.as_pointer()), align=4)

    with builder.if_else(builder.icmp_signed(">=", cols, _i64(TILE_COLS * panels))) as (wide, narrow):
        with wide:
            for v in range(panels):
                store(v, False)
        with narrow:
            for v in range(panels):
                store(v, v == panels - 1)


def _emit_vnni(builder, a: _Args, *, indirect: bool, native: bool) -> None:
    """Switch on the run-time (rows, panels) to a tile specialised for that shape (one of VNNI_SHAPES;
    any other does nothing)."""
    dot = _dot4(builder, native=native)
    shape = builder.add(builder.mul(a.int64("rows"), _i64(64)), a.int64("panels"))
    done = builder.append_basic_block("vnni.done")
    switch = builder.switch(shape, done)
    for rows, panels in VNNI_SHAPES:
        block = builder.append_basic_block(f"vnni.{rows}x{panels}")
        switch.add_case(ir.Constant(_I64, rows * 64 + panels), block)
        builder.position_at_end(block)
        _emit_vnni_shape(builder, a, rows=rows, panels=panels, indirect=indirect, dot=dot)
        builder.branch(done)
    builder.position_at_end(done)


_VNNI_DIRECT = ("bcast", "r0", "rows", "weights", "p0", "panels", "nkq", "out", "cr0", "cc0", "cols")
_VNNI_INDIRECT = (
    "plane", "bases", "r0", "rows", "groups", "weights", "p0", "panels", "nkq", "out", "cr0", "cc0", "cols",
)  # fmt: skip


def _make_vnni(*, indirect: bool):
    names = _VNNI_INDIRECT if indirect else _VNNI_DIRECT

    def typed(arg_types):
        if not _arrays_ok(names, arg_types):
            return None

        def codegen(context, builder, sig, args):
            native = "avx512vnni" in target_features(context)
            _emit_vnni(builder, _Args(context, builder, sig, args, names), indirect=indirect, native=native)
            return context.get_dummy_value()

        return types.void(*arg_types), codegen

    if indirect:

        def vnni_indirect(typingctx, plane, bases, r0, rows, groups, weights, p0, panels, nkq, out, cr0, cc0, cols):
            return typed((plane, bases, r0, rows, groups, weights, p0, panels, nkq, out, cr0, cc0, cols))

        return intrinsic(vnni_indirect)

    def vnni_tile(typingctx, bcast, r0, rows, weights, p0, panels, nkq, out, cr0, cc0, cols):
        return typed((bcast, r0, rows, weights, p0, panels, nkq, out, cr0, cc0, cols))

    return intrinsic(vnni_tile)


# ``rows`` (1 .. VNNI_ROWS) uint8 rows x packed panels ``p0 .. p0 + panels`` (1 .. VNNI_PANELS,
# rows x panels <= VNNI_ACCUMULATORS) into ``out[cr0 + i, cc0 + j]`` for ``j < min(cols, 16 * panels)``;
# ``cols`` must be at least ``16 * (panels - 1) + 8``. Dense layers, convolutions.
vnni_tile = _make_vnni(indirect=False)
vnni_indirect = _make_vnni(indirect=True)


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


@intrinsic
def borrowed(typingctx, array):
    """``array`` without its reference count: a view numba never increfs or decrefs.

    numba increments and decrements (atomically, through a function call) the reference count
    of every array argument of every call and of every view it creates. The interpreter of
    :mod:`kernels.executor` passes a dozen arrays down a few levels per operation: about
    0.5 us of a 3 us batch-1 call. Its arrays all belong to the caller, who holds them for the
    whole call, so views of them need no count; a null ``meminfo`` is what numba skips.
    The result must not outlive the call (never return it or store it).
    """
    if not isinstance(array, types.Array):
        return None

    def codegen(context, builder, sig, args):
        source = context.make_array(array)(context, builder, args[0])
        view = context.make_array(array)(context, builder)
        context.populate_array(
            view,
            data=source.data,
            shape=source.shape,
            strides=source.strides,
            itemsize=source.itemsize,
            meminfo=None,
            parent=None,
        )
        return view._getvalue()

    return array(array), codegen
