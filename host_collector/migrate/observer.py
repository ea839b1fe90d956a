"""Hooks through which a caller watches the daemon's migrations.

The daemon runs with the default observer, which changes nothing. A test
harness (fphint_lab's witness) passes its own to :class:`CollectorServer`
to see, from outside the gate's bookkeeping, which pages a migration's proxy
rewrote and which its agent hinted. Hooks are explicit parameters: nothing
patches the daemon's classes.
"""

from __future__ import annotations

from host_collector.epochs import Epoch
from host_collector.proxy.results import ProxyResult
from host_collector.rewrite.gate import RewriteGate


class MigrationWatch:
    """One migration's hooks; every method is a no-op by default."""

    def gate(self, gate: RewriteGate) -> RewriteGate:
        """The gate the proxy will use: ``gate`` itself, or a :class:`RewriteGate` that wraps it."""
        return gate

    def epoch_released(self, epoch: Epoch) -> None:
        """``epoch`` is about to lose its bitmaps (its hints are final)."""

    def finished(self, result: ProxyResult | None) -> None:
        """The migration's run is over; ``result`` is None if no proxy ran."""


class MigrationObserver:
    """Makes a :class:`MigrationWatch` for each migration the daemon runs."""

    def migration(self, vm: str, number: int) -> MigrationWatch:
        """``number`` counts the runs of one job (a standing proxy serves many)."""
        return MigrationWatch()


#: The daemon's observer when nobody watches.
NO_OBSERVER = MigrationObserver()
