"""The tracked answer's subtraction (guest_agent.sources.ebpf.tracked), no BPF:
the fast path (packed words, slices, bisection) equals the plain rule page for
page on random bitmaps, runs and wide ranges, and that rule is the one the
safety argument states (docs/safety-rule.md §5.6)."""

from __future__ import annotations

import itertools
import random
from array import array

import pytest

from fphint import ranges
from guest_agent.sources.ebpf.tracked import TrackedSet, subtract

PAGE = 4096


def touched_rule(runs: list[tuple[int, int]], bm: bytes, wide: list[tuple[int, int]]) -> set[int]:
    """Page by page: kept iff no set bit among its run's pages in its 64-page
    word, no wide range holds it, and it lies inside the bitmap."""
    nbits = len(bm) * 8
    keep = set()
    for s, e in runs:
        for p in range(s, e):
            w = p >> 6
            word_pages = range(max(s, w << 6), min(e, (w + 1) << 6))
            if p >= nbits or any(q >= nbits or bm[q >> 3] >> (q & 7) & 1 for q in word_pages):
                continue
            if any(a <= p < b for a, b in wide):
                continue
            keep.add(p)
    return keep


def random_case(rnd: random.Random) -> tuple[list[tuple[int, int]], bytearray, list[tuple[int, int]]]:
    words = rnd.choice([1, 3, 8, 40])
    bm = bytearray(words * 8)
    for _ in range(rnd.randint(0, 3 * words)):
        q = rnd.randrange(words * 64)
        bm[q >> 3] |= 1 << (q & 7)
    if rnd.random() < 0.2:  # a dense stretch
        a, k = rnd.randrange(len(bm)), rnd.randint(1, 16)
        bm[a : a + k] = b"\xff" * len(bm[a : a + k])
    runs: list[tuple[int, int]] = []
    p = rnd.randint(0, 3)
    while True:
        n = rnd.choice([1, 2, 3, 8, 63, 64, 65, 130, 300])
        if p + n > words * 64 + 70:
            break
        if runs and runs[-1][1] == p:  # a run cut by a part boundary: one run
            runs[-1] = (runs[-1][0], p + n)
        else:
            runs.append((p, p + n))
        p += n + rnd.choice([0, 1, 5, 70])
    wide = [
        (a, a + rnd.choice([1, 64, 500, 1 << 40]))
        for a in (rnd.randrange(words * 64 + 1) for _ in range(rnd.choice([0, 0, 1, 2])))
    ]
    return runs, bm, wide


def pages_of(pfn_runs: list[tuple[int, int]]) -> set[int]:
    return {p for s, e in pfn_runs for p in range(s, e)}


@pytest.mark.parametrize("seed", range(4))
def test_fast_path_equals_the_rule(seed: int) -> None:
    rnd = random.Random(seed)
    for _ in range(100):
        runs, bm, wide = random_case(rnd)
        flat = [x for r in runs for x in r]
        plain = subtract(flat, memoryview(bm), wide)
        assert pages_of(plain) == touched_rule(runs, bytes(bm), wide)
        ts = TrackedSet()
        ts.reset(0.0, len(bm))
        # Parts end where they like: a run cut by a part boundary joins up again.
        pieces = [(s * PAGE, (e - s) * PAGE) for s, e in runs]
        cut = rnd.randrange(len(pieces) + 1)
        if pieces and cut < len(pieces) and pieces[cut][1] > PAGE and rnd.random() < 0.5:
            s, n = pieces[cut]
            pieces[cut : cut + 1] = [(s, PAGE), (s + PAGE, n - PAGE)]
            cut += 1
        ts.add(pieces[:cut])
        ts.add(pieces[cut:])
        ans = ts.answer(memoryview(bm), wide)
        assert ans is not None
        got = ans.ranges
        assert ranges.decode(list(ans.words)) == got  # the words are the wire's encoding
        assert ans.nranges == len(got) and ans.pages == sum(n for _, n in got) // PAGE
        assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(got)), "sorted, not overlapping"
        assert {p for s, n in got for p in range(s // PAGE, (s + n) // PAGE)} == pages_of(plain)


def test_clean_bitmap_keeps_every_run_without_splitting() -> None:
    ts = TrackedSet()
    bm = bytearray(10000 * 10 // 8 + 8)
    ts.reset(0.0, len(bm))
    rs = [(i * 10 * PAGE, 3 * PAGE) for i in range(1000)]
    ts.add(rs)
    ans = ts.answer(memoryview(bm), [])
    assert ans is not None and ans.ranges == rs and ans.split_runs == 0


def test_nothing_tracked_before_a_scan() -> None:
    ts = TrackedSet()
    assert ts.answer(memoryview(bytearray(8)), []) is None
    ts.reset(0.0, 8)
    ts.clear()
    assert ts.answer(memoryview(bytearray(8)), []) is None


def test_subtract_drops_a_touched_word_not_its_neighbours() -> None:
    bm = bytearray(8 * 4)
    bm[8 + 3] = 0x10  # page 64 + 28
    assert subtract(array("Q", [0, 256]), memoryview(bm)) == [(0, 64), (128, 256)]
