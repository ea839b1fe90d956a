"""Decode and validate the packed ranges of one Report call against a RAM layout.

Everything a guest sends passes through here before it may touch a bitmap.
A chunk is either accepted whole or refused whole with a :class:`HintViolation`
naming the first offending range; nothing is merged from a refused chunk.
Arithmetic is done in numpy uint64 with every wrap detected, and the result is
property-tested against the exact reference codec in :mod:`fphint.ranges`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .errors import Refusal
from .layout import RamLayout

U64 = np.uint64
Array = npt.NDArray[np.uint64]


class HintViolation(Refusal):
    """A chunk no well-behaved agent sends."""


@dataclass
class Pieces:
    """Validated page spans, each inside one RAMBlock."""

    blocks: list[str]  # index -> block name
    block_idx: npt.NDArray[np.intp]
    first: Array  # first page inside the block
    count: Array  # pages
    accepted: int  # ranges that hint at least one whole page
    rejected: int  # ranges with no whole page, or only pages in excluded spans

    @property
    def pages(self) -> int:
        return int(self.count.sum(dtype=U64))


class LayoutIndex:
    """Page-granular arrays of a layout, built once per layout.

    Entries are the mapped ranges plus the excluded spans (block index -1):
    a hint must lie inside their union, and only its mapped part is kept.
    """

    def __init__(self, layout: RamLayout) -> None:
        self.layout = layout
        self.shift = sh = layout.page_size.bit_length() - 1
        self.blocks = sorted(layout.blocks)
        bidx = {b: i for i, b in enumerate(self.blocks)}
        entries = sorted(
            [(r.gpa >> sh, r.end >> sh, bidx[r.block], r.offset >> sh) for r in layout.ranges]
            + [(g >> sh, (g + n) >> sh, -1, 0) for g, n in layout.excluded]
        )
        self.r_start = np.array([e[0] for e in entries], dtype=U64)
        self.r_end = np.array([e[1] for e in entries], dtype=U64)
        self.r_block = np.array([e[2] for e in entries], dtype=np.intp)
        self.r_off = np.array([e[3] for e in entries], dtype=U64)
        # Coverage: entries that touch end to end merged, for the containment test.
        cov: list[list[int]] = []
        for s, e, _, _ in entries:
            if cov and cov[-1][1] == s:
                cov[-1][1] = e
            else:
                cov.append([s, e])
        self.c_start = np.array([c[0] for c in cov], dtype=U64)
        self.c_end = np.array([c[1] for c in cov], dtype=U64)


class ReportDecoder:
    """The range state of one Report call, carried across its chunks."""

    def __init__(self, index: LayoutIndex) -> None:
        self.index = index
        #: Start and (exclusive, exact) end of the previous range of the call.
        self.prev_start = 0
        self.prev_end = 0

    def decode(self, words: Sequence[int]) -> Pieces:
        """Validate one chunk and map it to block pages.

        :raise HintViolation: the chunk is refused; the decoder state is unchanged.
        """
        ix = self.index
        if len(words) % 2:
            raise HintViolation("INVALID_ARGUMENT", "odd", f"odd number of packed words ({len(words)})")
        w = np.asarray(words, dtype=U64)
        n = len(w) // 2
        empty = Pieces(ix.blocks, np.zeros(0, np.intp), np.zeros(0, U64), np.zeros(0, U64), 0, 0)
        if n == 0:
            return empty
        deltas, lens = w[0::2], w[1::2]
        with np.errstate(over="ignore"):
            cs = np.cumsum(np.concatenate((np.array([self.prev_start], dtype=U64), deltas)), dtype=U64)
            bad = np.flatnonzero(cs[1:] < cs[:-1])
            if bad.size:
                raise HintViolation("INVALID_ARGUMENT", "overflow", f"range {bad[0]} starts beyond 2**64")
            starts = cs[1:]
            nz = lens > 0
            last = starts + (lens - U64(1))
        bad = np.flatnonzero(nz & (last < starts))
        if bad.size:
            raise HintViolation("INVALID_ARGUMENT", "overflow", f"range {bad[0]} ends beyond 2**64")
        # Each range must start at or after the previous one's end. Within the
        # chunk that is start > previous last byte when the previous range is
        # not empty (an empty one ends where it starts, and starts are sorted).
        bad = np.flatnonzero(nz[:-1] & (starts[1:] <= last[:-1])) + 1
        if int(starts[0]) < self.prev_end:
            bad = np.concatenate((np.array([0], dtype=bad.dtype), bad))
        if bad.size:
            i = int(bad[0])
            raise HintViolation(
                "INVALID_ARGUMENT", "overlap", f"range {i} at {int(starts[i]):#x} overlaps the previous one"
            )
        # Trim inward to whole pages, in page units (no wrap possible there).
        sh, mask = U64(ix.shift), U64((1 << ix.shift) - 1)
        s_page = (starts >> sh) + ((starts & mask) != 0).astype(U64)
        e_page = (last >> sh) + ((last & mask) == mask).astype(U64)
        keep = nz & (e_page > s_page)
        s_page, e_page = s_page[keep], e_page[keep]
        if s_page.size:
            ci = np.searchsorted(ix.c_start, s_page, side="right").astype(np.intp) - 1
            inside = (ci >= 0) & (e_page <= ix.c_end[np.maximum(ci, 0)])
            bad = np.flatnonzero(~inside)
            if bad.size:
                i = int(np.flatnonzero(keep)[bad[0]])
                raise HintViolation(
                    "OUT_OF_RANGE",
                    "outside_ram",
                    f"range {i} [{int(starts[i]):#x}, +{int(lens[i]):#x}) is not inside guest RAM",
                )
        pieces, hinted = self._map(s_page, e_page)
        # Commit the state only now that the whole chunk is good.
        self.prev_start = int(starts[-1])
        self.prev_end = self.prev_start + int(lens[-1])
        pieces.accepted = int(hinted.sum())
        pieces.rejected = n - pieces.accepted
        return pieces

    def _map(self, s_page: Array, e_page: Array) -> tuple[Pieces, npt.NDArray[np.bool_]]:
        """Pieces inside blocks, and for each range whether any of it is hinted."""
        ix = self.index
        ri = np.searchsorted(ix.r_start, s_page, side="right").astype(np.intp) - 1
        single = e_page <= ix.r_end[ri]
        bi = ix.r_block[ri]
        use = single & (bi >= 0)
        block_idx = bi[use]
        first = ix.r_off[ri[use]] + (s_page[use] - ix.r_start[ri[use]])
        count = e_page[use] - s_page[use]
        hinted = use.copy()
        if not single.all():
            # Spans over entries that touch end to end (rare): walk them.
            extra_b, extra_f, extra_c = [], [], []
            for k in np.flatnonzero(~single).tolist():
                pos, end, i = int(s_page[k]), int(e_page[k]), int(ri[k])
                while pos < end:
                    stop = min(end, int(ix.r_end[i]))
                    b = int(ix.r_block[i])
                    if b >= 0:
                        extra_b.append(b)
                        extra_f.append(int(ix.r_off[i]) + pos - int(ix.r_start[i]))
                        extra_c.append(stop - pos)
                        hinted[k] = True
                    pos, i = stop, i + 1
            block_idx = np.concatenate((block_idx, np.array(extra_b, dtype=np.intp)))
            first = np.concatenate((first, np.array(extra_f, dtype=U64)))
            count = np.concatenate((count, np.array(extra_c, dtype=U64)))
        return Pieces(ix.blocks, block_idx, first, count, 0, 0), hinted
