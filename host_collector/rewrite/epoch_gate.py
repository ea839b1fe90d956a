"""The proxy's RewriteGate, driven by the source QEMU's QMP monitor.

``MIGRATION_PASS`` events open hint epochs; ``query-migrate`` polls confirm,
window by window, which sync count was current after the proxy received a
record (the rules are in :mod:`.ledger`, their proof in docs/safety-rule.md §3).

Polls are rate-limited (one in flight, at most one per ``poll_interval_s``)
and only issued when the proxy has reported new bytes. Nothing here waits on
the guest, and nothing the proxy calls blocks: :meth:`received` only stores
a number and nudges the poller. A QMP error, a timeout or a reply that makes
no sense stops all further rewriting (the gate then decides everything at
once, unchanged); it never produces a verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Generic

from host_collector.qmp.session import EventQueue, QmpError, QmpSession
from host_collector.rewrite.gate import PageOracle, RewriteGate
from host_collector.rewrite.ledger import CollectorLike, E, EpochEntry, EpochLedger, LedgerStats

#: query-migrate states that still carry a current ``ram.dirty-sync-count``.
_COUNTING = frozenset({"active", "pre-switchover", "device", "completed", "cancelling"})
#: MIGRATION statuses of the source's completion: the guest is stopped, the final sync comes next.
_COMPLETING = frozenset({"pre-switchover", "device"})
#: States before the first page record (setup runs sync 1; wait-unplug follows it).
_BEFORE_PAGES = frozenset({"setup", "wait-unplug"})


class EpochGate(RewriteGate, Generic[E]):
    """The :class:`RewriteGate` of one migration stream.

    ``on_release`` is the ledger's (:class:`EpochLedger`): it sees each
    epoch's entry before the collector frees its bitmaps. ``on_open(sync,
    epoch)`` is told of each epoch as it opens (the migration's coverage
    figures); neither may block. ``same_sync=False`` drops rule (b)'s
    e == s case (a KVM source: docs/safety-rule.md §7.2).
    """

    def __init__(
        self,
        source: QmpSession,
        collector: CollectorLike[E],
        vm: str,
        *,
        poll_interval_s: float = 0.01,
        poll_timeout_s: float = 1.0,
        hint_deadline_s: float = 5.0,
        on_release: Callable[[EpochEntry[E]], None] | None = None,
        on_open: Callable[[int, E], None] | None = None,
        same_sync: bool = True,
    ) -> None:
        if poll_interval_s <= 0 or poll_timeout_s <= 0:
            raise ValueError("poll interval and timeout must be positive")
        self.ledger = EpochLedger(
            collector, vm, hint_deadline_s=hint_deadline_s, on_release=on_release, same_sync=same_sync
        )
        self._source = source
        self._interval = poll_interval_s
        self._timeout = poll_timeout_s
        self._listeners: list[Callable[[], None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._wake = asyncio.Event()
        self._wake_pending = False
        self._events: EventQueue | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.polls_issued = 0
        self._on_open = on_open
        #: query-migrate round trips: answered polls, their sum and the longest (seconds).
        self.poll_rtt_n = 0
        self.poll_rtt_sum = 0.0
        self.poll_rtt_max = 0.0
        self._started = False
        #: The guest stopped (QMP STOP): its agent cannot answer any more.
        self._stopped = False

    # ---- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        """Listen for MIGRATION_PASS and start polling. Call before ``migrate`` is issued.

        A gate serves one migration stream: starting it twice raises.
        """
        if self._started:
            raise RuntimeError("an EpochGate serves one migration; make a new one")
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._events = self._source.listen("MIGRATION_PASS", "STOP", "MIGRATION")
        self._tasks = [
            asyncio.create_task(self._event_loop(), name="fph-gate-events"),
            asyncio.create_task(self._poll_loop(), name="fph-gate-polls"),
        ]

    async def stop(self) -> None:
        """Stop polling and release every epoch (the stream is over)."""
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks = []
        if self._events is not None:
            self._source.unlisten(self._events)
            self._events = None
        self._listeners.clear()
        self.ledger.release_all()

    # ---- RewriteGate ------------------------------------------------------

    def received(self, total: int) -> None:
        self.ledger.received(total)
        if self._wake_pending or self._loop is None:
            return
        self._wake_pending = True
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            self._loop.call_soon_threadsafe(self._wake.set)

    def decided_through(self) -> int:
        return self.ledger.decided_through()

    def oracle_for(self, end: int) -> PageOracle | None:
        return self.ledger.oracle_for(end)

    def oracle_until(self, end: int) -> tuple[PageOracle | None, int]:
        return self.ledger.oracle_until(end)

    def stop_holding(self) -> None:
        self.ledger.stop_holding()

    @property
    def guest_stopped(self) -> bool:
        """QEMU stopped the guest (at switchover, or anyone did): a proxy that
        paces the source must stop now. QEMU may write the final pass holding
        the lock its QMP answers need, so the gate cannot decide until that
        pass is read; the STOP event still arrives (the monitor has its own
        thread)."""
        return self._stopped

    def guest_not_running(self) -> None:
        """The guest is not running (a STOP, or paused before the migration)."""
        if not self._stopped:
            self._stopped = True
            self.ledger.stop_holding()
            self._notify()

    def add_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        """Forget ``callback`` (all of its registrations); :meth:`stop` forgets them all."""
        self._listeners = [cb for cb in self._listeners if cb != callback]

    # ---- reporting --------------------------------------------------------

    @property
    def failure(self) -> str | None:
        return self.ledger.failure

    def stats(self) -> LedgerStats:
        return self.ledger.snapshot()

    # ---- internals --------------------------------------------------------

    def _notify(self) -> None:
        for cb in list(self._listeners):
            try:
                cb()
            except Exception:  # a listener's bug must not stop the poller
                pass

    def _fail(self, reason: str) -> None:
        self.ledger.fail(reason)
        self._notify()

    def _take_events(self) -> None:
        """Apply every MIGRATION_PASS already received, in arrival order."""
        if self._events is None:
            return
        for ev in self._events.clear():
            self._apply_event(ev)

    def _apply_event(self, ev: Mapping[str, Any]) -> None:
        name = ev.get("event")
        if name == "STOP" or (name == "MIGRATION" and _status(ev) in _COMPLETING):
            # The guest stopped during the migration (QEMU's completion, or anyone's
            # stop): decide unpolled records now, by request offsets alone (§3.9).
            self.ledger.completion_started()
            self.guest_not_running()
            self._notify()
            return
        if name == "MIGRATION":
            return
        data = ev.get("data")
        count = data.get("pass") if isinstance(data, Mapping) else None
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            self._fail(f"malformed MIGRATION_PASS event: {dict(ev)!r}")
            return
        entry = self.ledger.on_pass(count)
        if entry is not None and self._on_open is not None:
            try:
                self._on_open(entry.sync, entry.epoch)
            except Exception:  # a watcher's bug must not stop the gate
                pass
        if self.ledger.failure:
            self._notify()

    async def _event_loop(self) -> None:
        assert self._events is not None
        while True:
            ev = await self._events.get()
            self._apply_event(ev)

    async def _poll_loop(self) -> None:
        last_issue = -float("inf")
        while not self.ledger.failure:
            if self.ledger.received_total <= self.ledger.confirmed_through:
                self._wake.clear()
                self._wake_pending = False
                if self.ledger.received_total <= self.ledger.confirmed_through:
                    await self._wake.wait()
                continue
            delay = last_issue + self._interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            x = self.ledger.received_total
            passes_before = self.ledger.last_pass
            last_issue = time.monotonic()
            self.polls_issued += 1
            try:
                reply = await self._source.execute("query-migrate", timeout_s=self._timeout)
            except QmpError as err:
                self._fail(f"query-migrate: {err}")
                return
            rtt = time.monotonic() - last_issue
            self.poll_rtt_n += 1
            self.poll_rtt_sum += rtt
            self.poll_rtt_max = max(self.poll_rtt_max, rtt)
            # Events queued before this reply are applied before it (QEMU emits
            # MIGRATION_PASS s before it can answer s; the client keeps wire order).
            self._take_events()
            self._apply_reply(x, reply, passes_before)
            self._notify()

    def _apply_reply(self, x: int, reply: Any, passes_before: int) -> None:
        if not isinstance(reply, Mapping):
            self._fail(f"query-migrate returned {reply!r}")
            return
        status = reply.get("status")
        if status in _BEFORE_PAGES:
            return  # no ram counters yet, and no page record can have been sent: ask again
        ram = reply.get("ram")
        count = ram.get("dirty-sync-count") if isinstance(ram, Mapping) else None
        if status not in _COUNTING or not isinstance(count, int) or isinstance(count, bool):
            self._fail(f"query-migrate status {status!r} without a dirty-sync-count")
            return
        self.ledger.on_poll(x, count, passes_before)


def _status(ev: Mapping[str, Any]) -> object:
    data = ev.get("data")
    return data.get("status") if isinstance(data, Mapping) else None
