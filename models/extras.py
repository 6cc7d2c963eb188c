"""Optional dependency groups: one clear message instead of an ImportError traceback."""

from __future__ import annotations

import importlib
from types import ModuleType

from models.errors import MissingExtraError

TRAIN_INSTALL = "pip install 'hegate[train]'  (or: make test, which installs every extra)"


def missing_train_extra(module: str) -> MissingExtraError:
    return MissingExtraError(
        f"{module!r} is not installed: training and datasets need the 'train' extra. Install it with: {TRAIN_INSTALL}"
    )


def require_train_extra(module: str) -> ModuleType:
    """Import ``module``, which only the ``train`` extra provides.

    Raises:
        MissingExtraError: naming the install command, when the module is missing.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise missing_train_extra(module) from exc
