"""The packed range codec: the exact reference and the collector's numpy decoder
must agree on every input, including the 2**64 edge and empty ranges."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fphint import ranges
from host_collector.hintcheck import HintViolation, LayoutIndex, ReportDecoder
from host_collector.layout import RamLayout, RamRange

END = 1 << 64
u64 = st.integers(min_value=0, max_value=END - 1)
edge = st.sampled_from([0, 1, 4095, 4096, END - 4097, END - 4096, END - 4095, END - 2, END - 1])
num = st.one_of(u64, edge, st.integers(0, 1 << 20))


@st.composite
def sorted_ranges(draw: st.DrawFn) -> list[tuple[int, int]]:
    out = []
    pos = draw(st.one_of(st.integers(0, 1 << 40), edge))
    for _ in range(draw(st.integers(0, 30))):
        if pos >= END:
            break
        start = min(pos + draw(st.one_of(st.just(0), st.integers(0, 1 << 30), edge)), END - 1)
        length = draw(st.one_of(st.just(0), st.integers(1, 1 << 24), st.integers(0, END - start)))
        length = min(length, END - start)
        out.append((start, length))
        pos = start + length
    return out


@given(sorted_ranges(), st.integers(1, 7))
def test_roundtrip_in_chunks(rs: list[tuple[int, int]], per_chunk: int) -> None:
    state = ranges.CodecState()
    decoded = []
    for words in ranges.chunked(rs, per_chunk):
        decoded += ranges.decode(words, state)
    assert decoded == rs


@given(st.lists(num, max_size=24))
def test_decoder_rules_are_exact(words: list[int]) -> None:
    """Any word list: either both the reference and a replay of its rules accept
    it with the same ranges, or the reference refuses it for a stated rule."""
    try:
        got = ranges.decode(words)
    except ranges.RangeError:
        got = None
    prev_start = prev_end = 0
    expect: list[tuple[int, int]] | None = []
    if len(words) % 2:
        expect = None
    else:
        for i in range(0, len(words), 2):
            s, n = prev_start + words[i], words[i + 1]
            if s >= END or s + n > END or s < prev_end:
                expect = None
                break
            assert expect is not None
            expect.append((s, n))
            prev_start, prev_end = s, s + n
    assert got == expect


def test_encode_refuses_unsorted_and_overlap() -> None:
    with pytest.raises(ranges.RangeError):
        ranges.encode([(8192, 4096), (4096, 4096)])
    with pytest.raises(ranges.RangeError):
        ranges.encode([(0, 8192), (4096, 4096)])
    with pytest.raises(ranges.RangeError):
        ranges.encode([(END - 4096, 8192)])
    assert ranges.encode([(END - 4096, 4096)]) == [END - 4096, 4096]


def test_coalesce() -> None:
    assert ranges.coalesce([(8192, 4096), (0, 4096), (4096, 4096), (100, 0)]) == [(0, 12288)]


# The numpy decoder against the reference: a layout covering the whole 64-bit
# space (one block per 2**62 bytes) so that only the encoding rules can refuse.
WHOLE = RamLayout.from_ranges([RamRange(gpa=i << 62, size=1 << 62, block=f"b{i}", offset=0) for i in range(4)])


@settings(max_examples=400)
@given(st.lists(num, max_size=24), st.integers(1, 6))
@example([0, 4096, 4095, 1], 1)  # one byte of overlap
@example([0, 4096, 4096, 4096], 1)  # touching is fine
@example([0, 8192, 4096, 0], 2)  # an empty range inside the previous one
@example([END - 4096, 4096, 0, 0], 1)  # ends exactly at 2**64
@example([END - 4096, 4097], 1)  # one byte beyond 2**64
@example([END - 1, 0, 1, 0], 2)  # the next start wraps
def test_numpy_decoder_matches_reference(words: list[int], split: int) -> None:
    if len(words) % 2:
        with pytest.raises(HintViolation):
            ReportDecoder(LayoutIndex(WHOLE)).decode(words)
        return
    try:
        ref = ranges.decode(words)
    except ranges.RangeError:
        ref = None
    dec = ReportDecoder(LayoutIndex(WHOLE))
    got: list[tuple[str, int, int]] = []
    accepted = rejected = 0
    refused = False
    cut = max(2, (len(words) // split) // 2 * 2)
    for i in range(0, len(words), cut):  # fed in pieces, as chunks of one call
        try:
            p = dec.decode(words[i : i + cut])
        except HintViolation:
            refused = True
            break
        accepted += p.accepted
        rejected += p.rejected
        got += [(p.blocks[b], f, c) for b, f, c in zip(p.block_idx.tolist(), p.first.tolist(), p.count.tolist())]
    assert refused == (ref is None)
    if ref is not None:
        whole = [(s, n) for s, n in ref if -(-s // 4096) < (s + n) // 4096]
        assert accepted == len(whole)
        assert rejected == len(ref) - len(whole)
        expect = []
        for s, n in whole:
            pg, last = -(-s // 4096), (s + n) // 4096  # trimmed inward to whole pages
            while pg < last:  # split at block ends (2**50 pages per block)
                block_end = ((pg >> 50) + 1) << 50
                stop = min(last, block_end)
                expect.append((f"b{pg >> 50}", pg & ((1 << 50) - 1), stop - pg))
                pg = stop
        assert sorted(got) == sorted(expect)
