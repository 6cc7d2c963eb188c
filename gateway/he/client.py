"""Client side: keys from the public spec, encryption of inputs, decryption of their logits.

The secret key is made here and never leaves this object; what goes to the server is the
relinearization key and Galois keys for exactly the spec's rotation steps (and, for the
``circuit_private`` profile, a public key). Up to
``spec.packing.lanes`` inputs share one ciphertext and cost the server as much as one.
"""

from __future__ import annotations

import numpy as np
import tenseal.sealapi as seal

from gateway.he.plan import EncryptionSpec
from gateway.he.wire import dump, load_ciphertext
from models.errors import InvalidArgumentError
from models.quantization import QuantParams


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

        The input is rounded to the model's uint8 grid first, as the int8 model would round it.

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
        """The logits of an encrypted result: ``[outputs]`` for one input, ``[count, outputs]`` for a batch."""
        plaintext = seal.Plaintext()
        seal.Decryptor(self.context, self._secret_key).decrypt(load_ciphertext(self.context, result), plaintext)
        logits = self.spec.packing.unpack(np.array(self._encoder.decode_double(plaintext)), count or 1)
        return logits[0] if count is None else logits
