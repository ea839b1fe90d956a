"""The agent's settings, in a module of their own: the command line reads
them without importing asyncio and gRPC (guest_agent/cli.py imports those
only for ``run``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    chunk_ranges: int = 4096
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    #: Live hints: how often frees are drained, and at most how many ranges a second.
    live_interval_s: float = 0.1
    live_max_ranges_per_s: int = 20000
    #: Scan once, then track: "migration" (from a request until requests stop
    #: for track_idle_s), "always" (rescanning every refresh_s meanwhile) or "off".
    track: str = "migration"
    track_idle_s: float = 30.0
    refresh_s: float = 10.0
    #: Opt-in: drop the clean page cache before a migration's first fresh scan
    #: (guest_agent/reclaim.py), at most once per track_idle_s.
    reclaim_page_cache: bool = False

    def __post_init__(self) -> None:
        if self.track not in TRACK_MODES:
            raise ValueError(f"track={self.track!r}: choose from {', '.join(TRACK_MODES)}")


TRACK_MODES = ("migration", "always", "off")
