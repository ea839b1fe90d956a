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

Cost on the relay's thread: :meth:`CoverageCounter.batch` only queues the
batch (a deque append). The queue is worked off in bulk by
:meth:`CoverageCounter.drain`, which the migration's status loop calls every
0.1 s on the asyncio loop (and epoch openings and releases), while the relay
thread mostly waits in recv/send without the GIL: one numpy conversion and
one indexed store per window and block, about 0.1 us per record. Should
nobody drain, the relay does it itself every :data:`DRAIN_BATCHES` batches,
so the queue stays bounded. bench/proxy_throughput.py's ``proxy_held_cov``
measures the cost.
"""

from __future__ import annotations

import bisect
import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter
from typing import Protocol

import numpy as np
import numpy.typing as npt

from fphint.v1 import admin_pb2
from host_collector.layout import RamLayout

#: Batches queued before the relay's own call works them off (~0.25 GB of records).
DRAIN_BATCHES = 1024

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

    def __init__(
        self, layout: RamLayout, *, guest_stopped: Callable[[], bool] = lambda: False, limit: int = 256
    ) -> None:
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
        #: Batches not yet counted: (received_at, pages, rewritten indices, final).
        self._queue: collections.deque[tuple[float, list[tuple[int, int, str, int]], list[int] | None, bool]] = (
            collections.deque()
        )

    # ---- inputs ---------------------------------------------------------------

    def epoch_opened(self, sync: int, epoch: CoveredEpoch) -> None:
        stopped = self._guest_stopped()
        with self._lock:
            self._drain_locked()
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
            self._drain_locked()
            w = self._by_id.get(epoch.id)
            if w is None or w.free is not None:
                return
            w.free = free
            w.free_pages = sum(int(np.count_nonzero(m)) for m in free.values())
            self._finalise_ready()

    def batch(
        self, received_at: float, pages: list[tuple[int, int, str, int]], rewritten: list[int] | None, final: bool
    ) -> None:
        """The relay's tap: a batch of PAGE records parsed at ``received_at`` is done with.

        Only queued; every :data:`DRAIN_BATCHES` the queue is counted here, in bulk.
        """
        if pages:
            q = self._queue
            q.append((received_at, pages, rewritten, final))
            if len(q) >= DRAIN_BATCHES:
                with self._lock:
                    self._drain_locked()

    def drain(self) -> None:
        """Count the queued batches now (any thread; the daemon's status loop calls it)."""
        if self._queue:
            with self._lock:
                self._drain_locked()

    def _drain_locked(self) -> None:
        """Count every queued batch: per (mask, block) the batches' page numbers in one array, one store."""
        q = self._queue
        #: (id of the mask dict, block) -> _Pending
        todo: dict[tuple[int, str], _Pending] = {}

        def pending(target: dict[str, Mask], block: str, rw_target: dict[str, Mask] | None) -> _Pending:
            key = (id(target), block)
            got = todo.get(key)
            if got is None:
                got = todo[key] = _Pending(target, block, rw_target)
            return got

        while q:
            received_at, pages, rewritten, final = q.popleft()
            n = len(pages)
            rw_target: dict[str, Mask] | None = None
            if final:
                self._end_records += n
                target = self._end_pages
            else:
                i = bisect.bisect_right(self._starts, received_at) - 1
                if i < 0:
                    self._before_first += n
                    continue
                w = self._windows[i]
                if w.result is not None:
                    continue  # finalised already (parsed long before it was done with): too late to count
                w.records += n
                first = w.epoch.first_chunk_at
                target = w.after if first is not None and first <= received_at else w.before
                rw_target = w.rewritten
            b = pages[0][2]
            if pages[-1][2] == b and len(set(map(_BLOCK, pages))) == 1:
                pending(target, b, rw_target).add(pages, rewritten if rw_target is not None else None)
                continue
            rw = set(rewritten or ())
            for k, rec in enumerate(pages):  # a batch across blocks (rare): record by record
                pending(target, rec[2], rw_target).add([rec], [0] if rw_target is not None and k in rw else None)
        for job in todo.values():
            size = self._pages.get(job.block)
            if size is not None:  # a block outside the layout: never hinted
                job.store(size)

    # ---- the report -------------------------------------------------------------

    def report(self, started_at: float, ended_at: float) -> admin_pb2.Coverage:
        """The coverage block; call once the proxy and the gate are done (every epoch released)."""
        with self._lock:
            self._drain_locked()
            for w in self._windows:
                w.complete = True
                if w.free is None:
                    w.free = {}  # never released (e.g. a gate that failed early): nothing counts as free
            self._finalise_ready(ended_at)
            out = admin_pb2.Coverage(
                epochs_not_tracked=self._not_tracked,
                records_before_first_epoch=self._before_first,
                end_section_records=self._end_records,
            )
            for w in self._windows:
                assert w.result is not None
                e = out.epochs.add()
                e.CopyFrom(w.result)
                e.opened_at_s = w.opened_at - started_at
            if self._last_answered is not None:
                free = self._last_answered[1]
                out.end_section_reported_free = sum(
                    int(np.count_nonzero(m & free[b])) for b, m in self._end_pages.items() if b in free
                )
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
            if (
                w.result.reported
                and not w.after_stop
                and (self._last_answered is None or self._last_answered[0] < w.sync)
            ):
                self._last_answered = (w.sync, w.free)
            w.before, w.after, w.rewritten, w.free = {}, {}, {}, {}


class _Pending:
    """Batches of one block bound for one mask (and their rewrites for ``rw_target``)."""

    __slots__ = ("block", "chunks", "n", "rw", "rw_target", "target")

    def __init__(self, target: dict[str, Mask], block: str, rw_target: dict[str, Mask] | None) -> None:
        self.target = target
        self.block = block
        self.rw_target = rw_target
        self.chunks: list[list[tuple[int, int, str, int]]] = []
        self.n = 0
        self.rw: list[int] = []  # indices into the concatenation of chunks

    def add(self, pages: list[tuple[int, int, str, int]], rewritten: list[int] | None) -> None:
        if rewritten:
            self.rw.extend(map(self.n.__add__, rewritten))
        self.chunks.append(pages)
        self.n += len(pages)

    def store(self, size: int) -> None:
        pg = np.fromiter(chain.from_iterable(map(_PAGE, c) for c in self.chunks), dtype=np.intp, count=self.n)
        _mask(self.target, self.block, size)[pg[pg < size]] = True
        if self.rw_target is not None and self.rw:
            r = pg[np.array(self.rw, dtype=np.intp)]
            _mask(self.rw_target, self.block, size)[r[r < size]] = True


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
        1 for e in eps if not e.after_stop and not e.reported and e.duration_ms > LONG_EPOCH_MS
    )
    c.first_report_goal_met = 0 <= c.first_report_ms <= FIRST_REPORT_GOAL_MS
    c.fraction_goal_met = c.fraction >= FRACTION_GOAL
    c.report_every_epoch_goal_met = bool(eps) and c.epochs_over_200ms_without_report == 0
