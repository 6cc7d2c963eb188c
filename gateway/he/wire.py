"""SEAL objects to bytes and back, with SEAL's validity checks on every load.

``tenseal.sealapi`` saves and loads through file paths only, so bytes pass through a temporary
file in memory (``/dev/shm`` where it exists). Loading runs SEAL's own checks (sizes, parameter
ids, coefficients in range): bytes that break a ciphertext's or a key's structure, or that were
made under other parameters, raise :class:`InvalidArgumentError` here instead of reaching the
evaluator. A well-formed ciphertext under someone else's key cannot be detected: it decrypts to
noise for its sender, and nobody else can decrypt the result.

What clients send is seeded: a freshly encrypted ciphertext or a freshly generated key carries
a PRNG seed instead of its uniformly random half, which halves its size on the wire.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import tenseal.sealapi as seal

from models.errors import InvalidArgumentError

_MEMORY_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else None
T = TypeVar("T")


def dump(obj) -> bytes:
    """Bytes of anything with a ``save(path)``: ciphertexts, keys, seeded ``Serializable``s."""
    with tempfile.NamedTemporaryFile(dir=_MEMORY_DIR) as handle:
        obj.save(handle.name)
        return Path(handle.name).read_bytes()


def _load(factory: Callable[[], T], context: seal.SEALContext, data: bytes, what: str) -> T:
    obj = factory()
    with tempfile.NamedTemporaryFile(dir=_MEMORY_DIR) as handle:
        handle.write(data)
        handle.flush()
        try:
            obj.load(context, handle.name)
        except (RuntimeError, ValueError, TypeError) as exc:  # SEAL's validity checks
            raise InvalidArgumentError(f"{what} is not valid for this model's parameters: {exc}") from None
    return obj


def load_ciphertext(context: seal.SEALContext, data: bytes) -> seal.Ciphertext:
    return _load(seal.Ciphertext, context, data, "ciphertext")


def load_relin_keys(context: seal.SEALContext, data: bytes) -> seal.RelinKeys:
    return _load(seal.RelinKeys, context, data, "relinearization key")


def load_galois_keys(context: seal.SEALContext, data: bytes) -> seal.GaloisKeys:
    return _load(seal.GaloisKeys, context, data, "Galois keys")
