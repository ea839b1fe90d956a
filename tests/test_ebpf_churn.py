"""Soundness under churn: scans taken while other processes map, touch and
unmap memory never report a page that is in use, unless it was allocated
after the scan looked at it.

The rule checked, for every page of every part a scan yields: it is
KPF_BUDDY when /proc/kpageflags is re-read right after the part, or an
allocation event covering it fired after the part's scan phase ended
(``ScanPart.scanned_at``). The events come from this test's own tracer
(tracefs tracepoints with their pfn fields, one timestamp per PFN in an
array map: nothing is lost), independent of the source's cross-check.

The same storm is then scanned with the cross-check switched off, and with
the page_type re-read removed, to see whether the checker catches them.
"""

from __future__ import annotations

import mmap
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
import re
from dataclasses import dataclass, field

import pytest

from guest_agent.sources.ebpf import EbpfSource, Options, headers, system
from guest_agent.sources.ebpf.selftest import buddy_flags, reporting_block, runs_of

pytestmark = [pytest.mark.root, pytest.mark.bpf, pytest.mark.slow]

PAGE = 4096
#: Rounds per variant. Re-reading kpageflags for every reported page is what
#: costs (~0.5 us a free page, kernel side), so keep them few.
ROUNDS = 5

STORM = r"""
import mmap, os, random, sys
rnd = random.Random(int(sys.argv[1]))
while True:
    size = rnd.choice([8, 32, 64, 128]) << 20
    m = mmap.mmap(-1, size)
    if rnd.random() < 0.3:
        m.madvise(mmap.MADV_HUGEPAGE)
    m.write(b"x" * size)
    if rnd.random() < 0.5:
        m.madvise(mmap.MADV_DONTNEED, 0, size // 2)
    m.close()
"""

TRACER = r"""
BPF_F_TABLE("array", u32, u64, last_alloc, NR_PFNS, BPF_F_MMAPABLE);

/* Range events (compaction): kept whole, in order, with their time. */
struct tp_range { u64 start; u64 end; u64 ns; };
BPF_ARRAY(ranges, struct tp_range, NR_RANGES);
BPF_ARRAY(nranges, u64, 1);

static __always_inline void stamp(u64 pfn, u32 order)
{
    u64 now = bpf_ktime_get_ns();
    for (u32 i = 0; i < 1024; i++) {
        if (i >> (order & 15))
            break;
        u32 k = pfn + i;
        u64 *v = last_alloc.lookup(&k);
        if (v)
            *v = now;
    }
}

static __always_inline void stamp_range(u64 start, u64 end)
{
    u32 z = 0;
    u64 *n = nranges.lookup(&z);
    if (!n)
        return;
    u32 idx = __sync_fetch_and_add(n, 1);
    struct tp_range *r = ranges.lookup(&idx);
    if (r) {
        r->start = start;
        r->end = end;
        r->ns = bpf_ktime_get_ns();
    }
}

TRACEPOINT_PROBE(kmem, mm_page_alloc) {
    if (args->pfn != ~0UL) stamp(args->pfn, args->order);
    return 0;
}
TRACEPOINT_PROBE(kmem, mm_page_alloc_zone_locked) {
    stamp(args->pfn, args->order);
    return 0;
}
TRACEPOINT_PROBE(kmem, mm_page_alloc_extfrag) {
    stamp(args->pfn, args->fallback_order > args->alloc_order ? args->fallback_order : args->alloc_order);
    return 0;
}
TRACEPOINT_PROBE(compaction, mm_compaction_isolate_freepages) {
    if (args->nr_taken) stamp_range(args->start_pfn, args->end_pfn + 1024);
    return 0;
}
TRACEPOINT_PROBE(compaction, mm_compaction_fast_isolate_freepages) {
    /* the block taken may lie anywhere above start_pfn */
    if (args->nr_taken) stamp_range(args->start_pfn, ~0ULL);
    return 0;
}
"""

NR_RANGES = 1 << 16


class AllocTracer:
    """Last allocation time (CLOCK_MONOTONIC ns) of every PFN."""

    def __init__(self, nr_pfns: int) -> None:
        from bcc import BPF

        src = headers.kernel_source()
        if src:
            os.environ["BCC_KERNEL_SOURCE"] = src
        self.bpf = BPF(text=TRACER.encode(), cflags=[f"-DNR_PFNS={nr_pfns}", f"-DNR_RANGES={NR_RANGES}"])
        fd = self.bpf[b"last_alloc"].map_fd
        self._map = mmap.mmap(fd, (nr_pfns * 8 + 4095) & ~4095, mmap.MAP_SHARED, mmap.PROT_READ)
        self.last = memoryview(self._map).cast("Q")
        self.nr_pfns = nr_pfns

    def ranges_since(self, ns: int) -> list[tuple[int, int]]:
        """Range events at or after ``ns``; every one ever recorded is kept."""
        n = int(self.bpf[b"nranges"][0].value)
        assert n <= NR_RANGES, "range event log overflowed"
        table = self.bpf[b"ranges"]
        out = []
        for i in range(n):
            r = table[i]
            if r.ns >= ns or r.ns == 0:  # 0: being written, count it
                out.append((int(r.start), int(r.end)))
        return out

    def close(self) -> None:
        self.last.release()
        self._map.close()
        self.bpf.cleanup()


@dataclass
class Verdict:
    rounds: int = 0
    reported: int = 0
    not_buddy: int = 0
    covered: int = 0
    #: Whole aligned blocks of free page reporting's order that left the
    #: buddy lists with no allocation event: reporting isolates them (no
    #: tracepoint, shared/reference/ebpf.md §2) and they stay free.
    reporting: int = 0
    violations: int = 0
    dropped: int = 0
    scan_s: float = 0.0
    samples: list[tuple[int, int]] = field(default_factory=list)


def _not_buddy_runs(fd: int, start_pfn: int, npages: int) -> list[tuple[int, int]]:
    """(pfn, count) runs inside a reported range that kpageflags says are not free now."""
    flags = buddy_flags(fd, start_pfn, start_pfn + npages)
    return [(start_pfn + m.start(), m.end() - m.start()) for m in re.finditer(rb"\x00+", flags)]


def check_rounds(src: EbpfSource, tracer: AllocTracer, rounds: int, until_violation: bool = False) -> Verdict:
    v = Verdict()
    block = reporting_block() or 1 << 62
    fd = os.open("/proc/kpageflags", os.O_RDONLY)
    try:
        for _ in range(rounds):
            t0 = time.monotonic()
            for part in src.parts():
                # The immediate re-read: right after the part, its pages only.
                bad = [r for start, length in part.ranges
                       for r in _not_buddy_runs(fd, start // PAGE, length // PAGE)]
                v.reported += part.pages
                if not bad:
                    continue
                after_ns = int(part.scanned_at * 1e9)
                wide = tracer.ranges_since(after_ns)
                for pfn0, count in bad:
                    v.not_buddy += count
                    left = [p for p in range(pfn0, pfn0 + count)
                            if not (p < tracer.nr_pfns and tracer.last[p] >= after_ns)
                            and not any(s <= p < e for s, e in wide)]
                    v.covered += count - len(left)
                    for first, n in runs_of(left):
                        if first % block == 0 and n % block == 0:
                            v.reporting += n
                        else:
                            v.violations += n
                            if len(v.samples) < 10:
                                v.samples.append((first, n))
            v.scan_s += time.monotonic() - t0
            v.rounds += 1
            v.dropped += int(src.scanner.last.dropped)
            if until_violation and v.violations:
                break
    finally:
        os.close(fd)
    return v


@pytest.fixture(scope="module")
def storm() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [subprocess.Popen([sys.executable, "-c", STORM, str(i)]) for i in range(2)]
    time.sleep(0.5)
    yield procs
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()


@pytest.fixture(scope="module")
def tracer() -> Iterator[AllocTracer]:
    t = AllocTracer(system.ram_pfn_ranges()[-1][1])
    yield t
    t.close()


def _opened(options: Options) -> EbpfSource:
    s = EbpfSource(options=options)
    s.open()
    return s


def test_scans_are_sound_under_churn(storm: list[subprocess.Popen[bytes]], tracer: AllocTracer) -> None:
    src = _opened(Options())
    try:
        v = check_rounds(src, tracer, ROUNDS)
    finally:
        src.close()
    assert all(p.poll() is None for p in storm), "the storm must still be running"
    print(f"\nchecked: {v}")
    assert v.reported > 0
    assert v.dropped > 0, "the storm should race with the scans"
    assert v.violations == 0, f"pages reported free, in use, and no allocation after the scan: {v}"


def test_checker_catches_scans_without_the_crosscheck(storm: list[subprocess.Popen[bytes]], tracer: AllocTracer) -> None:
    """With the in-scan cross-check off, blocks allocated between their read
    and the end of the scan are reported; the rule above must see them."""
    src = _opened(Options(crosscheck=False))
    try:
        v = check_rounds(src, tracer, 3 * ROUNDS, until_violation=True)
    finally:
        src.close()
    print(f"\nwithout cross-check: {v}")
    assert v.violations > 0, f"churn did not expose the missing cross-check: {v}"


def test_without_the_recheck(storm: list[subprocess.Popen[bytes]], tracer: AllocTracer) -> None:
    """Removing the page_type re-read is not observable with the cross-check
    on: a block torn by an allocation while it was read is also touched by
    that allocation's event during the scan, so it is dropped either way
    (docs/ebpf-source.md). The run documents that; the re-read stays as the
    defence for exits without a tracepoint."""
    src = _opened(Options(recheck=False))
    try:
        v = check_rounds(src, tracer, 2)
    finally:
        src.close()
    print(f"\nwithout re-read: {v}")
    assert v.violations == 0, v
