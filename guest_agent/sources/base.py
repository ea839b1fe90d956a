"""The interface every free-page source implements.

A source answers one question, "which guest-physical pages are free in the
buddy allocator right now?", without allocating or writing guest memory. The
agent calls :meth:`FreePageSource.parts` once per hint request, after the
request arrived: a source must scan afresh every time and never serve a result
computed earlier (docs/safety-rule.md §5). A source
implements only :meth:`~FreePageSource.parts`; :meth:`~FreePageSource.snapshot`
(the command line, benches) is the same scan joined, derived here once.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from ..errors import AgentError


class SourceUnavailable(AgentError):
    """The source cannot run on this kernel; the message says why, for the logs
    and the attach facts."""


@dataclass(frozen=True)
class Probe:
    """Whether a source can run here, and if not, why not."""

    name: str
    available: bool
    reason: str = ""


@dataclass
class Snapshot:
    """Free guest-physical byte ranges seen by one scan.

    ``ranges`` are sorted, non-overlapping, page-aligned (start, length) pairs.
    Each page in them was free at some instant between ``started`` and
    ``finished`` (``time.monotonic()``), never earlier.
    """

    source: str
    ranges: Sequence[tuple[int, int]]
    pages: int
    started: float
    finished: float
    #: False when the scan stopped early (deadline); what it has is still sound.
    complete: bool = True
    #: Source-specific figures worth logging (chunks run, blocks dropped, ...).
    details: dict[str, float] = field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return self.finished - self.started


@dataclass
class ScanSummary:
    """What a source says about its last scan besides the ranges."""

    #: False when the scan stopped early (deadline).
    complete: bool = True
    #: Source-specific figures worth logging.
    details: dict[str, float] = field(default_factory=dict)


class Part(Protocol):
    """Free (start, length) byte ranges of one stretch of a scan, sorted."""

    @property
    def ranges(self) -> Sequence[tuple[int, int]]: ...

    @property
    def pages(self) -> int: ...


@dataclass
class WholeScan:
    """A plain :class:`Part`: its ranges and their page count."""

    ranges: Sequence[tuple[int, int]]
    pages: int


class TrackedPart(Protocol):
    """Pages free now by tracking, already in the wire's packed form."""

    @property
    def nranges(self) -> int: ...

    @property
    def pages(self) -> int: ...

    #: Seconds it took to compute.
    @property
    def compute_s(self) -> float: ...

    def packed(self, limit: int) -> tuple[Sequence[int], int]:
        """The first ``limit`` ranges as ``fphint.ranges.encode`` words from
        a fresh codec state, and how many ranges that is."""
        ...


class LiveFrees(abc.ABC):
    """Pages freed after a point in time, for extra hints of an open epoch.

    Optional: only sources that can watch frees (eBPF) provide it. Losing
    events is allowed (fewer hints); reporting a page that was not freed after
    :meth:`start` is not.
    """

    @abc.abstractmethod
    def start(self) -> None:
        """Begin collecting; only frees after this call may be reported."""

    @abc.abstractmethod
    def drain(self, max_ranges: int) -> list[tuple[int, int]]:
        """Return up to ``max_ranges`` freed (start, length) byte ranges, sorted,
        and forget them."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop collecting and drop what was not drained."""


class FreePageSource(abc.ABC):
    """A way to learn free guest-physical pages from kernel data."""

    #: Name used on the command line and in the attach facts.
    name: ClassVar[str]

    @abc.abstractmethod
    def probe(self) -> Probe:
        """Check cheaply whether this source can work here (no BPF load yet)."""

    def open(self) -> None:
        """Prepare for scanning (load programs, self-test).

        :raise SourceUnavailable: when the source turns out not to work.
        """

    @abc.abstractmethod
    def parts(self, deadline: float | None = None) -> Iterator[Part]:
        """Scan now, yielding parts in address order as soon as each is ready,
        so the agent can send before the scan ends. Each part is sound on its
        own. Stop early once ``time.monotonic()`` passes ``deadline`` (and say
        so in :meth:`scan_summary`)."""

    def scan_summary(self) -> ScanSummary:
        """About the scan :meth:`parts` last finished; the default: complete, no figures."""
        return ScanSummary()

    def snapshot(self, deadline: float | None = None) -> Snapshot:
        """Scan now, all at once: every part of :meth:`parts`, runs touching
        across parts merged, with :meth:`scan_summary`'s verdict and figures."""
        started = now()
        ranges, pages = join_parts(self.parts(deadline))
        summary = self.scan_summary()
        return Snapshot(self.name, ranges, pages, started, now(), summary.complete, summary.details)

    def live_frees(self) -> LiveFrees | None:
        """A tracker of pages freed after a point in time, if the source has one."""
        return None

    def cancel_scans(self) -> None:
        """Make the scans running now stop soon (a newer request wants the
        source); scans begun later are unaffected. The default does nothing:
        the agent still stops between parts."""

    def set_tracking(self, on: bool) -> bool:
        """Scan once, then track: keep the last scan valid between requests
        (docs/safety-rule.md §5.6). True when the source now tracks; the
        default cannot."""
        return False

    def tracked(self) -> TrackedPart | None:
        """Pages free now, from the last scan and what was allocated since,
        with no scan; None when the source does not track (the default)."""
        return None

    def close(self) -> None:
        """Release kernel resources; the source may not be used afterwards."""


def join_parts(parts: Iterable[Part]) -> tuple[list[tuple[int, int]], int]:
    """All ranges of a scan's parts, runs touching across a part boundary merged; and the pages."""
    out: list[tuple[int, int]] = []
    pages = 0
    for part in parts:
        pages += part.pages
        for start, length in part.ranges:
            if out and out[-1][0] + out[-1][1] == start:
                out[-1] = (out[-1][0], out[-1][1] + length)
            else:
                out.append((start, length))
    return out, pages


def now() -> float:
    return time.monotonic()
