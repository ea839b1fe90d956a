"""Epoch's own updates (merge, note_report, poison, close, arm_deadline),
called directly as the Collector calls them, on a real layout index."""

from __future__ import annotations

import asyncio
import time

from fphint import ranges
from fphint.v1 import hints_pb2
from host_collector.epochs import Epoch
from host_collector.hintcheck import LayoutIndex, ReportDecoder
from host_collector.layout import RamLayout, RamRange

MiB = 1 << 20
PS = 4096
INDEX = LayoutIndex(RamLayout.from_ranges([RamRange(0, 8 * MiB, "ram", 0)]))
SNAP, LIVE = hints_pb2.REPORT_KIND_SNAPSHOT, hints_pb2.REPORT_KIND_LIVE


def epoch(deadline_s: float = 30.0) -> Epoch:
    return Epoch("vm", 7, INDEX, time.monotonic() + deadline_s, live_hints=True)


def test_merge_marks_pages_and_counts_the_chunk() -> None:
    ep = epoch()
    dec, state = ReportDecoder(ep.index), ranges.CodecState()  # one Report call
    p = dec.decode(ranges.encode([(0, 2 * PS), (MiB + 100, 10)], state))  # the second has no whole page
    assert ep.merge(p, 2, SNAP, False) == 2
    assert ep.is_free("ram", 0) and ep.is_free("ram", 1) and not ep.is_free("ram", 2)
    assert ep.ranges_seen == 2 and ep.answered and not ep.snapshot_done.is_set()
    st = ep.stats()
    assert (st.chunks, st.accepted_ranges, st.rejected_ranges, st.hinted_pages, st.free_pages) == (1, 1, 1, 2, 2)
    assert st.request_to_first_chunk_s is not None and st.request_to_last_chunk_s is None
    # A live chunk with end does not complete the snapshot; a snapshot chunk with end does.
    assert ep.merge(dec.decode(ranges.encode([(4 * MiB, PS)], state)), 1, LIVE, True) == 1
    assert not ep.snapshot_done.is_set()
    assert ep.merge(dec.decode(ranges.encode([(5 * MiB, PS)], state)), 1, SNAP, True) == 1
    assert ep.snapshot_done.is_set() and ep.stats().request_to_last_chunk_s is not None
    assert ep.ranges_seen == 4 and ep.stats().hinted_pages == 4


def test_poison_forgets_every_hint() -> None:
    ep = epoch()
    ep.merge(ReportDecoder(ep.index).decode(ranges.encode([(0, MiB)])), 1, SNAP, False)
    assert ep.free_pages() == MiB // PS
    ep.poison()
    assert ep.free_pages() == 0 and not ep.is_free("ram", 0)


def test_reports_are_counted_with_the_agents_figures() -> None:
    ep = epoch()
    ep.note_report(None, "ebpf")
    assert ep.stats().reports == 1 and ep.stats().agent == {} and ep.stats().agent_source == ""
    ep.note_report(hints_pb2.AgentStats(cpu_seconds=0.5, rss_bytes=1 << 20, snapshot_pages=9), "ebpf")
    st = ep.stats()
    assert st.reports == 2 and st.agent["cpu_seconds"] == 0.5 and st.agent["snapshot_pages"] == 9.0
    assert st.agent_source == "ebpf"
    ep.note_rejected_report()
    assert ep.stats().rejected_reports == 1


def test_close_once_wakes_waiters_and_cancels_the_deadline() -> None:
    async def go() -> None:
        ep = epoch()
        fired: list[str] = []
        ep.arm_deadline(0.05, lambda: fired.append("deadline"))
        waiter = asyncio.ensure_future(ep.wait_closed())
        assert ep.close("on demand") and not ep.close("again")
        await asyncio.wait_for(waiter, 1)
        assert not ep.is_open and ep.close_reason == "on demand" and ep.snapshot_done.is_set()
        assert not ep.hints_pending and ep.stats().close_reason == "on demand" and not ep.stats().open
        await asyncio.sleep(0.1)
        assert fired == [], "closing cancels the deadline timer"

        late = epoch()
        late.arm_deadline(0.01, lambda: fired.append("deadline"))
        await asyncio.sleep(0.1)
        assert fired == ["deadline"] and late.is_open, "the epoch only calls back; the collector closes it"

    asyncio.run(go())
