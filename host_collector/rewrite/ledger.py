"""The timing half of the safety rule, as plain bookkeeping (no I/O).

docs/safety-rule.md §3.2-3.5 has the proof of every case below.

Inputs, all in main-channel byte offsets (bytes the proxy reported received):

* ``MIGRATION_PASS c`` arrived (sync c has *finished*): epoch c opens through
  the collector and its hint request goes out now, at request offset O_c.
* a ``query-migrate`` issued after the proxy reported X bytes answered
  ``dirty-sync-count`` s: sync s+1 had not *started* when QEMU computed the
  reply, which was after every record ending at or before X was received.

A record ending at ``end`` is judged by the earliest answered poll with
X >= end (answer s). Epoch e's hints may zero it when

* e == s: rule (b). The hints were taken after sync s ended and no sync
  started between them and the record's pick;
* e > s: rule (a). Sync e started after that poll's reply, so after the
  record was read; every hint of epoch e is later still;
* O_e >= end: rule (a). The record was received before epoch e's request
  went out, so it was read before any hint of e was taken.

Any other epoch (older than s, requested after the record was read) is
stale: a sync may have collected a write between hint and pick. Those
records go out unchanged. If a poll fails, nothing past the last answered
poll is ever rewritten.

Two switches (docs/safety-rule.md §3.9, §7.2):

* once the source's completion began (``MIGRATION`` status ``device``),
  records no answered poll covers are decided at once, by the third case
  alone (it needs no poll): nothing waits for the poll QEMU can only answer
  after the final pass;
* ``same_sync=False`` (a KVM source without the dirty ring) drops the first
  case: KVM's deferred dirty-log clear breaks rule (b).

Each entry is the one record of its epoch: the migration report reads the
entries the ledger hands to ``on_release`` (:mod:`.recorder`).
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from host_collector.rewrite.gate import NEVER, PageOracle

log = logging.getLogger(__name__)


class EpochLike(Protocol):
    """What the ledger needs of ``host_collector.epochs.Epoch``."""

    @property
    def id(self) -> int: ...

    @property
    def is_open(self) -> bool: ...

    def is_free(self, block: str, page: int) -> bool: ...

    @property
    def hints_pending(self) -> bool: ...

    @property
    def answered(self) -> bool: ...


#: The collector's epoch type (``Epoch``; a fake in tests), kept so whoever
#: reads an entry gets the epoch as the collector made it.
E = TypeVar("E", bound=EpochLike)
E_co = TypeVar("E_co", bound=EpochLike, covariant=True)


class CollectorLike(Protocol[E_co]):
    """What the ledger needs of ``host_collector.epochs.Collector``."""

    def open_epoch(self, vm: str, deadline_s: float, live_hints: bool = True) -> E_co: ...

    def close_epoch(self, vm: str, epoch_id: int, reason: str = "on demand") -> None: ...

    def release_epoch(self, vm: str, epoch_id: int) -> None: ...


@dataclass
class EpochEntry(Generic[E]):
    """One epoch as the ledger knows it: its sync, its request offset, its state."""

    sync: int
    epoch: E
    request_offset: int
    #: decided_through() when the epoch opened: held there while its snapshot arrives.
    decided_at_open: int = 0
    closed: bool = False
    released: bool = False
    unusable_after_poll: int | None = None  # index of the poll that made it stale for all later records


class EpochOracle:
    """Free if any usable epoch says so; a released epoch says nothing."""

    __slots__ = ("entries",)

    def __init__(self, entries: Sequence[EpochEntry[Any]]) -> None:
        self.entries = tuple(entries)

    def is_free(self, block: str, page: int) -> bool:
        for e in self.entries:
            if not e.released and e.epoch.is_free(block, page):
                return True
        return False

    @property
    def syncs(self) -> tuple[int, ...]:
        return tuple(e.sync for e in self.entries)


@dataclass
class LedgerStats:
    received: int = 0
    decided_through: int = 0
    passes: int = 0
    last_pass: int = 0
    polls_answered: int = 0
    last_poll_sync: int = 0
    syncs_seen_by_poll_first: int = 0  # a poll answered s before MIGRATION_PASS s arrived
    epochs_opened: int = 0
    epochs_released: int = 0
    failure: str | None = None


class EpochLedger(Generic[E]):
    """Epochs, polls and verdicts for one migration stream.

    Thread-safe: the proxy may call :meth:`received` and :meth:`oracle_for`
    from its own thread while QMP events and poll answers arrive on the
    asyncio loop.

    ``on_release(entry)`` is called (under the ledger's lock) when an epoch
    is done with, before the collector frees its bitmaps: the last moment its
    hints and figures can be read.
    """

    def __init__(
        self,
        collector: CollectorLike[E],
        vm: str,
        *,
        hint_deadline_s: float = 5.0,
        max_polls: int = 4096,
        release_lag_polls: int = 2,
        on_release: Callable[[EpochEntry[E]], None] | None = None,
        same_sync: bool = True,
    ) -> None:
        self._collector = collector
        #: Whether the e == s case (rule (b)) may be used (§7.2: not under KVM without the dirty ring).
        self.same_sync = same_sync
        #: The source's completion began: unpolled records are decided by request offsets alone (§3.9).
        self._completing = False
        self._on_release = on_release
        self._vm = vm
        self._deadline_s = hint_deadline_s
        self._max_polls = max_polls
        self._release_lag = release_lag_polls
        self._lock = threading.Lock()
        self._received = 0
        self._poll_x: list[int] = []  # offsets, ascending
        self._poll_s: list[int] = []  # answers, non-decreasing
        self._poll_base = 0  # global index of _poll_x[0]
        self._epochs: dict[int, EpochEntry[E]] = {}
        self._latest: EpochEntry[E] | None = None
        self._last_pass = 0
        self._failed: str | None = None
        self._last_oracle: EpochOracle | None = None
        #: An epoch closed without a single chunk from the agent.
        self._agent_silent = False
        #: Cleared for good once the guest has stopped (the stream's completion).
        self._hold_for_hints = True
        self.stats = LedgerStats()

    # ---- inputs -----------------------------------------------------------

    def received(self, total: int) -> None:
        if total > self._received:
            self._received = total

    @property
    def received_total(self) -> int:
        return self._received

    @property
    def confirmed_through(self) -> int:
        """X of the last answered poll (0 before any)."""
        return self._poll_x[-1] if self._poll_x else 0

    @property
    def failure(self) -> str | None:
        return self._failed

    @property
    def last_pass(self) -> int:
        return self._last_pass

    @property
    def latest(self) -> EpochEntry[E] | None:
        """The epoch opened last, released or not (for progress reports)."""
        return self._latest

    def on_pass(self, count: int) -> EpochEntry[E] | None:
        """``MIGRATION_PASS count``: open epoch ``count`` and send its hint request."""
        with self._lock:
            if self._failed:
                return None
            if count <= self._last_pass:
                self._fail_locked(f"MIGRATION_PASS went from {self._last_pass} to {count}")
                return None
            self._last_pass = count
            self.stats.passes += 1
            self.stats.last_pass = count
            for older in self._epochs.values():
                self._close_locked(older, f"sync {count} finished")
            try:
                epoch = self._collector.open_epoch(self._vm, self._deadline_s)
            except Exception as err:  # the collector refusing must stop rewrites, not the migration
                self._fail_locked(f"collector could not open epoch for sync {count}: {err}")
                return None
            entry = EpochEntry(count, epoch, self._received, self._poll_x[-1] if self._poll_x else 0)
            self._epochs[count] = self._latest = entry
            self.stats.epochs_opened += 1
            return entry

    def on_poll(self, x: int, sync_count: int, passes_before: int = 0) -> None:
        """A ``query-migrate`` issued when ``x`` bytes had been reported answered ``sync_count``.

        ``passes_before``: the last MIGRATION_PASS applied when the poll was
        issued; an answer below it means the two sources disagree.
        """
        with self._lock:
            if self._failed:
                return
            if sync_count < passes_before:
                self._fail_locked(
                    f"query-migrate answered sync {sync_count} after MIGRATION_PASS {passes_before} had arrived"
                )
                return
            if self._poll_x and (x < self._poll_x[-1] or sync_count < self._poll_s[-1]):
                self._fail_locked(
                    f"poll (offset {x}, sync {sync_count}) goes back from "
                    f"(offset {self._poll_x[-1]}, sync {self._poll_s[-1]})"
                )
                return
            if sync_count > self._last_pass:
                self.stats.syncs_seen_by_poll_first += 1
            self._poll_x.append(x)
            self._poll_s.append(sync_count)
            index = self._poll_base + len(self._poll_x) - 1
            if len(self._poll_x) > self._max_polls:
                drop = len(self._poll_x) - self._max_polls
                del self._poll_x[:drop], self._poll_s[:drop]
                self._poll_base += drop
            self.stats.polls_answered += 1
            self.stats.last_poll_sync = sync_count
            for e in self._epochs.values():
                if e.sync < sync_count and e.request_offset <= x:
                    self._close_locked(e, f"sync {sync_count} started")
                    if e.unusable_after_poll is None:
                        e.unusable_after_poll = index
            for e in list(self._epochs.values()):
                if e.unusable_after_poll is not None and index - e.unusable_after_poll >= self._release_lag:
                    self._release_locked(e)

    def fail(self, reason: str) -> None:
        """No more rewrites past the last answered poll; epochs stop collecting hints."""
        with self._lock:
            self._fail_locked(reason)

    def stop_holding(self) -> None:
        """The guest has stopped for good: hints not received by now will not
        come, so decisions no longer wait for them (QEMU opens an epoch for its
        final sync too, and holding for its snapshot would add to downtime)."""
        self._hold_for_hints = False

    def completion_started(self) -> None:
        """The source entered ``device`` (its completion: guest stopped, final sync to come).

        From now on a record no answered poll covers is decided at once with
        the epochs whose request went out after it was received (rule (a),
        no poll needed; docs/safety-rule.md §3.9), instead of waiting for a
        poll QEMU answers only after it wrote the final pass.
        """
        self._completing = True
        self._hold_for_hints = False

    @property
    def completing(self) -> bool:
        return self._completing

    def release_all(self) -> None:
        with self._lock:
            for e in list(self._epochs.values()):
                self._close_locked(e, "migration stream ended")
                self._release_locked(e)

    # ---- verdicts ---------------------------------------------------------

    def decided_through(self) -> int:
        """The last answered poll's offset, held where it stood when the open
        epoch's request went out while its snapshot is still arriving: a record
        judged now would miss hints that are on their way (the proxy's hold
        bounds still cap the wait, so no migration waits on a guest)."""
        if self._failed or self._completing:
            return NEVER
        x = self._poll_x[-1] if self._poll_x else 0
        if self._agent_silent or not self._hold_for_hints:
            return x  # it never answered an earlier epoch, or the guest has stopped
        for e in list(self._epochs.values()):
            if not e.closed and e.epoch.hints_pending:
                x = min(x, e.decided_at_open)
        return x

    def _usable(self, e: EpochEntry[E], s: int) -> bool:
        """Whether epoch ``e`` may zero a record judged by a poll that answered ``s`` (§3.4, cases 1-2)."""
        return e.sync > s or (e.sync == s and self.same_sync)

    def oracle_for(self, end: int) -> PageOracle | None:
        with self._lock:
            i = bisect.bisect_left(self._poll_x, end)
            if i >= len(self._poll_x):
                if self._completing and not self._failed:
                    # §3.9: no poll covers it, and none will before the final pass: case 3 alone.
                    return self._oracle_locked(
                        tuple(e for e in self._epochs.values() if not e.released and e.request_offset >= end)
                    )
                return None  # not confirmed (after a failure, never will be)
            # If the earliest poll after `end` was dropped, _poll_x[i] is a later
            # one: its answer is no smaller, so the usable set only shrinks.
            s = self._poll_s[i]
            usable = tuple(
                e for e in self._epochs.values() if not e.released and (self._usable(e, s) or e.request_offset >= end)
            )
            return self._oracle_locked(usable)

    def oracle_until(self, end: int) -> tuple[PageOracle | None, int]:
        """``oracle_for(end)`` and the last offset through which records get the same answer.

        The answer only changes where the deciding poll changes (at a poll
        offset) or where a record stops preceding an epoch's request (at a
        request offset), so the window ends at the first of those at or after
        ``end``. Epochs opened later only add hints by rule (a), so an answer
        reused inside its window is never larger than a fresh one.
        """
        with self._lock:
            i = bisect.bisect_left(self._poll_x, end)
            if i >= len(self._poll_x):
                if self._completing and not self._failed:
                    # §3.9: case 3 alone; the answer changes only where a request offset is passed.
                    through = NEVER
                    usable = []
                    for e in self._epochs.values():
                        if not e.released and e.request_offset >= end:
                            usable.append(e)
                            through = min(through, e.request_offset)
                    return self._oracle_locked(tuple(usable)), through
                # Not confirmed yet (the proxy does not ask then), or never will be.
                return None, (NEVER if self._failed else end)
            s = self._poll_s[i]
            through = self._poll_x[i]
            usable = []
            for e in self._epochs.values():
                if e.released:
                    continue
                if self._usable(e, s):
                    usable.append(e)
                elif e.request_offset >= end:
                    usable.append(e)
                    through = min(through, e.request_offset)
            return self._oracle_locked(tuple(usable)), through

    def _oracle_locked(self, usable: tuple[EpochEntry[E], ...]) -> EpochOracle | None:
        if not usable:
            return None
        last = self._last_oracle
        if last is not None and last.entries == usable:
            return last
        oracle = self._last_oracle = EpochOracle(usable)
        return oracle

    def polls(self) -> list[tuple[int, int]]:
        """(offset, sync count) of every answered poll still kept, oldest first."""
        with self._lock:
            return list(zip(self._poll_x, self._poll_s))

    def entries(self) -> list[EpochEntry[E]]:
        """Epochs not yet released, oldest first."""
        with self._lock:
            return list(self._epochs.values())

    def snapshot(self) -> LedgerStats:
        st = self.stats
        st.received = self._received
        st.decided_through = self.decided_through()
        st.failure = self._failed
        return LedgerStats(**vars(st))

    # ---- internals --------------------------------------------------------

    def _fail_locked(self, reason: str) -> None:
        if self._failed:
            return
        self._failed = reason
        for e in self._epochs.values():
            self._close_locked(e, f"no more rewrites: {reason}")

    def _close_locked(self, e: EpochEntry[E], reason: str) -> None:
        if e.closed:
            return
        e.closed = True
        if not e.epoch.answered:
            self._agent_silent = True
        try:
            self._collector.close_epoch(self._vm, e.epoch.id, reason)
        except Exception:  # a collector that already dropped it is fine
            pass

    def _release_locked(self, e: EpochEntry[E]) -> None:
        if e.released:
            return
        e.released = True
        del self._epochs[e.sync]
        self.stats.epochs_released += 1
        if self._on_release is not None:
            try:
                self._on_release(e)
            except Exception:  # a watcher's bug must not keep the bitmaps alive
                log.exception("epoch ledger: on_release failed for epoch %d", e.epoch.id)
        try:
            self._collector.release_epoch(self._vm, e.epoch.id)
        except Exception:
            pass
