"""Scan once, then track, with the real eBPF source on this kernel: the
gate's life (open while tracking, never closed under a running scan, closed
and the set forgotten when tracking stops), the tracked answer against a
fresh scan (printed: request-side cost of each), and what this kernel's hooks
allow. Soundness under churn is tests/test_ebpf_churn.py's."""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from typing import cast

import pytest

from guest_agent.sources.ebpf import EbpfSource, Options, ScanPart
from guest_agent.sources.ebpf.program import Ctl
from guest_agent.sources.ebpf.source import tracking_refusal
from guest_agent.sources.ebpf.tracked import TrackedAnswer


@pytest.fixture(scope="module")
def src() -> Iterator[EbpfSource]:
    s = EbpfSource()
    s.open()
    yield s
    s.close()


def gate(src: EbpfSource) -> int:
    return int(src.scanner.prog.ctl[Ctl.GATE])


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.slow
def test_gate_follows_tracking(src: EbpfSource) -> None:
    if not src.can_track:
        pytest.skip(f"this kernel does not allow tracking: {src.facts['tracking']}")
    src.set_tracking(False)
    assert src.tracked() is None and gate(src) == 0
    assert src.set_tracking(True)
    assert src.tracked() is None, "nothing is tracked before a scan"
    for _part in src.parts():
        pass
    assert gate(src) == 1, "the gate stays open after a tracked scan"
    ans = src.tracked()
    assert ans is not None and 0 < ans.pages <= ans.scanned_pages
    # Stopping tracking under a running scan leaves that scan's gate open
    # until it ends, then closes it.
    it = cast(Generator[ScanPart, None, None], src.parts())
    next(it)
    src.set_tracking(False)
    assert gate(src) == 1
    it.close()
    assert gate(src) == 0 and src.tracked() is None


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.slow
def test_tracked_answer_against_a_fresh_scan(src: EbpfSource) -> None:
    """The request-side cost of each way to answer (printed, not asserted)."""
    if not src.can_track:
        pytest.skip(f"this kernel does not allow tracking: {src.facts['tracking']}")
    src.set_tracking(True)
    try:
        firsts, wholes, tracked = [], [], []
        ans: TrackedAnswer | None = None
        for _ in range(5):
            t0 = time.perf_counter()
            it = src.parts()
            next(it)
            firsts.append(time.perf_counter() - t0)
            for _part in it:
                pass
            wholes.append(time.perf_counter() - t0)
            time.sleep(0.2)
            t0 = time.perf_counter()
            ans = src.tracked()
            tracked.append(time.perf_counter() - t0)
            assert ans is not None and ans.nranges > 0
        assert ans is not None
        print(
            f"\nfresh scan: first part {min(firsts) * 1000:.2f} ms, whole {min(wholes) * 1000:.1f} ms; "
            f"tracked answer {min(tracked) * 1000:.2f} ms ({ans.nranges} ranges, {ans.pages} pages, "
            f"{ans.split_runs} runs split, {ans.scanned_pages - ans.pages} pages dropped after 0.2 s)"
        )
    finally:
        src.set_tracking(False)


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.slow
def test_tracking_needs_every_exit_hooked(src: EbpfSource) -> None:
    tps = src.facts["tracepoints"].split(",")
    kprobe = "kprobe:__isolate_free_page" in tps
    compaction = {"mm_compaction_isolate_freepages", "mm_compaction_fast_isolate_freepages"} <= set(tps)
    assert src.can_track == (kprobe or compaction), src.facts
    assert src.facts["tracking"] == "on" if src.can_track else src.facts["tracking"].startswith("off: ")


def test_tracking_refusal_names_what_is_missing() -> None:
    fast = ["mm_compaction_isolate_freepages", "mm_compaction_fast_isolate_freepages"]
    assert tracking_refusal(["kprobe:__isolate_free_page"], Options()) == ""
    assert tracking_refusal(fast, Options()) == ""
    why = tracking_refusal(fast[:1], Options())  # Linux 6.1 without kprobes
    assert "mm_compaction_fast_isolate_freepages" in why and "__isolate_free_page" in why
    assert tracking_refusal(["kprobe:__isolate_free_page"], Options(tracking=False)).startswith("turned off")


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.slow
def test_hooks_are_attached_only_while_needed(src: EbpfSource) -> None:
    """Idle, no exit hook and no free hook costs the guest a BPF call."""
    prog = src.scanner.prog
    src.set_tracking(False)
    hooked = ["raw:" + tp for tp, _ in src.scanner.hooks.raw]
    assert hooked and not any(prog.attached(k) for k in hooked), "idle: detached"
    it = cast(Generator[ScanPart, None, None], src.parts())
    next(it)
    assert all(prog.attached(k) for k in hooked), "a scan runs with its hooks"
    it.close()
    assert not any(prog.attached(k) for k in hooked)
    live = src.live_frees()
    live.start()
    assert prog.attached("raw:mm_page_free")
    live.stop()
    assert not prog.attached("raw:mm_page_free"), "not tracking: detached at stop"
    if src.can_track:
        src.set_tracking(True)
        for _part in src.parts():
            pass
        live.start()
        live.stop()
        assert all(prog.attached(k) for k in hooked) and prog.attached("raw:mm_page_free"), "tracking keeps them"
        src.set_tracking(False)
        assert not any(prog.attached(k) for k in hooked) and not prog.attached("raw:mm_page_free")
