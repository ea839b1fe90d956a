"""A consumer for a BPF ring buffer map, on its mmap'ed pages alone.

The map's user-visible layout (kernel/bpf/ringbuf.c): page 0 holds
``consumer_pos`` (the only page user space may write), page 1
``producer_pos``, then the data area, mapped twice in a row so a record that
wraps past the end reads as one contiguous slice. Each record starts with an
8-byte header whose first u32 is its length, with BUSY (still being written:
stop here) and DISCARD (skip it) in the top bits; records are 8-byte aligned.

Ordering: the producer position is read before the headers it covers and the
consumer position is written after the records are read. x86_64 keeps loads
in order and stores after loads (TSO), which is what the kernel's acquire and
release pair needs here; the source is x86_64-only (vmemmap_base) anyway.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
HDR_SIZE = 8
_U32 = struct.Struct("<I")

Handler = Callable[[memoryview], None]


class RingReader:
    """Reads records from a consumer word, a producer word and the doubled
    data area (any buffers: the mapped map, or plain memory in tests)."""

    def __init__(self, consumer: memoryview, producer: memoryview, data: memoryview, size: int) -> None:
        if size <= 0 or size & (size - 1) or len(data) < 2 * size:
            raise ValueError(f"ring size {size} is not a power of two mapped twice")
        self._cons = consumer.cast("Q") if consumer.format != "Q" else consumer
        self._prod = producer.cast("Q") if producer.format != "Q" else producer
        self._data = data
        self._mask = size - 1
        #: Records one call reads at most (a ring full of the smallest records).
        self.limit = size // HDR_SIZE

    def consume(self, handler: Handler, limit: int | None = None) -> int:
        """Hand every complete record to ``handler`` (at most ``limit``); return how many.

        Discarded records are skipped; a busy one ends the call (the producer
        is still writing it and records after it wait for it).
        """
        cons = self._cons[0]
        n = 0
        cap = self.limit if limit is None else min(limit, self.limit)
        while n < cap:
            prod = self._prod[0]
            if cons >= prod:
                break
            while cons < prod and n < cap:
                off = cons & self._mask
                hdr = _U32.unpack_from(self._data, off)[0]
                if hdr & BUSY_BIT:
                    self._cons[0] = cons
                    return n
                length = hdr & ~(BUSY_BIT | DISCARD_BIT)
                if not hdr & DISCARD_BIT:
                    handler(self._data[off + HDR_SIZE : off + HDR_SIZE + length])
                    n += 1
                cons += (length + HDR_SIZE + 7) & ~7
                self._cons[0] = cons
        return n


class RingBuffer:
    """A ring buffer map's pages mapped into this process, with a reader."""

    def __init__(self, map_fd: int, size: int) -> None:
        page = mmap.PAGESIZE
        self._maps = [
            mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0),
            mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page),
        ]
        cons, prod = (memoryview(m) for m in self._maps)
        self._views = [cons, prod, cons[:8].cast("Q"), prod[:8].cast("Q"), prod[page:]]
        self.reader = RingReader(self._views[2], self._views[3], self._views[4], size)

    def consume(self, handler: Handler, limit: int | None = None) -> int:
        return self.reader.consume(handler, limit)

    def close(self) -> None:
        for v in reversed(self._views):
            v.release()
        self._views.clear()
        for m in self._maps:
            m.close()
        self._maps.clear()
