"""Compare a scan with /proc/kpageflags, page for page.

KPF_BUDDY is set on every page of a free buddy block (Linux 6.1+), so on a
quiet system the two must agree exactly. Each part of the scan is compared
with kpageflags read right after it, while the scan's allocation bitmap is
still recording, so churn is told apart from error:

* ``extra``: the scan said free, kpageflags says not. An allocation event
  since the scan began *explains* it (the page left after it was read).
  Free page reporting takes whole aligned blocks of its order off the free
  lists with no tracepoint while it reports them (shared/reference/ebpf.md
  §2); they stay free, so extras of exactly that shape are counted apart.
  Anything else is unexplained: a systematic error (a wrong offset or base)
  shows up as a few pages per block all over memory and fails the test.
* ``missing``: kpageflags says free, the scan did not (freed after it was
  read, on a per-CPU list, or dropped by the cross-check). The safe direction,
  but a wrong encoding shows up here as "found nothing".

The agent runs this once at start (a wrong encoding, offset or vmemmap_base
fails it), the tests run it on a quiet and on a churning system.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from ..kpageflags import _BUDDY_BYTE, _TO_FLAG, ENTRY
from .scanner import Scanner, ScanPart

_ONES = re.compile(rb"\x01+")

#: Unexplained extra pages allowed: exits with no tracepoint other than
#: free page reporting are rare (compaction capture, hwpoison).
UNEXPLAINED_LIMIT = 64
#: Extra pages shaped like free page reporting allowed, as a fraction of the
#: pages the scan found.
REPORTING_FRACTION = 0.05
#: Missing pages allowed, as a fraction of KPF_BUDDY pages.
MISSING_FRACTION = 0.05
MISSING_FLOOR = 4096
REPORTING_ORDER = "/sys/module/page_reporting/parameters/page_reporting_order"


def reporting_block(path: str = REPORTING_ORDER) -> int | None:
    """Pages per block free page reporting isolates, if the kernel has it."""
    try:
        with open(path) as f:
            order = int(f.read())
    except (OSError, ValueError):
        return None
    return 1 << order if 0 <= order < 20 else None


@dataclass
class Comparison:
    scanned: int = 0
    kpageflags: int = 0
    extra: int = 0
    explained: int = 0
    #: Extra pages in whole aligned blocks of free page reporting's order.
    reporting: int = 0
    missing: int = 0
    #: First few unexplained extra PFN runs (pfn, count), for the message.
    samples: list[tuple[int, int]] = field(default_factory=list)

    @property
    def unexplained(self) -> int:
        return self.extra - self.explained - self.reporting

    def add(self, other: Comparison) -> None:
        self.scanned += other.scanned
        self.kpageflags += other.kpageflags
        self.extra += other.extra
        self.explained += other.explained
        self.reporting += other.reporting
        self.missing += other.missing
        self.samples += other.samples[: max(0, 8 - len(self.samples))]

    def failure(self) -> str:
        """Why this comparison disproves the scanner, or ""."""
        if self.kpageflags and not self.scanned:
            return f"the scan found no free pages, kpageflags has {self.kpageflags}"
        if self.unexplained > UNEXPLAINED_LIMIT:
            where = ", ".join(f"{p:#x}+{n}" for p, n in self.samples)
            return (
                f"{self.unexplained} pages reported free are not free in kpageflags "
                f"and no allocation explains them (limit {UNEXPLAINED_LIMIT}; e.g. {where})"
            )
        limit = int(REPORTING_FRACTION * self.scanned)
        if self.reporting > limit:
            return f"{self.reporting} reported pages were taken by free page reporting (limit {limit})"
        limit = max(MISSING_FLOOR, int(MISSING_FRACTION * self.kpageflags))
        if self.missing > limit:
            return f"the scan missed {self.missing} of {self.kpageflags} free pages (limit {limit})"
        return ""

    def summary(self) -> str:
        return (
            f"scan {self.scanned} pages, kpageflags {self.kpageflags}, extra {self.extra} "
            f"({self.explained} explained by allocations, {self.reporting} by free page "
            f"reporting), missing {self.missing}"
        )


def buddy_flags(fd: int, first: int, end: int) -> bytes:
    """One byte per PFN in [first, end): 1 where KPF_BUDDY is set."""
    raw = os.pread(fd, (end - first) * ENTRY, first * ENTRY)
    flags = raw[_BUDDY_BYTE::ENTRY].translate(_TO_FLAG)
    return flags + bytes(end - first - len(flags))


def scan_flags(part: ScanPart, page_shift: int = 12) -> tuple[bytearray, int]:
    """One byte per PFN of the part: 1 where the scan reported it free; and
    how many reported pages lie outside the part (none, unless broken)."""
    size = part.end_pfn - part.first_pfn
    flags = bytearray(size)
    outside = 0
    for start, length in part.ranges:
        lo = (start >> page_shift) - part.first_pfn
        hi = lo + (length >> page_shift)
        clipped_lo, clipped_hi = max(lo, 0), min(hi, size)
        outside += (hi - lo) - max(0, clipped_hi - clipped_lo)
        if clipped_hi > clipped_lo:
            flags[clipped_lo:clipped_hi] = b"\x01" * (clipped_hi - clipped_lo)
    return flags, outside


def _count(flags: bytes | bytearray) -> int:
    return len(flags) - flags.count(0)


def compare_part(part: ScanPart, kpf_fd: int, dirty: memoryview, block: int | None = None) -> Comparison:
    """Compare one part; call it while the scan's gate is still open.

    ``block``: pages per free page reporting block (:func:`reporting_block`).
    """
    n = part.end_pfn - part.first_pfn
    if n <= 0:
        return Comparison()
    got, outside = scan_flags(part)
    want = buddy_flags(kpf_fd, part.first_pfn, part.end_pfn)
    g, w = int.from_bytes(got, "little"), int.from_bytes(want, "little")
    out = Comparison(scanned=_count(got) + outside, kpageflags=_count(want))
    out.extra = outside  # never explained: the scan reported past its own part
    out.missing = (w & ~g).bit_count()
    extra = g & ~w
    if not extra:
        return out
    nbits = len(dirty) * 8
    for m in _ONES.finditer(extra.to_bytes(n, "little")):
        first, count = part.first_pfn + m.start(), m.end() - m.start()
        out.extra += count
        left = [pfn for pfn in range(first, first + count) if not (pfn < nbits and dirty[pfn >> 3] >> (pfn & 7) & 1)]
        out.explained += count - len(left)
        for pfn, n in runs_of(left):
            if block and pfn % block == 0 and n % block == 0:
                out.reporting += n
            elif len(out.samples) < 8:
                out.samples.append((pfn, n))
    return out


def runs_of(pfns: list[int]) -> list[tuple[int, int]]:
    """(first, count) runs of a sorted list of PFNs."""
    out: list[tuple[int, int]] = []
    for pfn in pfns:
        if out and out[-1][0] + out[-1][1] == pfn:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((pfn, 1))
    return out


def run(scanner: Scanner, kpageflags: str) -> Comparison:
    """Scan once and compare every part with kpageflags read right after it."""
    total = Comparison()
    block = reporting_block()
    fd = os.open(kpageflags, os.O_RDONLY)
    try:
        for part in scanner.parts():
            total.add(compare_part(part, fd, scanner.prog.dirty_bytes, block))
    finally:
        os.close(fd)
    return total
