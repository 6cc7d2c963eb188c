"""Key uploads spooled within bounds: how many at once (per tenant and in all), how many bytes, how idle.

A key upload is a client stream of tens to hundreds of MiB (27.6 MiB for the default model's
keys, 212 MiB for the MNIST CNN's circuit_private set). On main every upload was buffered whole
with no cap on how many ran at once and no timeout between chunks: three stalled 300 MiB uploads
added about 1 GB to the gateway that stayed. Here:

- the header is read first and its announced size checked against ``max_bytes`` and the spool's
  free bytes, and the upload against the tenant's and the gateway's concurrent uploads: an upload
  over a cap is RESOURCE_EXHAUSTED before any of its data is read, and a tenant can hold at most
  ``tenant_uploads`` of the ``uploads`` slots, so it cannot lock other tenants out;
- the announced size is reserved for the upload's life, and its bytes go to an anonymous memory
  map of that size: the kernel gives it pages only as chunks arrive (a stalled upload holds what
  it sent, not what it announced), and unmapping returns every page at once, whatever the
  allocator would have kept of a list of chunks;
- every chunk (the header included) must arrive within ``idle_seconds`` of the previous one; a
  stalled upload fails with DEADLINE_EXCEEDED, and a failed, timed-out or cancelled upload unmaps
  its spool and frees its reservation when it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from gateway.api import hegate_v1_pb2 as pb
from models.errors import DeadlineExceededError, InvalidArgumentError, ResourceExhaustedError

logger = logging.getLogger(__name__)
MIB = 1 << 20


class UploadLimits(BaseModel):
    """What key uploads in flight may take from one gateway (see :mod:`gateway.server.uploads`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_bytes: int = Field(gt=0, description="largest key upload")
    spool_bytes: int = Field(gt=0, description="announced bytes of every upload in flight together")
    uploads: int = Field(ge=1, description="uploads in flight in all")
    tenant_uploads: int = Field(ge=1, description="uploads in flight per tenant")
    idle_seconds: float = Field(gt=0, description="longest wait for an upload's next chunk")


@dataclass(frozen=True)
class Upload:
    """A received upload: its header and its bytes, readable until the spool's context exits."""

    header: pb.KeysHeader
    data: memoryview


class UploadSpool:
    """Admits, receives and frees key uploads within :class:`UploadLimits` (one per gateway)."""

    def __init__(self, limits: UploadLimits) -> None:
        self.limits = limits
        self._reserved = 0
        self._uploads = 0
        self._tenants: dict[str, int] = {}

    @property
    def reserved_bytes(self) -> int:
        """Announced bytes of the uploads in flight."""
        return self._reserved

    @contextlib.asynccontextmanager
    async def receive(self, chunks: AsyncIterator[pb.RegisterKeysChunk], *, tenant: str) -> AsyncIterator[Upload]:
        """Read one upload; its bytes stay valid inside the ``async with`` and are freed when it exits.

        Raises:
            InvalidArgumentError: no header first, a second header, or bytes other than announced.
            ResourceExhaustedError: over ``max_bytes``, the spool's bytes or the uploads in flight
                (the tenant's or all); raised before any data chunk is read.
            DeadlineExceededError: no chunk for ``idle_seconds``.
        """
        stream = aiter(chunks)
        first = await self._next(stream)
        if first is None:
            raise InvalidArgumentError("empty key upload")
        if first.WhichOneof("part") != "header":
            raise InvalidArgumentError("the first chunk of a key upload must be its header")
        header = first.header
        total = header.total_bytes
        self._admit(total, tenant)
        try:
            with mmap.mmap(-1, max(total, 1)) as spool:
                received = 0
                while (chunk := await self._next(stream)) is not None:
                    if chunk.WhichOneof("part") != "data":
                        raise InvalidArgumentError("only the first chunk of a key upload may be a header")
                    end = received + len(chunk.data)
                    if end > total:
                        raise InvalidArgumentError(f"the upload exceeds the {total} bytes its header announced")
                    spool[received:end] = chunk.data
                    received = end
                if received != total:
                    raise InvalidArgumentError(f"the upload ended after {received} of {total} bytes")
                whole = memoryview(spool)
                data = whole[:total]
                try:
                    yield Upload(header=header, data=data)
                finally:  # the map cannot be closed while a view of it lives
                    data.release()
                    whole.release()
        finally:
            self._release(total, tenant)

    async def _next(self, stream: AsyncIterator[pb.RegisterKeysChunk]) -> pb.RegisterKeysChunk | None:
        try:
            return await asyncio.wait_for(anext(stream), self.limits.idle_seconds)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            raise DeadlineExceededError(
                f"no chunk of the key upload arrived for {self.limits.idle_seconds:g} s; the upload was abandoned"
            ) from None

    def _admit(self, total: int, tenant: str) -> None:
        limits = self.limits
        if total > limits.max_bytes:
            raise ResourceExhaustedError(
                f"a key upload of {total / MIB:.1f} MiB exceeds the largest accepted, "
                f"{limits.max_bytes / MIB:.1f} MiB ({total} > {limits.max_bytes} bytes)"
            )
        if self._tenants.get(tenant, 0) >= limits.tenant_uploads:
            raise ResourceExhaustedError(
                f"tenant {tenant!r} already has {limits.tenant_uploads} key uploads in flight, its limit; "
                f"retry when one has finished"
            )
        if self._uploads >= limits.uploads:
            raise ResourceExhaustedError(f"the gateway already receives {limits.uploads} key uploads; retry shortly")
        if self._reserved + total > limits.spool_bytes:
            raise ResourceExhaustedError(
                f"the key upload spool holds {self._reserved / MIB:.1f} of {limits.spool_bytes / MIB:.1f} MiB: "
                f"no room for {total / MIB:.1f} MiB more; retry shortly"
            )
        self._reserved += total
        self._uploads += 1
        self._tenants[tenant] = self._tenants.get(tenant, 0) + 1

    def _release(self, total: int, tenant: str) -> None:
        self._reserved -= total
        self._uploads -= 1
        self._tenants[tenant] -= 1
        if not self._tenants[tenant]:
            del self._tenants[tenant]
