"""What a migration through the proxy comes to: its outcome and its counters.

Plain values, safe to hand to any thread: the relay fills them in, the
daemon's report (host_collector.migrate) reads them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from host_collector.stream.wire import Phase


class ProxyOutcome(enum.Enum):
    """How a migration through the proxy ended (as far as the proxy can tell)."""

    #: Both ends closed their connections; everything received was forwarded.
    FINISHED = "finished"
    #: The proxy cut every connection on purpose (see ``abort_reason``).
    ABORTED = "aborted"
    #: A connection failed (refused, reset, a peer vanished mid-stream) and
    #: the proxy closed every other one at once.
    BROKEN = "broken"


@dataclass(frozen=True)
class ProxyStats:
    """Counters of one migration; a snapshot, safe to read from any thread."""

    phase: Phase = Phase.HEADER
    #: Main channel bytes received from the source (the gate's offsets).
    source_bytes: int = 0
    #: Main channel bytes sent to the destination.
    destination_bytes: int = 0
    #: Return-path bytes relayed destination -> source.
    return_bytes: int = 0
    extra_connections: int = 0
    #: Bytes relayed on extra connections, both directions.
    extra_bytes: int = 0
    page_records: int = 0
    zero_records: int = 0
    pages_rewritten: int = 0
    #: PAGE records that had to wait for the gate.
    pages_held: int = 0
    #: Held records sent unchanged because a bound was hit or parsing stopped.
    pages_released_unjudged: int = 0
    #: Bytes currently held back.
    held_bytes: int = 0
    #: Why the parser gave up (the rest went through verbatim), if it did.
    fallback_reason: str | None = None
    #: Why the proxy cut the connections on purpose, if it did.
    abort_reason: str | None = None
    #: The I/O error that ended the migration, if any.
    error: str | None = None
    #: Seconds the relay stopped reading the source because the read-ahead was full.
    paced_s: float = 0.0
    #: Seconds inside sendmsg to the destination (a slow link shows here).
    send_s: float = 0.0
    #: Seconds waiting with records held (for the gate, or a hold deadline).
    held_wait_s: float = 0.0
    #: The switchover (``time.monotonic()``, None: not seen): the relay first saw the guest
    #: stopped, with ``backlog_at_stop`` bytes received and not yet sent; the END section began;
    #: the last held record went out after it; the source's EOF.
    stop_seen_at: float | None = None
    backlog_at_stop: int = 0
    end_section_at: float | None = None
    drained_at: float | None = None
    eof_at: float | None = None


@dataclass(frozen=True)
class ProxyResult:
    """How the migration ended, and the counters at that moment."""

    outcome: ProxyOutcome
    stats: ProxyStats


#: ``on_phase(phase, offset)``: the main channel enters ``phase`` at stream offset ``offset``.
PhaseListener = Callable[[Phase, int], None]

#: ``tap(received_at, pages, rewritten, final)``: a batch of PAGE records is
#: done with (judged, or let go unjudged), in receive order, from the relay's
#: thread. ``received_at`` is ``time.monotonic()`` when its bytes were parsed,
#: ``pages`` the parser's records ``(start, end, block, page)``, ``rewritten``
#: the indices of the records turned into zero records, ``final`` an END
#: section batch. Must be cheap: it runs on the hot path, once per batch.
BatchTap = Callable[[float, list[tuple[int, int, str, int]], "list[int] | None", bool], None]
