"""Shared fixtures: small digits models trained once per test session (a few seconds each), and the real
servers of ``services`` (``redis_server``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from services import redis_server  # noqa: F401 - a fixture, offered to every test module


@pytest.fixture(scope="session")
def digits():
    from models.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def trained_repo(tmp_path_factory) -> Path:
    """A repository with a digits cnn and a digits mlp, each trained for a few epochs at epsilon 3."""
    from models.pipeline import train_model
    from models.recipes import recipe_for

    root = tmp_path_factory.mktemp("repo")
    for arch in ("cnn", "mlp"):
        recipe = recipe_for("digits", arch, epsilon=3.0, epochs=4)
        train_model(recipe=recipe, out=root, command=f"test fixture digits {arch}", progress=False)
    return root


@pytest.fixture(scope="session")
def exported_cnn(tmp_path_factory):
    """A digits cnn with its QuantizedNetwork in memory, for export round-trip tests."""
    from models.pipeline import train_model
    from models.recipes import recipe_for

    recipe = recipe_for("digits", "cnn", epsilon=8.0, epochs=3)
    return train_model(recipe=recipe, out=tmp_path_factory.mktemp("cnn"), command="test", progress=False)
