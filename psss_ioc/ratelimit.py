"""Log lines at a bounded rate (bad-input policy: one log line per kind, rate-limited)."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """At most one line per key per `period` seconds; the next line that passes for that key
    says how many were suppressed in between."""

    def __init__(self, logger: logging.Logger, period: float = 10.0) -> None:
        self._logger = logger
        self.period = period
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, key: str, level: int, message: str, exc_info: bool = False) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-1e9, 0))
        if now - last < self.period:
            self._last[key] = (last, suppressed + 1)
            return
        if suppressed:
            message = f"{message} ({suppressed} similar messages suppressed)"
        self._last[key] = (now, 0)
        self._logger.log(level, "%s", message, exc_info=exc_info)
