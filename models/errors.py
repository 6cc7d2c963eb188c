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


class ResourceExhaustedError(HegateError):
    """A request exceeds a bounded resource (a memory budget, a queue's capacity, ...).

    Bounds keep one client from starving the others; the message names the bound and the amount
    asked for, so the caller can tell whether a smaller request or a later retry can succeed.
    """


class UnauthenticatedError(HegateError):
    """The call carries no API key, or one that the configuration does not know."""


class DeadlineExceededError(HegateError):
    """The caller's deadline passed before the work finished; the work is abandoned."""


class UnavailableError(HegateError):
    """The service cannot take the request right now (starting, stopping, replacing workers);
    the same request may succeed on retry."""


class InternalError(HegateError):
    """Something failed that the caller could not have caused or avoided; it is logged."""


class WorkerCrashedError(InternalError):
    """An evaluation worker process died while holding the request; a replacement is starting.

    If the request's own bytes crashed it, retrying will crash the replacement too, which is
    why this is not reported as retryable.
    """
