"""SEAL objects to bytes and back, with SEAL's validity checks on every load.

``tenseal.sealapi`` saves and loads through file paths only, so bytes pass through a temporary
file in memory (``/dev/shm`` where it exists). Loading runs SEAL's own checks (sizes, parameter
ids, coefficients in range): bytes that break a ciphertext's or a key's structure, or that were
made under other parameters, raise :class:`InvalidArgumentError` here instead of reaching the
evaluator. A well-formed ciphertext under someone else's key cannot be detected: it decrypts to
noise for its sender, and nobody else can decrypt the result.

Clients that come from TenSEAL may send a serialized TenSEAL context instead of bare keys:
:func:`load_public_context` takes its keys only if it holds no secret key and was made with
exactly this model's parameters.

What clients send is seeded: a freshly encrypted ciphertext or a freshly generated key carries
a PRNG seed instead of its uniformly random half, which halves its size on the wire.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import tenseal
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


def load_public_key(context: seal.SEALContext, data: bytes) -> seal.PublicKey:
    return _load(seal.PublicKey, context, data, "public key")


def load_public_context(
    context: seal.SEALContext, data: bytes
) -> tuple[seal.RelinKeys, seal.GaloisKeys, seal.PublicKey | None]:
    """The relinearization and Galois keys of a serialized TenSEAL context, and its public key if it holds one.

    Raises:
        InvalidArgumentError: the bytes are not a TenSEAL context, the context holds a secret key
            (it would have let the server decrypt: refused, nothing kept), its parameters differ
            from this model's, or it lacks relinearization or Galois keys.
    """
    try:
        client = tenseal.context_from(data)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise InvalidArgumentError(f"not a serialized TenSEAL context: {exc}") from None
    if client.is_private():
        del client
        raise InvalidArgumentError(
            "the context contains a secret key; serialize it with save_secret_key=False: the server must not hold it"
        )
    if client.seal_context().data.key_parms_id() != context.key_parms_id():
        raise InvalidArgumentError("the context's encryption parameters differ from this model's spec")
    if not (client.has_relin_keys() and client.has_galois_keys()):
        raise InvalidArgumentError("the context lacks relinearization or Galois keys")
    public = client.public_key().data if client.has_public_key() else None
    return client.relin_keys().data, client.galois_keys().data, public
