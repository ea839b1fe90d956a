"""The contract between the stream proxy and whoever decides which hints apply.

The proxy parses the source's main channel and holds back RAM records for a
bounded time. The gate implements the timing half of the safety rule
(shared/reference/safety-rule.md): it knows when each epoch's hint request was
sent (in bytes the proxy had received by then) and what each ``query-migrate``
poll issued after a given byte offset answered. From that it says, for a
record whose last byte was received at stream offset ``end``, which free-page
hints may turn it into a zero page.

Offsets are counts of main-channel bytes received from the source, starting
at 0 with the "QEVM" magic.

Two optional methods, looked up with ``getattr`` by their users:

* ``oracle_until(end) -> (oracle, valid_through)``: what ``oracle_for(end)``
  returns, and the last offset through which every record gets that same
  answer, so the proxy asks once per window rather than once per record
  (:class:`SpanGate`).
* ``stop_holding()``: the proxy saw the stream's completion begin, so the
  guest is stopped for good; a gate that holds ``decided_through`` back while
  hints are on their way stops doing so (they will not come).
* ``remove_listener(callback)``: undo :meth:`RewriteGate.add_listener`. The
  proxy never calls it; a gate is meant to serve one migration, and the QMP
  gate refuses to start twice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class PageOracle(Protocol):
    """Free-page hints that may zero a given record."""

    def is_free(self, block: str, page: int) -> bool:
        """Whether page ``page`` (offset // 4096) of RAMBlock ``block`` is hinted free."""
        ...


class RewriteGate(Protocol):
    """Decides which hints may change records the proxy holds."""

    def received(self, total: int) -> None:
        """The proxy has now received ``total`` bytes of the main channel.

        Cheap; called often. The gate may start a confirmation poll.
        """
        ...

    def decided_through(self) -> int:
        """Records that ended at or before this offset can be judged now."""
        ...

    def oracle_for(self, end: int) -> PageOracle | None:
        """Hints that may zero a record that ended at ``end`` (``end <= decided_through()``).

        None: send it unchanged.
        """
        ...

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from any thread) when ``decided_through`` may have grown."""
        ...


class SpanGate(Protocol):
    """The optional window extension of :class:`RewriteGate`."""

    def oracle_until(self, end: int) -> tuple[PageOracle | None, int]:
        """(``oracle_for(end)``, the last offset >= ``end`` with the same answer)."""
        ...


class NoHints:
    """A gate that never rewrites: the plain relay."""

    def received(self, total: int) -> None:
        pass

    def decided_through(self) -> int:
        return 1 << 63

    def oracle_for(self, end: int) -> PageOracle | None:
        return None

    def add_listener(self, callback: Callable[[], None]) -> None:
        pass

    def remove_listener(self, callback: Callable[[], None]) -> None:
        pass

    def oracle_until(self, end: int) -> tuple[PageOracle | None, int]:
        return None, 1 << 63
