"""The encryption plan: the public spec that travels to clients, and the server's encoded layers.

``compile_plan`` lowers a model to affine maps and squares, chooses the input packing (im2col
when the first layer is a convolution, flat otherwise; see :mod:`gateway.he.packing`), lays
each affine map out as baby-step / giant-step diagonals in the lane's virtual slots, chooses
CKKS parameters for the depth, the width and a rigorous bound on every value, and collects the
rotation steps, the costs per layer and the error bound into the public :class:`EncryptionSpec`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import tenseal.sealapi as seal
from pydantic import BaseModel, ConfigDict, Field

from gateway.he.graph import Affine, LoweredModel, Square, lower
from gateway.he.linear import DiagonalPlan, EncodedLinear, next_power_of_two, plan_matrix, plan_replicated
from gateway.he.packing import ConvGeometry, Packing
from gateway.he.params import CkksParameters, Precision, choose_parameters
from gateway.he.wire import dump, load_ciphertext, load_galois_keys, load_public_context, load_relin_keys
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
    precision: Precision = Field(default="standard", description="the profile the parameters were chosen for")
    parameters: CkksParameters
    rotation_steps: list[int] = Field(description="the only rotations evaluation uses: make Galois keys for these")
    packing: Packing
    input_scale: float = Field(description="uint8 quantization the client applies before encrypting")
    input_zero_point: int
    layers: list[LayerCost]
    logit_error_bound: float = Field(
        description="bound on |encrypted - exact| for each logit, where exact is the int8 network without "
        "onnxruntime's rounding of intermediate activations (see CIPHERTEXT_NOISE)"
    )

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


def _error_bound(params: CkksParameters, lowered: LoweredModel, bounds: list[float], rotations: list[int]) -> float:
    """The bound under the noise model above (:data:`CIPHERTEXT_NOISE`), carried through every stage.

    An affine map scales its input's error by its largest absolute row sum and adds the
    rounding of its encoded weights against the input and the fresh noise of its rotations
    and rescale; a square doubles the relative error and adds its relinearization and rescale.
    The last layer rotates at the product's scale (about ``2**scale_bits`` times the result's)
    and rescales once, so its rotations add next to nothing.
    """
    noise = CIPHERTEXT_NOISE * params.poly_modulus_degree
    encoding = ENCODING_NOISE * math.sqrt(params.poly_modulus_degree)
    scale, result_scale = 2.0**params.scale_bits, 2.0**params.result_scale_bits
    value = float(np.abs(lowered.input_quantization.dequantize(np.array([0, 255]))).max())
    error = noise / scale  # encryption
    last = len(lowered.stages) - 1
    for index, (stage, turns, bound) in enumerate(zip(lowered.stages, rotations, bounds, strict=True)):
        if isinstance(stage, Affine):
            out_scale = result_scale if index == last else scale
            rotation_scale = out_scale * scale if index == last else out_scale
            error = (
                float(np.abs(stage.matrix).sum(1).max()) * error
                + math.sqrt(stage.matrix.shape[1]) * value * encoding / out_scale
                + turns * noise / rotation_scale
                + noise / out_scale
            )
        else:
            error = 2 * value * error + error**2 + 2 * noise / scale
        value = bound
    return error


def compile_plan(path: Path, *, precision: Precision = "standard") -> tuple[EncryptionSpec, list[DiagonalPlan | None]]:
    """Lower the model at ``path`` and plan it with parameters of the given ``precision``.

    Raises:
        UnsupportedOperatorError: an operator CKKS cannot evaluate, named with its node.
        InvalidArgumentError: a layer or a value range that no secure parameter set holds.
    """
    lowered = lower(path)
    if not isinstance(lowered.stages[-1], Affine) or not isinstance(lowered.stages[0], Affine):
        raise InvalidArgumentError("the model must start and end with a linear layer")
    virtual = _virtual_slots(lowered)
    bounds = lowered.bounds()
    params = choose_parameters(depth=lowered.depth, slots_needed=virtual, value_bound=max(bounds), precision=precision)
    packing = _packing(lowered, slots=params.slots, virtual_slots=virtual)
    plans: list[DiagonalPlan | None] = []
    costs: list[LayerCost] = []
    period = virtual
    for index, (stage, bound) in enumerate(zip(lowered.stages, bounds, strict=True)):
        if isinstance(stage, Square):
            plans.append(None)
            costs.append(
                LayerCost(
                    kind="square",
                    shape=str(stage.width),
                    rotations=0,
                    plaintext_products=0,
                    ciphertext_products=1,
                    levels=1,
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
                levels=1,
                value_bound=bound,
            )
        )
    steps = sorted({step * packing.lanes for plan in plans if plan is not None for step in plan.rotation_steps} - {0})
    spec = EncryptionSpec(
        precision=precision,
        parameters=params,
        rotation_steps=steps,
        packing=packing,
        input_scale=lowered.input_quantization.scale,
        input_zero_point=lowered.input_quantization.zero_point,
        layers=costs,
        logit_error_bound=_error_bound(params, lowered, bounds, [p.rotations if p else 0 for p in plans]),
    )
    return spec, plans


class EncryptedModel:
    """Server side: the plan's plaintexts encoded once at load; evaluation needs public keys only.

    Read-only after construction: one instance per worker process serves any number of
    requests, each with its own client's keys.
    """

    def __init__(self, path: Path, *, precision: Precision = "standard") -> None:
        self.path = path
        self.spec, stages = compile_plan(path, precision=precision)
        context = self.spec.parameters.seal_context
        self.context = context
        self.evaluator = seal.Evaluator(context)
        self._layers: list[EncodedLinear | None] = []
        parms_id = context.first_parms_id()
        self.input_scale = 2.0**self.spec.parameters.scale_bits
        scale = self.input_scale
        last = len(stages) - 1
        for index, plan in enumerate(stages):
            if plan is None:
                self._layers.append(None)
                data = context.get_context_data(parms_id)
                scale = scale * scale / float(data.parms().coeff_modulus()[-1].value())
            else:
                encoded = EncodedLinear(
                    plan,
                    context=context,
                    parms_id=parms_id,
                    lanes=self.spec.packing.lanes,
                    input_scale=scale,
                    output_scale=2.0**self.spec.parameters.result_scale_bits if index == last else None,
                )
                self._layers.append(encoded)
                scale = encoded.output_scale
            parms_id = context.get_context_data(parms_id).next_context_data().parms_id()

    def load_keys(self, relin: bytes, galois: bytes) -> tuple[seal.RelinKeys, seal.GaloisKeys]:
        """A client's evaluation keys, checked by SEAL against this model's parameters.

        Raises:
            InvalidArgumentError: bytes that are not keys for these parameters, or Galois keys
                that lack one of the plan's rotation steps.
        """
        return self._checked(load_relin_keys(self.context, relin), load_galois_keys(self.context, galois))

    def load_context(self, data: bytes) -> tuple[seal.RelinKeys, seal.GaloisKeys]:
        """The keys of a public TenSEAL context; one holding a secret key is refused (see ``wire``)."""
        return self._checked(*load_public_context(self.context, data))

    def _checked(
        self, relin_keys: seal.RelinKeys, galois_keys: seal.GaloisKeys
    ) -> tuple[seal.RelinKeys, seal.GaloisKeys]:
        """SEAL's load checks structure, not purpose: Galois keys load as relinearization keys too
        (the same format), and relinearizing with them crashes SEAL. So check what each key is for."""
        if not relin_keys.has_key(2):
            raise InvalidArgumentError("the relinearization key holds no key for s^2: are the keys swapped?")
        elements = self.spec.parameters.galois_elements(self.spec.rotation_steps)
        missing = [s for s, e in zip(self.spec.rotation_steps, elements, strict=True) if not galois_keys.has_key(e)]
        if missing:
            raise InvalidArgumentError(f"the Galois keys lack rotation steps {missing[:5]}: make keys from the spec")
        return relin_keys, galois_keys

    def evaluate(self, ciphertext: bytes, keys: tuple[seal.RelinKeys, seal.GaloisKeys]) -> bytes:
        """One encrypted ciphertext (up to ``lanes`` inputs) in, its encrypted logits out."""
        x = load_ciphertext(self.context, ciphertext)
        if x.parms_id() != self.context.first_parms_id() or x.size() != 2:
            raise InvalidArgumentError("the ciphertext is not a fresh encryption at this model's first level")
        if x.scale != self.input_scale:
            raise InvalidArgumentError(f"the ciphertext's scale must be 2**{self.spec.parameters.scale_bits}")
        relin_keys, galois_keys = keys
        for layer in self._layers:
            if layer is None:
                squared = seal.Ciphertext()
                self.evaluator.square(x, squared)
                self.evaluator.relinearize_inplace(squared, relin_keys)
                self.evaluator.rescale_to_next_inplace(squared)
                x = squared
            else:
                x = layer.evaluate(self.evaluator, x, galois_keys)
        return dump(x)
