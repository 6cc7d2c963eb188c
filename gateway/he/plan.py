"""The encryption plan: the public spec that travels to clients, and the server's encoded layers.

``compile_plan`` lowers a model to affine maps and squares, lays each affine map out as
baby-step / giant-step diagonals, chooses CKKS parameters for the depth and width, and collects
every rotation step into the public :class:`EncryptionSpec`. Packing rule (shared by both sides
through the spec): the client rounds its normalized input with the model's input quantization,
flattens it, zero-pads it to ``input_period`` and repeats it across all slots; the result's
logits are slots ``[0, classes)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tenseal.sealapi as seal
from pydantic import BaseModel, ConfigDict, Field

from gateway.he.graph import Affine, LoweredModel, Square, lower
from gateway.he.linear import DiagonalPlan, EncodedLinear, next_power_of_two, plan_replicated
from gateway.he.params import CkksParameters, choose_parameters
from gateway.he.wire import dump, load_ciphertext, load_galois_keys, load_relin_keys
from models.errors import InvalidArgumentError

PLAN_VERSION = 1


class LayerCost(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    shape: str
    rotations: int
    plaintext_products: int
    ciphertext_products: int
    levels: int


class EncryptionSpec(BaseModel):
    """Everything a client needs to make keys, encrypt an input and read a result. No secrets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plan_version: int = PLAN_VERSION
    parameters: CkksParameters
    rotation_steps: list[int] = Field(description="the only rotations evaluation uses: make Galois keys for these")
    input_shape: list[int]
    input_scale: float = Field(description="uint8 quantization the client applies before encrypting")
    input_zero_point: int
    input_width: int
    input_period: int = Field(description="the input is zero-padded to this length and repeated across all slots")
    output_width: int
    layers: list[LayerCost]

    @property
    def rotations(self) -> int:
        return sum(layer.rotations for layer in self.layers)


def compile_plan(path: Path) -> tuple[EncryptionSpec, list[DiagonalPlan | None]]:
    """Lower the model at ``path`` and plan it; refuses unsupported operators and widths here."""
    lowered: LoweredModel = lower(path)
    widths = [s.matrix.shape[0] for s in lowered.stages if isinstance(s, Affine)]
    input_width = int(np.prod(lowered.input_shape))
    input_period = next_power_of_two(input_width)
    params = choose_parameters(depth=lowered.depth, slots_needed=max([input_period, *widths]))
    stages: list[DiagonalPlan | None] = []
    costs: list[LayerCost] = []
    period = input_period
    for stage in lowered.stages:
        if isinstance(stage, Affine):
            plan = plan_replicated(stage.matrix, stage.bias, slots=params.slots, period=period)
            period = plan.output_period or params.slots
            stages.append(plan)
            rows, cols = stage.matrix.shape
            costs.append(
                LayerCost(
                    kind="affine",
                    shape=f"{rows}x{cols}",
                    rotations=plan.rotations,
                    plaintext_products=plan.products,
                    ciphertext_products=0,
                    levels=1,
                )
            )
        elif isinstance(stage, Square):
            stages.append(None)
            costs.append(
                LayerCost(
                    kind="square",
                    shape=str(stage.width),
                    rotations=0,
                    plaintext_products=0,
                    ciphertext_products=1,
                    levels=1,
                )
            )
    steps = sorted(set().union(*(p.rotation_steps for p in stages if p is not None)))
    output_width = next(s.matrix.shape[0] for s in reversed(lowered.stages) if isinstance(s, Affine))
    spec = EncryptionSpec(
        parameters=params,
        rotation_steps=steps,
        input_shape=lowered.input_shape,
        input_scale=lowered.input_quantization.scale,
        input_zero_point=lowered.input_quantization.zero_point,
        input_width=input_width,
        input_period=input_period,
        output_width=output_width,
        layers=costs,
    )
    return spec, stages


class EncryptedModel:
    """Server side: the plan's plaintexts encoded once at load; evaluation needs public keys only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.spec, stages = compile_plan(path)
        context = self.spec.parameters.seal_context
        self.context = context
        self.evaluator = seal.Evaluator(context)
        self._layers: list[EncodedLinear | None] = []
        parms_id = context.first_parms_id()
        scale = 2.0**self.spec.parameters.scale_bits
        for plan in stages:
            if plan is None:
                self._layers.append(None)
                data = context.get_context_data(parms_id)
                scale = scale * scale / float(data.parms().coeff_modulus()[-1].value())
            else:
                encoded = EncodedLinear(plan, context=context, parms_id=parms_id, input_scale=scale)
                self._layers.append(encoded)
                scale = encoded.output_scale
            parms_id = context.get_context_data(parms_id).next_context_data().parms_id()

    def load_keys(self, relin: bytes, galois: bytes) -> tuple[seal.RelinKeys, seal.GaloisKeys]:
        """A client's evaluation keys, checked by SEAL against this model's parameters."""
        return load_relin_keys(self.context, relin), load_galois_keys(self.context, galois)

    def evaluate(self, ciphertext: bytes, keys: tuple[seal.RelinKeys, seal.GaloisKeys]) -> bytes:
        """One encrypted input in, its encrypted logits out; only public keys involved."""
        x = load_ciphertext(self.context, ciphertext)
        if x.parms_id() != self.context.first_parms_id() or x.size() != 2:
            raise InvalidArgumentError("the ciphertext is not a fresh encryption at this model's first level")
        if x.scale != 2.0**self.spec.parameters.scale_bits:
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
