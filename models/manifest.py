"""The model manifest: everything a server, a client and an auditor need to know about one artifact.

A manifest sits beside ``model.onnx`` in ``<repo>/<model>/<version>/manifest.json``. It is the
single source of truth for how to feed the model (shape, dtype, normalization), what it outputs,
how private it is (the DP record, straight from the accountant) and how it was quantized.
"""

from __future__ import annotations

import math
import re
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.errors import InvalidArgumentError

MANIFEST_SCHEMA_VERSION = 2  # 2: the DP record says how its randomness was drawn
MODEL_FILE = "model.onnx"
MANIFEST_FILE = "manifest.json"
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]*$"


def validate_model_name(name: str) -> str:
    """Checked before training starts, so that a bad ``--name`` does not cost a training run."""
    if not re.fullmatch(MODEL_NAME_PATTERN, name):
        raise InvalidArgumentError(
            f"model name {name!r} must be lower-case letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, ser_json_inf_nan="strings")


class Normalization(_Record):
    """``normalized = (raw * scale - mean) / std``; mean/std hold one value or one per feature."""

    scale: float = Field(gt=0)
    mean: list[float] = Field(min_length=1)
    std: list[float] = Field(min_length=1)
    fitted_on: str

    @model_validator(mode="after")
    def _same_length(self) -> Normalization:
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std must have the same length")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self

    def apply(self, raw: np.ndarray) -> np.ndarray:
        """Normalize raw inputs to float32; per-feature values broadcast over the last axis."""
        mean, std = np.asarray(self.mean, np.float64), np.asarray(self.std, np.float64)
        return ((raw.astype(np.float64) * self.scale - mean) / std).astype(np.float32)


class InputSpec(_Record):
    name: str
    shape: list[int] = Field(description="shape of one sample, without the batch axis")
    dtype: Literal["float32"] = "float32"
    raw_range: tuple[float, float] = Field(description="range of raw values before normalization")
    normalization: Normalization


class OutputSpec(_Record):
    name: str
    labels: list[str] = Field(min_length=2)
    kind: Literal["logits"] = "logits"


class DPRecord(_Record):
    """DP-SGD's privacy record. ``epsilon`` comes from the accountant after training.

    A non-private baseline has ``epsilon = inf`` and ``noise_multiplier = 0``; it went through the
    same code path (per-sample clipping, Poisson sampling), only without noise.

    How the randomness was drawn is part of the record (see :mod:`models.randomness`): a model
    whose noise and batches came from the operating system's CSPRNG (``secure_rng``) carries no
    seed that reproduces them; a replayable one carries its ``replay_seed`` and is never served
    as a DP model, whatever its epsilon. A record that carries a bare ``seed`` (manifest schema 1,
    whose noise a published seed replays) or lacks the randomness fields is refused.
    """

    epsilon: float = Field(ge=0, description="spent, per the accountant after the last step")
    target_epsilon: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    noise_multiplier: float = Field(ge=0)
    max_grad_norm: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    expected_batch_size: int = Field(gt=0)
    epochs: int = Field(gt=0)
    steps: int = Field(gt=0)
    accountant: Literal["prv"] = "prv"
    poisson_sampling: bool = True
    secure_rng: bool = Field(description="noise and Poisson sampling drawn from the OS CSPRNG, recorded nowhere")
    rng: str = Field(min_length=1, description="the generator that drew the noise and the batches")
    noise_method: str = Field(min_length=1, description="how Gaussian samples were made from its bits")
    replay_seed: int | None = Field(
        description="the seed that reproduces noise and batches; present exactly when secure_rng is false"
    )
    init_seed: int = Field(description="seed of the initial weights, which DP-SGD's threat model takes as public")
    dataset: str
    private_size: int = Field(gt=0, description="examples DP-SGD trained on (n)")

    @model_validator(mode="before")
    @classmethod
    def _no_bare_seed(cls, data: object) -> object:
        if isinstance(data, dict) and "seed" in data:
            raise ValueError(
                "dp.seed: a seed that reproduces the DP noise voids the epsilon (anyone can replay training); "
                "retrain with secure randomness (schema 2 records secure_rng, rng and no replay seed)"
            )
        return data

    @model_validator(mode="after")
    def _seed_iff_replayable(self) -> DPRecord:
        if self.secure_rng and self.replay_seed is not None:
            raise ValueError("dp.replay_seed: a record that claims secure noise must not carry a seed that replays it")
        if not self.secure_rng and self.replay_seed is None:
            raise ValueError("dp.replay_seed: replayable randomness must record its seed (secure_rng is false)")
        return self

    @property
    def private(self) -> bool:
        """Trained with noise for a finite target epsilon (whether or not that noise is replayable)."""
        return math.isfinite(self.target_epsilon)

    @property
    def claims_dp(self) -> bool:
        """The epsilon is delivered: finite, and the noise cannot be replayed."""
        return self.private and self.secure_rng

    @property
    def label(self) -> str:
        """What every listing shows: the accountant's epsilon only where it is delivered."""
        if not self.private:
            return "epsilon: inf (no DP)"
        if not self.secure_rng:
            return "epsilon: none (replayable noise)"
        return f"epsilon: {self.epsilon:.3f} (delta {self.delta:g}, {self.accountant} accountant)"


UINT8_ACTIVATIONS = "uint8, per-tensor, asymmetric"
A16W8_ACTIVATIONS = "input uint8, hidden uint16 (A16W8), per-tensor, asymmetric"


class QuantizationRecord(_Record):
    scheme: Literal["static-qdq"] = "static-qdq"
    weights: Literal["int8, per-output-channel, symmetric, 7-bit range [-63, 63]"] = (
        "int8, per-output-channel, symmetric, 7-bit range [-63, 63]"
    )
    activations: Literal[
        "uint8, per-tensor, asymmetric", "input uint8, hidden uint16 (A16W8), per-tensor, asymmetric"
    ] = UINT8_ACTIVATIONS
    bias: Literal["int32, scale = input scale x weight scale"] = "int32, scale = input scale x weight scale"
    calibration_method: Literal["minmax"] = "minmax"
    calibration_split: str = Field(description="which data calibrated the activation ranges")
    calibration_size: int = Field(gt=0)


class Metrics(_Record):
    fp32_accuracy: float = Field(ge=0, le=1)
    int8_accuracy: float = Field(ge=0, le=1)
    test_size: int = Field(gt=0)


class TrainingRecord(_Record):
    command: str = Field(description="the exact command that produced this artifact")
    architecture: str
    optimizer: str
    learning_rate: float
    wall_time_seconds: float
    torch_threads: int
    torch_version: str
    opacus_version: str
    machine: str
    created: str


class FileRecord(_Record):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class LayerRecord(_Record):
    op: Literal["conv", "dense", "square", "avgpool", "flatten"]
    detail: str
    levels: int = Field(ge=0, description="CKKS multiplicative levels this layer consumes")


class EmpiricalAudit(_Record):
    """An empirical lower bound on epsilon from a one-run privacy audit, beside the accountant's figure.

    The accountant's epsilon is an upper bound proved for the algorithm; this one is measured on
    the code that actually ran: canaries inserted into a training run with the model's own DP-SGD
    mechanism (noise multiplier, clipping, sample rate, steps), guessed afterwards, and turned into
    an epsilon that the mechanism exceeds with probability at most ``1 - confidence`` if the
    audit is sound (Steinke, Nasr and Jagielski 2023). A bound above the accountant's epsilon
    means the implementation leaks more than its proof allows. It is a lower bound: a small value
    says the attack found little, not that the model leaks little. It does not describe
    ``model.onnx`` (which ``files`` hashes) but another run of the same mechanism.
    """

    method: str = Field(description="the auditing procedure, with its reference")
    epsilon_lower_bound: float = Field(ge=0, description="empirical: the mechanism's epsilon is at least this")
    confidence: float = Field(gt=0, lt=1, description="probability that the bound holds, over the audit's coins")
    delta: float = Field(ge=0, lt=1, description="the delta at which epsilon is bounded (the model's own)")
    canaries: int = Field(gt=0, description="m: canaries, each included in the audit run with probability 1/2")
    canary_kind: str
    guesses: int = Field(ge=0, description="r: canaries guessed in or out (the others abstained on)")
    correct: int = Field(ge=0)
    date: str
    results_file: str = Field(description="the benchmark results that hold the whole audit")

    @model_validator(mode="after")
    def _counts_in_order(self) -> EmpiricalAudit:
        if not self.correct <= self.guesses <= self.canaries:
            raise ValueError("need correct <= guesses <= canaries")
        return self


class Manifest(_Record):
    schema_version: Literal[2] = MANIFEST_SCHEMA_VERSION
    name: str = Field(pattern=MODEL_NAME_PATTERN)
    version: int = Field(ge=1)
    task: Literal["classification"] = "classification"
    dataset: str
    dataset_description: str
    input: InputSpec
    output: OutputSpec
    layers: list[LayerRecord] = Field(min_length=1)
    multiplicative_depth: int = Field(ge=1)
    dp: DPRecord
    quantization: QuantizationRecord
    metrics: Metrics
    training: TrainingRecord
    files: dict[str, FileRecord]
    audit: EmpiricalAudit | None = None

    @field_validator("files")
    @classmethod
    def _has_model_file(cls, files: dict[str, FileRecord]) -> dict[str, FileRecord]:
        if MODEL_FILE not in files:
            raise ValueError(f"files must list {MODEL_FILE}")
        return files

    @model_validator(mode="after")
    def _depth_matches_layers(self) -> Manifest:
        if self.multiplicative_depth != sum(layer.levels for layer in self.layers):
            raise ValueError("multiplicative_depth must equal the sum of the layers' levels")
        return self
