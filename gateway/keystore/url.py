"""Where the key registry lives: ``memory`` or a Redis URL, parsed and checked before anything starts.

The URL is validated whole at settings time (scheme, host, port range, integer database), so a
typo stops ``hegate serve`` with one line instead of surfacing as a connection error on the first
registration. Credentials are kept as secrets and never appear in messages: every message names
the store by :attr:`RedisLocation.display`, the URL without its user name and password.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from models.errors import InvalidArgumentError

MEMORY = "memory"
DEFAULT_REDIS_PORT = 6379
_SCHEMES = {"redis": False, "rediss": True}  # scheme -> TLS


class RedisLocation(BaseModel):
    """One Redis database: ``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tls: bool
    host: str = Field(min_length=1)
    port: int = Field(ge=1, le=65535)
    db: int = Field(ge=0)
    username: str | None = None
    password: SecretStr | None = Field(default=None, repr=False)

    @property
    def display(self) -> str:
        """The URL without credentials: what logs and error messages name."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'rediss' if self.tls else 'redis'}://{host}:{self.port}/{self.db}"


KeyStoreLocation = Literal["memory"] | RedisLocation


def parse_key_store_url(url: str) -> KeyStoreLocation:
    """``"memory"`` or the :class:`RedisLocation` that ``url`` names.

    Raises:
        InvalidArgumentError: anything else; the message never repeats a password.
    """
    if url == MEMORY:
        return MEMORY
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError when out of 0-65535 or not a number
    except ValueError as exc:
        raise InvalidArgumentError(f"key store URL {_redacted(url)}: {exc}") from None
    shown = _redacted(url)
    if parts.scheme not in _SCHEMES:
        raise InvalidArgumentError(
            f"key store must be 'memory' or redis://[:password@]HOST:PORT/DB (rediss:// for TLS), got {shown}"
        )
    if not parts.hostname:
        raise InvalidArgumentError(f"key store URL {shown} names no host")
    if port == 0:
        raise InvalidArgumentError(f"key store URL {shown}: port must be 1-65535")
    path = parts.path.removeprefix("/")
    if path and not path.isdigit():
        raise InvalidArgumentError(f"key store URL {shown}: the database must be an integer, got {path!r}")
    if parts.query or parts.fragment:
        raise InvalidArgumentError(f"key store URL {shown}: no query or fragment is understood")
    return RedisLocation(
        tls=_SCHEMES[parts.scheme],
        host=parts.hostname,
        port=port or DEFAULT_REDIS_PORT,
        db=int(path or 0),
        username=unquote(parts.username) if parts.username else None,
        password=SecretStr(unquote(parts.password)) if parts.password else None,
    )


def _redacted(url: str) -> str:
    """``url`` with anything before an ``@`` in its authority replaced, for messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return repr(url) if "@" not in url else "'<a value with credentials>'"
    authority, slash, tail = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    return f"{scheme}://{authority}{slash}{tail}"
