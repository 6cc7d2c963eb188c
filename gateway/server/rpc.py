"""The servicers' one wrapper: domain errors become the mapped status, anything else INTERNAL.

Servicer methods raise :mod:`models.errors` classes; :func:`rpc` aborts the call with the code
from :mod:`gateway.status` and the error's message. Anything else is a bug: it is logged with its
traceback and the caller gets INTERNAL without internals.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc

from gateway.status import status_for
from models import errors

logger = logging.getLogger(__name__)

T = TypeVar("T")
Handler = Callable[..., Awaitable[T]]


def rpc(method: Handler) -> Handler:
    """Run a servicer method; abort with the mapped status if it raises a domain error."""

    @functools.wraps(method)
    async def wrapper(self, request, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except errors.HegateError as exc:
            await context.abort(status_for(exc), str(exc))
        except grpc.aio.AbortError:
            raise
        except Exception:
            logger.exception("%s failed", method.__qualname__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; it has been logged")

    return wrapper
