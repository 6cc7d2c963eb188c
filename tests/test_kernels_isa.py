"""The VNNI code path: choosing it, its tiles' exact sums, and the machine code of each ISA."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from numba import njit

from kernels import NumbaModel, ops
from kernels import isa as kernel_isa
from kernels.compiler import compile_model
from kernels.executor import ONES
from kernels.program import PAIR_LIMIT, _pack
from kernels.simd import VNNI_ACCUMULATORS, VNNI_ROWS, VNNI_SHAPES, tile_4x16, vnni_tile
from kernels.testing import QdqGraph, random_weights
from models.errors import InvalidArgumentError
from models.quantization import QuantParams

REPO = Path(__file__).resolve().parents[1]
HAS_VNNI = "vnni" in kernel_isa.available()
needs_vnni = pytest.mark.skipif(not HAS_VNNI, reason="this CPU has no AVX512-VNNI")


def _small_model():
    rng = np.random.default_rng(3)
    graph = QdqGraph([2, 9, 9], QuantParams(0.02, 120))
    graph.conv(random_weights(rng, (20, 2, 3, 3)), np.full(20, 0.01), rng.integers(-99, 99, 20), QuantParams(0.05, 90))
    graph.square(QuantParams(0.03, 0)).flatten()
    return graph.gemm(random_weights(rng, (10, graph.shape[0])), np.full(10, 0.01), np.zeros(10), None).build()


# ---- choosing the path ----------------------------------------------------------------------


def test_the_fastest_available_path_is_the_default(monkeypatch):
    monkeypatch.delenv(kernel_isa.ENVIRONMENT, raising=False)
    assert kernel_isa.available()[0] == "avx2"
    assert kernel_isa.select() == ("vnni" if HAS_VNNI else "avx2")
    if not os.environ.get("NUMBA_CPU_FEATURES"):  # numba then compiles for the host's own features
        import llvmlite.binding as llvm

        assert ("+avx512vnni" in llvm.get_host_cpu_features().flatten().split(",")) == HAS_VNNI


def test_environment_variable_forces_a_path_and_the_argument_overrides_it(monkeypatch):
    monkeypatch.setenv(kernel_isa.ENVIRONMENT, " AVX2 ")
    assert kernel_isa.select() == "avx2"
    assert NumbaModel(compile_model(_small_model())).isa == "avx2"
    monkeypatch.setenv(kernel_isa.ENVIRONMENT, "auto")
    assert kernel_isa.select() == kernel_isa.available()[-1]
    if HAS_VNNI:
        monkeypatch.setenv(kernel_isa.ENVIRONMENT, "avx2")
        assert NumbaModel(compile_model(_small_model()), isa="vnni").isa == "vnni"


def test_unknown_paths_and_vnni_without_the_instructions_are_refused(monkeypatch):
    monkeypatch.setenv(kernel_isa.ENVIRONMENT, "avx512")
    with pytest.raises(InvalidArgumentError, match="one of auto, avx2, vnni; got 'avx512'"):
        kernel_isa.select()
    with pytest.raises(InvalidArgumentError, match="'sse'"):
        NumbaModel(compile_model(_small_model()), isa="sse")
    monkeypatch.setattr(kernel_isa, "compiled_features", lambda: frozenset({"avx2", "avx512f"}))
    assert kernel_isa.available() == ("avx2",)
    assert kernel_isa.select("auto") == "avx2"
    with pytest.raises(InvalidArgumentError, match="needs AVX512-VNNI"):
        kernel_isa.select("vnni")


# ---- VNNI tiles -----------------------------------------------------------------------------


def _exact(a: np.ndarray, w: np.ndarray) -> np.ndarray:
    return a.astype(np.int64) @ w.astype(np.int64).T


@pytest.mark.parametrize("seed", range(8))
def test_vnni_products_are_exact_and_stay_inside_their_columns(seed):
    """Every tile shape and remainder (1-8 rows, 1-10 panels, a last panel of 8 columns), written
    into a buffer of exactly ``n_padded`` columns followed by a guard row that must stay intact."""
    rng = np.random.default_rng(500 + seed)
    rows, k, n = int(rng.integers(1, VNNI_ROWS + 1)), int(rng.integers(1, 300)), int(rng.integers(1, 160))
    if seed == 0:
        n = 8 * int(rng.integers(1, 19)) * 2 - 8  # a narrow last panel for certain
    a = rng.integers(0, 256, (rows, k)).astype(np.uint8)
    a[:, ::3] = 255
    w = random_weights(rng, (n, k))
    packed, n_padded = _pack("test", w)
    a_padded = np.zeros((rows + 2, packed.shape[1] * 4), np.uint8)
    a_padded[1 : rows + 1, :k] = a
    sums = np.full((VNNI_ROWS + 1, n_padded), -7, np.int32)
    ops._vnni_products(a_padded, 1, rows, packed, packed.shape[1], n_padded, sums, 0)
    np.testing.assert_array_equal(sums[:rows, :n], _exact(a, w))
    np.testing.assert_array_equal(sums[:rows, n:], 0)  # padding columns: zero weights
    np.testing.assert_array_equal(sums[rows:], -7)


def test_tile_shapes_cover_every_row_and_panel_once_with_compiled_shapes():
    """The selector may only ask for shapes the intrinsic compiled (any other does nothing)."""
    for rows in range(1, VNNI_ROWS + 1):
        for panels in range(1, 20):
            covered = np.zeros((rows, panels), np.int64)
            p0 = 0
            while p0 < panels:
                most_rows, tile_panels = ops._vnni_tile_shape.py_func(rows, panels - p0)
                i = 0
                while i < rows:
                    tile_rows = ops._power_of_two.py_func(min(most_rows, rows - i))
                    assert (tile_rows, tile_panels) in VNNI_SHAPES
                    covered[i : i + tile_rows, p0 : p0 + tile_panels] += 1
                    i += tile_rows
                p0 += tile_panels
            assert (covered == 1).all(), (rows, panels)
    assert all(r * p <= VNNI_ACCUMULATORS for r, p in VNNI_SHAPES)


@njit(cache=False)
def _vnni_probe(a, rows, w, panels, sums, cols):
    vnni_tile(a, 0, rows, w, 0, panels, w.shape[1], sums, 0, 0, cols)


@njit(cache=False)
def _avx2_probe(a, w, sums, ones):
    tile_4x16(a, 0, w, 0, w.shape[0], sums, 0, 0, ones)


def test_a_shape_that_was_not_compiled_writes_nothing():
    a, w = np.full((3, 8), 255, np.uint8), np.ones((1, 2, 64), np.int8)
    sums = np.full((3, 16), -1, np.int32)
    _vnni_probe(a, 3, w, 1, sums, 16)
    assert (3, 1) not in VNNI_SHAPES and (sums == -1).all()
    _vnni_probe(a, 2, w, 1, sums, 16)
    np.testing.assert_array_equal(sums[:2], 255 * 8)


def test_vnni_tiles_do_not_saturate_where_avx2_tiles_do():
    """Beyond the pair limit vpdpbusd stays exact while vpmaddubsw clips: the two paths agree only
    because the packer refuses such weights on both (see test_full_range_int8_weights_are_refused)."""
    a = np.full((1, 8), 255, np.uint8)
    for w_pair, within_limit in (((65, 63), True), ((-64, -64), True), ((127, 127), False), ((-128, -128), False)):
        rows = np.tile(np.array(w_pair, np.int8), (16, 4))  # 16 output columns of k = 8 weights
        packed = np.ascontiguousarray(rows.reshape(16, 2, 4).transpose(1, 0, 2)).reshape(1, 2, 64)
        expected = 255 * int(rows[0].astype(np.int64).sum())
        vnni = np.zeros((1, 16), np.int32)
        _vnni_probe(a, 1, packed, 1, vnni, 16)
        assert (vnni == expected).all()
        avx2 = np.zeros((4, 16), np.int32)
        _avx2_probe(np.repeat(a, 4, axis=0), packed[0], avx2, ONES)
        assert bool((avx2[0] == expected).all()) == within_limit
        assert (abs(w_pair[0]) + abs(w_pair[1]) <= PAIR_LIMIT) == within_limit


def _mnemonics(asm: str) -> set[str]:
    """The instructions of an assembly listing (not its symbols: those contain the test's name)."""
    return set(re.findall(r"^\t(v\w+)\s", asm, re.MULTILINE))


@needs_vnni
def test_vnni_tiles_compile_to_vpdpbusd_and_avx2_tiles_do_not():
    a, w = np.full((4, 8), 255, np.uint8), np.ones((1, 2, 64), np.int8)
    sums = np.zeros((4, 16), np.int32)
    _vnni_probe(a, 4, w, 1, sums, 16)
    np.testing.assert_array_equal(sums, 255 * 8)
    _avx2_probe(a, w[0], sums, ONES)
    np.testing.assert_array_equal(sums, 255 * 8)
    vnni_asm = next(iter(_vnni_probe.inspect_asm().values()))
    avx2_asm = next(iter(_avx2_probe.inspect_asm().values()))
    assert "vpdpbusd" in _mnemonics(vnni_asm) and "%zmm" in vnni_asm
    assert "vpdpbusd" not in _mnemonics(avx2_asm)


def _run_fresh(code: str, cache: Path, **env: str) -> dict:
    """Run ``code`` in a new interpreter with an empty numba cache in ``cache``; it prints JSON."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env={**os.environ, "NUMBA_CACHE_DIR": str(cache), **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


_SPECIALIZATIONS = """
    import json, re, sys
    import numpy as np
    from numba import types
    sys.path.insert(0, "tests")
    from test_kernels_isa import _small_model
    from kernels import NumbaModel
    from kernels.executor import run_serial
    from models import onnx_runtime

    model = _small_model()
    x = np.random.default_rng(0).uniform(-1, 3, (33, 2, 9, 9)).astype(np.float32)
    expected = onnx_runtime.predict_logits(onnx_runtime.create_session(model.SerializeToString()), x)
    report = {"equal": {}, "asm": {}}
    for isa in ("vnni", "avx2"):
        report["equal"][isa] = bool(np.array_equal(NumbaModel.from_onnx(model, isa=isa).predict_logits(x), expected))
    if INSPECT:
        for signature, asm in run_serial.inspect_asm().items():
            instructions = set(re.findall(r"^\\t(v\\w+)\\s", asm, re.MULTILINE))
            report["asm"][str(signature[-1].literal_value)] = {
                name: name in instructions for name in ("vpdpbusd", "vpmaddwd", "vpdpwssd")
            }
    for name, counter in (("hits", run_serial.stats.cache_hits), ("misses", run_serial.stats.cache_misses)):
        # the signatures with the ISA as a literal (numba first tries, and misses, a plain int)
        report[name] = sum(n for sig, n in counter.items() if isinstance(sig[-1], types.Literal))
    print(json.dumps(report))
"""


@needs_vnni
def test_each_isa_compiles_its_own_interpreter_and_cache_entry(tmp_path):
    """numba's inspect_asm of the interpreter (a fresh process and cache, where the machine code
    can be inspected): the VNNI specialization runs vpdpbusd, the AVX2 one never does (the other
    path's branches are pruned before code generation). A second process finds both in the
    cache, each under its own signature, and both still match onnxruntime."""
    first = _run_fresh(_SPECIALIZATIONS.replace("INSPECT", "True"), tmp_path)
    assert first["equal"] == {"vnni": True, "avx2": True}
    vnni, avx2 = first["asm"][str(kernel_isa.VNNI)], first["asm"][str(kernel_isa.AVX2)]
    assert vnni["vpdpbusd"] and not avx2["vpdpbusd"]
    assert avx2["vpmaddwd"] or avx2["vpdpwssd"]  # the pair sums' word step (fused into vpdpwssd with VNNI)
    assert first["misses"] == 2 and first["hits"] == 0
    second = _run_fresh(_SPECIALIZATIONS.replace("INSPECT", "False"), tmp_path)
    assert second["equal"] == {"vnni": True, "avx2": True}
    assert second["misses"] == 0 and second["hits"] == 2


HASWELL_FEATURES = (
    "+64bit,+avx,+avx2,+bmi,+bmi2,+cmov,+cx16,+f16c,+fma,+lzcnt,+movbe,+popcnt,+sse,+sse2,+sse3,+sse4.1,+sse4.2,"
    "+ssse3,+xsave"
)


@pytest.fixture(scope="module")
def haswell(tmp_path_factory) -> dict:
    """Both kinds of tiles compiled for Haswell (AVX2, no AVX-512) in a fresh process; this CPU
    runs that code whatever its own features."""
    code = """
        import json, re
        import numpy as np
        from numba import njit
        from kernels import isa
        from kernels.executor import ONES
        from kernels.program import _pack
        from kernels.simd import tile_4x16, vnni_tile
        from kernels.testing import random_weights

        @njit(cache=False)
        def vnni_probe(x, w, sums, cols):
            vnni_tile(x, 0, 4, w, 0, 4, w.shape[1], sums, 0, 0, cols)

        @njit(cache=False)
        def avx2_probe(x, w, sums, ones):
            tile_4x16(x, 0, w, 0, w.shape[0], sums, 0, 0, ones)

        rng = np.random.default_rng(0)
        weights = random_weights(rng, (56, 41))
        packed, n_padded = _pack("t", weights)
        x = np.zeros((4, packed.shape[1] * 4), np.uint8)
        x[:, :41] = rng.integers(0, 256, (4, 41))
        exact = x[:, :41].astype(np.int64) @ weights.astype(np.int64).T
        vnni, avx2 = np.zeros((4, n_padded), np.int32), np.zeros((4, 16 * packed.shape[0]), np.int32)
        vnni_probe(x, packed, vnni, n_padded)
        for p in range(packed.shape[0]):
            avx2_probe(x, packed[p], avx2[:, 16 * p :], ONES)
        try:
            isa.select("vnni")
            refused = False
        except Exception:
            refused = True

        def instructions(probe):
            asm = next(iter(probe.inspect_asm().values()))
            return sorted(set(re.findall(r"^\\t(v\\w+)\\s", asm, re.MULTILINE)))

        print(json.dumps({
            "vnni_exact": bool((vnni[:, :56] == exact).all()), "avx2_exact": bool((avx2[:, :56] == exact).all()),
            "vnni": instructions(vnni_probe), "avx2": instructions(avx2_probe),
            "available": isa.available(), "refused": refused,
        }))
    """
    cache = tmp_path_factory.mktemp("cache")
    return _run_fresh(code, cache, NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES=HASWELL_FEATURES)


def test_tiles_compile_to_vpmaddubsw_on_avx2(haswell):
    """The AVX2 tiles rely on LLVM recognising vpmaddubsw/vpmaddwd in portable IR; an LLVM change
    that lost the pattern would stay correct but run at half speed, so check the machine code for
    an AVX2 CPU. (With AVX-512 available, as on this project's VNNI machine, LLVM 22 lowers the
    same IR differently, to vpmovsdw and vpdpwssd: that is what the VNNI path replaces.)"""
    assert haswell["avx2_exact"]
    assert {"vpmaddubsw", "vpmaddwd"} <= set(haswell["avx2"])
    assert not any(name.startswith("vpdp") for name in haswell["avx2"])


def test_vnni_tiles_stay_exact_on_a_cpu_without_vnni(haswell):
    """Without AVX512-VNNI the VNNI tiles lower to portable IR with the same exact sums, and the
    VNNI path is neither chosen nor accepted."""
    assert haswell["vnni_exact"]
    assert "vpdpbusd" not in haswell["vnni"]
    assert haswell["available"] == ["avx2"] and haswell["refused"]
