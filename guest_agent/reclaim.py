"""Opt-in: drop the guest's clean page cache before a migration's first scan.

Clean page-cache pages are not free, so no source reports them, yet their
content is on disk: freeing them first turns them into free pages the scan
finds, and the migration skips them. The guest pays by re-reading what it
needs afterwards, so it is off by default (``--reclaim-page-cache``) and the
comparison shows it in rows of its own, against init_on_free with the same
reclaim. Only clean pages go ("1": page cache, not slab): nothing is written
back, nothing of the guest's data is lost.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)

DROP_CACHES = "/proc/sys/vm/drop_caches"


@dataclass
class PageCacheReclaim:
    """At most one reclaim per ``every_s``: the first request of a migration
    reclaims, its later epochs (seconds apart) do not."""

    every_s: float
    path: str = DROP_CACHES
    last: float | None = None
    #: Reclaims done, and the last one's seconds (or its error).
    count: int = 0
    last_s: float = 0.0
    error: str = ""

    def due(self, now: float) -> bool:
        return self.last is None or now - self.last >= self.every_s

    def run(self, now: float | None = None) -> bool:
        """Reclaim if due (in the scanner thread: it takes tens of ms per GiB
        of cache). A failure is logged and only means nothing was reclaimed."""
        now = time.monotonic() if now is None else now
        if not self.due(now):
            return False
        self.last = now
        t0 = time.monotonic()
        try:
            with open(self.path, "w") as f:
                f.write("1\n")
        except OSError as e:
            self.error = f"{self.path}: {e.strerror or e}"
            log.warning("page-cache reclaim failed: %s", self.error)
            return False
        self.count += 1
        self.last_s = time.monotonic() - t0
        log.info("page cache dropped before the scan in %.0f ms", self.last_s * 1000)
        return True
