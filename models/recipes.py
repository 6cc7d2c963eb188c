"""Default architecture options and hyperparameters per (dataset, architecture).

The bundled models were trained with these defaults; command-line flags override any field,
and the exact command lands in the manifest.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from models.errors import NotFoundError
from models.training import TrainingConfig


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str
    architecture: str
    architecture_options: dict[str, int]
    training: TrainingConfig


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


def recipe_for(dataset: str, architecture: str, **overrides: object) -> Recipe:
    """The default recipe for ``(dataset, architecture)`` with ``overrides`` applied.

    ``overrides`` may name any :class:`TrainingConfig` field (``epsilon`` is required); ``None``
    values keep the default.

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
    )
