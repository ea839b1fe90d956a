"""Memory patterns the in-guest workloads write and verify (stdlib only).

A region is filled with a pseudo-random sequence of period 4093 bytes (a
prime, so every 4 KiB page of a region holds different bytes and no page is
ever all zero), derived from a seed that names the writer. Filling and
checking are single C-level operations (bytes repetition, slice assignment,
comparison), fast enough under TCG; only a failed check walks the pages to
say which ones are wrong.

Installed in the guest as the package fphint_lab.guest (vm-images/vmimage/final.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
from dataclasses import dataclass

PAGE = 4096
#: Pattern period in bytes: prime, so page contents never repeat within a region.
PERIOD = 4093


def period_bytes(seed: str) -> bytes:
    """PERIOD pseudo-random bytes for ``seed`` (SHA-256 in counter mode)."""
    out = bytearray()
    counter = 0
    while len(out) < PERIOD:
        out += hashlib.sha256(f"{seed}/{counter}".encode()).digest()
        counter += 1
    return bytes(out[:PERIOD])


def expected(seed: str, length: int) -> bytes:
    """The bytes a region of ``length`` filled with ``seed`` must hold."""
    unit = period_bytes(seed)
    reps = length // PERIOD + 1
    return (unit * reps)[:length]


#: Regions are written and checked this many bytes at a time, so a workload
#: needs little memory beyond the region itself (a 512 MiB fill in a 1 GiB
#: guest must not need a second 512 MiB for the expected bytes).
CHUNK = 4 << 20


class Stripe:
    """The pattern for ``seed`` as one buffer from which any CHUNK-long piece
    starting at any region offset is a slice (the pattern repeats every PERIOD)."""

    def __init__(self, seed: str) -> None:
        unit = period_bytes(seed)
        self.view = memoryview(unit * (CHUNK // PERIOD + 2))

    def at(self, lo: int, n: int) -> memoryview:
        off = lo % PERIOD
        return self.view[off : off + n]


@dataclass(frozen=True)
class BadPage:
    """One page of a region that does not hold what was written."""

    index: int
    #: Offset in the page of the first wrong byte.
    offset: int
    #: 16 bytes expected and found from that offset, hex.
    want: str
    got: str
    #: The whole page reads as zero (what a wrongly skipped page looks like).
    zero: bool

    def as_dict(self) -> dict[str, object]:
        return {"page": self.index, "offset": self.offset, "want": self.want, "got": self.got, "zero": self.zero}


class Region:
    """An anonymous private mapping of whole pages, freed by :meth:`free`."""

    def __init__(self, length: int) -> None:
        if length <= 0 or length % PAGE:
            raise ValueError(f"region length {length} is not a positive multiple of {PAGE}")
        self.length = length
        self._map: mmap.mmap | None = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    @property
    def mem(self) -> mmap.mmap:
        if self._map is None:
            raise ValueError("region already freed")
        return self._map

    def no_huge_pages(self) -> None:
        """Keep khugepaged from collapsing (and so moving) this region's pages.

        Debian's kernel has THP "always": khugepaged copies small pages into a
        huge one, and physical addresses read from pagemap go stale.
        """
        self.mem.madvise(mmap.MADV_NOHUGEPAGE)

    def address(self) -> int:
        """The region's virtual address (for /proc/<pid>/pagemap)."""
        buf = ctypes.c_char.from_buffer(self.mem)
        try:
            return ctypes.addressof(buf)
        finally:
            del buf  # release the export so the mapping can be closed

    def fill(self, seed: str) -> None:
        stripe = Stripe(seed)
        mem = self.mem
        for lo in range(0, self.length, CHUNK):
            n = min(CHUNK, self.length - lo)
            mem[lo : lo + n] = stripe.at(lo, n)

    def check(self, seed: str, limit: int = 16) -> tuple[int, list[BadPage]]:
        """(number of bad pages, the first ``limit`` of them)."""
        stripe = Stripe(seed)
        mem = self.mem
        bad: list[BadPage] = []
        count = 0
        for lo in range(0, self.length, CHUNK):
            n = min(CHUNK, self.length - lo)
            if mem[lo : lo + n] == stripe.at(lo, n):
                continue
            c, pages = self._bad_pages(stripe, lo, n, limit - len(bad))
            count += c
            bad += pages
        return count, bad

    def _bad_pages(self, stripe: Stripe, start: int, n: int, limit: int) -> tuple[int, list[BadPage]]:
        mem = self.mem
        bad: list[BadPage] = []
        count = 0
        for lo in range(start, start + n, PAGE):
            index = lo // PAGE
            got = mem[lo : lo + PAGE]
            ref = bytes(stripe.at(lo, PAGE))
            if got != ref:
                count += 1
                if len(bad) < limit:
                    off = next(i for i in range(PAGE) if got[i] != ref[i])
                    bad.append(
                        BadPage(index, off, ref[off : off + 16].hex(), got[off : off + 16].hex(), got.count(0) == PAGE)
                    )
        return count, bad

    def free(self) -> None:
        """munmap: the pages go back to the guest kernel's free lists."""
        if self._map is not None:
            self._map.close()
            self._map = None
