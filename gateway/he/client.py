"""Client side: keys from the public spec, encryption of one input, decryption of its logits.

The secret key is made here and never leaves this object; what goes to the server is the
relinearization key and Galois keys for exactly the spec's rotation steps.
"""

from __future__ import annotations

import numpy as np
import tenseal.sealapi as seal

from gateway.he.plan import EncryptionSpec
from gateway.he.wire import dump, load_ciphertext
from models.errors import InvalidArgumentError
from models.quantization import QuantParams


def galois_elements(steps: list[int], poly_modulus_degree: int) -> list[int]:
    """SEAL's Galois element for a left rotation by ``step`` slots: ``3**step mod 2N``."""
    return [pow(3, step, 2 * poly_modulus_degree) for step in steps]


class ClientKeys:
    """A secret key and the public evaluation keys made from it, for one model's spec."""

    def __init__(self, spec: EncryptionSpec) -> None:
        self.spec = spec
        self.context = spec.parameters.seal_context
        self._generator = seal.KeyGenerator(self.context)
        self._secret_key = self._generator.secret_key()
        self._encoder = seal.CKKSEncoder(self.context)
        self._encryptor = seal.Encryptor(self.context, self._secret_key)
        self._input = QuantParams(scale=spec.input_scale, zero_point=spec.input_zero_point)

    def evaluation_keys(self) -> tuple[bytes, bytes]:
        """Seeded relinearization key and Galois keys (the spec's rotation steps only), as bytes."""
        elements = galois_elements(self.spec.rotation_steps, self.spec.parameters.poly_modulus_degree)
        return dump(self._generator.create_relin_keys()), dump(self._generator.create_galois_keys(elements))

    def encrypt(self, x: np.ndarray) -> bytes:
        """Encrypt one normalized input of the spec's input shape: a seeded ciphertext, as bytes."""
        x = np.asarray(x)
        if x.dtype != np.float32 or list(x.shape) != self.spec.input_shape:
            raise InvalidArgumentError(
                f"input must be float32 of shape {self.spec.input_shape}, got {x.dtype} {list(x.shape)}"
            )
        period = np.zeros(self.spec.input_period)
        period[: self.spec.input_width] = self._input.dequantize(self._input.quantize(x)).ravel()
        values = np.tile(period, self.spec.parameters.slots // self.spec.input_period)
        plaintext = seal.Plaintext()
        self._encoder.encode(values.tolist(), 2.0**self.spec.parameters.scale_bits, plaintext)
        return dump(self._encryptor.encrypt_symmetric(plaintext))

    def decrypt(self, result: bytes) -> np.ndarray:
        """The logits in an encrypted result."""
        plaintext = seal.Plaintext()
        seal.Decryptor(self.context, self._secret_key).decrypt(load_ciphertext(self.context, result), plaintext)
        return np.array(self._encoder.decode_double(plaintext)[: self.spec.output_width])
