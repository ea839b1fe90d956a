"""The test-only rogue agent (fphint_lab/guest/rogue_agent.py) on this host, no
guest: the lying source really reports a live process's pages (found through
its pagemap) on top of the real free pages, in the one sorted part the agent
can encode; the late agent really sends after the deadline."""

from __future__ import annotations

import asyncio
import itertools
import json
import mmap
import os
from pathlib import Path

import pytest

from fphint_lab.collector_harness import FixedSource, make_config, running_collector, token, wait_attached, wait_for
from fphint_lab.guest import pagemap, rogue_agent

pytestmark = [pytest.mark.root]
PAGE = 4096


def test_union_merges_and_sorts() -> None:
    got = rogue_agent.union([(0, 8192), (16384, 4096)], [(4096, 8192), (40960, 4096)])
    assert got == [(0, 12288), (16384, 4096), (40960, 4096)]
    assert rogue_agent.union([], [(4096, 4096)]) == [(4096, 4096)]
    assert rogue_agent.union([(0, 4096)], [(4096, 4096)]) == [(0, 8192)]


def test_late_outcomes_name_both_correct_endings_and_nothing_else() -> None:
    """test_d accepts exactly these two endings of a late report; anything else
    (an accepted report, an unknown error) must not pass as one of them."""
    refused = (
        "<AioRpcError of RPC that terminated with: status = StatusCode.FAILED_PRECONDITION "
        'details = "epoch 17 is closed (deadline)">'
    )
    transport = (
        "ExecuteBatchError('Failed \"execute_batch\": (<grpc._cython.cygrpc.SendMessageOperation object at 0x7f>,)')"
    )
    assert rogue_agent.late_outcome({"error": refused}) == "refused: closed epoch"
    assert rogue_agent.late_outcome({"error": transport}) == "connection ended"
    assert rogue_agent.late_outcome({"cancelled": True}) == "connection ended"
    assert rogue_agent.late_outcome({"ranges_sent": 12}) == "accepted"
    unknown = rogue_agent.late_outcome({"error": "StatusCode.INVALID_ARGUMENT overlap"})
    assert unknown.startswith("other: ")


def test_lying_source_adds_the_victims_pages(tmp_path: Path) -> None:
    size = 64 * PAGE
    region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_NOHUGEPAGE)
    region[:] = b"\x5a" * size
    import ctypes

    buf = ctypes.c_char.from_buffer(region)
    addr = ctypes.addressof(buf)
    del buf
    src = rogue_agent.LyingSource(os.getpid(), addr, size, tmp_path / "journal")
    try:
        (part,) = list(src.parts())
        victim = pagemap.merge([p for p in pagemap.pfns(os.getpid(), addr, addr + size) if p is not None])
    finally:
        src.close()
    rs = list(part.ranges)
    assert rs == sorted(rs) and all(a + n <= b for (a, n), (b, _) in itertools.pairwise(rs)), "sorted, no overlap"
    covered = 0
    for start, length in victim:
        for page in range(start, start + length, PAGE):
            covered += any(a <= page < a + n for a, n in rs)
    assert covered == size // PAGE, "every page of the live region is reported free"
    journal = (tmp_path / "journal").read_text()
    assert '"victim_pages": 64' in journal
    region.close()


def test_late_agent_sends_after_the_deadline(tmp_path: Path) -> None:
    """Against a real collector: the report goes out a second after the
    deadline and is refused; nothing lands in the epoch."""
    from guest_agent.agent import Endpoint, Settings
    from guest_agent.facts import GuestSafety, build_facts

    async def scenario() -> None:
        async with running_collector(make_config(["vm"])) as srv:
            facts = build_facts(GuestSafety(), [], "fixed", "")
            addr = srv.bound[0]
            agent = rogue_agent.LateAgent(
                FixedSource([(0, 1 << 20)]),
                facts,
                lambda: Endpoint(addr, token("vm")),
                Settings(backoff_initial_s=0.05, backoff_max_s=0.5),
                delay=0.5,
                journal=tmp_path / "journal",
            )
            stop = asyncio.Event()
            task = asyncio.ensure_future(agent.run(stop))
            try:
                await wait_attached(srv, "vm")
                ep = srv.collector.open_epoch("vm", 0.3)
                await asyncio.sleep(1.5)
                assert ep.free_pages() == 0, "a late report must not count"
                await wait_for(lambda: (tmp_path / "journal").exists(), 5, "the late report")
            finally:
                stop.set()
                await asyncio.wait_for(task, 10)

    asyncio.run(scenario())
    (entry,) = [json.loads(line) for line in (tmp_path / "journal").read_text().splitlines()]
    assert entry["mode"] == "late" and entry["after_deadline_s"] >= 0.5
    assert "FAILED_PRECONDITION" in entry["error"] and "closed" in entry["error"], entry
