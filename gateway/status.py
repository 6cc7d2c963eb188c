"""The one table between domain errors and gRPC status codes, read both ways.

The server aborts a call that raised a :mod:`models.errors` class with :func:`status_for`; the
client SDK raises the same class again from the status code with :func:`error_for`, carrying the
code in its ``status`` attribute.
"""

from __future__ import annotations

import grpc

from models import errors

STATUS: dict[type[errors.HegateError], grpc.StatusCode] = {
    errors.InvalidArgumentError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFoundError: grpc.StatusCode.NOT_FOUND,
    errors.ResourceExhaustedError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.UnauthenticatedError: grpc.StatusCode.UNAUTHENTICATED,
    errors.DeadlineExceededError: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.UnavailableError: grpc.StatusCode.UNAVAILABLE,
    errors.ModelArtifactError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.MissingExtraError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.InternalError: grpc.StatusCode.INTERNAL,
}


def status_for(error: errors.HegateError) -> grpc.StatusCode:
    """The code of the nearest mapped class in ``error``'s ancestry."""
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return grpc.StatusCode.INTERNAL


def error_for(code: grpc.StatusCode, message: str) -> errors.HegateError:
    """The domain error for a status code, with the code in its ``status`` attribute."""
    cls = next(
        (c for c, mapped in STATUS.items() if mapped == code and c.__base__ is errors.HegateError), errors.HegateError
    )
    error = cls(message if cls is not errors.HegateError else f"{code.name}: {message}")
    error.status = code
    return error
