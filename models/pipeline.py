"""From a dataset name to a validated artifact: train, quantize, export, score, write.

This is the one place that strings the steps together; each step lives in its own module.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models import architectures, onnx_runtime
from models.data import Dataset, load_dataset
from models.export import build_onnx
from models.layers import describe
from models.machine import machine_description
from models.manifest import (
    A16W8_ACTIVATIONS,
    UINT8_ACTIVATIONS,
    InputSpec,
    Metrics,
    OutputSpec,
    QuantizationRecord,
    TrainingRecord,
    validate_model_name,
)
from models.quantization import QuantizedNetwork, quantize_network
from models.recipes import Recipe
from models.repository import ModelArtifact, write_artifact
from models.training import TrainedModel, fp32_accuracy, train

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class ExportedModel:
    artifact: ModelArtifact
    network: QuantizedNetwork


def model_name(dataset: str, arch: str, epsilon: float) -> str:
    """``mnist-cnn-eps3``, ``breast-cancer-mlp-eps3``, ``mnist-mlp-epsinf``."""
    tag = "inf" if epsilon == float("inf") else f"{epsilon:g}"
    return f"{dataset.replace('_', '-')}-{arch}-eps{tag}"


def export_trained(
    *,
    trained: TrainedModel,
    dataset: Dataset,
    recipe: Recipe,
    out: Path,
    name: str,
    version: int,
    command: str,
) -> ExportedModel:
    """Quantize a trained module on the public split, export it, score it and write the artifact."""
    import opacus
    import torch

    public_x = dataset.normalize(dataset.public.x)
    layers = architectures.to_layers(trained.module)
    ranges = architectures.activation_ranges(trained.module, public_x)
    network = quantize_network(layers, ranges, activation_bits=recipe.activation_bits)
    records = [describe(layer) for layer in layers]
    model = build_onnx(
        network,
        input_name=INPUT_NAME,
        input_shape=dataset.input_shape,
        output_name=OUTPUT_NAME,
        num_outputs=len(dataset.labels),
        doc=f"hegate model {name} v{version}; provenance in manifest.json",
    )
    test_x = dataset.normalize(dataset.test.x)
    session = onnx_runtime.create_session(model.SerializeToString())
    int8_accuracy = float(np.mean(onnx_runtime.predict_logits(session, test_x).argmax(1) == dataset.test.y))
    raw = dataset.test.x
    fields = dict(
        name=name,
        version=version,
        dataset=dataset.name,
        dataset_description=dataset.description,
        input=InputSpec(
            name=INPUT_NAME,
            shape=dataset.input_shape,
            raw_range=(float(min(raw.min(), dataset.public.x.min())), float(max(raw.max(), dataset.public.x.max()))),
            normalization=dataset.normalization,
        ),
        output=OutputSpec(name=OUTPUT_NAME, labels=dataset.labels),
        layers=records,
        multiplicative_depth=sum(r.levels for r in records),
        dp=trained.dp,
        quantization=QuantizationRecord(
            activations=A16W8_ACTIVATIONS if recipe.activation_bits == 16 else UINT8_ACTIVATIONS,
            calibration_split=f"{dataset.name} public split",
            calibration_size=len(public_x),
        ),
        metrics=Metrics(
            fp32_accuracy=fp32_accuracy(trained.module, dataset), int8_accuracy=int8_accuracy, test_size=len(test_x)
        ),
        training=TrainingRecord(
            command=command,
            architecture=f"{recipe.architecture} {recipe.architecture_options}",
            optimizer=f"DP-SGD (SGD, momentum {recipe.training.momentum})",
            learning_rate=recipe.training.learning_rate,
            wall_time_seconds=round(trained.wall_time_seconds, 1),
            torch_threads=recipe.training.threads,
            torch_version=torch.__version__,
            opacus_version=opacus.__version__,
            machine=machine_description(),
            created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        ),
    )
    artifact = write_artifact(out, fields, model)
    return ExportedModel(artifact=artifact, network=network)


def train_private(recipe: Recipe, dataset: Dataset, *, progress: bool = True) -> TrainedModel:
    """Seed, build the architecture, fit its fixed parts on public data, then train with DP-SGD."""
    import torch

    torch.set_num_threads(recipe.training.threads)  # with a core busy elsewhere, 2 threads run 100x slower
    torch.manual_seed(recipe.training.seed)  # the initial weights are part of what the seed fixes
    module = architectures.build(
        recipe.architecture, dataset.input_shape, len(dataset.labels), **recipe.architecture_options
    )
    architectures.fit_public(module, dataset.normalize(dataset.public.x))
    return train(module=module, dataset=dataset, config=recipe.training, progress=progress)


def train_model(
    *, recipe: Recipe, out: Path, name: str | None = None, version: int = 1, command: str, progress: bool = True
) -> ExportedModel:
    """Train ``recipe`` with DP-SGD and write the int8 artifact to ``out/<name>/<version>``."""
    name = validate_model_name(name or model_name(recipe.dataset, recipe.architecture, recipe.training.epsilon))
    dataset = load_dataset(recipe.dataset)
    return export_trained(
        trained=train_private(recipe, dataset, progress=progress),
        dataset=dataset,
        recipe=recipe,
        out=out,
        name=name,
        version=version,
        command=command,
    )
