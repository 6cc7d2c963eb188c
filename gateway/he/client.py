"""Client side: keys from the public spec, encryption of one input, decryption of its logits.

The secret key is made here and never leaves this object; what goes to the server is the
relinearization key and Galois keys for exactly the spec's rotation steps.
"""

from __future__ import annotations

import numpy as np
import tenseal.sealapi as seal

from gateway.he.plan import EncryptionSpec
from models.errors import InvalidArgumentError
from models.quantization import QuantParams


def galois_elements(steps: list[int], poly_modulus_degree: int) -> list[int]:
    """SEAL's Galois element for a left rotation by ``step`` slots: ``3**step mod 2N``."""
    return [pow(3, step, 2 * poly_modulus_degree) for step in steps]


class ClientKeys:
    def __init__(self, spec: EncryptionSpec) -> None:
        self.spec = spec
        self.context = spec.parameters.seal_context
        generator = seal.KeyGenerator(self.context)
        self._secret_key = generator.secret_key()
        self.relin_keys = seal.RelinKeys()
        generator.create_relin_keys(self.relin_keys)
        self.galois_keys = seal.GaloisKeys()
        generator.create_galois_keys(
            galois_elements(spec.rotation_steps, spec.parameters.poly_modulus_degree), self.galois_keys
        )
        self._encoder = seal.CKKSEncoder(self.context)
        self._input = QuantParams(scale=spec.input_scale, zero_point=spec.input_zero_point)

    def encrypt(self, x: np.ndarray) -> seal.Ciphertext:
        """Encrypt one normalized input of the spec's input shape."""
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
        ciphertext = seal.Ciphertext()
        seal.Encryptor(self.context, self._secret_key).encrypt_symmetric(plaintext, ciphertext)
        return ciphertext

    def decrypt(self, ciphertext: seal.Ciphertext) -> np.ndarray:
        plaintext = seal.Plaintext()
        seal.Decryptor(self.context, self._secret_key).decrypt(ciphertext, plaintext)
        return np.array(self._encoder.decode_double(plaintext)[: self.spec.output_width])
