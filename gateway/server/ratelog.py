"""Log lines that a client can cause, rate-limited: a flood of bad calls must not become a flood
of log lines (each costs the event loop a few microseconds and the disk a few hundred bytes).

One :class:`RateLimitedLog` per kind of line: ``burst`` lines at once, then ``per_second``; the
lines dropped meanwhile are counted and reported by the next line that gets through.
"""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """``log.info("...", args)`` / ``log.exception(...)`` through a token bucket."""

    def __init__(self, logger: logging.Logger, *, per_second: float = 1.0, burst: int = 10) -> None:
        self._logger = logger
        self._rate = per_second
        self._burst = float(burst)
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._dropped = 0

    def _take(self) -> int | None:
        """The lines dropped since the last one, or ``None`` when this one must be dropped too."""
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens < 1.0:
            self._dropped += 1
            return None
        self._tokens -= 1.0
        dropped, self._dropped = self._dropped, 0
        return dropped

    def log(self, level: int, message: str, *args: object, exc_info: bool = False) -> None:
        dropped = self._take()
        if dropped is None:
            return
        if dropped:
            message += f" ({dropped} similar lines dropped)"
        self._logger.log(level, message, *args, exc_info=exc_info)

    def info(self, message: str, *args: object) -> None:
        self.log(logging.INFO, message, *args)

    def warning(self, message: str, *args: object) -> None:
        self.log(logging.WARNING, message, *args)

    def exception(self, message: str, *args: object) -> None:
        self.log(logging.ERROR, message, *args, exc_info=True)
