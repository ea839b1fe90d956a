"""The opt-in page-cache reclaim: once per migration, before its first fresh
scan, and never when off (a stand-in drop_caches file; the real one in a guest
is exercised by the comparison's reclaim rows)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from pathlib import Path

from fphint_lab.collector_harness import make_config, running_agent, running_collector, wait_attached, wait_for
from guest_agent.reclaim import PageCacheReclaim
from guest_agent.settings import Settings
from guest_agent.sources.base import Part

from .test_agent_tracking import TrackingSource


def run(coro: Awaitable[None], timeout: float = 60) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type,unused-ignore]


def test_reclaim_is_due_once_per_window(tmp_path: Path) -> None:
    f = tmp_path / "drop_caches"
    r = PageCacheReclaim(every_s=30.0, path=str(f))
    assert r.run(now=100.0) and f.read_text() == "1\n"
    f.write_text("")
    assert not r.run(now=120.0) and f.read_text() == ""  # same migration: not again
    assert r.run(now=131.0) and r.count == 2


def test_a_failed_reclaim_is_reported_not_raised(tmp_path: Path) -> None:
    r = PageCacheReclaim(every_s=30.0, path=str(tmp_path / "absent" / "drop_caches"))
    assert not r.run(now=1.0)
    assert "absent" in r.error and r.count == 0


class Watching(TrackingSource):
    """Notes, at each scan's start, whether the stand-in drop_caches was written."""

    def __init__(self, drop_caches: Path) -> None:
        super().__init__(scan_s=0.05)
        self.drop_caches = drop_caches
        self.reclaimed_before: list[int] = []

    def parts(self, deadline: float | None = None) -> Iterator[Part]:
        if self.drop_caches.read_text():
            self.reclaimed_before.append(len(self.scans))
            self.drop_caches.write_text("")
        return super().parts(deadline)


def _migration(tmp_path: Path, on: bool) -> Watching:
    """Three epochs of one migration."""
    f = tmp_path / "drop_caches"
    f.write_text("")
    src = Watching(f)

    async def go() -> None:
        settings = Settings(backoff_initial_s=0.05, backoff_max_s=0.5, reclaim_page_cache=on)
        reclaim = PageCacheReclaim(settings.track_idle_s, path=str(f))
        async with running_collector(make_config(["a"])) as srv:
            async with running_agent(srv, "a", src, settings, reclaim=reclaim):
                await wait_attached(srv, "a")
                for n in range(1, 4):
                    ep = srv.collector.open_epoch("a", 5.0, live_hints=False)
                    await wait_for(lambda: len(src.scans) >= n and ep.stats().reports >= 1, 5, f"scan {n}")

    run(go())
    return src


def test_agent_reclaims_before_the_first_scan_only_when_asked(tmp_path: Path) -> None:
    on = _migration(tmp_path, True)
    assert len(on.scans) >= 3
    assert on.reclaimed_before == [0], "one reclaim per migration, before its first scan"
    assert _migration(tmp_path, False).reclaimed_before == []
