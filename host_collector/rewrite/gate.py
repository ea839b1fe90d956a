"""The contract between the stream proxy and whoever decides which hints apply.

The proxy parses the source's main channel and holds back RAM records for a
bounded time. A gate implements the timing half of the safety rule
(docs/safety-rule.md §3): it knows when each epoch's hint request was sent
(in bytes the proxy had received by then) and what each ``query-migrate``
poll issued after a given byte offset answered. From that
it says, for a record whose last byte was received at stream offset ``end``,
which free-page hints may turn it into a zero page.

Offsets are counts of main-channel bytes received from the source, starting
at 0 with the "QEVM" magic.

:class:`RewriteGate` is the one contract: four methods every gate writes,
and four the proxy also calls whose defaults are right for a gate that has
nothing more to say (answer per record, no hints to stop waiting for, no
idea whether the guest stopped, one migration per gate).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Protocol

#: An offset past the end of any stream: "decided through everything".
NEVER = 1 << 63


class PageOracle(Protocol):
    """Free-page hints that may zero a given record."""

    def is_free(self, block: str, page: int) -> bool:
        """Whether page ``page`` (offset // 4096) of RAMBlock ``block`` is hinted free."""
        ...


class RewriteGate(abc.ABC):
    """Decides which hints may change records the proxy holds.

    All calls but the listener's come from the proxy's parsing thread.
    """

    # ---- what every gate writes ---------------------------------------------

    @abc.abstractmethod
    def received(self, total: int) -> None:
        """The proxy has now received ``total`` bytes of the main channel.

        Cheap; called after every read. The gate may start a confirmation poll.
        """

    @abc.abstractmethod
    def decided_through(self) -> int:
        """Records that ended at or before this offset can be judged now."""

    @abc.abstractmethod
    def oracle_for(self, end: int) -> PageOracle | None:
        """Hints that may zero a record that ended at ``end`` (``end <= decided_through()``).

        None: send it unchanged.
        """

    @abc.abstractmethod
    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from any thread) when ``decided_through`` may have grown."""

    # ---- what a gate may refine -----------------------------------------------

    def oracle_until(self, end: int) -> tuple[PageOracle | None, int]:
        """(``oracle_for(end)``, the last offset >= ``end`` through which every record gets that answer).

        The proxy asks once per window instead of once per record, and clamps
        the window to ``decided_through()``. The default promises nothing
        beyond ``end`` itself, so the proxy asks again for the next record.
        """
        return self.oracle_for(end), end

    def stop_holding(self) -> None:
        """The stream's completion began, so the guest is stopped for good: a
        gate that holds ``decided_through`` back while hints are on their way
        stops doing so (they will not come). Default: nothing is held."""

    @property
    def guest_stopped(self) -> bool:
        """The guest is known to be stopped: a proxy that paces the source stops now.

        Default False: a gate that cannot tell leaves pacing to the proxy's
        own bounds (the END section, a record whose hold time ran out).
        """
        return False

    def remove_listener(self, callback: Callable[[], None]) -> None:
        """Undo :meth:`add_listener`. The proxy never calls it: a gate serves
        one migration. Default: nothing to undo."""


class NoHints(RewriteGate):
    """A gate that never rewrites: the plain relay."""

    def received(self, total: int) -> None:
        pass

    def decided_through(self) -> int:
        return NEVER

    def oracle_for(self, end: int) -> PageOracle | None:
        return None

    def add_listener(self, callback: Callable[[], None]) -> None:
        pass

    def oracle_until(self, end: int) -> tuple[PageOracle | None, int]:
        return None, NEVER  # one window for the whole stream: batches are skipped whole
