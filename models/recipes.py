"""Default architecture options and hyperparameters per (dataset, architecture).

The bundled models were trained with these defaults; command-line flags override any field,
and the exact command lands in the manifest.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

from models.errors import InvalidArgumentError, NotFoundError
from models.manifest import A16W8_ACTIVATIONS, Manifest
from models.quantization import ActivationBits
from models.training import TrainingConfig


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str
    architecture: str
    architecture_options: dict[str, int]
    training: TrainingConfig
    activation_bits: ActivationBits = Field(description="width of the hidden activations in the int8 export")


# An MLP's hidden layer sends its rounding straight to the logits (no pooling averages it): with
# uint8 activations onnxruntime's classes differed from the exact network's, which the CKKS
# engine computes, on 0.2-0.7% of MNIST; with uint16, on none. A CNN's pooled features do not
# need it (99.98% agreement at uint8), and the linear model has no hidden activation.
_ACTIVATION_BITS: dict[str, ActivationBits] = {"mlp": 16}


_DEFAULTS: dict[tuple[str, str], tuple[dict[str, int], dict[str, float | int]]] = {
    ("mnist", "cnn"): (
        {"kernel": 5, "stride": 2, "padding": 0, "scales": 2, "orientations": 6, "pool": 2, "hidden": 0},
        {"epochs": 40, "batch_size": 1024, "learning_rate": 1.0, "momentum": 0.9, "max_grad_norm": 0.1},
    ),
    ("mnist", "mlp"): (
        {"hidden": 128},
        {"epochs": 20, "batch_size": 1024, "learning_rate": 0.1, "momentum": 0.9, "max_grad_norm": 1.0},
    ),
    ("digits", "cnn"): (
        {"kernel": 5, "stride": 1, "padding": 2, "scales": 1, "orientations": 4, "pool": 2, "hidden": 0},
        {"epochs": 10, "batch_size": 64, "learning_rate": 1.0, "momentum": 0.9, "max_grad_norm": 0.1},
    ),
    ("digits", "mlp"): (
        {"hidden": 32},
        {"epochs": 10, "batch_size": 64, "learning_rate": 0.1, "momentum": 0.9, "max_grad_norm": 1.0},
    ),
    ("breast_cancer", "linear"): (
        {},
        {"epochs": 30, "batch_size": 64, "learning_rate": 0.1, "momentum": 0.9, "max_grad_norm": 1.0},
    ),
    ("breast_cancer", "mlp"): (
        {"hidden": 16},
        {"epochs": 30, "batch_size": 64, "learning_rate": 0.1, "momentum": 0.9, "max_grad_norm": 1.0},
    ),
}


def recipe_for(
    dataset: str, architecture: str, *, activation_bits: ActivationBits | None = None, **overrides: object
) -> Recipe:
    """The default recipe for ``(dataset, architecture)`` with ``overrides`` applied.

    ``overrides`` may name any :class:`TrainingConfig` field (``epsilon`` is required); ``None``
    values keep the default, as does ``activation_bits=None`` (16 for an MLP, otherwise 8).

    Raises:
        NotFoundError: no recipe for that pair.
    """
    try:
        options, training = _DEFAULTS[(dataset, architecture)]
    except KeyError:
        known = ", ".join(f"{d}/{a}" for d, a in _DEFAULTS)
        raise NotFoundError(
            f"no recipe for dataset {dataset!r} with architecture {architecture!r}; known: {known}"
        ) from None
    given = {key: value for key, value in overrides.items() if value is not None}
    return Recipe(
        dataset=dataset,
        architecture=architecture,
        architecture_options=options,
        training=TrainingConfig(**{**training, **given}),
        activation_bits=activation_bits or _ACTIVATION_BITS.get(architecture, 8),
    )


def recipe_from_manifest(manifest: Manifest) -> Recipe:
    """The recipe that trained ``manifest``'s model, rebuilt from its DP and training records.

    An auditor needs more models trained exactly like a released one (the reference models of a
    membership-inference attack) without re-parsing the recorded command line. Every training
    field comes from the record; the architecture options are not overridable from the command
    line, so they are the recipe's defaults, checked against the recorded architecture.

    Raises:
        NotFoundError: no recipe for the recorded dataset and architecture.
        InvalidArgumentError: the record does not match this code's recipe (its architecture
            options changed since), or names no momentum.
    """
    architecture = manifest.training.architecture.split(" ", 1)[0]
    momentum = re.search(r"momentum ([0-9.eE+-]+)\)", manifest.training.optimizer)
    if momentum is None:
        raise InvalidArgumentError(f"{manifest.name}: no momentum in optimizer {manifest.training.optimizer!r}")
    dp = manifest.dp
    recipe = recipe_for(
        dp.dataset,
        architecture,
        activation_bits=16 if manifest.quantization.activations == A16W8_ACTIVATIONS else 8,
        epsilon=dp.target_epsilon,
        delta=dp.delta,
        epochs=dp.epochs,
        batch_size=dp.expected_batch_size,
        learning_rate=manifest.training.learning_rate,
        momentum=float(momentum.group(1)),
        max_grad_norm=dp.max_grad_norm,
        seed=dp.init_seed,
        randomness="secure" if dp.secure_rng else "replayable",
        threads=manifest.training.torch_threads,
    )
    rebuilt = f"{recipe.architecture} {recipe.architecture_options}"
    if rebuilt != manifest.training.architecture:
        raise InvalidArgumentError(
            f"{manifest.name}: trained as {manifest.training.architecture!r}, the recipe now builds {rebuilt!r}"
        )
    return recipe
