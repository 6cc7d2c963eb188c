"""CKKS parameters: chosen from depth and precision, and refused below 128-bit security.

The security limit is the HomomorphicEncryption.org standard's: for ring degree ``N`` the total
bit count of the modulus (the ciphertext primes plus the special key-switching prime) must not
exceed ``MAX_MODULUS_BITS[N]`` for 128-bit classical security with a ternary secret. These are
the values SEAL's ``CoeffModulus.MaxBitCount(N, tc128)`` returns; a test checks them against SEAL.
"""

from __future__ import annotations

import math
import typing
from functools import cached_property
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.errors import InvalidArgumentError

if TYPE_CHECKING:
    import tenseal.sealapi as seal

MAX_MODULUS_BITS = {4096: 109, 8192: 218, 16384: 438, 32768: 881}
MAX_PRIME_BITS = 60
MIN_SCALE_BITS = 26  # below this, the intermediate layers' rounding reaches the logits' third decimal
RESULT_SCALE_BITS = 24  # the result's rounding, ~2**-24 relative: far below any logit margin

Precision = Literal["standard", "high"]
Profile = Literal["standard", "high", "circuit_private"]
"""Every profile a client may ask for. The first two differ in precision only; ``circuit_private``
(see :mod:`gateway.he.flooding`) also hides the model in the result, and needs the client's public key."""
PROFILES: tuple[Profile, ...] = typing.get_args(Profile)


class PrecisionProfile(BaseModel):
    """What a parameter set must give, before it is made as small (fast) as 128-bit security allows.

    ``standard`` holds logits to about 1e-3 in the smallest ring: what class agreement needs. ``high``
    asks for a 50-bit scale and a 40-bit result, which usually takes the next ring degree: about
    2**15 times smaller logit errors for 2-4x the time, keys and bytes. The privacy benchmark sweeps both.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    result_scale_bits: int = Field(ge=10, le=MAX_PRIME_BITS)
    min_scale_bits: int = Field(ge=20, le=MAX_PRIME_BITS)


PRECISIONS: dict[Precision, PrecisionProfile] = {
    "standard": PrecisionProfile(result_scale_bits=RESULT_SCALE_BITS, min_scale_bits=MIN_SCALE_BITS),
    "high": PrecisionProfile(result_scale_bits=40, min_scale_bits=50),
}


class CkksParameters(BaseModel):
    """Ring degree, modulus chain and scale: the public part of a CKKS context.

    ``coeff_modulus_bits`` lists every prime, the special prime last (SEAL's convention). A
    ciphertext starts with all but the special prime and loses one prime per rescale, so it
    supports ``depth = len(coeff_modulus_bits) - 2`` rescales before only the first prime is left.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    poly_modulus_degree: int = Field(description="ring degree N; N/2 slots")
    coeff_modulus_bits: list[int] = Field(min_length=3)
    scale_bits: int = Field(ge=20, le=2 * MAX_PRIME_BITS, description="above one prime when a level drops two")
    result_scale_bits: int = Field(default=RESULT_SCALE_BITS, ge=10, le=2 * MAX_PRIME_BITS)

    @model_validator(mode="after")
    def _secure(self) -> CkksParameters:
        limit = MAX_MODULUS_BITS.get(self.poly_modulus_degree)
        if limit is None:
            raise ValueError(f"poly_modulus_degree must be one of {sorted(MAX_MODULUS_BITS)}")
        if any(not 20 <= bits <= MAX_PRIME_BITS for bits in self.coeff_modulus_bits):
            raise ValueError(f"every prime must have 20 to {MAX_PRIME_BITS} bits")
        if sum(self.coeff_modulus_bits) > limit:
            raise ValueError(
                f"{sum(self.coeff_modulus_bits)} modulus bits exceed the {limit} that N={self.poly_modulus_degree} "
                "allows at 128-bit security (HomomorphicEncryption.org standard)"
            )
        return self

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def depth(self) -> int:
        return len(self.coeff_modulus_bits) - 2

    def galois_elements(self, steps: list[int]) -> list[int]:
        """SEAL's Galois element for a left rotation by ``step`` slots: ``3**step mod 2N``."""
        return [pow(3, step, 2 * self.poly_modulus_degree) for step in steps]

    @cached_property
    def seal_context(self) -> seal.SEALContext:
        """The SEAL context; SEAL re-checks the 128-bit limit itself. (TenSEAL is imported here, not
        above: the gateway's settings name the precision profiles and should load light.)"""
        import tenseal.sealapi as seal

        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(self.poly_modulus_degree)
        parms.set_coeff_modulus(seal.CoeffModulus.Create(self.poly_modulus_degree, self.coeff_modulus_bits))
        context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
        if not context.parameters_set():
            raise InvalidArgumentError(f"SEAL refuses these parameters: {context.parameters_error_message()}")
        return context


def choose_parameters(
    *, depth: int, slots_needed: int, value_bound: float, precision: Precision = "standard"
) -> CkksParameters:
    """The smallest ring that holds ``slots_needed`` values through ``depth`` rescales at the
    ``precision`` asked for, with the largest scale that ring allows at 128-bit security.

    The first prime is the only one left in a result, so it sets the result's size: it holds
    values up to ``value_bound`` at ``2**result_scale_bits`` (the last layer lowers the scale to
    that), plus a sign bit and a bit of margin. Every other prime, special prime included, gets
    the scale: the whole rest of the modulus budget, for precision in the intermediate layers.

    Args:
        depth: multiplicative depth (rescales) of the plan.
        slots_needed: the widest vector the plan packs into one ciphertext.
        value_bound: a bound on ``|value|`` at every stage (see ``LoweredModel.bounds``).
        precision: a key of :data:`PRECISIONS`: the result's scale and the least scale accepted.

    Raises:
        InvalidArgumentError: nothing within 128-bit security fits.
    """
    profile = PRECISIONS[precision]
    result_scale_bits = profile.result_scale_bits
    first = result_scale_bits + max(1, math.ceil(math.log2(max(value_bound, 1.0)))) + 2
    if first > MAX_PRIME_BITS:
        raise InvalidArgumentError(
            f"values up to {value_bound:.3g} need a {first}-bit first prime; at most {MAX_PRIME_BITS} bits exist"
        )
    for degree, limit in sorted(MAX_MODULUS_BITS.items()):
        scale = min(MAX_PRIME_BITS, (limit - first) // (depth + 1))
        if degree // 2 >= slots_needed and scale >= max(profile.min_scale_bits, first):
            bits = [first] + [scale] * (depth + 1)
            return CkksParameters(
                poly_modulus_degree=degree,
                coeff_modulus_bits=bits,
                scale_bits=scale,
                result_scale_bits=result_scale_bits,
            )
    raise InvalidArgumentError(
        f"no ring degree holds {slots_needed} slots at depth {depth} with a scale of at least "
        f"{profile.min_scale_bits} bits and a {first}-bit first prime within 128-bit security"
    )
