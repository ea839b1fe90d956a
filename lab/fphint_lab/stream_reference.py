"""A slow, plain reference reader of the main channel, for differential fuzzing.

Written from the byte layouts (qemu-stream.md, QEMU 7.2's loader) separately
from host_collector/stream/parser.py and without its fast paths,
incremental state or buffer handover: one pass over a complete byte string.
It applies the same acceptance rules (what the proxy may prove), so on any
input both must report the same PAGE records and stop at the same byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field


class _Stop(Exception):
    def __init__(self, at: int) -> None:
        self.at = at


class _Short(Exception):
    pass


@dataclass
class Reference:
    #: (start, end, block, page) of every PAGE record accepted.
    pages: list[tuple[int, int, str, int]] = field(default_factory=list)
    #: Offset of the first item not accepted, if any.
    stop: int | None = None
    #: The ram END section (with its footer) was read: the rest is device state.
    complete: bool = False


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.d = data
        self.p = 0

    def take(self, n: int) -> bytes:
        if self.p + n > len(self.d):
            raise _Short
        b = self.d[self.p : self.p + n]
        self.p += n
        return b

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def peek(self) -> int:
        if self.p >= len(self.d):
            raise _Short
        return self.d[self.p]


def reference_read(data: bytes) -> Reference:
    out = Reference()
    r = _Reader(data)
    try:
        _read(r, out)
    except _Stop as e:
        out.stop = e.at
    except _Short:
        pass
    return out


def _ascii(b: bytes) -> str | None:
    try:
        return b.decode("ascii")
    except UnicodeDecodeError:
        return None


def _read(r: _Reader, out: Reference) -> None:
    if r.u32() != 0x5145564D or r.u32() != 3:
        raise _Stop(0)
    ignore_shared = False
    if r.peek() == 0x07:
        r.u8()
        n = r.u32()
        if n > 255:
            raise _Stop(r.p - 5)
        r.take(n)
        while r.peek() == 0x05:
            at = r.p
            r.u8()
            sub = r.take(r.u8())
            if r.u32() != 1:
                raise _Stop(at)
            if sub == b"configuration/target-page-bits":
                if r.u32() != 12:
                    raise _Stop(at)
            elif sub == b"configuration/uuid":
                r.take(16)
            elif sub == b"configuration/capabilities":
                count = r.u32()
                if count > 64:
                    raise _Stop(at)
                caps = [r.take(r.u8()) for _ in range(count)]
                if any(c != b"x-ignore-shared" for c in caps):
                    raise _Stop(at)
                ignore_shared = bool(caps)
            else:
                raise _Stop(at)
    ram_id: int | None = None
    blocks: dict[str, int] = {}
    current: str | None = None
    footers: bool | None = None
    ended = False
    while True:
        at = r.p
        kind = r.u8()
        if kind == 0x08:
            cmd, length = r.u16(), r.u16()
            if {1: 0, 2: 4, 11: 0}.get(cmd) != length:
                raise _Stop(at)
            r.take(length)
            continue
        if kind == 0x01:
            sid = r.u32()
            idstr = r.take(r.u8())
            inst, ver = r.u32(), r.u32()
            if idstr != b"ram" or inst != 0 or ver != 4 or ram_id is not None:
                raise _Stop(at)
            ram_id = sid
            # the setup payload: MEM_SIZE, its list, EOS
            rec = r.p
            w = r.u64()
            if w & 0xFFF != 0x04:
                raise _Stop(rec)
            total = w & ~0xFFF
            seen = 0
            while seen < total:
                listed = _ascii(r.take(r.u8()))
                used = r.u64()
                if ignore_shared:
                    r.u64()
                if not listed or listed in blocks or used == 0 or used % 4096:
                    raise _Stop(rec)
                blocks[listed] = used
                seen += used
            if seen != total or not blocks:
                raise _Stop(rec)
            if r.u64() != 0x10:
                raise _Stop(r.p - 8)
        elif kind in (0x02, 0x03):
            sid = r.u32()
            if sid != ram_id or not blocks or ended:
                raise _Stop(at)
            ended = kind == 0x03
            while True:
                rec = r.p
                w = r.u64()
                flags, addr = w & 0xFFF, w & ~0xFFF
                if w == 0x10:
                    break
                if flags & ~0x20 not in (0x02, 0x08):
                    raise _Stop(rec)
                if flags & 0x20:
                    if current is None:
                        raise _Stop(rec)
                    block = current
                else:
                    named = _ascii(r.take(r.u8()))
                    if named is None or named not in blocks:
                        raise _Stop(rec)
                    block = named
                if addr >= blocks[block]:
                    raise _Stop(rec)
                if flags & 0x08:
                    r.take(4096)
                    out.pages.append((rec, r.p, block, addr >> 12))
                elif r.u8() != 0:
                    raise _Stop(rec)
                current = block
        else:
            raise _Stop(at)
        # after a ram payload: a footer or none, the same way every time
        at = r.p
        if r.peek() == 0x7E:
            r.u8()
            if r.u32() != ram_id or footers is False:
                raise _Stop(at)
            footers = True
        else:
            if footers:
                raise _Stop(at)
            footers = False
        if ended:
            out.complete = True
            return
