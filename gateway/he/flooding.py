"""Circuit privacy (the ``circuit_private`` profile): a result that tells its client the result and nothing else.

**What leaks without it.** A CKKS result decrypts to ``Delta * y + e``: the logits ``y`` and an
error ``e`` that the evaluation left. The client holds the secret key, so it reads the whole
phase, ``e`` included, and it knows its own input ciphertext and keys. ``e`` is a deterministic
function of those and of the model: how each rotation's key-switching noise and each rescale's
rounding travelled through the weights. So is the ciphertext's second component ``c1``. Read
across queries, both are equations in the weights beyond what ``y`` says.

**The mechanism** (:class:`Flooder`, run by the server after the last layer, while the result
still sits over two primes ``q0 * q1``; the client uploads a public key with its evaluation keys):

1. *re-randomize*: add ``z = Enc_pk(0)``, a fresh public-key encryption of zero (SEAL's: ``(p0 u
   + e0, p1 u + e1)``, ``u`` ternary, ``e0, e1`` centred binomial);
2. *flood*: add to the first component a polynomial ``E`` whose ``N`` coefficients are
   independent and uniform on ``[-2**b, 2**b)``, drawn from the operating system's CSPRNG
   (``os.urandom``) for every result, with ``2**b >= 2**s * B`` (:data:`FLOODING_BITS` ``s = 40``)
   and ``B`` a bound on every coefficient of the result's error (evaluation plus ``z``);
3. rescale once more (drop ``q1``), so the result has one prime like the other profiles.

**Why it hides the model.** Let ``y = f~(x')``: the served network applied to ``x'``, the values
the client's ciphertext actually holds; ``f~`` is the network with its weights as the server
encoded them (public structure, and the same function for every client). Fix everything the
client knows (secret key, keys, input ciphertext). Before step 3 the result is ``(c0', c1') =
(c0 + z0 + E, c1 + z1)``; its phase is ``round(M) + d + E`` with ``M = Delta * sigma^-1(y)`` (a
function of ``y`` only) and ``d`` the evaluation's error plus ``z``'s, ``|d_i| <= B``.

* Hybrid 1 (statistical): for any fixed shift ``|d_i| <= B``, ``d_i + E_i`` and ``E_i`` are
  ``|d_i| / 2**(b+1) <= 2**-(s+1)`` apart; the ``N`` coefficients are independent, so the phase
  is within ``N * 2**-(s+1)`` of ``round(M) + E`` (:attr:`CircuitPrivacy.statistical_distance`:
  ``2**-27`` at ``N = 16384``), which no longer depends on ``u``, ``e0``, ``e1`` or the model.
* Hybrid 2 (computational): ``p1 = a`` is uniform, and ``(a, a u + e1)`` is an RLWE sample with
  the fresh ternary secret ``u``, pseudorandom under the assumption SEAL's public-key encryption
  already rests on; so ``c1' = c1 + a u + e1`` is indistinguishable from uniform, whatever ``c1``.
* What is left, ``(c1*, round(M) + E - c1* s)`` with ``c1*`` uniform, is sampled from ``y``
  and the client's key alone. Step 3 is post-processing: it hides nothing less.

**What it rests on.**

* ``B`` = ``Delta * eps + B_pk``. ``eps`` bounds the evaluation error in every slot; it comes from
  the noise model of :mod:`gateway.he.plan` (each rotation, relinearization and rescale adds
  ``CIPHERTEXT_NOISE * N / scale`` to a slot, twice what was measured, carried through the layers
  as for the stated error bound) without its encoding and input terms, which are part of ``f~``
  and ``x'``. This is a **stated heuristic, not a proof**: a worst-case bound (every rounding at
  its extreme, ``||sigma(e)||_inf <= N ||e||_inf``) is about ``2**13`` larger and leaves no precision
  at these parameters. The coefficient bound follows from the slot bound rigorously
  (``||e||_inf <= ||sigma(e)||_inf``); tests and ``hegate bench privacy`` check measured errors
  against the slot bound. ``B_pk = 21 (2N + 1) + (N + 1) / 2`` is proved for honestly made keys:
  SEAL's errors are centred binomial within 21, ``u`` and the secret ternary (the last term: SEAL
  encrypts at a higher level and switches down).
* Honest key generation (a semi-honest client): a client that makes keys from a large secret or
  a large-error public key pushes the noise past ``B``; the server cannot see that (no
  zero-knowledge proof of well-formed keys here). Likewise an input ciphertext holding values far
  outside the model's input range (the SDK clips; the server cannot check a ciphertext) breaks the
  value bounds the noise model uses. Either attacks only the model owner, never another client.
* RLWE with a ternary secret, for hybrid 2.

**What it does not hide.** ``y`` itself, at the precision it is returned (model extraction by
many queries: bound it with rate limits per tenant); ``f~`` is the encoded network, whose logits
differ from the exact int8 network's by double-precision encoding error (~``2**-40`` relative),
below the flood but not hidden by it; the plan (rotation steps, depth, parameters: public in the
spec), evaluation time, sizes, and which profile was used. Across ``Q`` results the statistical
distances add: ``Q * N * 2**-(s+1)``. It protects the model from the client, not the client's
key from the server (that is the SDK's rounding of decrypted logits).

**What it costs** (the parameters :func:`choose_private_parameters` picks). The flood lands in
the decrypted logits: ``2**s`` times the evaluation error. So every level drops two primes instead
of one (a scale near ``2**90``, so the evaluation error sits about ``2**60`` below the values) and
a second prime ``q1`` at the end leaves room for the flood above the result: for the MNIST CNN at
``N = 16384``, a flood of ``2**61`` over a result scale of ``2**79``, a standard deviation of
``2e-4`` of a logit and a stated bound of ``4.2e-3`` (the standard profile states ``9.6e-2``).
Twice the primes of the ``high`` profile cost about three times its Galois-key bytes and its
time (``bench/results/quick/privacy.md``).
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable

import numpy as np
import tenseal.sealapi as seal
import zstandard
from pydantic import BaseModel, ConfigDict, Field

from gateway.he.params import MAX_MODULUS_BITS, MAX_PRIME_BITS, CkksParameters
from gateway.he.wire import dump, load_ciphertext
from models.errors import InvalidArgumentError

FLOODING_BITS = 40
"""``s``: the flood exceeds the error bound by ``2**s`` in every coefficient."""
FAILURE_BITS = 40
"""The flood's stated effect on the logits holds for every slot except with probability ``2**-40``."""
KEY_NOISE_BOUND = 21
"""SEAL's centred binomial error (standard deviation 3.2): every coefficient within 21."""
SPECIAL_PRIME_BITS = MAX_PRIME_BITS
MAX_FLOOD_LOGIT_ERROR = 2.0**-4
"""The most the flood may move a logit (at ``1 - 2**-40``) for a parameter set to be chosen."""
LEVELS_PER_LAYER = 2
"""Primes each layer drops: a scale of two primes keeps the evaluation error ``2**60`` below the values."""
FLOOD_OVER_ROUNDING_BITS = 4
"""After the flood, the last rescale's rounding ((N + 1) / 2) stays ``2**4`` below what is left of it."""


class CircuitPrivacy(BaseModel):
    """The flood of a ``circuit_private`` spec: public, so that anyone can check the claim's numbers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    statistical_security_bits: int = Field(description="s: the flood exceeds the error bound by 2**s")
    evaluation_noise_bound: float = Field(
        description="heuristic bound on every coefficient of the evaluation's error at the result scale"
    )
    public_key_noise_bound: float = Field(description="proved bound on the re-randomizer's error (honest keys)")
    flooding_bits: int = Field(description="b: each coefficient of the flood is uniform on [-2**b, 2**b)")
    flooding_logit_bound: float = Field(description="the flood's effect on any logit, except with prob. 2**-40")
    flooding_logit_std: float = Field(description="standard deviation of the flood's effect on one logit")
    statistical_distance: float = Field(description="N * 2**-(s+1): the result's distance from a simulation")


def public_key_noise_bound(degree: int) -> float:
    """``|e u + e1 s + e0|`` per coefficient of ``Enc_pk(0)``, proved for honest keys (see the module doc)."""
    return KEY_NOISE_BOUND * (2 * degree + 1) + (degree + 1) / 2


def _hoeffding(degree: int) -> float:
    """``t / 2**b``: every slot's real part of a uniform flood on ``[-2**b, 2**b)`` stays within ``t``
    except with probability ``2**-FAILURE_BITS`` (Hoeffding, union over the ``N / 2`` slots)."""
    return math.sqrt(2 * degree * (math.log(degree) + FAILURE_BITS * math.log(2)))


def flood_for(
    params: CkksParameters, evaluation_bound: float, *, final_prime_bits: int, noise_per_operation: float
) -> CircuitPrivacy:
    """The flood for ``params``, whose result scale is ``2**result_scale_bits`` over ``q0 * q1``.

    ``evaluation_bound`` bounds the evaluation error in every slot, in logits; ``final_prime_bits``
    is ``q1``'s size (the rescale after the flood); ``noise_per_operation`` the noise model's slot
    error of one operation at scale 1 (for that rescale's rounding).
    """
    degree = params.poly_modulus_degree
    result_scale = 2.0**params.result_scale_bits
    evaluation = result_scale * evaluation_bound
    key_noise = public_key_noise_bound(degree)
    bits = FLOODING_BITS + math.ceil(math.log2(evaluation + key_noise))
    after_rescale = result_scale / 2.0**final_prime_bits
    bound = 2.0**bits * _hoeffding(degree) / result_scale + noise_per_operation / after_rescale
    return CircuitPrivacy(
        statistical_security_bits=FLOODING_BITS,
        evaluation_noise_bound=evaluation,
        public_key_noise_bound=key_noise,
        flooding_bits=bits,
        flooding_logit_bound=bound,
        flooding_logit_std=2.0**bits * math.sqrt(degree / 6) / result_scale,
        statistical_distance=degree * 2.0 ** -(FLOODING_BITS + 1),
    )


def choose_private_parameters(
    *,
    depth: int,
    slots_needed: int,
    value_bound: float,
    evaluation_bound: Callable[[CkksParameters], float],
    noise_per_operation: Callable[[int], float],
) -> tuple[CkksParameters, CircuitPrivacy]:
    """The smallest ring where a flood of ``2**40`` times the error bound moves a logit by at most
    :data:`MAX_FLOOD_LOGIT_ERROR`, and within it the most precise chain.

    The chain is ``[q0, q1] + [p] * (2 * depth) + [special]``: each layer drops two ``p``-bit
    primes (scale ``2**(2p)``); the result lands over ``q0 * q1`` at scale ``2**R``, where the flood
    goes; the rescale after it drops ``q1``. Constraints: the values and the flood fit ``q0 * q1``
    and, after that rescale, ``q0``; the flood stays ``2**4`` above that rescale's rounding.

    Args:
        depth: layers (affine maps and squares).
        slots_needed: the widest vector the plan packs into one ciphertext.
        value_bound: a bound on ``|value|`` at every stage.
        evaluation_bound: the noise model's bound on the evaluation error in every slot (logits)
            for a candidate parameter set, without encoding and input terms.
        noise_per_operation: the noise model's slot error of one operation at scale 1, for ``N``.

    Raises:
        InvalidArgumentError: no ring within 128-bit security gives that precision.
    """
    value_bits = max(1, math.ceil(math.log2(max(value_bound, 1.0))))
    for degree, limit in sorted(MAX_MODULUS_BITS.items()):
        if degree // 2 < slots_needed:
            continue
        best: tuple[float, CkksParameters, CircuitPrivacy] | None = None
        for prime in range(MAX_PRIME_BITS, 29, -1):
            end = limit - SPECIAL_PRIME_BITS - LEVELS_PER_LAYER * prime * depth
            for q1 in range(20, min(MAX_PRIME_BITS, end - 20) + 1):
                q0 = min(MAX_PRIME_BITS, end - q1)
                result_bits = q0 + q1 - value_bits - 5
                if q0 < 20 or result_bits - q1 + value_bits > q0 - 4:
                    continue
                params = CkksParameters(
                    poly_modulus_degree=degree,
                    coeff_modulus_bits=[q0, q1] + [prime] * (LEVELS_PER_LAYER * depth) + [SPECIAL_PRIME_BITS],
                    scale_bits=LEVELS_PER_LAYER * prime,
                    result_scale_bits=result_bits,
                )
                flood = flood_for(
                    params,
                    evaluation_bound(params),
                    final_prime_bits=q1,
                    noise_per_operation=noise_per_operation(degree),
                )
                fits = flood.flooding_bits <= q0 + q1 - 5 and flood.flooding_bits - q1 <= q0 - 4
                above_rounding = flood.flooding_bits - q1 >= math.log2(degree) + FLOOD_OVER_ROUNDING_BITS
                if fits and above_rounding and (best is None or flood.flooding_logit_bound < best[0]):
                    best = (flood.flooding_logit_bound, params, flood)
        if best is not None and best[0] <= MAX_FLOOD_LOGIT_ERROR:
            return best[1], best[2]
    raise InvalidArgumentError(
        f"no ring holds {slots_needed} slots at depth {depth} with a flood of 2**{FLOODING_BITS} over the "
        f"evaluation error below {MAX_FLOOD_LOGIT_ERROR} of a logit within 128-bit security"
    )


# -- the server's step ----------------------------------------------------------------------------------

_COMPRESSION = 5  # byte of SEAL's 16-byte header: 0 none, 1 zlib, 2 zstd
_CIPHERTEXT_HEAD = 97  # parms_id 32, is_ntt_form 1, size 8, degree 8, primes 8, scale 8, correction 8, header 16 + 8
_NTT_FLAG, _SIZE, _DEGREE, _PRIMES, _SCALE = 32, 33, 41, 49, 57


def _payload(data: bytes) -> bytes:
    if data[_COMPRESSION] == 2:
        return zstandard.ZstdDecompressor().decompress(data[16:], max_output_size=1 << 30)
    if data[_COMPRESSION] == 0:
        return data[16:]
    raise RuntimeError(f"unexpected SEAL compression mode {data[_COMPRESSION]}")


class Flooder:
    """Re-randomizes and floods results at one level (two primes) for one model's parameters.

    Read-only after construction, like the :class:`~gateway.he.plan.EncryptedModel` that holds it.
    """

    def __init__(self, context: seal.SEALContext, parms_id, privacy: CircuitPrivacy) -> None:
        self.context = context
        self.parms_id = parms_id
        self.bits = privacy.flooding_bits
        data = context.get_context_data(parms_id)
        self.primes = [int(m.value()) for m in data.parms().coeff_modulus()]
        self.degree = data.parms().poly_modulus_degree()
        self._evaluator = seal.Evaluator(context)

    def flood(self) -> np.ndarray:
        """A fresh flood: ``N`` integers uniform on ``[-2**b, 2**b)`` from ``os.urandom``, as residues
        ``[primes, N]`` (uint64). ``b + 1`` random bits per coefficient, so no value is likelier than
        another. Up to 62 bits (every bundled model) in int64 arithmetic: 0.3 ms at N = 16384 where
        Python integers take 14 ms."""
        offset = 1 << self.bits
        if self.bits + 1 <= 63:
            words = np.frombuffer(os.urandom(8 * self.degree), np.uint64) >> np.uint64(64 - (self.bits + 1))
            flood = words.astype(np.int64) - np.int64(offset)
            return np.array([np.mod(flood, np.int64(q)).astype(np.uint64) for q in self.primes])
        width = (self.bits + 1 + 7) // 8
        raw = os.urandom(width * self.degree)
        mask = (1 << (self.bits + 1)) - 1
        flood = np.array(
            [(int.from_bytes(raw[i : i + width], "little") & mask) - offset for i in range(0, len(raw), width)],
            dtype=object,
        )
        return np.array([(flood % q).astype(np.uint64) for q in self.primes])

    def sanitize(self, result: seal.Ciphertext, public_key: seal.PublicKey) -> seal.Ciphertext:
        """``result + Enc_pk(0) + (E, 0)``, rescaled once: see the module doc.

        Raises:
            InvalidArgumentError: the result is not at this flooder's level.
        """
        if result.parms_id() != self.parms_id:
            raise InvalidArgumentError("the result is not at the level where this plan floods")
        zero = seal.Ciphertext()
        seal.Encryptor(self.context, public_key).encrypt_zero(self.parms_id, zero)
        self._evaluator.transform_from_ntt_inplace(zero)
        data = dump(zero)
        payload = bytearray(_payload(data))
        size, degree, primes = struct.unpack_from("<QQQ", payload, _SIZE)
        if payload[_NTT_FLAG] != 0 or (size, degree, primes) != (2, self.degree, len(self.primes)):
            raise RuntimeError("SEAL's ciphertext layout is not the one this module was written for")
        components = np.frombuffer(payload, np.uint64, offset=_CIPHERTEXT_HEAD).reshape(2, primes, degree).copy()
        moduli = np.array(self.primes, np.uint64)[:, None]
        components[0] = (components[0] + self.flood()) % moduli  # residues below 2**60: no overflow
        struct.pack_into("<d", payload, _SCALE, result.scale)
        payload[_CIPHERTEXT_HEAD:] = components.tobytes()
        header = data[:_COMPRESSION] + b"\x00" + data[_COMPRESSION + 1 : 8] + struct.pack("<Q", 16 + len(payload))
        flooded = load_ciphertext(self.context, header + bytes(payload))
        self._evaluator.transform_to_ntt_inplace(flooded)
        sanitized = seal.Ciphertext()
        self._evaluator.add(result, flooded, sanitized)
        self._evaluator.rescale_to_next_inplace(sanitized)
        return sanitized
