"""Incremental parser of the migration stream's main channel.

The parser finds every PAGE record the proxy may turn into a ZERO record and
proves that everything around it is understood. It owns no I/O and no policy:
it reads complete items from a buffer, reports page records and phase changes,
and gives up (``fallback``) at the first item it cannot parse with certainty.
What to do with a give-up after rewrites were made is the proxy's business.

Items are parsed whole: an item cut by the end of the buffer is parsed again
from its first byte once more bytes arrived, so the parser keeps no state
inside an item. No item it accepts is longer than :data:`MAX_ITEM` bytes.
The one exception is the MEM_SIZE block list, the only item that can be long
(up to :data:`MAX_ITEM`) and made of many parts: the parser remembers the
entries it has read, so a list that arrives a byte at a time costs time
linear in its length, not quadratic. Every other item is at most a few KiB,
so parsing stays linear in the stream however the source slices it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from host_collector.stream import wire as s
from host_collector.stream.wire import Phase

#: Largest item (record, section header, configuration) the parser buffers.
#: A PAGE record with the longest block name is 8 + 1 + 255 + 4096 bytes; a
#: MEM_SIZE list of a real VM a few KiB.
MAX_ITEM = 256 * 1024

#: A PAGE record as the parser reports it: (first byte, byte after the last,
#: block idstr, page index). Positions are indexes into the buffer fed; the
#: 4096 data bytes are the last 4096 of the record and the flags byte is at
#: first byte + 7.
PageRecord = tuple[int, int, str, int]

_U16 = s.U16.unpack_from
_U32 = s.U32.unpack_from
_U64 = s.U64.unpack_from
_PAGE = s.PAGE_SIZE
_PAGE_CONT = s.FLAG_PAGE | s.FLAG_CONTINUE
_ZERO_CONT = s.FLAG_ZERO | s.FLAG_CONTINUE
_FLAGS = s.FLAGS_MASK
_ADDR = ~s.FLAGS_MASK

#: Set (to anything but "" or "0") to parse with the pure-Python loop even
#: when the C accelerator is built.
NO_C_ENV = "FPH_NO_C_PARSER"

#: ``continue_records(buf, pos, end, block, block_len, pages) -> (pos, zeros)``
#: of the optional ``_fastparse`` extension: the CONTINUE PAGE/ZERO part of
#: :meth:`StreamParser._ram_records`, in C.
ContinueRecords = Callable[[bytearray, int, int, str, int, list[PageRecord]], tuple[int, int]]


def _load_accelerator() -> tuple[ContinueRecords | None, str]:
    try:
        from host_collector.stream._fastparse import continue_records
    except ImportError as e:  # not built (no compiler or headers at install time)
        return None, f"C extension not available ({e})"
    return continue_records, ""


_C_CONTINUE, _C_MISSING = _load_accelerator()


def accelerator() -> str:
    """Which record loop a default :class:`StreamParser` uses, and if Python, why."""
    if _C_CONTINUE is None:
        return f"python: {_C_MISSING}"
    if os.environ.get(NO_C_ENV, "") not in ("", "0"):
        return f"python: {NO_C_ENV} is set"
    return "c"


# Where the parser stands between items.
_HEADER = 0  # before "QEVM"
_CONFIG = 1  # after the version word: the configuration section or a top-level item
_TOP = 2  # expecting a top-level item
_RAM = 3  # inside a ram section payload
_FOOTER = 4  # after a ram payload's EOS


@dataclass(frozen=True)
class Fallback:
    """Why the parser stopped understanding the stream, and where."""

    reason: str
    #: Stream offset of the first byte of the item it could not parse.
    offset: int
    #: The phase the stream was in.
    phase: Phase


class _Unknown(Exception):
    def __init__(self, reason: str, pos: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.pos = pos


class _NeedMore(Exception):
    """The item starting at the current position is not complete yet."""


def _name(raw: bytes) -> str | None:
    """A RAMBlock idstr as the rest of the collector spells it, or None if not ASCII."""
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return None


class StreamParser:
    """Parses the main channel chunk by chunk; see the module docstring.

    ``feed`` appends to :attr:`pages` and :attr:`transitions`; the caller
    empties them after each call.

    ``accelerate``: None (default) parses runs of CONTINUE records with the C
    extension when it is built and :data:`NO_C_ENV` is not set; False never
    does; True requires it. Results are the same either way.
    """

    def __init__(self, *, accelerate: bool | None = None) -> None:
        if accelerate is None:
            accelerate = accelerator() == "c"
        elif accelerate and _C_CONTINUE is None:
            raise RuntimeError(_C_MISSING)
        #: The C loop for runs of CONTINUE records, if used.
        self._c_continue = _C_CONTINUE if accelerate else None
        self.phase = Phase.HEADER
        self.fallback: Fallback | None = None
        #: PAGE records completed by the last ``feed`` calls.
        self.pages: list[PageRecord] = []
        #: (phase, stream offset of the item that entered it), in order.
        self.transitions: list[tuple[Phase, int]] = []
        #: RAMBlocks listed by MEM_SIZE: idstr -> used_length in bytes.
        self.blocks: dict[str, int] = {}
        self.zero_records = 0
        self.page_records = 0
        self._state = _HEADER
        self._base = 0
        self._ram_id: int | None = None
        self._ram_kind = 0
        self._mem_size_seen = False
        self._footers: bool | None = None
        self._ignore_shared = False
        self._block: str | None = None  # the block CONTINUE refers to
        self._block_len = 0
        #: A MEM_SIZE list cut by the end of the buffer: (stream offset of
        #: the item, of its next entry, the blocks read so far, their sum).
        self._mem_partial: tuple[int, int, dict[str, int], int] | None = None

    @property
    def accelerated(self) -> bool:
        """Whether runs of CONTINUE records are parsed by the C extension."""
        return self._c_continue is not None

    @property
    def parsing(self) -> bool:
        """Whether bytes still go through the parser (not yet device state or pass-through)."""
        return self.phase is not Phase.DEVICE_STATE and self.phase is not Phase.PASSTHROUGH

    def feed(self, buf: bytearray, pos: int, end: int, base: int) -> int:
        """Parse the complete items in ``buf[pos:end]``; ``buf[0]`` is stream offset ``base``.

        Returns the position of the first byte not parsed: the start of an
        incomplete item, or of the item the parser gave up at, or ``end``.
        Bytes from there on are plain relay once :attr:`parsing` is false.
        """
        if not self.parsing:
            return end
        self._base = base
        try:
            while pos < end:
                st = self._state
                if st == _RAM:
                    new = self._ram_records(buf, pos, end)
                    if new == pos and self._state == _RAM:  # the next record is incomplete
                        break
                    pos = new
                elif st == _TOP:
                    pos = self._top_item(buf, pos, end)
                elif st == _FOOTER:
                    pos = self._footer(buf, pos, end)
                elif st == _CONFIG:
                    pos = self._config(buf, pos, end)
                else:
                    pos = self._header(buf, pos, end)
                if self.phase is Phase.DEVICE_STATE:
                    return end
        except _NeedMore:
            pass
        except _Unknown as e:
            self._give_up(e.reason, e.pos)
            return e.pos
        if end - pos > MAX_ITEM:
            self._give_up(f"an item longer than {MAX_ITEM} bytes", pos)
        return pos

    def give_up(self, reason: str, offset: int) -> None:
        """Stop parsing for a reason found outside the stream (e.g. an extra connection)."""
        if self.parsing:
            self.fallback = Fallback(reason, offset, self.phase)
            self._enter(Phase.PASSTHROUGH, offset)

    # -- internals -------------------------------------------------------

    def _give_up(self, reason: str, pos: int) -> None:
        self.give_up(reason, self._base + pos)

    def _enter(self, phase: Phase, pos_or_offset: int) -> None:
        self.phase = phase
        self.transitions.append((phase, pos_or_offset))

    def _header(self, buf: bytearray, pos: int, end: int) -> int:
        if end - pos < 4:
            raise _NeedMore
        magic = _U32(buf, pos)[0]
        if magic != s.FILE_MAGIC:  # judged as soon as the word is here (e.g. a TLS hello)
            raise _Unknown(f"no QEVM magic (first word {magic:#010x}): TLS or not a migration stream", pos)
        if end - pos < 8:
            raise _NeedMore
        version = _U32(buf, pos + 4)[0]
        if version != s.FILE_VERSION:
            raise _Unknown(f"stream version {version}", pos)
        self._state = _CONFIG
        return pos + 8

    def _config(self, buf: bytearray, pos: int, end: int) -> int:
        """The optional configuration section; the parser needs the byte after it."""
        if pos >= end:
            raise _NeedMore
        if buf[pos] != s.CONFIGURATION:
            self._state = _TOP
            self._enter(Phase.SETUP, self._base + pos)
            return pos
        p = pos + 1
        p, name_len = self._u32(buf, p, end)
        if name_len > 255:
            raise _Unknown(f"machine type name of {name_len} bytes", pos)
        p = self._skip(p, name_len, end)
        while True:
            if p >= end:
                raise _NeedMore
            if buf[p] != s.SUBSECTION:
                break
            p = self._config_subsection(buf, p, end)
        self._state = _TOP
        self._enter(Phase.SETUP, self._base + p)
        return p

    def _config_subsection(self, buf: bytearray, pos: int, end: int) -> int:
        if end - pos < 2:
            raise _NeedMore
        n = buf[pos + 1]
        p = self._skip(pos + 2, n, end)
        sub = bytes(buf[pos + 2 : p])
        p, version = self._u32(buf, p, end)
        if version != 1:
            raise _Unknown(f"configuration subsection {sub!r} version {version}", pos)
        if sub == s.SUB_TARGET_PAGE_BITS:
            p, bits = self._u32(buf, p, end)
            if bits != s.TARGET_PAGE_BITS:
                raise _Unknown(f"target page bits {bits}", pos)
            return p
        if sub == s.SUB_UUID:
            return self._skip(p, 16, end)
        if sub == s.SUB_CAPABILITIES:
            p, count = self._u32(buf, p, end)
            if count > 64:
                raise _Unknown(f"{count} validated capabilities", pos)
            caps = []
            for _ in range(count):
                if p >= end:
                    raise _NeedMore
                q = self._skip(p + 1, buf[p], end)
                caps.append(bytes(buf[p + 1 : q]))
                p = q
            for cap in caps:
                if cap not in s.KNOWN_CAPABILITIES:
                    raise _Unknown(f"capability {cap.decode('ascii', 'replace')} in the configuration", pos)
            self._ignore_shared = s.CAP_IGNORE_SHARED in caps
            return p
        raise _Unknown(f"configuration subsection {sub.decode('ascii', 'replace')}", pos)

    def _top_item(self, buf: bytearray, pos: int, end: int) -> int:
        kind = buf[pos]
        if kind == s.SECTION_PART or kind == s.SECTION_END:
            p, sid = self._u32(buf, pos + 1, end)
            if sid != self._ram_id or not self._mem_size_seen:
                raise _Unknown(f"section {sid} is not the ram section", pos)
            if self._ram_kind == s.SECTION_END:
                raise _Unknown("a ram section after its END", pos)
            self._ram_kind = kind
            self._state = _RAM
            if kind == s.SECTION_END:
                self._enter(Phase.COMPLETION, self._base + pos)
            elif self.phase is Phase.SETUP:
                self._enter(Phase.ITERATION, self._base + pos)
            return p
        if kind == s.COMMAND:
            if end - pos < 5:
                raise _NeedMore
            cmd, length = _U16(buf, pos + 1)[0], _U16(buf, pos + 3)[0]
            if s.PASSABLE_COMMANDS.get(cmd) != length:
                name = s.COMMAND_NAMES.get(cmd, f"#{cmd}")
                raise _Unknown(f"command {name} (length {length})", pos)
            return self._skip(pos + 5, length, end)
        if kind == s.SECTION_FULL:
            # Refused whatever follows; named in the reason if it is here already.
            try:
                what = self._section_name(buf, pos, end)
            except _NeedMore:
                what = "(cut)"
            raise _Unknown(f"device section {what} before the end of RAM", pos)
        if kind == s.SECTION_START:
            p, sid = self._u32(buf, pos + 1, end)
            if p >= end:
                raise _NeedMore
            q = self._skip(p + 1, buf[p], end)
            idstr = bytes(buf[p + 1 : q])
            q, instance = self._u32(buf, q, end)
            q, version = self._u32(buf, q, end)
            what = f"{idstr.decode('ascii', 'replace')!r} instance {instance} version {version}"
            if (
                idstr != s.RAM_IDSTR
                or instance != s.RAM_INSTANCE
                or version != s.RAM_VERSION
                or self._ram_id is not None
            ):
                raise _Unknown(f"iterable section {what}", pos)
            self._ram_id = sid
            self._ram_kind = kind
            self._state = _RAM
            return q
        if kind == s.EOF:
            raise _Unknown("EOF before the ram END section", pos)
        raise _Unknown(f"item type {kind:#04x}", pos)

    def _section_name(self, buf: bytearray, pos: int, end: int) -> str:
        p, _ = self._u32(buf, pos + 1, end)
        if p >= end:
            raise _NeedMore
        q = self._skip(p + 1, buf[p], end)
        q, instance = self._u32(buf, q, end)
        q, version = self._u32(buf, q, end)
        return (
            f"{bytes(buf[p + 1 : p + 1 + buf[p]]).decode('ascii', 'replace')!r} instance {instance} version {version}"
        )

    def _footer(self, buf: bytearray, pos: int, end: int) -> int:
        if buf[pos] == s.SECTION_FOOTER:
            p, sid = self._u32(buf, pos + 1, end)
            if self._footers is False or sid != self._ram_id:
                raise _Unknown(f"section footer {sid} after ram section {self._ram_id}", pos)
            self._footers = True
        else:
            if self._footers:
                raise _Unknown("missing section footer", pos)
            self._footers = False
            p = pos
        if self._ram_kind == s.SECTION_END:
            self._enter(Phase.DEVICE_STATE, self._base + p)
        self._state = _TOP
        return p

    def _ram_records(self, buf: bytearray, pos: int, end: int) -> int:
        """Records of a ram payload up to and including EOS; the hot path.

        Returns the position after the last complete record; leaves
        ``_state`` at ``_RAM`` if the payload continues beyond ``end``.
        The C loop, if used, takes runs of CONTINUE PAGE/ZERO records and
        stops at the first record it does not take, with every check of the
        two branches below; that record then goes through this loop.
        """
        if self._ram_kind == s.SECTION_START:
            return self._setup_records(buf, pos, end)
        pages = self.pages
        block = self._block
        block_len = self._block_len
        c_continue = self._c_continue
        zeros = 0
        npages = len(pages)
        try:
            while True:
                if c_continue is not None and block is not None:
                    pos, n = c_continue(buf, pos, end, block, block_len, pages)
                    zeros += n
                if end - pos < 8:
                    return pos
                w = _U64(buf, pos)[0]
                flags = w & _FLAGS
                # A record is refused as soon as its header says so, even
                # before the rest of it arrived (as the reference reader does).
                if flags == _PAGE_CONT:
                    if block is None or w - flags >= block_len:
                        raise _Unknown(self._bad_offset(block, w - flags), pos)
                    nxt = pos + 4104
                    if nxt > end:
                        return pos
                    pages.append((pos, nxt, block, w >> 12))
                    pos = nxt
                    continue
                if flags == _ZERO_CONT:
                    if block is None or w - flags >= block_len:
                        raise _Unknown(self._bad_offset(block, w - flags), pos)
                    if pos + 9 > end:
                        return pos
                    if buf[pos + 8]:
                        raise _Unknown(self._bad_zero(block, w - flags, buf[pos + 8]), pos)
                    zeros += 1
                    pos += 9
                    continue
                if flags == s.FLAG_EOS and w == s.FLAG_EOS:
                    self._state = _FOOTER
                    return pos + 8
                kind = flags & ~s.FLAG_CONTINUE
                if kind != s.FLAG_PAGE and kind != s.FLAG_ZERO:
                    raise _Unknown(self._odd_record(flags), pos)
                # A page record that names its block.
                p = pos + 8
                if flags & s.FLAG_CONTINUE:
                    if block is None:
                        raise _Unknown("CONTINUE before any block was named", pos)
                    new_block, new_len = block, block_len
                else:
                    if p >= end:
                        return pos
                    q = p + 1 + buf[p]
                    if q > end:
                        return pos
                    new_name = _name(bytes(buf[p + 1 : q]))
                    if new_name is None or new_name not in self.blocks:
                        raise _Unknown(f"page of block {bytes(buf[p + 1 : q])!r} not listed in MEM_SIZE", pos)
                    new_block, new_len = new_name, self.blocks[new_name]
                    p = q
                addr = w - flags
                if addr >= new_len:
                    raise _Unknown(self._bad_offset(new_block, addr), pos)
                if kind == s.FLAG_PAGE:
                    nxt = p + _PAGE
                    if nxt > end:
                        return pos
                    pages.append((pos, nxt, new_block, addr >> 12))
                else:
                    nxt = p + 1
                    if nxt > end:
                        return pos
                    if buf[p]:
                        raise _Unknown(self._bad_zero(new_block, addr, buf[p]), pos)
                    zeros += 1
                block, block_len = new_block, new_len
                pos = nxt
        finally:
            self._block = block
            self._block_len = block_len
            self.zero_records += zeros
            self.page_records += len(pages) - npages

    def _setup_records(self, buf: bytearray, pos: int, end: int) -> int:
        """The ram START payload: MEM_SIZE and its block list, then EOS."""
        if end - pos < 8:
            raise _NeedMore
        w = _U64(buf, pos)[0]
        flags = w & _FLAGS
        if w == s.FLAG_EOS and self._mem_size_seen:
            self._state = _FOOTER
            return pos + 8
        if flags != s.FLAG_MEM_SIZE or self._mem_size_seen:
            raise _Unknown(self._odd_record(flags) + " in the ram setup section", pos)
        total = w & _ADDR
        item = self._base + pos
        partial = self._mem_partial
        if partial is not None and partial[0] == item:
            _, resume, blocks, seen = partial
            p = resume - self._base
        else:
            blocks, seen, p = {}, 0, pos + 8
        extra = 8 if self._ignore_shared else 0
        try:
            while seen < total:
                if p >= end:
                    raise _NeedMore
                q = self._skip(p + 1, buf[p], end)
                name = _name(bytes(buf[p + 1 : q]))
                q, used = self._u64(buf, q, end)
                q = self._skip(q, extra, end)
                if not name or name in blocks:
                    raise _Unknown(f"MEM_SIZE entry {bytes(buf[p + 1 : q])!r}", pos)
                if used == 0 or used % _PAGE:
                    raise _Unknown(f"block {name} of {used:#x} bytes", pos)
                blocks[name] = used
                seen += used
                p = q
        except _NeedMore:
            self._mem_partial = (item, self._base + p, blocks, seen)
            raise
        self._mem_partial = None
        if seen != total or not blocks:
            raise _Unknown(f"MEM_SIZE total {total:#x} but blocks add up to {seen:#x}", pos)
        self.blocks = blocks
        self._mem_size_seen = True
        return p

    @staticmethod
    def _bad_offset(block: str | None, addr: int) -> str:
        if block is None:
            return "CONTINUE before any block was named"
        return f"page offset {addr:#x} beyond the end of block {block}"

    def _bad_zero(self, block: str | None, addr: int, fill: int) -> str:
        if fill:
            return f"zero page with fill byte {fill:#04x}"
        return self._bad_offset(block, addr)

    @staticmethod
    def _odd_record(flags: int) -> str:
        kind = flags & ~s.FLAG_CONTINUE
        if kind == s.FLAG_XBZRLE:
            return "XBZRLE page (xbzrle is on)"
        if kind == s.FLAG_COMPRESS_PAGE:
            return "compressed page (compress is on)"
        if flags == s.FLAG_MULTIFD_FLUSH:
            return "MULTIFD_FLUSH record (multifd is on)"
        if flags & s.FLAG_HOOK:
            return "RDMA hook record"
        return f"RAM record flags {flags:#05x}"

    @staticmethod
    def _skip(p: int, n: int, end: int) -> int:
        q = p + n
        if q > end:
            raise _NeedMore
        return q

    @staticmethod
    def _u32(buf: bytearray, p: int, end: int) -> tuple[int, int]:
        if end - p < 4:
            raise _NeedMore
        return p + 4, _U32(buf, p)[0]

    @staticmethod
    def _u64(buf: bytearray, p: int, end: int) -> tuple[int, int]:
        if end - p < 8:
            raise _NeedMore
        return p + 8, _U64(buf, p)[0]
