"""The packed range encoding of ``ReportChunk.ranges`` (protos/fphint/v1/hints.proto).

Each range is two numbers in a packed ``repeated uint64`` (protobuf writes them
as varints): the distance of its start from the previous range's start, then
its length. Start deltas keep the numbers small for a sorted scan, and because
a delta is measured from the previous *start*, an overlap is expressible and
therefore checkable: a well-formed call is sorted and overlap-free.

The state (previous start and end) carries across the chunks of one Report
call, so a chunk cannot be understood without the ones before it; sequence
numbers guarantee their order.

This module is the exact reference (Python integers, no wrap-around). The
collector decodes with numpy for speed and is property-tested against it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from .errors import FphintError

#: One past the largest guest-physical address.
ADDRESS_SPACE_END = 1 << 64


class RangeError(FphintError):
    """A packed range list that no well-behaved agent produces."""


@dataclass
class CodecState:
    """Where the previous range of the call started and ended."""

    prev_start: int = 0
    prev_end: int = 0


def encode(ranges: Iterable[tuple[int, int]], state: CodecState | None = None) -> list[int]:
    """Pack (start, length) pairs; ``state`` continues a call across chunks.

    :raise RangeError: on unsorted or overlapping input, or addresses beyond 2**64.
    """
    st = state if state is not None else CodecState()
    out: list[int] = []
    append = out.append
    prev_start, prev_end = st.prev_start, st.prev_end
    for start, length in ranges:
        if start < prev_end or length < 0 or start >= ADDRESS_SPACE_END or start + length > ADDRESS_SPACE_END:
            raise RangeError(f"range {start:#x}+{length:#x} is unsorted, overlapping or beyond 2**64")
        append(start - prev_start)
        append(length)
        prev_start, prev_end = start, start + length
    st.prev_start, st.prev_end = prev_start, prev_end
    return out


def decode(words: Sequence[int], state: CodecState | None = None) -> list[tuple[int, int]]:
    """Unpack a chunk into (start, length) pairs, checking every rule exactly.

    :raise RangeError: odd word count, a word that is not a uint64, a start or
        end beyond 2**64, or a range that starts before the previous one ended.
    """
    if len(words) % 2:
        raise RangeError(f"odd number of packed words ({len(words)})")
    st = state if state is not None else CodecState()
    prev_start, prev_end = st.prev_start, st.prev_end
    out: list[tuple[int, int]] = []
    for i in range(0, len(words), 2):
        delta, length = words[i], words[i + 1]
        if not (0 <= delta < ADDRESS_SPACE_END and 0 <= length < ADDRESS_SPACE_END):
            raise RangeError(f"range {i // 2}: packed words must be uint64")
        start = prev_start + delta
        if start >= ADDRESS_SPACE_END or start + length > ADDRESS_SPACE_END:
            raise RangeError(f"range {i // 2} reaches beyond 2**64")
        if start < prev_end:
            raise RangeError(f"range {i // 2} at {start:#x} overlaps the previous one (ends {prev_end:#x})")
        out.append((start, length))
        prev_start, prev_end = start, start + length
    st.prev_start, st.prev_end = prev_start, prev_end
    return out


def chunked(ranges: Sequence[tuple[int, int]], per_chunk: int) -> Iterator[list[int]]:
    """Encode ``ranges`` as consecutive chunks of at most ``per_chunk`` ranges."""
    if per_chunk < 1:
        raise ValueError("per_chunk must be at least 1")
    state = CodecState()
    for i in range(0, len(ranges), per_chunk):
        yield encode(ranges[i : i + per_chunk], state)


def coalesce(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort and merge touching or overlapping ranges; drop empty ones."""
    out: list[tuple[int, int]] = []
    for start, length in sorted(r for r in ranges if r[1] > 0):
        if out and start <= out[-1][0] + out[-1][1]:
            s0, l0 = out[-1]
            out[-1] = (s0, max(s0 + l0, start + length) - s0)
        else:
            out.append((start, length))
    return out
