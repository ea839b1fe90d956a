"""Pages freed after a point in time, from the ``mm_page_free`` tracepoint.

A block's content is garbage from the moment it is freed, whether it goes to
a per-CPU list or the buddy lists, so a page freed after the hint request was
free at an instant after it (docs/safety-rule.md §5).

The BPF side tags each event with the generation current when it fired and
bounds the rate (``Options.live_per_s`` events per ~1.07 s) and the
ring (``live_pages``); whatever does not fit is dropped and counted. Dropping
only means fewer hints. Events of an earlier generation (before
:meth:`start`) are never reported.

The program is attached at :meth:`start` and detached at :meth:`stop`
unless the source tracks (a migration is on: requests come every few hundred
ms), then when tracking stops: attached, it costs every page free a BPF
call. Attaching needs no grace period: a free it misses is a hint fewer.
"""

from __future__ import annotations

import itertools
import logging
import struct
from collections.abc import Callable

from ..base import LiveFrees
from .program import Ctl, LoadedProgram
from .system import PAGE_SHIFT

log = logging.getLogger(__name__)

_EVENT = struct.Struct("<QQ")
LIVE_TP = "mm_page_free"
#: Records read per drain: reading costs ~1.5 us a record here (far more in
#: a TCG guest) on the loop thread that answers requests, so it is bounded;
#: what the ring cannot hold meanwhile is dropped (fewer hints).
DRAIN_RECORDS = 2048
#: Generations are unique within the process (never 0: 0 means "off").
_generations = itertools.count(1)


class EbpfLiveFrees(LiveFrees):
    """Collects frees while started; :meth:`drain` hands them out sorted."""

    def __init__(
        self, prog: LoadedProgram, max_pending: int = 1 << 16, keep_attached: Callable[[], bool] = lambda: False
    ) -> None:
        self._prog = prog
        self._keep_attached = keep_attached
        self._max_pending = max_pending
        self._gen = 0
        self._pending: list[tuple[int, int]] = []
        #: Events dropped here because the pending list was full.
        self.overflow = 0
        #: Events of an earlier generation, dropped when read.
        self.stale = 0
        self._ring = prog.ring("live")

    def _on_event(self, data: memoryview) -> None:
        if len(data) < _EVENT.size:
            return
        pfn_order, gen = _EVENT.unpack_from(data)
        if gen != self._gen or not self._gen:
            self.stale += 1
            return
        if len(self._pending) >= self._max_pending:
            self.overflow += 1
            return
        pfn, order = pfn_order >> 8, pfn_order & 0xFF
        self._pending.append((pfn, pfn + (1 << order)))

    def _consume(self) -> None:
        self._ring.consume(self._on_event, DRAIN_RECORDS)

    @property
    def lost(self) -> int:
        """Events the BPF side dropped (rate bound or full ring), all time."""
        return int(self._prog.ctl[Ctl.LIVE_LOST])

    def _attach(self) -> None:
        if not self._prog.attached("raw:" + LIVE_TP):
            try:
                self._prog.attach_raw(LIVE_TP, "on_free")
            except Exception as e:  # no live hints this time, the rest works
                log.warning("cannot attach to tracepoint %s: %s", LIVE_TP, e)

    def detach_if_idle(self) -> None:
        """Detach unless started (the source stopped tracking)."""
        if not self._gen and self._prog.attached("raw:" + LIVE_TP):
            self._prog.detach_raw(LIVE_TP)

    def start(self) -> None:
        self._attach()
        self._gen = next(_generations)
        self._prog.ctl[Ctl.LIVE_GEN] = self._gen
        # Older events still in the ring are dropped by their generation when
        # drained: not read here, where the request is waiting.
        self._pending.clear()

    def stop(self) -> None:
        self._prog.ctl[Ctl.LIVE_GEN] = 0
        self._gen = 0
        self._pending.clear()
        if not self._keep_attached():
            self.detach_if_idle()

    def drain(self, max_ranges: int) -> list[tuple[int, int]]:
        if max_ranges <= 0 or not self._gen:
            return []
        self._consume()
        merged: list[list[int]] = []
        for s, e in sorted(self._pending):
            if merged and s <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], e)
            else:
                merged.append([s, e])
        out = merged[:max_ranges]
        self._pending = [(s, e) for s, e in merged[max_ranges:]]
        return [(s << PAGE_SHIFT, (e - s) << PAGE_SHIFT) for s, e in out]
