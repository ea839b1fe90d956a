"""A minimal stand-in for host_collector.epochs.Collector (docs/design.md API) for the gate tests.

It records every call and refuses misuse loudly: hints for a closed epoch are
dropped (as the real collector does) and asking a released epoch anything is
a test failure, because the gate must never consult freed bitmaps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


class FakeEpoch:
    def __init__(self, epoch_id: int, vm: str) -> None:
        self.id = epoch_id
        self.vm = vm
        self.opened_at = time.monotonic()
        self._open = True
        self.close_reason = ""
        self.released = False
        self.free: set[tuple[str, int]] = set()
        self.rejected = 0

    @property
    def is_open(self) -> bool:
        return self._open

    #: Tests set these to model a snapshot still on its way, or a silent agent.
    hints_pending = False
    answered = True

    def is_free(self, block: str, page: int) -> bool:
        assert not self.released, f"is_free on released epoch {self.id}"
        return (block, page) in self.free

    def add_free(self, block: str, page: int) -> bool:
        """A hint arrives; False if the epoch no longer accepts hints."""
        if not self._open:
            self.rejected += 1
            return False
        self.free.add((block, page))
        return True


@dataclass
class FakeCollector:
    epochs: dict[int, FakeEpoch] = field(default_factory=dict)
    calls: list[tuple[str, ...]] = field(default_factory=list)
    fail_open: bool = False
    _next: int = 1

    def open_epoch(self, vm: str, deadline_s: float, live_hints: bool = True) -> FakeEpoch:
        if self.fail_open:
            raise KeyError(f"unknown VM {vm!r}")
        assert deadline_s > 0
        ep = FakeEpoch(self._next, vm)
        self._next += 1
        self.epochs[ep.id] = ep
        self.calls.append(("open", vm, str(ep.id)))
        return ep

    def close_epoch(self, vm: str, epoch_id: int, reason: str = "on demand") -> None:
        ep = self.epochs[epoch_id]
        assert ep.vm == vm
        ep._open = False
        ep.close_reason = ep.close_reason or reason
        self.calls.append(("close", vm, str(epoch_id), reason))

    def release_epoch(self, vm: str, epoch_id: int) -> None:
        ep = self.epochs[epoch_id]
        assert ep.vm == vm and not ep.released, f"epoch {epoch_id} released twice"
        ep._open = False
        ep.released = True
        self.calls.append(("release", vm, str(epoch_id)))
