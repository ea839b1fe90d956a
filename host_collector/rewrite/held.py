"""A gate that holds every verdict until a check passes.

A standing proxy (``fph-collector proxy``) can only check the source's
settings once the orchestrator's ``migrate`` has started, so nothing may be
rewritten before: :class:`HeldGate` decides nothing until :meth:`HeldGate.clear`
and, after :meth:`HeldGate.refuse`, never rewrites (docs/safety-rule.md §4).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from host_collector.rewrite.epoch_gate import EpochGate
from host_collector.rewrite.gate import NEVER, PageOracle, RewriteGate


class HeldGate(RewriteGate):
    """A RewriteGate that decides nothing until :meth:`clear`; after :meth:`refuse`, never rewrites.

    Records wait at most the proxy's hold bounds, as for any gate.
    """

    def __init__(self, inner: EpochGate[Any]) -> None:
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

    # RewriteGate

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
