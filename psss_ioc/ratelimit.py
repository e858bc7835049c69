"""Log lines at a bounded rate (bad-input policy: one log line per kind, rate-limited)."""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """At most one line per key per `period` seconds; the next line that passes for that key
    says how many were suppressed in between.

    Keys are meant to be kinds (a few dozen), but the table is bounded anyway: beyond
    `max_keys`, keys whose period is over are forgotten (a long-running IOC must not grow
    with, say, a key that by mistake contains a pulse id).
    """

    def __init__(self, logger: logging.Logger, period: float = 10.0,
                 max_keys: int = 1000) -> None:
        self._logger = logger
        self.period = period
        self.max_keys = max_keys
        self._last: dict[str, tuple[float, int]] = {}

    def __len__(self) -> int:
        return len(self._last)

    def __call__(self, key: str, level: int, message: str, exc_info: bool = False) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-1e9, 0))
        if now - last < self.period:
            self._last[key] = (last, suppressed + 1)
            return
        if suppressed:
            message = f"{message} ({suppressed} similar messages suppressed)"
        self._last[key] = (now, 0)
        if len(self._last) > self.max_keys:
            self._forget(now)
        self._logger.log(level, "%s", message, exc_info=exc_info)

    def _forget(self, now: float) -> None:
        """Drop the keys whose period is over (their suppressed counts are not reported)."""
        self._last = {k: v for k, v in self._last.items() if now - v[0] < self.period}
        if len(self._last) > self.max_keys:  # all of them within the period: start afresh
            self._last.clear()
