"""The encryption plan: the public spec that travels to clients, and the server's encoded layers.

``compile_plan`` lowers a model to affine maps and squares, chooses the input packing (im2col
when the first layer is a convolution, flat otherwise; see :mod:`gateway.he.packing`), lays
each affine map out as baby-step / giant-step diagonals in the lane's virtual slots, chooses
CKKS parameters for the profile, the depth, the width and a rigorous bound on every value, and
collects the rotation steps, the costs per layer and the error bound into the public
:class:`EncryptionSpec`. The ``circuit_private`` profile adds a flood (:mod:`gateway.he.flooding`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tenseal.sealapi as seal
from pydantic import BaseModel, ConfigDict, Field, model_serializer

from gateway.he.flooding import LEVELS_PER_LAYER, CircuitPrivacy, Flooder, choose_private_parameters
from gateway.he.graph import Affine, LoweredModel, Square, lower
from gateway.he.linear import (
    DiagonalPlan,
    EncodedLinear,
    dropped_primes,
    next_power_of_two,
    plan_matrix,
    plan_replicated,
)
from gateway.he.packing import ConvGeometry, Packing
from gateway.he.params import CkksParameters, Profile, choose_parameters
from gateway.he.wire import (
    dump,
    load_ciphertext,
    load_galois_keys,
    load_public_context,
    load_public_key,
    load_relin_keys,
)
from models.errors import InvalidArgumentError

PLAN_VERSION = 2
# Noise model of the stated error bound. A ciphertext operation's fresh error moves a slot by at
# most CIPHERTEXT_NOISE * N / scale: measured here at N = 8192, a rescale's rounding (which the
# secret key multiplies) moves it by about 2**12 (0.4 N), a rotation's key switching by about
# 2**17 (16 N); the constant covers both twice over. Encoding a plaintext rounds N coefficients,
# which moves a slot by sqrt(N / 12) in a standard deviation; ENCODING_NOISE * sqrt(N) covers
# 13 of them. Tests and the benchmark check measured errors against the bound.
CIPHERTEXT_NOISE = 32.0
ENCODING_NOISE = 4.0


class LayerCost(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    shape: str
    rotations: int
    plaintext_products: int
    ciphertext_products: int
    levels: int
    value_bound: float = Field(description="a bound on |value| after this layer, for every valid input")


class EncryptionSpec(BaseModel):
    """Everything a client needs to make keys, encrypt inputs and read results. No secrets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plan_version: int = PLAN_VERSION
    precision: Profile = Field(
        default="standard", description="the profile the parameters were chosen for (standard, high, circuit_private)"
    )
    parameters: CkksParameters
    rotation_steps: list[int] = Field(description="the only rotations evaluation uses: make Galois keys for these")
    packing: Packing
    input_scale: float = Field(description="uint8 quantization the client applies before encrypting")
    input_zero_point: int
    layers: list[LayerCost]
    logit_error_bound: float = Field(
        description="bound on |encrypted - exact| for each logit, where exact is the int8 network without "
        "onnxruntime's rounding of intermediate activations (see CIPHERTEXT_NOISE); with circuit_private, "
        "the flood's effect too (holds except with probability 2**-40 per result)"
    )
    circuit_privacy: CircuitPrivacy | None = Field(
        default=None, description="circuit_private only: the flood; the client must register a public key"
    )

    @model_serializer(mode="wrap")
    def _without_absent_privacy(self, handler):
        """Standard and high specs serialize as before the field existed, so older clients parse them."""
        data = handler(self)
        if data.get("circuit_privacy") is None:
            data.pop("circuit_privacy", None)
        return data

    @property
    def input_shape(self) -> list[int]:
        return self.packing.input_shape

    @property
    def output_width(self) -> int:
        return self.packing.outputs

    @property
    def rotations(self) -> int:
        return sum(layer.rotations for layer in self.layers)

    @property
    def plaintext_products(self) -> int:
        return sum(layer.plaintext_products for layer in self.layers)


def im2col_matrix(affine: Affine, packing: Packing) -> np.ndarray:
    """The first layer's matrix acting on the im2col-packed lane instead of the flat input.

    Row ``c * block + p`` (channel ``c``, output position ``p``) takes the value under tap ``k``
    from position ``k * block + p``. The result is checked to compute exactly ``affine.matrix``.

    Raises:
        InvalidArgumentError: the map is not the convolution that the geometry describes.
    """
    block, gather = packing.conv.block, packing.gather
    rows, cols = affine.matrix.shape
    if rows % block:
        raise InvalidArgumentError(f"a {rows}-row map is not a convolution with {block} output positions")
    position = np.arange(rows) % block
    matrix = np.zeros((rows, packing.virtual_slots))
    for tap in range(packing.conv.taps):
        slot = tap * block + position
        source = gather[slot]
        inside = source >= 0
        matrix[np.flatnonzero(inside), slot[inside]] = affine.matrix[np.flatnonzero(inside), source[inside]]
    recovered = np.zeros((rows, cols + 1))
    np.add.at(recovered.T, gather, matrix.T)  # sum each slot's column into the input index it holds
    if not np.array_equal(recovered[:, :cols], affine.matrix):
        raise InvalidArgumentError("the first layer is not a plain convolution over its input; cannot pack im2col")
    return matrix


def _packing(lowered: LoweredModel, slots: int, virtual_slots: int) -> Packing:
    first = lowered.stages[0]
    conv: ConvGeometry | None = first.conv if isinstance(first, Affine) else None
    return Packing(
        kind="im2col" if conv else "flat",
        input_shape=lowered.input_shape,
        slots=slots,
        virtual_slots=virtual_slots,
        outputs=lowered.stages[-1].matrix.shape[0],
        conv=conv,
    )


def _virtual_slots(lowered: LoweredModel) -> int:
    """Positions a lane needs: the packed input and the widest layer, rounded up to a power of two."""
    probe = _packing(lowered, slots=1 << 40, virtual_slots=1 << 40)
    widths = [probe.width] + [s.matrix.shape[0] for s in lowered.stages if isinstance(s, Affine)]
    return next_power_of_two(max(widths))


def _row_sums(lowered: LoweredModel) -> list[float]:
    """Each stage's largest absolute row sum (0 for a square): how much it can grow an error."""
    return [float(np.abs(s.matrix).sum(1).max()) if isinstance(s, Affine) else 0.0 for s in lowered.stages]


def _error_bound(
    params: CkksParameters,
    lowered: LoweredModel,
    bounds: list[float],
    rotations: list[int],
    *,
    row_sums: list[float],
    levels: int = 1,
    interaction_only: bool = False,
) -> float:
    """The bound under the noise model above (:data:`CIPHERTEXT_NOISE`), carried through every stage.

    An affine map scales its input's error by its largest absolute row sum and adds the
    rounding of its encoded weights against the input and the fresh noise of its rotations
    and rescale; a square doubles the relative error and adds its relinearization and rescale.
    The last layer rotates at the product's scale (about ``2**scale_bits`` times the result's)
    and rescales once, so its rotations add next to nothing. With ``levels`` primes per layer,
    each layer rescales that many times (the extra rescales, at larger scales, are counted at
    the smallest one).

    ``interaction_only`` leaves out the input's encryption and every plaintext's encoding: what
    remains is the noise that depends on how the client's ciphertext met the model, which the
    circuit-private flood must drown (the rest belongs to the input and to the encoded model).
    """
    noise = CIPHERTEXT_NOISE * params.poly_modulus_degree
    encoding = 0.0 if interaction_only else ENCODING_NOISE * math.sqrt(params.poly_modulus_degree)
    scale, result_scale = 2.0**params.scale_bits, 2.0**params.result_scale_bits
    value = float(np.abs(lowered.input_quantization.dequantize(np.array([0, 255]))).max())
    error = 0.0 if interaction_only else noise / scale  # encryption
    last = len(lowered.stages) - 1
    stages = zip(lowered.stages, rotations, bounds, row_sums, strict=True)
    for index, (stage, turns, bound, row_sum) in enumerate(stages):
        if isinstance(stage, Affine):
            out_scale = result_scale if index == last else scale
            rotation_scale = out_scale * scale if index == last else out_scale
            error = (
                row_sum * error
                + math.sqrt(stage.matrix.shape[1]) * value * encoding / out_scale
                + turns * noise / rotation_scale
                + levels * noise / out_scale
            )
        else:
            error = 2 * value * error + error**2 + (1 + levels) * noise / scale
        value = bound
    return error


def _plan_stages(
    lowered: LoweredModel, packing: Packing, virtual: int, levels: int
) -> tuple[list[DiagonalPlan | None], list[LayerCost]]:
    """Each stage's diagonals (None for a square) and cost; independent of the ring."""
    plans: list[DiagonalPlan | None] = []
    costs: list[LayerCost] = []
    period = virtual
    for index, (stage, bound) in enumerate(zip(lowered.stages, lowered.bounds(), strict=True)):
        if isinstance(stage, Square):
            plans.append(None)
            costs.append(
                LayerCost(
                    kind="square",
                    shape=str(stage.width),
                    rotations=0,
                    plaintext_products=0,
                    ciphertext_products=1,
                    levels=levels,
                    value_bound=bound,
                )
            )
            continue
        if index == 0 and packing.kind == "im2col":
            plan = plan_matrix(im2col_matrix(stage, packing), stage.bias, slots=virtual)
        else:
            plan = plan_replicated(stage.matrix, stage.bias, slots=virtual, period=period)
        period = plan.output_period or virtual
        plans.append(plan)
        rows, cols = stage.matrix.shape
        costs.append(
            LayerCost(
                kind="conv (im2col)" if index == 0 and packing.kind == "im2col" else "affine",
                shape=f"{rows}x{cols}",
                rotations=plan.rotations,
                plaintext_products=plan.products,
                ciphertext_products=0,
                levels=levels,
                value_bound=bound,
            )
        )
    return plans, costs


def compile_plan(path: Path, *, profile: Profile = "standard") -> tuple[EncryptionSpec, list[DiagonalPlan | None]]:
    """Lower the model at ``path`` and plan it with the parameters of ``profile``.

    Raises:
        UnsupportedOperatorError: an operator CKKS cannot evaluate, named with its node.
        InvalidArgumentError: a layer or a value range that no secure parameter set holds.
    """
    lowered = lower(path)
    if not isinstance(lowered.stages[-1], Affine) or not isinstance(lowered.stages[0], Affine):
        raise InvalidArgumentError("the model must start and end with a linear layer")
    virtual = _virtual_slots(lowered)
    bounds = lowered.bounds()
    private = profile == "circuit_private"
    levels = LEVELS_PER_LAYER if private else 1
    plans, costs = _plan_stages(lowered, _packing(lowered, slots=virtual, virtual_slots=virtual), virtual, levels)
    turns = [plan.rotations if plan else 0 for plan in plans]
    row_sums = _row_sums(lowered)
    privacy = None
    if private:
        if not plans[-1].output_period:
            # Every slot of a replicated result holds a logit or a zero; any other layout could leave
            # partial sums of the model in the slots besides the logits, which the flood does not hide.
            raise InvalidArgumentError("circuit_private needs a last layer in the replicated layout")
        params, privacy = choose_private_parameters(
            depth=lowered.depth,
            slots_needed=virtual,
            value_bound=max(bounds),
            evaluation_bound=lambda p: _error_bound(
                p, lowered, bounds, turns, row_sums=row_sums, levels=levels, interaction_only=True
            ),
            noise_per_operation=lambda degree: CIPHERTEXT_NOISE * degree,
        )
    else:
        params = choose_parameters(
            depth=lowered.depth, slots_needed=virtual, value_bound=max(bounds), precision=profile
        )
    packing = _packing(lowered, slots=params.slots, virtual_slots=virtual)
    steps = sorted({step * packing.lanes for plan in plans if plan is not None for step in plan.rotation_steps} - {0})
    bound = _error_bound(params, lowered, bounds, turns, row_sums=row_sums, levels=levels)
    spec = EncryptionSpec(
        precision=profile,
        parameters=params,
        rotation_steps=steps,
        packing=packing,
        input_scale=lowered.input_quantization.scale,
        input_zero_point=lowered.input_quantization.zero_point,
        layers=costs,
        logit_error_bound=bound + (privacy.flooding_logit_bound if privacy else 0.0),
        circuit_privacy=privacy,
    )
    return spec, plans


@dataclass(frozen=True)
class EvaluationKeys:
    """One client's keys as the evaluator uses them; ``public`` only for ``circuit_private``."""

    relin: seal.RelinKeys
    galois: seal.GaloisKeys
    context: seal.SEALContext
    public: seal.PublicKey | None = None

    @property
    def resident_bytes(self) -> int:
        """The bytes SEAL holds for these keys once deserialized: what the key tier's quotas count.

        Computed, not sampled: every key-switching key (one relinearization key, one Galois key per
        rotation element) is ``k - 1`` ciphertexts of 2 polynomials of ``N`` 64-bit coefficients
        modulo each of the ``k`` primes of the key level, ``16 N k (k - 1)`` bytes, and SEAL's load
        has checked every key against those parameters; a public key is one such ciphertext,
        ``16 N k``. Why not an RSS delta: SEAL's memory pool reuses freed blocks, so a load after
        other work can show far less (36.4 MiB of 67.5 for the first load after encoding the plan)
        and each later one the full amount. Measured 2026-12-03 (``pytest -s
        tests/test_he_plan_memory.py``: eight loads kept in a fresh ``spawn`` process, RSS from
        ``/proc/self/status``): mnist-cnn-eps3 (26 Galois keys and the relinearization key, N 8192,
        k 5; 27.6 MiB on the wire) 67.5 MiB computed, RSS deltas 67.5-69.9 MiB after the first load
        (mean 68.5); breast-cancer-linear-eps3 (5 Galois keys, N 4096, k 3) 2.25 MiB computed, mean
        delta 2.51 MiB (a load's own buffers weigh more in a small set).
        """
        key_level = self.context.key_context_data().parms()
        degree = key_level.poly_modulus_degree()
        primes = len(key_level.coeff_modulus())
        ciphertext = 2 * degree * primes * 8
        switching_keys = self.relin.size() + self.galois.size()
        return switching_keys * (primes - 1) * ciphertext + (ciphertext if self.public is not None else 0)


class EncryptedModel:
    """Server side: the plan's plaintexts encoded once at load; evaluation needs public keys only.

    Read-only after construction: one instance per worker process serves any number of
    requests, each with its own client's keys.
    """

    def __init__(self, path: Path, *, profile: Profile = "standard") -> None:
        self.path = path
        self.spec, stages = compile_plan(path, profile=profile)
        context = self.spec.parameters.seal_context
        self.context = context
        self.evaluator = seal.Evaluator(context)
        self._layers: list[EncodedLinear | None] = []
        self._levels = [layer.levels for layer in self.spec.layers]
        parms_id = context.first_parms_id()
        self.input_scale = 2.0**self.spec.parameters.scale_bits
        scale = self.input_scale
        last = len(stages) - 1
        for index, (plan, levels) in enumerate(zip(stages, self._levels, strict=True)):
            dropped, next_parms_id = dropped_primes(context, parms_id, levels)
            if plan is None:
                self._layers.append(None)
                scale = scale * scale / dropped
            else:
                encoded = EncodedLinear(
                    plan,
                    context=context,
                    parms_id=parms_id,
                    lanes=self.spec.packing.lanes,
                    input_scale=scale,
                    output_scale=2.0**self.spec.parameters.result_scale_bits if index == last else None,
                    levels=levels,
                )
                self._layers.append(encoded)
                scale = encoded.output_scale
            parms_id = next_parms_id
        privacy = self.spec.circuit_privacy
        self._flooder = Flooder(context, parms_id, privacy) if privacy else None

    @property
    def needs_public_key(self) -> bool:
        return self._flooder is not None

    def load_keys(self, relin: bytes, galois: bytes, public: bytes = b"") -> EvaluationKeys:
        """A client's evaluation keys, checked by SEAL against this model's parameters.

        Raises:
            InvalidArgumentError: bytes that are not keys for these parameters, Galois keys that
                lack one of the plan's rotation steps, or a public key missing (circuit_private)
                or not wanted (the other profiles).
        """
        public_key = self._public_key(public)
        return self._checked(load_relin_keys(self.context, relin), load_galois_keys(self.context, galois), public_key)

    def load_context(self, data: bytes) -> EvaluationKeys:
        """The keys of a public TenSEAL context; one holding a secret key is refused (see ``wire``).
        A circuit_private plan takes the context's public key too."""
        relin, galois, public = load_public_context(self.context, data)
        if self.needs_public_key and public is None:
            raise InvalidArgumentError(self._public_key_missing())
        return self._checked(relin, galois, public if self.needs_public_key else None)

    def _public_key_missing(self) -> str:
        return (
            "the circuit_private profile needs the client's public key (the server re-randomizes the "
            "result with a fresh encryption of zero under it); register it with the evaluation keys"
        )

    def _public_key(self, data: bytes) -> seal.PublicKey | None:
        if not self.needs_public_key:
            if data:
                raise InvalidArgumentError(
                    f"a public key is used by the circuit_private profile only, not {self.spec.precision!r}"
                )
            return None
        if not data:
            raise InvalidArgumentError(self._public_key_missing())
        return load_public_key(self.context, data)

    def _checked(
        self, relin_keys: seal.RelinKeys, galois_keys: seal.GaloisKeys, public: seal.PublicKey | None
    ) -> EvaluationKeys:
        """SEAL's load checks structure, not purpose: Galois keys load as relinearization keys too
        (the same format), and relinearizing with them crashes SEAL. So check what each key is for."""
        if not relin_keys.has_key(2):
            raise InvalidArgumentError("the relinearization key holds no key for s^2: are the keys swapped?")
        elements = self.spec.parameters.galois_elements(self.spec.rotation_steps)
        missing = [s for s, e in zip(self.spec.rotation_steps, elements, strict=True) if not galois_keys.has_key(e)]
        if missing:
            raise InvalidArgumentError(f"the Galois keys lack rotation steps {missing[:5]}: make keys from the spec")
        return EvaluationKeys(relin=relin_keys, galois=galois_keys, context=self.context, public=public)

    def evaluate(self, ciphertext: bytes, keys: EvaluationKeys) -> bytes:
        """One encrypted ciphertext (up to ``lanes`` inputs) in, its encrypted logits out
        (re-randomized and flooded with circuit_private)."""
        x = load_ciphertext(self.context, ciphertext)
        if x.parms_id() != self.context.first_parms_id() or x.size() != 2:
            raise InvalidArgumentError("the ciphertext is not a fresh encryption at this model's first level")
        if x.scale != self.input_scale:
            raise InvalidArgumentError(f"the ciphertext's scale must be 2**{self.spec.parameters.scale_bits}")
        for layer, levels in zip(self._layers, self._levels, strict=True):
            if layer is None:
                squared = seal.Ciphertext()
                self.evaluator.square(x, squared)
                self.evaluator.relinearize_inplace(squared, keys.relin)
                for _ in range(levels):
                    self.evaluator.rescale_to_next_inplace(squared)
                x = squared
            else:
                x = layer.evaluate(self.evaluator, x, keys.galois)
        if self._flooder is not None:
            if keys.public is None:
                raise InvalidArgumentError(self._public_key_missing())
            x = self._flooder.sanitize(x, keys.public)
        return dump(x)
