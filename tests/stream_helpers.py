"""Synthetic migration streams, test gates and a loopback harness for the proxy.

:class:`StreamBuilder` writes a main-channel stream from the layouts in
qemu-stream.md and, alongside, the stream the proxy must produce when the
pages marked ``hinted`` are zeroed: an expectation built independently of the
proxy's own code.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable, Iterable, Set
from dataclasses import dataclass, field

from fphint_lab.proxy_loopback import run_proxy as run_proxy  # the fuzz targets use it too
from host_collector.proxy.migration_proxy import MigrationProxy
from host_collector.rewrite.gate import PageOracle, RewriteGate

PAGE = 4096


def be16(v: int) -> bytes:
    return struct.pack(">H", v)


def be32(v: int) -> bytes:
    return struct.pack(">I", v)


def be64(v: int) -> bytes:
    return struct.pack(">Q", v)


@dataclass
class StreamBuilder:
    """Appends items to ``orig`` and their expected rewritten form to ``want``."""

    orig: bytearray = field(default_factory=bytearray)
    want: bytearray = field(default_factory=bytearray)
    #: (start offset, end offset, block, page) of every PAGE record in ``orig``.
    pages: list[tuple[int, int, str, int]] = field(default_factory=list)
    footers: bool = True
    _last_block: str | None = None

    def raw(self, data: bytes) -> StreamBuilder:
        self.orig += data
        self.want += data
        return self

    def header(self, version: int = 3) -> StreamBuilder:
        return self.raw(b"QEVM" + be32(version))

    def config(self, machine: bytes = b"pc-q35-7.2", subsections: Iterable[bytes] = ()) -> StreamBuilder:
        self.raw(b"\x07" + be32(len(machine)) + machine)
        for sub in subsections:
            self.raw(sub)
        return self

    @staticmethod
    def subsection(name: bytes, payload: bytes, version: int = 1) -> bytes:
        return b"\x05" + bytes([len(name)]) + name + be32(version) + payload

    @classmethod
    def caps(cls, *names: bytes) -> bytes:
        body = be32(len(names)) + b"".join(bytes([len(n)]) + n for n in names)
        return cls.subsection(b"configuration/capabilities", body)

    def command(self, cmd: int, data: bytes = b"") -> StreamBuilder:
        return self.raw(b"\x08" + be16(cmd) + be16(len(data)) + data)

    def section_start(
        self, sid: int, idstr: bytes, instance: int = 0, version: int = 4, kind: int = 1
    ) -> StreamBuilder:
        return self.raw(bytes([kind]) + be32(sid) + bytes([len(idstr)]) + idstr + be32(instance) + be32(version))

    def start_ram(self, sid: int, blocks: dict[str, int], ignore_shared: bool = False) -> StreamBuilder:
        self.section_start(sid, b"ram")
        self.raw(be64(sum(blocks.values()) | 0x04))
        for name, size in blocks.items():
            self.raw(bytes([len(name)]) + name.encode() + be64(size))
            if ignore_shared:
                self.raw(be64(0xFEED0000))
        return self.eos().footer(sid)

    def part(self, sid: int) -> StreamBuilder:
        return self.raw(b"\x02" + be32(sid))

    def end(self, sid: int) -> StreamBuilder:
        return self.raw(b"\x03" + be32(sid))

    def eos(self) -> StreamBuilder:
        return self.raw(be64(0x10))

    def footer(self, sid: int) -> StreamBuilder:
        if self.footers:
            self.raw(b"\x7e" + be32(sid))
        return self

    def _hdr(self, block: str, page: int, flag: int) -> tuple[bytes, bytes]:
        """(header word, idstr bytes), with CONTINUE when ``block`` is the last one named."""
        if block == self._last_block:
            return be64(page * PAGE | flag | 0x20), b""
        self._last_block = block
        return be64(page * PAGE | flag), bytes([len(block)]) + block.encode()

    def zero(self, block: str, page: int, fill: int = 0) -> StreamBuilder:
        w, name = self._hdr(block, page, 0x02)
        return self.raw(w + name + bytes([fill]))

    def page(self, block: str, page: int, data: bytes | None = None, hinted: bool = False) -> StreamBuilder:
        if data is None:
            data = bytes([(page * 7 + 1) % 251 + 1]) * PAGE
        assert len(data) == PAGE
        w, name = self._hdr(block, page, 0x08)
        start = len(self.orig)
        self.orig += w + name + data
        self.pages.append((start, len(self.orig), block, page))
        if hinted:
            flags_zero = struct.unpack(">Q", w)[0] & ~0x08 | 0x02
            self.want += be64(flags_zero) + name + b"\x00"
        else:
            self.want += w + name + data
        return self

    def full(self, sid: int, idstr: bytes, payload: bytes) -> StreamBuilder:
        return self.section_start(sid, idstr, version=1, kind=4).raw(payload).footer(sid)

    def eof(self, vmdesc: bytes = b'{"page_size": 4096, "devices": []}') -> StreamBuilder:
        return self.raw(b"\x00" + b"\x06" + be32(len(vmdesc)) + vmdesc)

    def forget_block(self) -> None:
        """Name the block again on the next page record (as QEMU does after a RAM list change)."""
        self._last_block = None


BLOCKS = {"pc.ram": 64 * PAGE, "pc.bios": 4 * PAGE, "/rom@etc/acpi/tables": 2 * PAGE}


def typical_stream(hinted: Set[tuple[str, int]] = frozenset(), *, return_path: bool = True) -> StreamBuilder:
    """A small stream shaped like QEMU 7.2's: setup, two PARTs, END, device state, EOF."""
    b = StreamBuilder()
    b.header().config()
    if return_path:
        b.command(1).command(2, be32(1))
    b.start_ram(2, BLOCKS)
    b.part(2)
    for pg in range(0, 40):
        if pg % 3 == 0:
            b.zero("pc.ram", pg)
        else:
            b.page("pc.ram", pg, hinted=("pc.ram", pg) in hinted)
    b.page("pc.bios", 0, hinted=("pc.bios", 0) in hinted)
    b.eos().footer(2)
    b.part(2)
    # Continues in pc.bios across the section boundary.
    b.page("pc.bios", 1, hinted=("pc.bios", 1) in hinted)
    b.page("pc.ram", 41, hinted=("pc.ram", 41) in hinted)
    b.eos().footer(2)
    b.end(2)
    # a re-send in the END section: never rewritten (the guest is stopped and
    # a sync ran before its pick, so no hint can apply to it)
    b.page("pc.ram", 41)
    b.zero("pc.ram", 63)
    b.eos().footer(2)
    b.full(3, b"timer", be64(123) + be64(456))
    b.eof()
    return b


class FixedGate(RewriteGate):
    """Everything is decided at once; ``free`` says which pages may be zeroed.

    Records every page it was asked about and every one it freed.
    """

    def __init__(self, free: dict[str, set[int]] | set[tuple[str, int]]) -> None:
        if isinstance(free, dict):
            free = {(b, p) for b, pages in free.items() for p in pages}
        self.free = set(free)
        self.asked: list[tuple[int, str, int]] = []
        self.rewritten: set[tuple[str, int]] = set()
        self.totals: list[int] = []
        self._end = 0

    def received(self, total: int) -> None:
        self.totals.append(total)

    def decided_through(self) -> int:
        return 1 << 62

    def oracle_for(self, end: int) -> PageOracle | None:
        self._end = end
        return self

    def is_free(self, block: str, page: int) -> bool:
        self.asked.append((self._end, block, page))
        if (block, page) in self.free:
            self.rewritten.add((block, page))
            return True
        return False

    def add_listener(self, callback: Callable[[], None]) -> None:
        pass


class SteppedGate(FixedGate):
    """Nothing is decided until the test calls :meth:`step`, like polls answering.

    ``step(upto, confirmed)`` decides every record ending at or before
    ``upto``: with the hints if ``confirmed``, unchanged (a poll that reported
    a new sync count) otherwise.
    """

    def __init__(self, free: dict[str, set[int]] | set[tuple[str, int]]) -> None:
        super().__init__(free)
        self.windows: list[tuple[int, bool]] = []  # (upto, confirmed), increasing
        self.listeners: list[Callable[[], None]] = []
        self.none_windows_asked: list[int] = []
        self.total = 0

    def received(self, total: int) -> None:
        super().received(total)
        self.total = total

    def step(self, upto: int, confirmed: bool) -> None:
        assert not self.windows or upto > self.windows[-1][0]
        self.windows.append((upto, confirmed))
        for cb in self.listeners:
            cb()

    def decided_through(self) -> int:
        return self.windows[-1][0] if self.windows else 0

    def oracle_for(self, end: int) -> PageOracle | None:
        for upto, confirmed in self.windows:
            if end <= upto:
                if not confirmed:
                    self.none_windows_asked.append(end)
                    return None
                return super().oracle_for(end)
        raise AssertionError(f"oracle_for({end}) beyond decided_through {self.decided_through()}")

    def add_listener(self, callback: Callable[[], None]) -> None:
        self.listeners.append(callback)


class SpanSteppedGate(SteppedGate):
    """A :class:`SteppedGate` that also answers per window (``RewriteGate.oracle_until``)."""

    def __init__(self, free: dict[str, set[int]] | set[tuple[str, int]]) -> None:
        super().__init__(free)
        self.span_calls: list[int] = []
        self.per_record_calls = 0

    def oracle_for(self, end: int) -> PageOracle | None:
        self.per_record_calls += 1
        return super().oracle_for(end)

    def oracle_until(self, end: int) -> tuple[PageOracle | None, int]:
        self.span_calls.append(end)
        for upto, confirmed in self.windows:
            if end <= upto:
                self._end = end
                return (self if confirmed else None), upto
        raise AssertionError(f"oracle_until({end}) beyond decided_through")


@dataclass
class Loopback:
    """A fake source and destination around a :class:`MigrationProxy`."""

    proxy: MigrationProxy
    received: bytearray
    dest_conns: list[socket.socket]
    source: socket.socket | None = None
