"""Guest RAM layout: which guest-physical ranges are backed by which RAMBlock.

The migration stream names pages by (RAMBlock idstr, offset) while the guest
names them by guest-physical address, so every hint must be translated. The
layout comes from the VM registry file or, better, from QMP (``info mtree``),
never from the guest.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import grpc

from .errors import CollectorError

#: x86 target page size: the unit of RAM records in the migration stream.
TARGET_PAGE_SIZE = 4096
_U64_END = 1 << 64


class LayoutError(CollectorError):
    """A layout that cannot describe real guest RAM."""

    default_status = grpc.StatusCode.FAILED_PRECONDITION


@dataclass(frozen=True)
class RamRange:
    """``size`` bytes of guest-physical space at ``gpa`` backed by ``block`` at ``offset``."""

    gpa: int
    size: int
    block: str
    offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


@dataclass(frozen=True)
class RamLayout:
    """A validated set of :class:`RamRange` plus the size of every RAMBlock.

    ``blocks`` maps idstr to used_length in bytes: it sizes the per-block
    bitmaps, and a block may hold more than the ranges map (hidden behind a
    hole), which is still migrated but never hinted.
    """

    ranges: tuple[RamRange, ...]
    blocks: Mapping[str, int]
    page_size: int = TARGET_PAGE_SIZE
    #: (gpa, size) spans the guest may own and report free but that are never
    #: hinted (firmware/SMM windows the host cannot rule out). Hints there are
    #: clipped away, not refused: an honest agent does not know of them.
    excluded: tuple[tuple[int, int], ...] = ()
    _starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ps = self.page_size
        if ps <= 0 or ps & (ps - 1):
            raise LayoutError(f"page size {ps} is not a power of two")
        ordered = tuple(sorted(self.ranges, key=lambda r: r.gpa))
        prev_end = 0
        for r in ordered:
            where = f"range {r.gpa:#x}+{r.size:#x} ({r.block}@{r.offset:#x})"
            if r.size <= 0:
                raise LayoutError(f"{where}: empty")
            if (r.gpa | r.size | r.offset) % ps:
                raise LayoutError(f"{where}: not aligned to {ps} bytes")
            if r.gpa + r.size > _U64_END:
                raise LayoutError(f"{where}: beyond 2**64")
            if r.gpa < prev_end:
                raise LayoutError(f"{where}: overlaps another range")
            used = self.blocks.get(r.block)
            if used is None:
                raise LayoutError(f"{where}: unknown RAMBlock {r.block!r}")
            if r.offset + r.size > used:
                raise LayoutError(f"{where}: beyond the end of {r.block!r} ({used:#x} bytes)")
            prev_end = r.end
        spans = sorted(self.excluded)
        for gpa, size in spans:
            where = f"excluded span {gpa:#x}+{size:#x}"
            if size <= 0 or (gpa | size) % ps or gpa + size > _U64_END:
                raise LayoutError(f"{where}: empty, unaligned or beyond 2**64")
            if any(gpa < r.end and r.gpa < gpa + size for r in ordered):
                raise LayoutError(f"{where}: overlaps a mapped range")
        for (a, n), (b, _) in itertools.pairwise(spans):
            if b < a + n:
                raise LayoutError(f"excluded spans {a:#x}+{n:#x} and {b:#x} overlap")
        object.__setattr__(self, "excluded", tuple(spans))
        for name, used in self.blocks.items():
            if used <= 0 or used % ps:
                raise LayoutError(f"RAMBlock {name!r}: size {used:#x} not a positive multiple of {ps}")
        object.__setattr__(self, "ranges", ordered)
        object.__setattr__(self, "_starts", tuple(r.gpa for r in ordered))

    @classmethod
    def from_ranges(
        cls,
        ranges: Iterable[RamRange],
        page_size: int = TARGET_PAGE_SIZE,
        excluded: Iterable[tuple[int, int]] = (),
    ) -> RamLayout:
        """A layout whose blocks are exactly as large as the ranges that map them."""
        rs = tuple(ranges)
        blocks: dict[str, int] = {}
        for r in rs:
            blocks[r.block] = max(blocks.get(r.block, 0), r.offset + r.size)
        return cls(rs, blocks, page_size, tuple(excluded))

    @property
    def ram_bytes(self) -> int:
        """Guest-physical bytes the layout maps (what a guest can call RAM)."""
        return sum(r.size for r in self.ranges)

    def block_pages(self, block: str) -> int:
        return self.blocks[block] // self.page_size

    def find(self, gpa: int) -> RamRange | None:
        """The range containing ``gpa``, if any."""
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0 and gpa < self.ranges[i].end:
            return self.ranges[i]
        return None

    def split(self, start: int, end: int) -> list[tuple[str, int, int]] | None:
        """Map the page-aligned GPA span [start, end) to (block, first_page, page_count) pieces.

        Returns None unless the whole span is inside mapped RAM (ranges that
        touch end to end count as one span).
        """
        ps = self.page_size
        out: list[tuple[str, int, int]] = []
        pos = start
        i = bisect.bisect_right(self._starts, pos) - 1
        while pos < end:
            if i < 0 or i >= len(self.ranges):
                return None
            r = self.ranges[i]
            if not r.gpa <= pos < r.end:
                return None
            stop = min(end, r.end)
            out.append((r.block, (r.offset + pos - r.gpa) // ps, (stop - pos) // ps))
            pos = stop
            i += 1
        return out
