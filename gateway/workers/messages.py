"""What crosses the pipe between the gateway and a worker: small typed messages.

Every request carries an id; every reply names the id it answers. A failure carries the name of
a class of the domain error tree (:mod:`models.errors`) and its message, so the gateway raises
the same error that the worker raised and maps it to a status code in one place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from gateway.he.params import Profile


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Message):
    """One model version that the workers serve on the encrypted path, under every profile:
    ``preload`` are compiled when a worker starts, the others when keys for them first arrive."""

    name: str
    version: str
    onnx_path: Path
    preload: list[Profile] = ["standard"]


class LoadKeys(_Message):
    """Deserialize and check a client's evaluation keys (SEAL bytes) for one model version and
    profile, and keep them under ``key_id`` unless ``keep`` is false (a check only); the public key
    is the circuit_private profile's. The reply (:class:`KeysLoaded`) carries their resident bytes."""

    kind: Literal["load_keys"] = "load_keys"
    request_id: int
    key_id: str
    model: str
    version: str
    profile: Profile
    relin: bytes
    galois: bytes
    public_key: bytes = b""
    keep: bool = True


class ReadContext(_Message):
    """Check a serialized public TenSEAL context for a model and return its keys as SEAL bytes
    (in a :class:`KeysLoaded`); nothing is kept."""

    kind: Literal["read_context"] = "read_context"
    request_id: int
    model: str
    version: str
    profile: Profile
    context: bytes


class DropKeys(_Message):
    kind: Literal["drop_keys"] = "drop_keys"
    key_id: str


class ListKeys(_Message):
    """Ask which key sets the worker holds (answered by :class:`HeldKeys`): what the tests count."""

    kind: Literal["list_keys"] = "list_keys"
    request_id: int


class Evaluate(_Message):
    """Evaluate ``ciphertext`` with the keys under ``key_id``; give up if ``deadline`` passes first.

    ``sent_at`` and ``deadline`` are on ``time.monotonic()``, the same clock in every process on
    Linux: the worker reports how long the request waited in its pipe.
    """

    kind: Literal["evaluate"] = "evaluate"
    request_id: int
    key_id: str
    model: str
    version: str
    profile: Profile
    ciphertext: bytes
    sent_at: float
    deadline: float | None = None


class Shutdown(_Message):
    kind: Literal["shutdown"] = "shutdown"


class Ready(_Message):
    """A worker has loaded every model and takes requests."""

    kind: Literal["ready"] = "ready"
    models: list[str]


class KeysLoaded(_Message):
    """Keys loaded (``resident_bytes``: what the worker holds for them, see
    :attr:`~gateway.he.plan.EvaluationKeys.resident_bytes`), or a context's keys as SEAL bytes."""

    kind: Literal["keys_loaded"] = "keys_loaded"
    request_id: int
    resident_bytes: int = 0
    relin: bytes = b""
    galois: bytes = b""
    public_key: bytes = b""


class HeldKeys(_Message):
    kind: Literal["held_keys"] = "held_keys"
    request_id: int
    key_ids: list[str]
    resident_bytes: int


class Evaluated(_Message):
    kind: Literal["evaluated"] = "evaluated"
    request_id: int
    ciphertext: bytes
    queue_seconds: float
    compute_seconds: float


class Failed(_Message):
    kind: Literal["failed"] = "failed"
    request_id: int
    error: str
    message: str


Request = LoadKeys | ReadContext | DropKeys | ListKeys | Evaluate | Shutdown
Reply = Ready | KeysLoaded | HeldKeys | Evaluated | Failed
