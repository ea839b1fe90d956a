"""Free pages from ``/proc/kpageflags``: the user-space-only source.

Since Linux 6.1 the kernel sets KPF_BUDDY on *every* page of a free buddy
block, not only its head (fs/proc/page.c ``stable_page_flags``; the sentence
in pagemap.rst saying otherwise is stale, shared/reference/ebpf.md §1.3). So
the set of pages with KPF_BUDDY is exactly what we may report. The read is a
per-page snapshot; each page was free when it was read, which is all the
safety rule asks.

Reading is done in large blocks with the work on bytes done by C code
(slicing, ``bytes.translate`` and a regular expression find the runs), so the
agent needs neither numpy nor a per-page Python loop.
"""

from __future__ import annotations

import os
import re
import resource
from collections.abc import Iterator

from .base import FreePageSource, Probe, ScanSummary, SourceUnavailable, WholeScan, now

KPAGEFLAGS = "/proc/kpageflags"
#: Bit numbers from include/uapi/linux/kernel-page-flags.h.
KPF_BUDDY = 10
KPF_NOPAGE = 20
#: Bytes per PFN in /proc/kpageflags.
ENTRY = 8
#: PFNs read per pread: 512 Ki entries = 4 MiB of flags = 2 GiB of 4 KiB pages.
BLOCK_PFNS = 512 * 1024

# KPF_BUDDY is bit 2 of byte 1 of each little-endian u64.
_BUDDY_BYTE = KPF_BUDDY // 8
_BUDDY_MASK = 1 << (KPF_BUDDY % 8)
_TO_FLAG = bytes(1 if b & _BUDDY_MASK else 0 for b in range(256))
_RUNS = re.compile(rb"\x01+")


def buddy_runs(raw: bytes, first_pfn: int) -> list[tuple[int, int]]:
    """(pfn, count) runs of KPF_BUDDY pages in a block of raw kpageflags."""
    flags = raw[_BUDDY_BYTE::ENTRY].translate(_TO_FLAG)
    return [(first_pfn + m.start(), m.end() - m.start()) for m in _RUNS.finditer(flags)]


class KpageflagsSource(FreePageSource):
    """Scan /proc/kpageflags for KPF_BUDDY runs."""

    name = "kpageflags"

    def __init__(self, path: str = KPAGEFLAGS, page_size: int | None = None) -> None:
        self.path = path
        self.page_size = page_size or resource.getpagesize()
        self._fd: int | None = None
        self._complete = True
        self._pfns = 0
        self._blocks = 0

    def probe(self) -> Probe:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            return Probe(self.name, False, f"cannot open {self.path}: {e.strerror} (needs root)")
        try:
            head = os.pread(fd, ENTRY, 0)
        except OSError as e:
            return Probe(self.name, False, f"cannot read {self.path}: {e.strerror}")
        finally:
            os.close(fd)
        if len(head) != ENTRY:
            return Probe(self.name, False, f"{self.path} is empty")
        return Probe(self.name, True)

    def open(self) -> None:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise SourceUnavailable(f"cannot open {self.path}: {e.strerror}") from e

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def parts(self, deadline: float | None = None) -> Iterator[WholeScan]:
        """One part per block read (2 GiB of RAM): the agent sends each at once."""
        self.open()
        assert self._fd is not None
        fd, ps = self._fd, self.page_size
        pfn = self._pfns = self._blocks = 0
        self._complete = True
        while True:
            if deadline is not None and now() >= deadline:
                self._complete = False
                return
            raw = os.pread(fd, BLOCK_PFNS * ENTRY, pfn * ENTRY)
            if not raw:
                return
            runs = buddy_runs(raw, pfn)
            self._blocks += 1
            yield WholeScan([(p * ps, n * ps) for p, n in runs], sum(n for _, n in runs))
            pfn += len(raw) // ENTRY
            self._pfns = pfn
            if len(raw) < BLOCK_PFNS * ENTRY:
                return

    def scan_summary(self) -> ScanSummary:
        return ScanSummary(self._complete, {"pfns_read": float(self._pfns), "blocks": float(self._blocks)})
