"""The domain error tree shared by every hegate layer.

Errors carry no transport details: the gateway maps each class to a gRPC status code in one
place, and the CLI turns any of them into a one-line message and a non-zero exit code.
"""

from __future__ import annotations


class HegateError(Exception):
    """Base class of every error that hegate raises on purpose."""


class InvalidArgumentError(HegateError):
    """A caller passed a value that can never work (bad shape, out-of-range setting, ...)."""


class NotFoundError(HegateError):
    """A named thing (model, version, dataset, key) does not exist."""


class ModelArtifactError(HegateError):
    """A model artifact on disk is missing, corrupt or inconsistent with its manifest.

    The message always names the offending file and what is wrong with it.
    """


class MissingExtraError(HegateError):
    """An optional dependency group is not installed; the message names the install command."""
