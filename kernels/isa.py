"""Which integer-product code path the kernels run: AVX2 (``vpmaddubsw``) or VNNI (``vpdpbusd``).

Why a run-time choice: the AVX2 tiles of :mod:`kernels.simd` were tuned on an AVX2-only CPU,
and on a CPU with AVX512-VNNI onnxruntime switches to ``vpdpbusd`` (64 uint8 x int8 products
summed straight into int32 per instruction) and leaves them far behind (0.13x its MLP
throughput). The ISA is chosen once per model when it loads (:func:`select`) and passed to
every call of the interpreter of :mod:`kernels.executor` as a code that numba compiles as a
literal: each ISA has its own specialization, compiled only when a model uses it, with its own
disk-cache entry (the signature differs); numba also keys that cache on the CPU name and
features it compiles for, so machine code built for one CPU is never loaded on another.

``vnni`` is offered only when the CPU numba compiles for has AVX512-VNNI (the tiles use
512-bit ``vpdpbusd``); elsewhere :func:`select` refuses it, and the VNNI tiles, if compiled at
all, lower to portable IR that is exact and slow. The environment variable
``HEGATE_KERNELS_ISA`` (``auto``, ``avx2`` or ``vnni``) overrides the automatic choice, for
tests and for comparing the paths; the ``isa`` argument of
:class:`~kernels.executor.NumbaModel` overrides both.

Both paths give the same int32 sums on every model the compiler admits (see
:mod:`kernels.program`): ``vpmaddubsw`` saturates its int16 pair sums and ``vpdpbusd`` does not,
but the admitted weights never reach the saturation, so both compute the exact products.
"""

from __future__ import annotations

import functools
import os

from kernels.simd import target_features
from models.errors import InvalidArgumentError

AVX2, VNNI = 0, 1  # the codes the interpreter receives
NAMES = {"avx2": AVX2, "vnni": VNNI}
ENVIRONMENT = "HEGATE_KERNELS_ISA"
AUTO = "auto"


@functools.cache
def compiled_features() -> frozenset[str]:
    """CPU features numba compiles for: the host's, unless ``NUMBA_CPU_FEATURES`` says otherwise."""
    from numba.core.registry import cpu_target

    return target_features(cpu_target.target_context)


def available() -> tuple[str, ...]:
    """The paths this machine can run at full speed, fastest last."""
    return ("avx2", "vnni") if "avx512vnni" in compiled_features() else ("avx2",)


def select(requested: str | None = None) -> str:
    """The path to run: ``requested``, else ``$HEGATE_KERNELS_ISA``, else the fastest available.

    Raises:
        InvalidArgumentError: an unknown name, or ``vnni`` on a CPU without AVX512-VNNI.
    """
    name = (requested or os.environ.get(ENVIRONMENT) or AUTO).strip().lower()
    if name == AUTO:
        return available()[-1]
    if name not in NAMES:
        raise InvalidArgumentError(f"kernel ISA must be one of {AUTO}, {', '.join(NAMES)}; got {name!r}")
    if name not in available():
        raise InvalidArgumentError(f"kernel ISA {name!r} needs AVX512-VNNI, which this CPU does not have")
    return name
