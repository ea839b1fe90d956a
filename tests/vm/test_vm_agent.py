"""The real agent inside a real guest, answering a real collector on the host:
the token comes by fw_cfg, the collector is reached through slirp, the RAM
layout is learnt over QMP, and every hinted page is checked against the
guest's RAM file: the garbage a process left behind is hinted, the pages a
live process holds never are."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fphint import addresses
from fphint_lab.collector_harness import CollectorThread
from fphint_lab.guest import mempattern
from fphint_lab.vm.harness import VM, VMFactory
from host_collector.config import CollectorConfig, VmEntry
from host_collector.qmp.ram_layout import read_layout
from host_collector.qmp.session import QmpSession
from vmimage.qemu import collector_address

pytestmark = [pytest.mark.vm, pytest.mark.qemu, pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(1500)]

TOKEN = "agent-in-guest-test-token-0123"
PAGE = 4096


@pytest.fixture
def collector() -> Iterator[CollectorThread]:
    cfg = CollectorConfig(listen=(addresses.parse("tcp:127.0.0.1:0"),), vms=(VmEntry("guest", TOKEN),))
    col = CollectorThread(cfg)
    yield col
    col.close()


async def learn_layout(path: Path) -> object:
    qmp = await QmpSession.connect(str(path), label="fphint")
    try:
        return await read_layout(qmp)
    finally:
        await qmp.close()


def page_hashes(content: bytes) -> set[bytes]:
    return {hashlib.sha1(content[i : i + PAGE]).digest() for i in range(0, len(content), PAGE)}


def page_set(ranges: list[list[int]]) -> set[int]:
    """The page addresses in pagemap.py's ``[phys, length]`` ranges."""
    return {gpa for phys, length in ranges for gpa in range(phys, phys + length, PAGE)}


def live_pages_hinted(mask: Any, layout: Any, spans: list[list[int]]) -> list[int]:
    """Guest-physical addresses in ``spans`` whose block page is marked free."""
    out = set()
    for phys, length in spans:
        for gpa in range(phys, phys + length, PAGE):
            r = layout.find(gpa)
            if r is not None and mask[(r.offset + gpa - r.gpa) // PAGE]:
                out.add(gpa)
    return sorted(out)


def test_agent_in_guest_hints_only_free_pages(
    vm_factory: VMFactory, collector: CollectorThread, tmp_path: Path
) -> None:
    qmp_path = tmp_path / "fphint.qmp"
    vm: VM = vm_factory.boot(
        token=TOKEN,
        collector=collector_address(collector.port),
        extra_args=["-qmp", f"unix:{qmp_path},server=on,wait=off"],
    )
    layout = collector.call(learn_layout(qmp_path))
    collector.collector.set_layout("guest", layout)
    collector.wait_attached("guest")
    facts = collector.collector.vms["guest"].attachment.facts
    assert facts.chosen_source in ("ebpf", "kpageflags"), facts
    assert facts.kernel_release == vm.output("uname -r")

    # Garbage in free memory, and a live region that must never be hinted.
    vm.workload("fill.py", "192", "--seed", "garbage")
    vm.workload("churn.py", "start", "--workers", "1", "--loop-mib", "4", "--keep-mib", "32")
    keep = vm.workload("churn.py", "info")["workers"][0]

    async def one_epoch() -> tuple[int, dict[str, object]]:
        ep = collector.collector.open_epoch("guest", 20.0)
        await asyncio.wait_for(ep.snapshot_done.wait(), 20.0)
        masks = {b: ep.free_mask(b).copy() for b in ep.blocks()}
        return ep.free_pages(), masks

    # The pages of the worker's keep region, held from before the request to
    # after the answer: named by physical address, since content can be
    # copied into free memory. Not the rest of the process: its loop region
    # (and Python's arenas) are unmapped and mapped again while the agent
    # answers, so a page of them seen before the request may truly be free
    # when the hint is taken (480 such pages failed this test once). And
    # only pages at the same address both times: compaction may migrate a
    # keep page meanwhile, and its old frame is then truly free.
    keep_range = ("--addr", str(keep["keep_addr"]), "--len", str(keep["keep_len"]))
    held = vm.workload("pagemap.py", str(keep["pid"]), *keep_range)
    free_pages, masks = collector.call(one_epoch())
    held_after = vm.workload("pagemap.py", str(keep["pid"]), *keep_range)
    assert free_pages > 150 * 256, free_pages  # most of the 1 GiB guest is free

    (block,) = masks  # one RAMBlock: the memory backend
    mask = masks[block]
    assert held["pages"] == held_after["pages"] == keep["keep_len"] // PAGE, (held["pages"], held_after["pages"])
    stable = page_set(held["ranges"]) & page_set(held_after["ranges"])
    assert len(stable) > 0.9 * held["pages"], (len(stable), held["pages"])
    spans = [[gpa, PAGE] for gpa in sorted(stable)]
    hinted_live = live_pages_hinted(mask, layout, spans)
    assert not hinted_live, f"{len(hinted_live)} pages a live process holds were hinted free: {hinted_live[:8]}"
    planted = mask.copy()  # the checker catches a lie: one held page marked free
    victim = spans[0][0]
    r = layout.find(victim)
    planted[(r.offset + victim - r.gpa) // PAGE] = True
    assert live_pages_hinted(planted, layout, spans) == [victim]

    # Coverage from a quiet guest: a scan that races compaction under churn
    # drops everything above the compaction's start (its fast path may take a
    # free block anywhere there, and no per-page event says which): measured
    # here as 78% of the garbage hinted in some runs, 99.9% in others.
    checked = vm.workload("churn.py", "check")
    assert checked.get("ok"), checked
    garbage = page_hashes(mempattern.expected("garbage", 192 << 20))
    # A compaction still finishing after the churn stopped can race a scan
    # (83 % once in CI): up to three epochs, a few seconds apart; the first
    # that reaches the goal passes, else the last one's figures fail it.
    for attempt in range(3):
        if attempt:
            vm.cmd("cont")
            time.sleep(3)
        _, masks = collector.call(one_epoch())
        vm.cmd("stop")  # freeze RAM for the comparison
        mask = masks[block]

        # The filler's pages went back to the buddy allocator: those still holding
        # its pattern (the churn and the agent reuse some) are free, so nearly all
        # must be hinted, and there must be many (its pattern found in hinted pages
        # of the RAM file proves the guest-physical -> RAMBlock mapping, since the
        # agent only knows GPAs). The fill writes its region only, so at most
        # 192 MiB of pages hold the pattern.
        present = hinted_garbage = 0
        with open(vm.ram_path, "rb") as f:
            for page in range(len(mask)):
                if hashlib.sha1(f.read(PAGE)).digest() in garbage:
                    present += 1
                    hinted_garbage += bool(mask[page])
        assert present > 0.5 * (192 << 20) // PAGE, present
        print(
            f"\ngarbage pages {present}, hinted {hinted_garbage} ({hinted_garbage / present:.1%}), "
            f"source {facts.chosen_source}"
        )
        if hinted_garbage > 0.95 * present:
            break
    assert hinted_garbage > 0.95 * present, (hinted_garbage, present)
