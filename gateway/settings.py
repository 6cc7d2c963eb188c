"""The gateway's settings: one validated model, from a TOML file, ``HEGATE_*`` variables and flags.

Precedence, lowest first: the defaults below (which serve the bundled models on loopback with an
in-memory key registry and no authentication), the config file, environment variables
(``HEGATE_WORKERS=2``, nested with ``__``: ``HEGATE_TLS__CERT_FILE=...``), then command-line
flags. Anything invalid stops the start with one message naming every bad field.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, InitSettingsSource, SettingsConfigDict

from gateway.he.params import Precision
from gateway.keystore.base import KeyLimits
from gateway.keystore.url import MEMORY, parse_key_store_url
from gateway.server.uploads import UploadLimits
from models.errors import InvalidArgumentError

BUNDLED_REPOSITORY = Path(__file__).resolve().parent.parent / "models" / "bundled"
MIB = 1 << 20
MESSAGE_PREFIX_BYTES = 5  # gRPC's compressed flag and length before every message


class TlsSettings(BaseModel):
    """Server TLS; with ``client_ca_file`` the server also demands client certificates (mutual TLS)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert_file: Path = Field(description="PEM certificate chain of the server")
    key_file: Path = Field(description="PEM private key of the server")
    client_ca_file: Path | None = Field(default=None, description="PEM CA bundle; set it to require client certs")

    @model_validator(mode="after")
    def _files_exist(self) -> TlsSettings:
        for path in (self.cert_file, self.key_file, self.client_ca_file):
            if path is not None and not path.is_file():
                raise ValueError(f"{path} does not exist")
        return self


class EdgeLimits(BaseModel):
    """What one client, or one peer address, may take from the gateway at its edge (both ports).

    Every figure is chosen so that one hostile, unauthenticated peer on this machine kind (2 cores)
    cannot grow the gateway by more than 128 MiB or lock other clients out; ``bench/hostile.py``
    measures that, and the README's table lists each limit with its default. A peer is one IPv4
    address, or one IPv6 /64 (one host can hold a whole /64).

    The buffer budgets count request bytes held until their message is whole and reply bytes that
    wait for the client's flow-control window, on the fast path; the grpc.aio port's C-core keeps
    its own buffers, bounded there by the stream, call and connection limits.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_concurrent_streams: int = Field(default=128, ge=1, le=1 << 16, description="calls in flight per connection")
    max_header_bytes: int = Field(default=16 << 10, ge=4096, description="a call's header list (both ports)")
    connection_buffer_bytes: int = Field(default=24 * MIB, ge=MIB, description="bytes held per connection")
    peer_buffer_bytes: int = Field(default=32 * MIB, ge=MIB, description="bytes held per peer address")
    total_buffer_bytes: int = Field(default=64 * MIB, ge=MIB, description="bytes held by all connections")
    request_seconds: float = Field(
        default=60.0, gt=0, description="a call's whole exchange on the fast path: request in, reply out"
    )
    idle_seconds: float = Field(default=300.0, gt=0, description="a connection without request progress is closed")
    connection_age_seconds: float = Field(
        default=1800.0, gt=0, description="a connection is asked to go away (GOAWAY) at this age"
    )
    max_connections: int = Field(default=1024, ge=1, description="open connections per port")
    max_peer_connections: int = Field(default=64, ge=1, description="open fast-path connections per peer address")
    max_calls: int = Field(default=4096, ge=1, description="calls in flight on the grpc.aio port")
    max_peer_calls: int = Field(default=256, ge=1, description="calls in flight per peer address on the grpc.aio port")
    handshake_seconds: float = Field(default=10.0, gt=0, description="TLS handshake and HTTP/2 preface (fast path)")
    penalty_seconds: float = Field(
        default=10.0, ge=0, description="a peer cut off for abuse (ENHANCE_YOUR_CALM) is refused this long"
    )

    @model_validator(mode="after")
    def _ordered(self) -> EdgeLimits:
        if not self.connection_buffer_bytes <= self.peer_buffer_bytes <= self.total_buffer_bytes:
            raise ValueError("connection_buffer_bytes <= peer_buffer_bytes <= total_buffer_bytes")
        if self.max_peer_connections > self.max_connections or self.max_peer_calls > self.max_calls:
            raise ValueError("a peer's share cannot exceed the whole")
        return self


class GatewaySettings(BaseSettings):
    """Everything ``hegate serve`` can be told.

    The key tier's defaults are sized for this project's machine kind (2 cores, 24 GiB of memory,
    ``free -m`` on 2026-12-03): the budget holds about 60 default-model key sets in the workers
    (67.5 MiB each, one copy per set), and the in-memory store keeps their serialized bytes beside
    (27.6 MiB each, 1.6 GiB at most then), about a quarter of the memory for keys; a tenant may take
    a quarter of the budget (15 default sets, or 2 of the MNIST CNN's circuit_private sets, 494 MiB
    each), and a quarter of a model's queue. Uploads: the largest real key set (212 MiB) fits
    ``upload_max_bytes``; the spool holds four of those at once, and a tenant two uploads; 30 s
    between chunks is about 8 s per 1 MiB chunk on a 1 Mbit/s link, with room to spare.
    """

    model_config = SettingsConfigDict(env_prefix="HEGATE_", env_nested_delimiter="__", extra="forbid", frozen=True)

    repository: Path = Field(default=BUNDLED_REPOSITORY, description="model repository to serve")
    address: str = Field(default="127.0.0.1:8001", description="host:port of the gRPC server")
    workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256, description="encrypted workers")
    metrics_port: int | None = Field(default=8002, ge=0, le=65535, description="Prometheus port; None disables")
    fast_path_port: int | None = Field(
        default=8003, ge=0, le=65535, description="plaintext fast path port (same host); None disables"
    )
    api_keys: dict[str, str] = Field(
        default_factory=dict, description="API key -> tenant; empty: no authentication (loopback default)"
    )
    tls: TlsSettings | None = None
    max_message_bytes: int = Field(default=8 * MIB, ge=64 * 1024, description="largest message either way")
    key_budget_bytes: int = Field(
        default=4096 * MIB,
        ge=MIB,
        description="resident bytes of every tenant's key sets in the workers, one copy per set (67.5 MiB for the "
        "default model's); the budget's fair share decides evictions",
    )
    tenant_key_bytes: int = Field(
        default=1024 * MIB, ge=MIB, description="resident bytes of one tenant's key sets (its own oldest go first)"
    )
    tenant_key_sets: int = Field(default=16, ge=1, description="key sets one tenant may hold")
    key_ttl_seconds: float = Field(default=3600.0, gt=0, description="keys unused this long are dropped")
    key_store: SecretStr = Field(
        default=SecretStr(MEMORY),
        description="where registered keys live: 'memory' (this process) or redis://[:password@]HOST:PORT/DB "
        "(rediss:// for TLS), shared by replicas and kept across restarts; secret because the URL may hold a password",
    )
    queue_limit: int = Field(default=64, ge=1, description="encrypted requests queued or running per model")
    tenant_queue_limit: int = Field(
        default=16, ge=1, description="encrypted requests queued or running per model for one tenant"
    )
    upload_max_bytes: int = Field(
        default=256 * MIB, ge=MIB, description="largest key upload (the MNIST CNN's circuit_private keys: 212 MiB)"
    )
    upload_spool_bytes: int = Field(
        default=1024 * MIB, ge=MIB, description="announced bytes of every key upload in flight together"
    )
    upload_limit: int = Field(default=8, ge=1, description="key uploads in flight in all")
    tenant_upload_limit: int = Field(default=2, ge=1, description="key uploads in flight per tenant")
    upload_idle_seconds: float = Field(default=30.0, gt=0, description="longest wait for a key upload's next chunk")
    max_batch: int = Field(default=4096, ge=1, description="largest plaintext batch per request")
    allow_non_finite_inputs: bool = Field(
        default=False, description="let NaN and infinite plaintext inputs through (refused as INVALID_ARGUMENT)"
    )
    limits: EdgeLimits = Field(default_factory=EdgeLimits, description="what one client may take (both ports)")
    grace_seconds: float = Field(default=10.0, ge=0, description="time in-flight requests get at shutdown")
    plaintext_backend: Literal["numba", "onnxruntime"] = Field(  # kernels.loader.Backend; a test keeps them equal
        default="numba",
        description="plaintext backend of requests that name none (the request parameter 'backend' picks either)",
    )
    ckks_precision: Precision = Field(
        default="standard",
        description="CKKS profile of clients that name none: standard (smallest ring) or high (~2**15 finer); "
        "clients may ask for any profile, circuit_private included",
    )

    @field_validator("key_store")
    @classmethod
    def _key_store_url(cls, value: SecretStr) -> SecretStr:
        try:
            parse_key_store_url(value.get_secret_value())
        except InvalidArgumentError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _checks(self) -> GatewaySettings:
        if not (self.repository / ".").is_dir():
            raise ValueError(f"repository {self.repository} is not a directory")
        host, _, port = self.address.rpartition(":")
        if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"address must be host:port, got {self.address!r}")
        if any(not key or not tenant for key, tenant in self.api_keys.items()):
            raise ValueError("api_keys maps non-empty keys to non-empty tenant names")
        if any(key != key.strip() for key in self.api_keys):
            raise ValueError("API keys cannot start or end with white space (presented keys are trimmed)")
        if self.limits.connection_buffer_bytes < self.max_message_bytes + MESSAGE_PREFIX_BYTES:
            raise ValueError("limits.connection_buffer_bytes must hold one whole message (max_message_bytes + 5)")
        return self

    @property
    def key_limits(self) -> KeyLimits:
        """What the key store may hold (see :class:`~gateway.keystore.base.KeyLimits`); a tenant
        quota above the budget is the budget (a tenant limit above the whole is never reached)."""
        return KeyLimits(
            budget_bytes=self.key_budget_bytes,
            tenant_bytes=min(self.tenant_key_bytes, self.key_budget_bytes),
            tenant_key_sets=self.tenant_key_sets,
            ttl_seconds=self.key_ttl_seconds,
        )

    @property
    def upload_limits(self) -> UploadLimits:
        """What key uploads in flight may take (see :mod:`gateway.server.uploads`)."""
        return UploadLimits(
            max_bytes=self.upload_max_bytes,
            spool_bytes=self.upload_spool_bytes,
            uploads=self.upload_limit,
            tenant_uploads=self.tenant_upload_limit,
            idle_seconds=self.upload_idle_seconds,
        )

    @property
    def authenticated(self) -> bool:
        return bool(self.api_keys)


def _read_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InvalidArgumentError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgumentError(f"config file {path}: {exc}") from None


def load_settings(*, config_file: Path | None = None, **overrides: Any) -> GatewaySettings:
    """Defaults < ``config_file`` < ``HEGATE_*`` environment < ``overrides`` (flags; None = not given).

    Raises:
        InvalidArgumentError: a missing or malformed file, or any invalid value, all named at once.
    """
    from_file = _read_config(config_file)

    class _WithFile(GatewaySettings):
        @classmethod
        def settings_customise_sources(cls, settings_cls, init_settings, env_settings, **_):
            return init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=from_file)

    try:
        settings = _WithFile(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        raise InvalidArgumentError(f"invalid gateway settings: {problems}") from None
    return GatewaySettings.model_validate(settings.model_dump())
