"""Rate-limited logging of refusals.

A guest (or anyone who can reach a listener) decides how often the collector
refuses something, so one log line per refusal lets it flood the journal.
Every refusal is still counted in the metrics (``fphint_rejects`` and
friends); the log gets at most ``burst`` lines per key and interval, then one
line saying how many were left out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

#: Lines per key and interval before lines are left out.
BURST = 5
INTERVAL_S = 10.0
#: Keys remembered at once; beyond this the oldest window is forgotten (so
#: keys a guest invents cannot grow the table).
MAX_KEYS = 256


class RateLimitedLog:
    """``log(level, key, msg, ...)`` like ``Logger.log``, at most ``burst`` per key per interval."""

    def __init__(
        self,
        logger: logging.Logger,
        burst: int = BURST,
        interval_s: float = INTERVAL_S,
        on_suppressed: Callable[[str], None] | None = None,
    ) -> None:
        self.logger = logger
        self.burst = burst
        self.interval_s = interval_s
        #: Called with the key for every line left out (e.g. a metric's inc).
        self.on_suppressed = on_suppressed
        #: key -> [window start, lines logged, lines left out]
        self._windows: dict[str, list[float]] = {}
        self.suppressed = 0

    def log(self, level: int, key: str, msg: str, *args: object, **kw: Any) -> bool:
        """Log unless this key's budget is spent; True if the line went out."""
        now = time.monotonic()
        w = self._windows.get(key)
        if w is None or now - w[0] >= self.interval_s:
            if w is not None and w[2]:
                self.logger.log(
                    level,
                    "%d similar lines left out in %.0f s (counted in the metrics)",
                    int(w[2]),
                    now - w[0],
                    extra={"reason": key},
                )
            if w is None and len(self._windows) >= MAX_KEYS:
                del self._windows[next(iter(self._windows))]
            w = self._windows[key] = [now, 0.0, 0.0]
        if w[1] < self.burst:
            w[1] += 1
            self.logger.log(level, msg, *args, **kw)
            return True
        w[2] += 1
        self.suppressed += 1
        if self.on_suppressed is not None:
            self.on_suppressed(key)
        return False

    def warning(self, key: str, msg: str, *args: object, **kw: Any) -> bool:
        return self.log(logging.WARNING, key, msg, *args, **kw)

    def info(self, key: str, msg: str, *args: object, **kw: Any) -> bool:
        return self.log(logging.INFO, key, msg, *args, **kw)
