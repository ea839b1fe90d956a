"""The agent's answering path with a tracking source, against a real
collector on loopback (no BPF: a stand-in source whose tracked set and scans
the test controls).

* the first request of a migration has nothing tracked: one Report (the
  scan); from the second on, the tracked answer goes out first, as its own
  SNAPSHOT call, and the fresh scan follows as a second one;
* a newer request never waits for an older request's scan: its tracked
  answer arrives while that scan still runs, and the scan is told to stop;
* tracking stops once requests stop for ``track_idle_s``, and ``track="off"``
  never asks for it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass

from fphint import ranges
from fphint_lab.collector_harness import (
    GiB,
    make_config,
    pages_of,
    running_agent,
    running_collector,
    wait_attached,
    wait_for,
)
from guest_agent.agent import Settings
from guest_agent.sources.base import FreePageSource, Part, Probe, WholeScan

MiB = 1 << 20
SCANNED = [(0x100000, 64 * MiB), (512 * MiB, 4096), (4 * GiB, 8 * MiB)]
TRACKED = [(0x100000, 32 * MiB), (4 * GiB, 8 * MiB)]


def run(coro: Awaitable[None], timeout: float = 60) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))  # type: ignore[arg-type,unused-ignore]


@dataclass
class Tracked:
    """A TrackedPart: fixed ranges."""

    rs: Sequence[tuple[int, int]]
    compute_s: float = 0.0001

    @property
    def nranges(self) -> int:
        return len(self.rs)

    @property
    def pages(self) -> int:
        return pages_of(self.rs)

    def packed(self, limit: int) -> tuple[Sequence[int], int]:
        n = min(limit, len(self.rs))
        return ranges.encode(self.rs[:n]), n


class TrackingSource(FreePageSource):
    """Scans take ``scan_s`` (in steps that honour cancel_scans); after a
    completed scan with tracking on, ``tracked()`` answers TRACKED."""

    name = "tracking-test"

    def __init__(self, scan_s: float = 0.0, cancellable: bool = True) -> None:
        self.scan_s = scan_s
        self.cancellable = cancellable
        self.tracking = False
        self.have_set = False
        self.gen = 0
        self.scans: list[tuple[float, float, bool]] = []  # (began, ended, cancelled)
        self.tracking_calls: list[bool] = []
        self.lock = threading.Lock()

    def probe(self) -> Probe:
        return Probe(self.name, True)

    def parts(self, deadline: float | None = None) -> Iterator[Part]:
        gen, began = self.gen, time.monotonic()
        cancelled = False
        while time.monotonic() - began < self.scan_s:
            if self.cancellable and self.gen != gen:
                cancelled = True
                break
            time.sleep(0.01)
        with self.lock:
            self.scans.append((began, time.monotonic(), cancelled))
            if self.tracking and not cancelled:
                self.have_set = True
        if not cancelled:
            yield WholeScan(SCANNED, pages_of(SCANNED))

    def cancel_scans(self) -> None:
        self.gen += 1

    def set_tracking(self, on: bool) -> bool:
        self.tracking_calls.append(on)
        self.tracking = on
        if not on:
            self.have_set = False
        return True

    def tracked(self) -> Tracked | None:
        return Tracked(TRACKED) if self.tracking and self.have_set else None


FAST = Settings(backoff_initial_s=0.05, backoff_max_s=0.5)


def test_tracked_answer_first_then_the_scan() -> None:
    async def go() -> None:
        async with running_collector(make_config(["a"])) as srv:
            src = TrackingSource(scan_s=0.3)
            async with running_agent(srv, "a", src, FAST):
                await wait_attached(srv, "a")
                first = srv.collector.open_epoch("a", 5.0, live_hints=False)
                await wait_for(lambda: len(src.scans) == 1 and first.stats().reports == 1, 5, "first scan")
                st = first.stats()
                assert st.free_pages == pages_of(SCANNED) and st.agent["snapshot_pages"] == pages_of(SCANNED)
                ep = srv.collector.open_epoch("a", 5.0, live_hints=False)
                await wait_for(lambda: ep.stats().reports == 2, 5, "tracked answer and scan")
                st = ep.stats()
                assert st.free_pages == pages_of(SCANNED)
                assert st.request_to_first_chunk_s is not None and st.request_to_last_chunk_s is not None
                # The tracked call came first: its chunk long before the scan's end.
                scan_end = src.scans[-1][1] - ep.opened_at
                assert st.request_to_first_chunk_s < scan_end <= st.request_to_last_chunk_s + 0.05
                scanned = first.stats().request_to_first_chunk_s or 0.0
                print(
                    f"\nrequest to first chunk: {st.request_to_first_chunk_s * 1000:.1f} ms tracked, "
                    f"{scanned * 1000:.1f} ms scan (fake scan of 300 ms)"
                )
                assert src.tracking_calls and all(src.tracking_calls)

    run(go())


def test_a_new_request_never_waits_for_an_old_scan() -> None:
    for cancellable in (True, False):

        async def go() -> None:
            async with running_collector(make_config(["a"])) as srv:
                src = TrackingSource(scan_s=0.05, cancellable=cancellable)
                async with running_agent(srv, "a", src, FAST):
                    await wait_attached(srv, "a")
                    warm = srv.collector.open_epoch("a", 5.0, live_hints=False)
                    await wait_for(lambda: warm.stats().reports == 1 and src.have_set, 5, "first scan")
                    src.scan_s = 2.0
                    old = srv.collector.open_epoch("a", 10.0, live_hints=False)
                    await wait_for(lambda: old.stats().reports == 1, 5, "old epoch's tracked answer")
                    await asyncio.sleep(0.1)  # its scan is running now
                    new = srv.collector.open_epoch("a", 10.0, live_hints=False)  # supersedes it
                    await wait_for(lambda: new.answered, 5, "new epoch's first chunk")
                    first_at = new.opened_at + (new.stats().request_to_first_chunk_s or 0)
                    await wait_for(lambda: len(src.scans) >= 2, 5, "the old scan to end")
                    old_scan = src.scans[1]
                    assert not old.is_open
                    if cancellable:  # told to stop: it ended soon after the new request
                        assert old_scan[2], "the old scan was not cancelled"
                        assert old_scan[1] < new.opened_at + 1.0
                    else:  # it ran its 2 s: the new tracked answer did not wait for it
                        assert not old_scan[2] and first_at < old_scan[1]
                    assert new.free_pages() >= pages_of(TRACKED)

        run(go())


def test_tracking_stops_when_requests_stop_and_off_means_off() -> None:
    async def go() -> None:
        async with running_collector(make_config(["a"])) as srv:
            src = TrackingSource()
            settings = Settings(backoff_initial_s=0.05, track_idle_s=0.3)
            async with running_agent(srv, "a", src, settings):
                await wait_attached(srv, "a")
                ep = srv.collector.open_epoch("a", 0.2, live_hints=False)
                await ep.wait_closed()
                assert src.tracking
                await wait_for(lambda: not src.tracking, 3, "tracking to stop")
                assert src.tracking_calls[-1] is False
            off = TrackingSource()
            async with running_agent(srv, "a", off, Settings(backoff_initial_s=0.05, track="off")) as agent:
                await wait_for(lambda: agent.attaches >= 1, 5, "the second agent to attach")
                for _ in range(2):
                    ep = srv.collector.open_epoch("a", 0.5, live_hints=False)
                    await asyncio.wait_for(ep.snapshot_done.wait(), 2)
                    assert ep.stats().reports == 1
                assert off.tracking_calls == []

    run(go())


def test_packed_words_make_a_call_with_a_small_first_chunk() -> None:
    from fphint.v1 import hints_pb2
    from guest_agent.chunks import ChunkEncoder

    for n in (0, 1, 256, 257, 4096, 9000):
        rs = [(i * 8192, 4096) for i in range(n)]
        chunks = list(ChunkEncoder(7, hints_pb2.REPORT_KIND_SNAPSHOT, 4096).packed(ranges.encode(rs), None, first=256))
        assert len(chunks[0].ranges) // 2 == min(n, 256)
        assert all(len(c.ranges) // 2 <= 4096 for c in chunks)
        assert [c.seq for c in chunks] == list(range(len(chunks))) and chunks[-1].end
        assert not any(c.end for c in chunks[:-1])
        state = ranges.CodecState()
        assert [r for c in chunks for r in ranges.decode(list(c.ranges), state)] == rs
