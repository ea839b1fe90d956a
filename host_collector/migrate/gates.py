"""Small wrappers around the epoch gate for one migration run.

:class:`EpochRecorder` stands between the epoch ledger and the collector and
keeps each epoch's figures when the ledger releases it (the report needs them
after the bitmaps are gone). :class:`HeldGate` holds every verdict until a
check passes: a standing proxy can only check the source's settings once the
orchestrator's ``migrate`` has started, so nothing may be rewritten before.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

from fphint.v1 import admin_pb2
from host_collector.epochs import Collector, Epoch, EpochStats
from host_collector.migration.gate import PageOracle
from host_collector.qmp.epoch_gate import EpochGate
from host_collector.qmp.epoch_ledger import EpochLedger

NEVER = 1 << 63


@dataclasses.dataclass
class EpochRecord:
    sync: int
    request_offset: int
    epoch: Epoch
    stats: EpochStats | None = None  # filled in at release


class EpochRecorder:
    """The collector as the ledger uses it (open/close/release), keeping every epoch's stats.

    At most ``limit`` finished epochs are kept (the newest); ``dropped`` counts the rest.
    """

    def __init__(
        self, collector: Collector, limit: int = 256, on_release: Callable[[Epoch], None] | None = None
    ) -> None:
        self._collector = collector
        self._on_release = on_release
        self.ledger: EpochLedger | None = None
        self._live: dict[int, EpochRecord] = {}
        self._done: collections.deque[EpochRecord] = collections.deque(maxlen=limit)
        self.dropped = 0
        self.latest: EpochRecord | None = None

    def open_epoch(self, vm: str, deadline_s: float, live_hints: bool = True) -> Epoch:
        ep = self._collector.open_epoch(vm, deadline_s, live_hints)
        led = self.ledger
        # The ledger sets its pass count before it asks, and its byte count is the request offset.
        rec = EpochRecord(led.last_pass if led else 0, led.received_total if led else 0, ep)
        self._live[ep.id] = rec
        self.latest = rec
        return ep

    def close_epoch(self, vm: str, epoch_id: int, reason: str = "on demand") -> None:
        self._collector.close_epoch(vm, epoch_id, reason)

    def release_epoch(self, vm: str, epoch_id: int) -> None:
        rec = self._live.pop(epoch_id, None)
        if rec is not None:
            self._keep(rec)
            if self._on_release is not None:
                self._on_release(rec.epoch)
        self._collector.release_epoch(vm, epoch_id)

    def finish(self) -> None:
        """Keep the figures of epochs the ledger never released."""
        for rec in list(self._live.values()):
            self._keep(rec)
        self._live.clear()

    def _keep(self, rec: EpochRecord) -> None:
        rec.stats = dataclasses.replace(rec.epoch.stats())
        if len(self._done) == self._done.maxlen:
            self.dropped += 1
        self._done.append(rec)

    def reports(self) -> list[admin_pb2.EpochReport]:
        out = []
        for rec in self._done:
            st = rec.stats
            assert st is not None
            out.append(
                admin_pb2.EpochReport(
                    epoch=rec.epoch.id,
                    sync=rec.sync,
                    request_offset=rec.request_offset,
                    request_sent=rec.epoch.request_sent,
                    hint_pages=st.free_pages,
                    accepted_ranges=st.accepted_ranges,
                    rejected_ranges=st.rejected_ranges,
                    reports=st.reports,
                    request_to_last_chunk_s=-1.0 if st.request_to_last_chunk_s is None else st.request_to_last_chunk_s,
                    close_reason=st.close_reason,
                )
            )
        return out


class HeldGate:
    """A RewriteGate that decides nothing until :meth:`clear`; after :meth:`refuse`, never rewrites.

    Records wait at most the proxy's hold bounds, as for any gate.
    """

    def __init__(self, inner: EpochGate) -> None:
        self.inner = inner
        self._state = "held"
        self.refusal: str | None = None
        self._listeners: list[Callable[[], None]] = []

    @property
    def state(self) -> str:
        return self._state

    def clear(self) -> None:
        if self._state == "held":
            self._state = "cleared"
            self._notify()

    def refuse(self, reason: str) -> None:
        """No rewriting in this migration; the inner gate stops asking for hints."""
        if self._state == "held":
            self.refusal = reason
            self._state = "refused"
            self.inner.ledger.fail(f"refused: {reason}")
            self._notify()

    def _notify(self) -> None:
        for cb in list(self._listeners):
            try:
                cb()
            except Exception:  # a listener's bug must not stop the caller
                pass

    # RewriteGate and its extensions

    def received(self, total: int) -> None:
        self.inner.received(total)

    def decided_through(self) -> int:
        state = self._state
        if state == "cleared":
            return self.inner.decided_through()
        return NEVER if state == "refused" else 0

    def oracle_for(self, end: int) -> PageOracle | None:
        return self.inner.oracle_for(end) if self._state == "cleared" else None

    def oracle_until(self, end: int) -> tuple[PageOracle | None, int]:
        state = self._state
        if state == "cleared":
            return self.inner.oracle_until(end)
        return None, (NEVER if state == "refused" else end)

    def stop_holding(self) -> None:
        self.inner.stop_holding()

    @property
    def guest_stopped(self) -> bool:
        return self.inner.guest_stopped

    def add_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)
        self.inner.add_listener(callback)

    def remove_listener(self, callback: Callable[[], None]) -> None:
        self._listeners = [cb for cb in self._listeners if cb != callback]
        self.inner.remove_listener(callback)
