"""Client side: keys from the public spec, encryption of inputs, decryption of their logits.

The secret key is made here and never leaves this object; what goes to the server is the
relinearization key and Galois keys for exactly the spec's rotation steps (and, for the
``circuit_private`` profile, a public key). Up to
``spec.packing.lanes`` inputs share one ciphertext and cost the server as much as one.

Decrypted logits leave this object rounded to a grid (see :func:`logit_grid`): a full-precision
CKKS decryption is the exact value plus noise that depends on the secret key, and whoever sees
such values for known inputs can solve for the key (Li and Micciancio, "On the security of
homomorphic encryption on approximate numbers", 2021: IND-CPA-D). The one method that returns
them unrounded says so in its name and exists to measure the engine's error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import tenseal.sealapi as seal

from gateway.he.plan import EncryptionSpec
from gateway.he.wire import dump, load_ciphertext
from models.errors import InvalidArgumentError
from models.quantization import QuantParams

GRID_BOUND_MULTIPLE = 2  # the grid is at least this many stated error bounds (see logit_grid)


def logit_grid(*, bound: float) -> float:
    """The grid decrypted logits are rounded to: the smallest power of two at least twice ``bound``.

    With ``|decrypted - exact| <= bound`` (the plan's stated error bound), a decrypted logit lies
    in ``[exact - bound, exact + bound]``, an interval of width ``2 * bound <= grid``. Rounding to
    the nearest multiple of the grid has its boundaries at the half-way points, a grid apart, so
    that interval holds at most one of them: the rounded logit is one of at most two adjacent grid
    points. Which one depends on the secret key's noise only when the value lies within that
    noise of a boundary: the rest of the error (the rounding of the server's encoded weights) is
    the same for every encryption of an input and involves no key. The measured error is 30 to
    3,000 times smaller than the bound, so that is rare: two encryptions of the same input
    decrypted to identical rounded logits for all 320 repeated inputs of
    ``tests/test_he_engine.py`` (2026-12-03; it requires 97%). A power of two makes every rounded
    logit an exact float64 multiple of the grid.

    Class decisions: rounding is monotone, so it never reverses two logits; it can only make them
    equal, and only when the exact margin between them is below ``grid + 2 * bound``. The SDK takes
    the class from the decryption before rounding (see :meth:`ClientKeys.decrypt_classified`), so
    rounding changes no class; ``argmax`` over the rounded logits breaks a tie at the lowest index.

    Raises:
        InvalidArgumentError: the bound is not a positive finite number.
    """
    if not (math.isfinite(bound) and bound > 0):
        raise InvalidArgumentError(f"the logit error bound must be positive and finite, got {bound}")
    return 2.0 ** math.ceil(math.log2(GRID_BOUND_MULTIPLE * bound))


@dataclass(frozen=True)
class DecryptedLogits:
    """Rounded logits ``[count, outputs]`` (multiples of ``grid``) and each input's class ``[count]``."""

    logits: np.ndarray
    classes: np.ndarray
    grid: float


class ClientKeys:
    """A secret key and the public evaluation keys made from it, for one model's spec."""

    def __init__(self, spec: EncryptionSpec) -> None:
        self.spec = spec
        self.context = spec.parameters.seal_context
        self.logit_grid = logit_grid(bound=spec.logit_error_bound)
        self._generator = seal.KeyGenerator(self.context)
        self._secret_key = self._generator.secret_key()
        self._encoder = seal.CKKSEncoder(self.context)
        self._encryptor = seal.Encryptor(self.context, self._secret_key)
        self._input = QuantParams(scale=spec.input_scale, zero_point=spec.input_zero_point)

    def evaluation_keys(self) -> tuple[bytes, bytes]:
        """Seeded relinearization key and Galois keys (the spec's rotation steps only), as bytes."""
        elements = self.spec.parameters.galois_elements(self.spec.rotation_steps)
        return dump(self._generator.create_relin_keys()), dump(self._generator.create_galois_keys(elements))

    def public_key(self) -> bytes:
        """A public key, for the ``circuit_private`` profile: the server re-randomizes results with a
        fresh encryption of zero under it. It holds no secret: anyone may encrypt with it. (Not seeded:
        ``tenseal.sealapi`` does not expose SEAL's seeded public key, so it is twice the bytes.)"""
        public = seal.PublicKey()
        self._generator.create_public_key(public)
        return dump(public)

    def encrypt(self, inputs: np.ndarray) -> bytes:
        """Encrypt one normalized input, or a batch ``[n, *input_shape]`` of up to ``lanes``.

        The input is rounded to the model's uint8 grid first, as the int8 model would round it,
        saturating at the grid's ends: the plan's value bounds (and so its error bound and the
        size of its first prime) hold for every ciphertext made here.

        Raises:
            InvalidArgumentError: not float32, wrong shape, or more inputs than one ciphertext holds.
        """
        inputs = np.asarray(inputs)
        if inputs.dtype != np.float32:
            raise InvalidArgumentError(f"inputs must be float32, got {inputs.dtype}")
        if list(inputs.shape) == self.spec.input_shape:
            inputs = inputs[None]
        rounded = self._input.dequantize(self._input.quantize(inputs))
        plaintext = seal.Plaintext()
        self._encoder.encode(self.spec.packing.pack(rounded).tolist(), 2.0**self.spec.parameters.scale_bits, plaintext)
        return dump(self._encryptor.encrypt_symmetric(plaintext))

    def decrypt(self, result: bytes, count: int | None = None) -> np.ndarray:
        """The logits of an encrypted result, rounded to :attr:`logit_grid`: ``[outputs]`` for one
        input, ``[count, outputs]`` for a batch."""
        logits = self.decrypt_classified(result, count or 1).logits
        return logits[0] if count is None else logits

    def decrypt_classified(self, result: bytes, count: int) -> DecryptedLogits:
        """Rounded logits of ``count`` inputs and their classes, taken before rounding.

        The class is the argmax of the decryption before rounding: the encrypted class, which is
        the exact network's wherever its top-two margin exceeds twice the stated bound. It shows
        the noise only where that margin is within the noise, the same rare event as a logit at a
        grid boundary (see :func:`logit_grid`).
        """
        values = self.decrypt_unrounded_unsafe(result, count)
        logits = self.logit_grid * np.round(values / self.logit_grid)
        return DecryptedLogits(logits=logits, classes=values.argmax(axis=1), grid=self.logit_grid)

    def decrypt_unrounded_unsafe(self, result: bytes, count: int | None = None) -> np.ndarray:
        """UNSAFE: the full-precision decryption, CKKS noise included.

        That noise depends on the secret key; anyone who sees these values (for inputs they
        know or can guess) learns about the key (IND-CPA-D, see the module doc). This exists to
        measure the engine's error against the stated bound, in tests and benchmarks; never
        show, log or send its values. Use :meth:`decrypt` or :meth:`decrypt_classified`.
        """
        plaintext = seal.Plaintext()
        seal.Decryptor(self.context, self._secret_key).decrypt(load_ciphertext(self.context, result), plaintext)
        logits = self.spec.packing.unpack(np.array(self._encoder.decode_double(plaintext)), count or 1)
        return logits[0] if count is None else logits
