"""Scan once, then track: the last scan's free runs, kept valid by the
allocation bitmap (docs/safety-rule.md §5.6).

After a scan the event gate stays open, so the bitmap keeps every page that
left the buddy lists since that scan began (and the wide list every event too
wide to mark page by page). A request is then answered at once with the
scan's runs minus every 64-page word an event touched among a run's pages,
minus the wide ranges: no BPF run, no scan. What remains was free when the
scan read it and has fired no exit event since, so it is free when the answer
is computed (the argument and its list of kernel paths are in the doc).

Speed: the answer is built on the wire's own encoding. The runs are kept as
the packed words a Report carries (distance from the previous start, length),
so runs no event touched are copied as array slices. The bitmap, ANDed with
a bitmap of the tracked pages (as integers: C speed), gives the touched
stretches; a bisection finds the runs they hit, and only those runs are
split in Python. The work grows with what was touched, not with memory.
"""

from __future__ import annotations

import re
import time
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

from .system import PAGE_SHIFT

#: Eight zero bytes or more: somewhere inside, whole clean 64-page words.
_ZERO_BYTES = re.compile(rb"\x00{8,}")
#: A bitmap byte covers 8 pages: byte b starts at byte address b << BYTE_SHIFT.
BYTE_SHIFT = PAGE_SHIFT + 3


@dataclass
class TrackedAnswer:
    """Pages free now by tracking, as a Report's packed words.

    ``words`` is ``fphint.ranges.encode`` of the byte ranges from a fresh
    codec state: for each range its start's distance from the previous
    range's start (from 0), then its length.
    """

    words: array[int]
    nranges: int
    pages: int
    #: Pages the tracked runs had before the subtraction, runs split in
    #: Python, wide ranges applied.
    scanned_pages: int = 0
    split_runs: int = 0
    wide: int = 0
    #: Seconds since the scan that found the runs began, and to compute this.
    age_s: float = 0.0
    compute_s: float = 0.0
    #: time.monotonic() just before the bitmap was read: what the answer says
    #: held then (exits after it were not seen).
    read_at: float = 0.0

    def packed(self, limit: int) -> tuple[array[int], int]:
        """The first ``limit`` ranges' words (a prefix of a sorted list is one)."""
        if limit >= self.nranges:
            return self.words, self.nranges
        n = max(0, limit)
        return self.words[: 2 * n], n

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The byte ``(start, length)`` ranges (decoded; tests and logs)."""
        out, start = [], 0
        w = self.words
        for i in range(0, len(w), 2):
            start += w[i]
            out.append((start, w[i + 1]))
        return out


def _clean_words(chunk: bytes | memoryview, first_word: int) -> list[tuple[int, int]]:
    """Stretches ``[w, w2)`` of all-zero 8-byte words in ``chunk`` (word 0 is ``first_word``)."""
    out = []
    for m in _ZERO_BYTES.finditer(chunk):
        a, b = -(-m.start() // 8), m.end() // 8
        if b > a:
            out.append((first_word + a, first_word + b))
    return out


def subtract(runs: Sequence[int], bitmap: memoryview, wide: Sequence[tuple[int, int]] = ()) -> list[tuple[int, int]]:
    """``runs`` (flat ``[s0, e0, s1, e1, ...]``, PFNs, sorted) minus the touched words.

    The specification the fast path in :meth:`TrackedSet.answer` must meet:
    a page ``p`` of run ``[s, e)`` is kept when no bit of a page of ``[s, e)``
    in ``p``'s 64-page word is set in ``bitmap`` (bytes, bit ``q`` = page
    ``q``) and no ``wide`` range ``[ws, we)`` (PFNs) holds ``p``. Pages past
    the bitmap's end count as touched. Returns sorted ``(start, end)`` PFN runs.
    """
    nbits = len(bitmap) * 8
    out: list[tuple[int, int]] = []
    append = out.append
    for i in range(0, len(runs), 2):
        s, e = runs[i], min(runs[i + 1], nbits)
        if e <= s:
            continue
        w0, w1 = s >> 6, (e + 63) >> 6
        chunk = bitmap[w0 << 3 : w1 << 3]
        bits = (int.from_bytes(chunk, "little") >> (s & 63)) & ((1 << (e - s)) - 1)
        if not bits:
            append((s, e))
            continue
        # Split: interior words by the byte search, the two edge words by
        # their bits inside the run (the run may share them with used pages).
        lo_end = min(e, (w0 + 1) << 6)
        if not (bits & ((1 << (lo_end - s)) - 1)):
            append((s, lo_end))
        if w1 - w0 > 2:
            for a, b in _clean_words(chunk[8 : (w1 - w0 - 1) << 3], w0 + 1):
                append((a << 6, b << 6))
        if w1 - w0 > 1:
            hi_start = (w1 - 1) << 6
            if not (bits >> (hi_start - s)):
                append((hi_start, e))
    if out:
        out = _merge(out)
    if wide:
        out = _minus(out, _merge(sorted(wide)))
    return out


def _merge(rs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged = [rs[0]]
    for s, e in rs[1:]:
        ps, pe = merged[-1]
        if s <= pe:
            merged[-1] = (ps, max(pe, e))
        else:
            merged.append((s, e))
    return merged


def _minus(rs: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted runs minus sorted, merged holes."""
    out = []
    j = 0
    for s, e in rs:
        while j < len(holes) and holes[j][1] <= s:
            j += 1
        k = j
        while s < e and k < len(holes) and holes[k][0] < e:
            hs, he = holes[k]
            if hs > s:
                out.append((s, hs))
            s = max(s, he)
            k += 1
        if s < e:
            out.append((s, e))
    return out


class TrackedSet:
    """The free runs found since the bitmap was last cleared.

    The scanner resets it when a scan clears the bitmap and adds each part
    as it is yielded; both, and :meth:`answer`, run under the scanner's lock,
    so an answer never reads a bitmap half cleared or runs of an older scan.
    Byte addresses throughout; 40 bytes a run, plus a bitmap of its pages.
    """

    def __init__(self, subtract: bool = True) -> None:
        self.began = 0.0
        self.valid = False
        #: Tests only: False answers with the runs as scanned (what the churn
        #: test's checker must catch).
        self.subtract = subtract
        self._reset(0)

    def _reset(self, nbytes: int) -> None:
        self._bs = array("Q")  # run starts
        self._be = array("Q")  # run ends
        self._words = array("Q")  # the packed words: start - previous start, length
        self._cum = array("Q", [0])  # pages of runs [0, i)
        self._mine = bytearray(nbytes)  # bit per page: in a run
        self._mine_int: int | None = 0

    def reset(self, began: float, bitmap_bytes: int) -> None:
        """A scan cleared the bitmap (``bitmap_bytes`` long) at ``began``:
        older runs mean nothing now."""
        self._reset(bitmap_bytes)
        self.began = began
        self.valid = True

    def clear(self) -> None:
        """The gate closed: nothing is tracked."""
        self._reset(0)
        self.valid = False

    def add(self, ranges: Sequence[tuple[int, int]]) -> None:
        """A part's byte ranges (sorted, after every earlier part's)."""
        bs, be, words, cum, mine = self._bs, self._be, self._words, self._cum, self._mine
        nbits = len(mine) * 8
        for start, length in ranges:
            s, e = start >> PAGE_SHIFT, min(nbits, (start + length) >> PAGE_SHIFT)
            if s < e:  # the run's bits (pages past the bitmap are never kept)
                a, b = -(-s // 8), e // 8
                if a < b:
                    mine[a:b] = _ONES[: b - a] if b - a <= len(_ONES) else b"\xff" * (b - a)
                for p in (*range(s, min(e, a * 8)), *range(max(s, b * 8, a * 8), e)):
                    mine[p >> 3] |= 1 << (p & 7)
            if be and be[-1] == start:  # continues the last run (a part boundary)
                be[-1] += length
                words[-1] += length
                cum[-1] += length >> PAGE_SHIFT
                continue
            words.append(start - (bs[-1] if bs else 0))
            words.append(length)
            bs.append(start)
            be.append(start + length)
            cum.append(cum[-1] + (length >> PAGE_SHIFT))
        self._mine_int = None

    @property
    def pages(self) -> int:
        return int(self._cum[-1])

    @property
    def runs(self) -> int:
        return len(self._bs)

    def _touched_stretches(self, bitmap: memoryview) -> list[tuple[int, int]]:
        """Byte stretches ``[a, b)`` of ``bitmap`` with a set bit of a tracked page."""
        if self._mine_int is None:
            self._mine_int = int.from_bytes(self._mine, "little")
        n = len(self._mine)
        both = int.from_bytes(bitmap[:n], "little") & self._mine_int
        if not both:
            return []
        flags = both.to_bytes(n, "little").translate(_NONZERO)
        out = []
        pos = flags.find(1)
        while pos >= 0:
            end = flags.find(0, pos)
            if end < 0:
                end = n
            out.append((pos, end))
            pos = flags.find(1, end)
        return out

    def answer(self, bitmap: memoryview, wide: Sequence[tuple[int, int]]) -> TrackedAnswer | None:
        """What is free now (:func:`subtract`'s rule), or None when nothing is tracked.

        ``bitmap`` must be as long as at :meth:`reset`; ``wide``: PFN ranges
        of events too wide for the bitmap.
        """
        if not self.valid:
            return None
        t0 = time.monotonic()
        bs, be, words, cum = self._bs, self._be, self._words, self._cum
        n = len(bs)
        if not self.subtract:
            return TrackedAnswer(array("Q", words), n, self.pages, self.pages, 0, 0, t0 - self.began, 0.0, t0)
        # Runs a set bit touches (in order), and runs wholly inside a wide range.
        hit: list[int] = []
        last = -1
        for a, b in self._touched_stretches(bitmap):
            i, j = bisect_right(be, a << BYTE_SHIFT), bisect_left(bs, b << BYTE_SHIFT)
            if i <= last:
                i = last + 1
            if i < j:
                hit.extend(range(i, j))
                last = j - 1
        limit = len(self._mine) << BYTE_SHIFT  # past the bitmap: touched
        tail = bisect_right(be, limit)
        if tail < n:
            hit = sorted(set(hit) | set(range(tail, n)))
        holes = _merge(sorted((s << PAGE_SHIFT, e << PAGE_SHIFT) for s, e in wide)) if wide else []
        stops: list[tuple[int, int, bool]] = [(k, k + 1, True) for k in hit]
        if holes:
            for hs, he in holes:
                i, j = bisect_right(be, hs), bisect_left(bs, he)
                if i < j and bs[i] < hs:
                    stops.append((i, i + 1, True))
                    i += 1
                if i < j and be[j - 1] > he:
                    stops.append((j - 1, j, True))
                    j -= 1
                if i < j:  # runs [i, j) lie inside the hole
                    stops.append((i, j, False))
            stops.sort()
        holes_pfn = [(s >> PAGE_SHIFT, e >> PAGE_SHIFT) for s, e in holes]
        out = array("Q")
        append = out.append
        prev = nr = pages = 0
        pos = 0
        stops.append((n, n, False))
        for i, j, split in stops:
            if j <= pos and i < n:
                continue
            if i < pos:
                i = pos
            if pos < i:  # runs [pos, i) untouched: copied as packed words
                append(bs[pos] - prev)
                out.extend(words[2 * pos + 1 : 2 * i])
                prev = bs[i - 1]
                nr += i - pos
                pages += cum[i] - cum[pos]
            if split:
                s, e = bs[i] >> PAGE_SHIFT, be[i] >> PAGE_SHIFT
                w0, w1 = s >> 6, (e + 63) >> 6
                if w1 - w0 == 1 and not holes_pfn:  # one word: all or nothing
                    bits = (
                        (bitmap[w0 << 3 : w1 << 3].cast("Q")[0] >> (s & 63)) & ((1 << (e - s)) - 1)
                        if e <= len(self._mine) * 8
                        else 1
                    )
                    pieces = [] if bits else [(s, e)]
                else:
                    pieces = subtract((s, e), bitmap, holes_pfn)
                for ps, pe in pieces:
                    append((ps << PAGE_SHIFT) - prev)
                    append((pe - ps) << PAGE_SHIFT)
                    prev = ps << PAGE_SHIFT
                    nr += 1
                    pages += pe - ps
            if j > pos:
                pos = j
        t1 = time.monotonic()
        return TrackedAnswer(out, nr, pages, self.pages, len(stops) - 1, len(wide), t1 - self.began, t1 - t0, t0)


_ONES = b"\xff" * 4096
#: bytes.translate table: every non-zero byte to 1.
_NONZERO = bytes([0] + [1] * 255)
