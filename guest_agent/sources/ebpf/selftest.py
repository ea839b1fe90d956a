"""Compare a scan with /proc/kpageflags, page for page.

KPF_BUDDY is set on every page of a free buddy block (Linux 6.1+), so on a
quiet system the two must agree exactly. Each part of the scan is compared
with kpageflags read right after it, while the scan's allocation bitmap is
still recording, so churn is told apart from error:

* ``extra``: the scan said free, kpageflags says not. An allocation event
  since the scan began *explains* it (the page left after it was read);
  anything else is unexplained and counts against the source.
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
from .scanner import ScanPart, Scanner

_ONES = re.compile(rb"\x01+")

#: Unexplained extra pages allowed, as a fraction of the pages the scan
#: found, and at least this many (a block can leave the buddy lists through
#: a path with no tracepoint: free page reporting, compaction capture).
EXTRA_FRACTION = 0.002
EXTRA_FLOOR = 1024
#: Missing pages allowed, as a fraction of KPF_BUDDY pages.
MISSING_FRACTION = 0.05
MISSING_FLOOR = 4096


@dataclass
class Comparison:
    scanned: int = 0
    kpageflags: int = 0
    extra: int = 0
    explained: int = 0
    missing: int = 0
    #: First few unexplained extra PFN runs (pfn, count), for the message.
    samples: list[tuple[int, int]] = field(default_factory=list)

    @property
    def unexplained(self) -> int:
        return self.extra - self.explained

    def add(self, other: Comparison) -> None:
        self.scanned += other.scanned
        self.kpageflags += other.kpageflags
        self.extra += other.extra
        self.explained += other.explained
        self.missing += other.missing
        self.samples += other.samples[: max(0, 8 - len(self.samples))]

    def failure(self) -> str:
        """Why this comparison disproves the scanner, or ""."""
        if self.kpageflags and not self.scanned:
            return f"the scan found no free pages, kpageflags has {self.kpageflags}"
        limit = max(EXTRA_FLOOR, int(EXTRA_FRACTION * self.scanned))
        if self.unexplained > limit:
            where = ", ".join(f"{p:#x}+{n}" for p, n in self.samples)
            return (
                f"{self.unexplained} pages reported free are not free in kpageflags "
                f"and no allocation explains them (limit {limit}; e.g. {where})"
            )
        limit = max(MISSING_FLOOR, int(MISSING_FRACTION * self.kpageflags))
        if self.missing > limit:
            return f"the scan missed {self.missing} of {self.kpageflags} free pages (limit {limit})"
        return ""

    def summary(self) -> str:
        return (
            f"scan {self.scanned} pages, kpageflags {self.kpageflags}, extra {self.extra} "
            f"({self.explained} explained by allocations), missing {self.missing}"
        )


def buddy_flags(fd: int, first: int, end: int) -> bytes:
    """One byte per PFN in [first, end): 1 where KPF_BUDDY is set."""
    raw = os.pread(fd, (end - first) * ENTRY, first * ENTRY)
    flags = raw[_BUDDY_BYTE::ENTRY].translate(_TO_FLAG)
    return flags + bytes(end - first - len(flags))


def scan_flags(part: ScanPart, page_shift: int = 12) -> bytearray:
    flags = bytearray(part.end_pfn - part.first_pfn)
    for start, length in part.ranges:
        lo = (start >> page_shift) - part.first_pfn
        n = length >> page_shift
        flags[lo : lo + n] = b"\x01" * n
    return flags


def _count(flags: bytes | bytearray) -> int:
    return len(flags) - flags.count(0)


def compare_part(part: ScanPart, kpf_fd: int, dirty: memoryview) -> Comparison:
    """Compare one part; call it while the scan's gate is still open."""
    n = part.end_pfn - part.first_pfn
    if n <= 0:
        return Comparison()
    got = scan_flags(part)
    want = buddy_flags(kpf_fd, part.first_pfn, part.end_pfn)
    g, w = int.from_bytes(got, "little"), int.from_bytes(want, "little")
    out = Comparison(scanned=_count(got), kpageflags=_count(want))
    out.missing = (w & ~g).bit_count()
    extra = g & ~w
    if extra:
        nbits = len(dirty) * 8
        for m in _ONES.finditer(extra.to_bytes(n, "little")):
            for pfn in range(part.first_pfn + m.start(), part.first_pfn + m.end()):
                out.extra += 1
                if pfn < nbits and dirty[pfn >> 3] >> (pfn & 7) & 1:
                    out.explained += 1
                elif len(out.samples) < 8:
                    if out.samples and out.samples[-1][0] + out.samples[-1][1] == pfn:
                        out.samples[-1] = (out.samples[-1][0], out.samples[-1][1] + 1)
                    else:
                        out.samples.append((pfn, 1))
    return out


def run(scanner: Scanner, kpageflags: str) -> Comparison:
    """Scan once and compare every part with kpageflags read right after it."""
    total = Comparison()
    fd = os.open(kpageflags, os.O_RDONLY)
    try:
        for part in scanner.parts():
            total.add(compare_part(part, fd, scanner.prog.dirty_bytes))
    finally:
        os.close(fd)
    return total
