"""Drive one scan: portions of PFNs, each scanned, cross-checked and turned
into byte ranges, all in bounded BPF runs.

A scan opens the event gate (allocation tracepoints start marking the
bitmap), then for each portion of at most ``nr_recs`` PFNs:

1. ``scan`` runs until the portion is covered, recording free blocks;
2. events too wide for the bitmap are folded into it (user space);
3. ``filter`` drops every block an allocation event touched since the scan
   began and merges the rest into runs;
4. the runs are read straight from the mapped array and yielded.

A portion is complete and sound on its own, so the agent can send it while
the next one is scanned (time to first chunk). The gate closes when the
iteration ends, however it ends, unless the scanner tracks: then it stays
open and every part joins the tracked set (tracked.py), which the next
request is answered from at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from . import system
from .hooks import Hooks
from .program import WIDE_MAX, Ctl, LoadedProgram
from .system import PAGE_SHIFT, KernelPaths, PfnRanges
from .tracked import TrackedAnswer, TrackedSet

#: Re-read which memory blocks are online at least this often; /proc/iomem is
#: read every scan (cheap) and a change forces a re-read (hot-add).
ONLINE_REFRESH_S = 10.0


@dataclass
class ScanPart:
    """Free byte ranges of PFNs [first_pfn, end_pfn), sorted, non-overlapping."""

    ranges: list[tuple[int, int]]
    pages: int
    first_pfn: int
    end_pfn: int
    #: time.monotonic() when the scan phase of this part ended (the filter
    #: began): allocation events before it dropped blocks, later ones did not.
    scanned_at: float
    blocks: int = 0
    dropped: int = 0


@dataclass
class ScanStats:
    runs: int = 0
    filter_runs: int = 0
    parts: int = 0
    blocks: int = 0
    dropped: int = 0
    pages: int = 0
    wide_events: int = 0
    overflowed: bool = False
    complete: bool = True
    extra: dict[str, float] = field(default_factory=dict)


class RamMap:
    """The PFN ranges worth scanning, kept fresh cheaply."""

    def __init__(self, paths: KernelPaths, limit_pfn: int) -> None:
        self._paths = paths
        self._limit = limit_pfn
        self._iomem = ""
        self._online: PfnRanges | None = None
        self._read_at = 0.0
        self.ranges: PfnRanges = []
        self.refresh(force=True)

    def refresh(self, force: bool = False) -> PfnRanges:
        with open(self._paths.iomem) as f:
            iomem = f.read()
        now = time.monotonic()
        if force or iomem != self._iomem or now - self._read_at > ONLINE_REFRESH_S:
            self._iomem = iomem
            self._online = system.online_pfn_ranges(self._paths.memory_blocks)
            self._read_at = now
            ram = system.ram_pfn_ranges(self._paths.iomem)
            ranges = ram if self._online is None else system.intersect(ram, self._online)
            self.ranges = system.intersect(ranges, [(0, self._limit)])
        return self.ranges


class Scanner:
    def __init__(self, prog: LoadedProgram, ram: RamMap, hooks: Hooks | None = None) -> None:
        self.prog = prog
        self.ram = ram
        #: The exit hooks: attached for a scan (and while tracking), else not.
        self.hooks = hooks or Hooks(prog, detachable=False)
        #: Called (under the lock) when the gate closes: nothing is watched now.
        self.on_idle: Callable[[], None] = lambda: None
        self.portion = prog.config.nr_recs
        self.bitmap_bytes = 8 * prog.config.bitmap_words
        self.last = ScanStats()
        #: Held to clear the bitmap, to add a part to the tracked set and to
        #: answer from it: an answer never sees a bitmap half cleared.
        self.lock = threading.Lock()
        self.tracked = TrackedSet()
        self._tracking = False
        self._scanning = False

    @property
    def tracking(self) -> bool:
        return self._tracking

    def set_tracking(self, on: bool) -> None:
        """Keep the gate open after scans (on), or close it and forget (off).

        On, the scan running now (if any) and every later one are tracked;
        nothing scanned before is (its bitmap history is gone). Off never
        closes the gate under a running scan: that scan closes it at its end.
        """
        with self.lock:
            if on == self._tracking:
                return
            self._tracking = on
            if not on and not self._scanning:  # a running scan closes it when it ends
                self._close_gate()

    def _close_gate(self) -> None:
        """Gate closed, set forgotten, hooks detached (under the lock)."""
        self.prog.begin.run(0)
        self.tracked.clear()
        self.hooks.detach()
        self.on_idle()

    def answer(self) -> TrackedAnswer | None:
        """What the tracked set says is free now, or None (not tracking, or
        no scan since tracking began). No BPF run: the bitmap is read in place."""
        ctl = self.prog.ctl
        with self.lock:
            if not (self._tracking and self.tracked.valid):
                return None
            n = ctl[Ctl.WIDE_N]
            wide = []
            spoiled = n > WIDE_MAX
            for i in range(0 if spoiled else n):
                s, e = ctl[Ctl.WIDE + 2 * i], ctl[Ctl.WIDE + 2 * i + 1]
                if e == 0:  # an event is writing it right now: cannot tell
                    spoiled = True
                    break
                wide.append((s, e))
            if spoiled:
                wide = [(0, 1 << 62)]
            return self.tracked.answer(self.prog.dirty_bytes, wide)

    def parts(self, deadline: float | None = None, cancel: Callable[[], bool] | None = None) -> Iterator[ScanPart]:
        """Scan now, yielding one part per portion of PFNs (some may be empty).

        ``cancel`` is asked between BPF runs; when it says so the scan stops
        as at a deadline (what it yielded stays sound).
        """
        prog, ctl = self.prog, self.prog.ctl
        ranges = self.ram.refresh()
        stats = self.last = ScanStats()
        with self.lock:
            self._scanning = True
        try:
            self.hooks.attach()  # no-op while tracking; else attach and a grace period
        except BaseException:
            with self.lock:
                self._scanning = False
            raise
        # Zero the bitmap and the wide list, then open the gate with a fence.
        # With the gate already open (tracking) an event racing the clearing
        # may lose its mark: its page left the lists before this scan reads.
        with self.lock:
            prog.clear_dirty()
            ctl[Ctl.WIDE_N] = 0
            for i in range(Ctl.WIDE, Ctl.WIDE + 2 * WIDE_MAX):
                ctl[i] = 0
            ctl[Ctl.FAULTS] = ctl[Ctl.REJECTS] = ctl[Ctl.DROPPED] = 0
            prog.begin.run(1)
            self.tracked.reset(time.monotonic(), self.bitmap_bytes)
        folded = 0
        try:
            pfn = 0
            for start, end in ranges:
                # A block may end past its range; never rescan its tail.
                pfn = max(pfn, start)
                while pfn < end:
                    first = pfn
                    stop = min(pfn + self.portion, end)
                    ctl[Ctl.NREC] = 0
                    while pfn < stop:
                        if (deadline is not None and time.monotonic() >= deadline) or (cancel is not None and cancel()):
                            stats.complete = False
                            break
                        prog.scan.run(pfn, stop)
                        stats.runs += 1
                        pfn = ctl[Ctl.CURSOR]
                    scanned_at = time.monotonic()
                    folded = self._fold_wide(folded, stats)
                    part = self._filter(first, max(pfn, first), scanned_at, stats)
                    with self.lock:
                        self.tracked.add(part.ranges)
                    yield part
                    if not stats.complete:
                        return
        finally:
            with self.lock:
                self._scanning = False
                if not self._tracking:
                    self._close_gate()
            stats.extra["faults"] = float(ctl[Ctl.FAULTS])
            stats.extra["rejects"] = float(ctl[Ctl.REJECTS])

    def _fold_wide(self, folded: int, stats: ScanStats) -> int:
        """Copy events too wide for the bitmap into it, as whole bytes."""
        ctl = self.prog.ctl
        n = ctl[Ctl.WIDE_N]
        if n == folded or stats.overflowed:
            return n
        dirty = self.prog.dirty_bytes
        if n > WIDE_MAX:
            stats.overflowed = True
        else:
            for i in range(folded, n):
                s, e = ctl[Ctl.WIDE + 2 * i], ctl[Ctl.WIDE + 2 * i + 1]
                if e == 0:  # an event is writing it right now
                    stats.overflowed = True
                    break
                lo, hi = min(s >> 3, self.bitmap_bytes), min(-(-e >> 3), self.bitmap_bytes)
                if hi > lo:
                    dirty[lo:hi] = b"\xff" * (hi - lo)
        if stats.overflowed:  # cannot tell what was touched: drop everything
            dirty[:] = b"\xff" * self.bitmap_bytes
        stats.wide_events = n
        return n

    def _filter(self, first: int, end: int, scanned_at: float, stats: ScanStats) -> ScanPart:
        prog, ctl = self.prog, self.prog.ctl
        nrec = ctl[Ctl.NREC]
        dropped0 = ctl[Ctl.DROPPED]
        ctl[Ctl.RUN_N] = ctl[Ctl.RUN_START] = ctl[Ctl.RUN_END] = 0
        i = 0
        while i < nrec:
            prog.filter.run(i, nrec)
            stats.filter_runs += 1
            i = ctl[Ctl.FILTERED]
        n = ctl[Ctl.RUN_N]
        runs = prog.runs
        ranges = list(zip(runs[0 : 2 * n : 2], runs[1 : 2 * n : 2]))
        rs, re = ctl[Ctl.RUN_START], ctl[Ctl.RUN_END]
        if re > rs:
            ranges.append((rs << PAGE_SHIFT, (re - rs) << PAGE_SHIFT))
        pages = sum(length for _, length in ranges) >> PAGE_SHIFT
        dropped = ctl[Ctl.DROPPED] - dropped0
        stats.parts += 1
        stats.blocks += nrec
        stats.dropped += dropped
        stats.pages += pages
        return ScanPart(ranges, pages, first, end, scanned_at, nrec, dropped)
