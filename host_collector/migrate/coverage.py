"""Coverage: did each epoch's hints come in time to be used?

Issue 13's goals are about timing, not the safety rule: the first report
within 100 ms of an epoch opening, >= 90 % of the reported-free pages QEMU
sends after the report rewritten, a report in every epoch over 200 ms. This
module measures them for the migration report, from three inputs:

* the epoch gate says when each epoch opened (:meth:`CoverageCounter.epoch_opened`);
* the proxy's relay hands over every batch of PAGE records once it is done
  with it, with the indices it rewrote (:meth:`CoverageCounter.batch`, a
  :data:`host_collector.proxy.results.BatchTap`);
* the ledger hands over each epoch before its bitmaps are freed
  (:meth:`CoverageCounter.epoch_released`): its free set as finally known.

A record belongs to the *window* of the epoch that was the newest when the
proxy parsed it (from that epoch's opening to the next one's). Per window the
counter keeps which pages were sent before and after the epoch's first
report and which were rewritten, one byte per page of each block it saw, and
intersects them with the epoch's final free set once both are complete.
Pages, not records: a page sent twice in one window counts once.

Cost on the relay's thread: one numpy conversion and one fancy-indexed store
per batch (tens of ns per record; bench/proxy_throughput.py measures it).
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Protocol

import numpy as np
import numpy.typing as npt

from fphint.v1 import admin_pb2
from host_collector.layout import RamLayout

#: Goals of issue 13.
FIRST_REPORT_GOAL_MS = 100.0
FRACTION_GOAL = 0.9
LONG_EPOCH_MS = 200.0

_BLOCK = itemgetter(2)
_PAGE = itemgetter(3)
Mask = npt.NDArray[np.bool_]


class CoveredEpoch(Protocol):
    """What the counter reads of ``host_collector.epochs.Epoch``."""

    @property
    def id(self) -> int: ...

    @property
    def opened_at(self) -> float: ...

    @property
    def first_chunk_at(self) -> float | None: ...

    def blocks(self) -> list[str]: ...

    def free_mask(self, block: str) -> Mask | None: ...


@dataclass
class _Window:
    sync: int
    epoch: CoveredEpoch
    opened_at: float
    after_stop: bool
    records: int = 0
    #: Pages sent before / after the first report, and rewritten, per block.
    before: dict[str, Mask] = field(default_factory=dict)
    after: dict[str, Mask] = field(default_factory=dict)
    rewritten: dict[str, Mask] = field(default_factory=dict)
    #: The epoch's free set when it was released (None: not yet).
    free: dict[str, Mask] | None = None
    free_pages: int = 0
    complete: bool = False  # a later window began, or the stream ended
    result: admin_pb2.EpochCoverage | None = None


class CoverageCounter:
    """Per-epoch coverage of one migration; thread-safe (relay thread and asyncio loop).

    ``guest_stopped()`` is asked when an epoch opens: an epoch opened after
    the guest stopped (QEMU's final sync) cannot be answered and is left out
    of the "report in every epoch" goal. At most ``limit`` windows are kept.
    """

    def __init__(self, layout: RamLayout, *, guest_stopped: Callable[[], bool] = lambda: False,
                 limit: int = 256) -> None:
        self._pages = {b: n // layout.page_size for b, n in layout.blocks.items()}
        self._guest_stopped = guest_stopped
        self._limit = limit
        self._lock = threading.Lock()
        self._windows: list[_Window] = []
        self._starts: list[float] = []  # opened_at of each window, ascending
        self._by_id: dict[int, _Window] = {}
        self._not_tracked = 0
        self._before_first = 0
        self._end_records = 0
        self._end_pages: dict[str, Mask] = {}
        #: The free set of the newest answered window finalised so far (for the END figure).
        self._last_answered: tuple[int, dict[str, Mask]] | None = None

    # ---- inputs ---------------------------------------------------------------

    def epoch_opened(self, sync: int, epoch: CoveredEpoch) -> None:
        stopped = self._guest_stopped()
        with self._lock:
            if len(self._windows) >= self._limit:
                self._not_tracked += 1
                return
            opened = epoch.opened_at
            if self._starts and opened < self._starts[-1]:
                opened = self._starts[-1]  # never out of order (one clock, one loop; belt and braces)
            w = _Window(sync, epoch, opened, stopped)
            if self._windows:
                self._windows[-1].complete = True
            self._windows.append(w)
            self._starts.append(opened)
            self._by_id[epoch.id] = w

    def epoch_released(self, epoch: CoveredEpoch) -> None:
        """Keep a copy of the epoch's free set (its bitmaps are about to go)."""
        free = {}
        for b in epoch.blocks():
            m = epoch.free_mask(b)
            if m is not None:
                free[b] = np.array(m, dtype=np.bool_, copy=True)
        with self._lock:
            w = self._by_id.get(epoch.id)
            if w is None or w.free is not None:
                return
            w.free = free
            w.free_pages = sum(int(np.count_nonzero(m)) for m in free.values())
            self._finalise_ready()

    def batch(self, received_at: float, pages: list[tuple[int, int, str, int]], rewritten: list[int] | None,
              final: bool) -> None:
        """The relay's tap: a batch of PAGE records parsed at ``received_at`` is done with."""
        n = len(pages)
        if not n:
            return
        with self._lock:
            if final:
                self._end_records += n
                self._mark(self._end_pages, pages, None)
                return
            i = bisect.bisect_right(self._starts, received_at) - 1
            if i < 0:
                self._before_first += n
                return
            w = self._windows[i]
            if w.result is not None:
                return  # finalised already (a batch parsed long before it was done with): too late to count
            w.records += n
            first = w.epoch.first_chunk_at
            target = w.after if first is not None and first <= received_at else w.before
            self._mark(target, pages, rewritten, w.rewritten)

    def _mark(self, target: dict[str, Mask], pages: Sequence[tuple[int, int, str, int]],
              rewritten: list[int] | None, rw_target: dict[str, Mask] | None = None) -> None:
        pg = np.fromiter(map(_PAGE, pages), dtype=np.intp, count=len(pages))
        blocks = set(map(_BLOCK, pages))
        rw = np.asarray(rewritten, dtype=np.intp) if rewritten else None
        for b in blocks:
            size = self._pages.get(b)
            if size is None:
                continue  # a block outside the layout: never hinted
            if len(blocks) == 1:
                sel, rsel = pg, (pg[rw] if rw is not None else None)
            else:
                inb = np.fromiter((blk == b for blk in map(_BLOCK, pages)), dtype=np.bool_, count=len(pages))
                sel = pg[inb]
                rsel = pg[rw[inb[rw]]] if rw is not None else None
            sel = sel[sel < size]
            _mask(target, b, size)[sel] = True
            if rw_target is not None and rsel is not None and rsel.size:
                _mask(rw_target, b, size)[rsel[rsel < size]] = True

    # ---- the report -------------------------------------------------------------

    def report(self, started_at: float, ended_at: float) -> admin_pb2.Coverage:
        """The coverage block; call once the proxy and the gate are done (every epoch released)."""
        with self._lock:
            for w in self._windows:
                w.complete = True
                if w.free is None:
                    w.free = {}  # never released (e.g. a gate that failed early): nothing counts as free
            self._finalise_ready(ended_at)
            out = admin_pb2.Coverage(epochs_not_tracked=self._not_tracked,
                                     records_before_first_epoch=self._before_first,
                                     end_section_records=self._end_records)
            for w in self._windows:
                assert w.result is not None
                e = out.epochs.add()
                e.CopyFrom(w.result)
                e.opened_at_s = w.opened_at - started_at
            if self._last_answered is not None:
                free = self._last_answered[1]
                out.end_section_reported_free = sum(
                    int(np.count_nonzero(m & free[b])) for b, m in self._end_pages.items() if b in free)
        _summarise(out)
        return out

    # ---- internals ------------------------------------------------------------------

    def _finalise_ready(self, ended_at: float | None = None) -> None:
        for i, w in enumerate(self._windows):
            if w.result is not None or not w.complete or w.free is None:
                continue
            nxt = self._windows[i + 1].opened_at if i + 1 < len(self._windows) else ended_at
            if nxt is None:
                continue
            w.result = _window_result(w, nxt)
            if w.result.reported and not w.after_stop and (
                    self._last_answered is None or self._last_answered[0] < w.sync):
                self._last_answered = (w.sync, w.free)
            w.before, w.after, w.rewritten, w.free = {}, {}, {}, {}


def _mask(masks: dict[str, Mask], block: str, size: int) -> Mask:
    m = masks.get(block)
    if m is None:
        m = masks[block] = np.zeros(size, dtype=np.bool_)
    return m


def _count(a: dict[str, Mask], free: dict[str, Mask], also: dict[str, Mask] | None = None) -> int:
    n = 0
    for b, m in a.items():
        f = free.get(b)
        if f is None:
            continue
        both = m & f
        if also is not None:
            r = also.get(b)
            if r is None:
                continue
            both &= r
        n += int(np.count_nonzero(both))
    return n


def _window_result(w: _Window, ended_at: float) -> admin_pb2.EpochCoverage:
    free = w.free or {}
    first = w.epoch.first_chunk_at
    sent_any = {b: m | w.before[b] if b in w.before else m for b, m in w.after.items()}
    for b, m in w.before.items():
        sent_any.setdefault(b, m)
    return admin_pb2.EpochCoverage(
        epoch=w.epoch.id,
        sync=w.sync,
        duration_ms=max(0.0, ended_at - w.opened_at) * 1000,
        reported=first is not None and first < ended_at,
        first_report_ms=-1.0 if first is None else (first - w.epoch.opened_at) * 1000,
        reported_free_pages=w.free_pages,
        records=w.records,
        sent_after_open=_count(sent_any, free),
        rewritten_after_open=_count(sent_any, free, w.rewritten),
        sent_after_report=_count(w.after, free),
        rewritten=_count(w.after, free, w.rewritten),
        after_stop=w.after_stop,
    )


def _summarise(c: admin_pb2.Coverage) -> None:
    eps = list(c.epochs)
    c.first_report_ms = eps[0].first_report_ms if eps else -1.0
    c.sent_after_report = sum(e.sent_after_report for e in eps)
    c.rewritten = sum(e.rewritten for e in eps)
    c.fraction = c.rewritten / c.sent_after_report if c.sent_after_report else -1.0
    c.sent_after_open = sum(e.sent_after_open for e in eps)
    c.rewritten_after_open = sum(e.rewritten_after_open for e in eps)
    c.fraction_after_open = c.rewritten_after_open / c.sent_after_open if c.sent_after_open else -1.0
    c.epochs_over_200ms_without_report = sum(
        1 for e in eps if not e.after_stop and not e.reported and e.duration_ms > LONG_EPOCH_MS)
    c.first_report_goal_met = 0 <= c.first_report_ms <= FIRST_REPORT_GOAL_MS
    c.fraction_goal_met = c.fraction >= FRACTION_GOAL
    c.report_every_epoch_goal_met = bool(eps) and c.epochs_over_200ms_without_report == 0
