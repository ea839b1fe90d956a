"""Each epoch's figures, kept past the release of its bitmaps for the migration report.

The ledger hands every entry it is done with to :meth:`EpochRecorder.released`
before the collector frees the epoch; the recorder keeps that entry (the
ledger's own record of the epoch: sync, request offset) with a copy of the
epoch's statistics taken then, and tells its ``on_release`` (the migration
observer) while the hints can still be read.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

from fphint.v1 import admin_pb2
from host_collector.epochs import Epoch, EpochStats
from host_collector.rewrite.ledger import EpochEntry


class EpochRecorder:
    """At most ``limit`` finished epochs are kept (the newest); ``dropped`` counts the rest."""

    def __init__(self, limit: int = 256, on_release: Callable[[Epoch], None] | None = None) -> None:
        self._on_release = on_release
        self._done: collections.deque[tuple[EpochEntry[Epoch], EpochStats]] = collections.deque(maxlen=limit)
        self.dropped = 0

    def released(self, entry: EpochEntry[Epoch]) -> None:
        """The ledger's ``on_release``: keep the entry and its figures as they are now."""
        if len(self._done) == self._done.maxlen:
            self.dropped += 1
        self._done.append((entry, dataclasses.replace(entry.epoch.stats())))
        if self._on_release is not None:
            self._on_release(entry.epoch)

    def reports(self) -> list[admin_pb2.EpochReport]:
        out = []
        for entry, st in self._done:
            out.append(
                admin_pb2.EpochReport(
                    epoch=entry.epoch.id,
                    sync=entry.sync,
                    request_offset=entry.request_offset,
                    request_sent=entry.epoch.request_sent,
                    hint_pages=st.free_pages,
                    accepted_ranges=st.accepted_ranges,
                    rejected_ranges=st.rejected_ranges,
                    reports=st.reports,
                    request_to_last_chunk_s=-1.0 if st.request_to_last_chunk_s is None else st.request_to_last_chunk_s,
                    close_reason=st.close_reason,
                )
            )
        return out
