"""The stream parser against synthetic streams: what it accepts, where it gives up."""

from __future__ import annotations

import random

import pytest

from fphint_lab.stream_reference import reference_read
from host_collector.stream.parser import MAX_ITEM, StreamParser
from host_collector.stream.wire import Phase
from tests.stream_helpers import BLOCKS, StreamBuilder, be16, be32, be64, typical_stream


def parse_all(data: bytes) -> StreamParser:
    p = StreamParser()
    p.feed(bytearray(data), 0, len(data), 0)
    return p


def parse_chunked(data: bytes, cuts: list[int]) -> tuple[StreamParser, list[tuple[int, int, str, int]]]:
    """Feed like the proxy does: a buffer grows, and at each cut the unparsed tail moves to a new one."""
    p = StreamParser()
    pages: list[tuple[int, int, str, int]] = []
    base = 0
    buf = bytearray()
    parsed = 0
    for cut in [*cuts, len(data)]:
        buf += data[base + len(buf) : cut]
        parsed = p.feed(buf, parsed, len(buf), base)
        pages += [(base + a, base + b, blk, pg) for a, b, blk, pg in p.pages]
        p.pages.clear()
        # hand over to a fresh buffer
        buf = bytearray(buf[parsed:])
        base += parsed
        parsed = 0
    return p, pages


def test_typical_stream_reports_every_page_record_and_phase() -> None:
    b = typical_stream()
    p = parse_all(bytes(b.orig))
    assert p.fallback is None
    assert p.phase is Phase.DEVICE_STATE
    assert p.pages == b.pages
    assert p.blocks == BLOCKS
    assert [ph for ph, _ in p.transitions] == [Phase.SETUP, Phase.ITERATION, Phase.COMPLETION, Phase.DEVICE_STATE]
    # each transition names the first byte of the item that entered the phase
    data = bytes(b.orig)
    offs = {ph: off for ph, off in p.transitions}
    assert data[offs[Phase.ITERATION]] == 0x02
    assert data[offs[Phase.COMPLETION]] == 0x03
    assert data[offs[Phase.DEVICE_STATE]] == 0x04
    assert p.zero_records == 15
    assert p.page_records == len(b.pages)


def test_block_of_continue_records_is_carried_across_sections() -> None:
    b = typical_stream()
    data = bytes(b.orig)
    p = parse_all(data)
    # The first record of the second PART and of the END carry CONTINUE (no idstr)...
    for start, _, _, _ in b.pages:
        if data[start - 5] in (2, 3):  # record right after a PART/END header
            assert data[start + 7] & 0x20
    # ...and are attributed to the block named in an earlier section.
    assert ("pc.bios", 1) in {(blk, pg) for _, _, blk, pg in p.pages}
    assert [(blk, pg) for _, _, blk, pg in p.pages].count(("pc.ram", 41)) == 2


@pytest.mark.parametrize("seed", range(6))
def test_any_chunking_gives_the_same_result(seed: int) -> None:
    data = bytes(typical_stream().orig)
    want = parse_all(data)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(data)), 40 if seed else len(data) - 1))
    p, pages = parse_chunked(data, cuts)
    assert pages == want.pages
    assert p.phase is want.phase and p.fallback is None
    assert p.zero_records == want.zero_records


def test_every_single_split_point() -> None:
    data = bytes(typical_stream().orig)
    want = parse_all(data).pages
    for k in range(1, len(data)):
        _, pages = parse_chunked(data, [k])
        assert pages == want, k


def test_without_configuration_and_footers() -> None:
    b = StreamBuilder(footers=False)
    b.header()
    b.start_ram(5, {"mem": 8 * PAGE_})
    b.part(5).page("mem", 1).zero("mem", 2).eos().footer(5)
    b.end(5).page("mem", 1).eos().footer(5)
    b.full(6, b"cpu", b"\x00" * 10).eof()
    p = parse_all(bytes(b.orig))
    assert p.fallback is None and p.phase is Phase.DEVICE_STATE
    assert [(blk, pg) for _, _, blk, pg in p.pages] == [("mem", 1), ("mem", 1)]


PAGE_ = 4096


def test_known_configuration_subsections_and_ignore_shared_block_list() -> None:
    b = StreamBuilder()
    b.header().config(
        subsections=[
            StreamBuilder.subsection(b"configuration/target-page-bits", be32(12)),
            StreamBuilder.caps(b"x-ignore-shared"),
            StreamBuilder.subsection(b"configuration/uuid", bytes(range(16))),
        ]
    )
    b.command(1).command(2, be32(1))
    b.start_ram(2, {"mem": 4 * PAGE_, "vga": 2 * PAGE_}, ignore_shared=True)
    b.part(2).page("vga", 1).page("mem", 3).eos().footer(2)
    b.command(11)  # SWITCHOVER_START (QEMU 10.0)
    b.end(2).eos().footer(2).eof()
    p = parse_all(bytes(b.orig))
    assert p.fallback is None, p.fallback
    assert p.phase is Phase.DEVICE_STATE
    assert p.blocks == {"mem": 4 * PAGE_, "vga": 2 * PAGE_}
    assert [(blk, pg) for _, _, blk, pg in p.pages] == [("vga", 1), ("mem", 3)]


def test_block_named_again_after_ram_list_change() -> None:
    b = StreamBuilder()
    b.header().config().start_ram(2, {"a": 4 * PAGE_, "b": 4 * PAGE_})
    b.part(2).page("a", 1).eos().footer(2)
    b.forget_block()
    b.part(2).page("a", 2).page("b", 0).page("b", 3).eos().footer(2)
    p = parse_all(bytes(b.orig))
    assert [(blk, pg) for _, _, blk, pg in p.pages] == [("a", 1), ("a", 2), ("b", 0), ("b", 3)]


def _prefix() -> StreamBuilder:
    b = StreamBuilder()
    b.header().config().command(1).command(2, be32(1))
    return b


def _in_ram() -> StreamBuilder:
    b = _prefix().start_ram(2, {"pc.ram": 16 * PAGE_, "pc.rom": 2 * PAGE_})
    b.part(2).page("pc.ram", 1).zero("pc.ram", 2)
    return b


def _case(build: StreamBuilder, bad: bytes, tail: bytes = b"\x00" * 64) -> tuple[bytes, int]:
    at = len(build.orig)
    return bytes(build.orig) + bad + tail, at


def _fallback_cases() -> dict[str, tuple[bytes, int, str, Phase]]:
    cases: dict[str, tuple[bytes, int, str, Phase]] = {}

    def add(name: str, case: tuple[bytes, int], reason: str, phase: Phase) -> None:
        cases[name] = (case[0], case[1], reason, phase)

    add("tls", _case(StreamBuilder(), b"\x16\x03\x01\x02\x00\x01\x00\x01"), "no QEVM magic", Phase.HEADER)
    add("version 2", _case(StreamBuilder(), b"QEVM" + be32(2)), "stream version 2", Phase.HEADER)
    # A configuration subsection is refused at its own first byte.
    config = StreamBuilder().header().raw(b"\x07" + be32(3) + b"abc")
    add(
        "unknown subsection",
        _case(config, StreamBuilder.subsection(b"configuration/zzz", b"")),
        "configuration subsection configuration/zzz",
        Phase.HEADER,
    )
    add(
        "mapped-ram capability",
        _case(config, StreamBuilder.caps(b"mapped-ram")),
        "capability mapped-ram",
        Phase.HEADER,
    )
    add(
        "page bits",
        _case(config, StreamBuilder.subsection(b"configuration/target-page-bits", be32(16))),
        "target page bits 16",
        Phase.HEADER,
    )
    add(
        "postcopy advise",
        _case(_prefix(), b"\x08" + be16(3) + be16(16) + be64(4096) + be64(4096)),
        "POSTCOPY_ADVISE",
        Phase.SETUP,
    )
    add("dirty-bitmaps advise", _case(_prefix(), b"\x08" + be16(3) + be16(0)), "POSTCOPY_ADVISE", Phase.SETUP)
    add("colo", _case(_prefix(), b"\x08" + be16(8) + be16(0)), "ENABLE_COLO", Phase.SETUP)
    add("ping with odd length", _case(_prefix(), b"\x08" + be16(2) + be16(2) + b"\0\0"), "PING (length 2)", Phase.SETUP)
    add("unknown command", _case(_prefix(), b"\x08" + be16(99) + be16(0)), "command #99", Phase.SETUP)
    add(
        "block migration",
        _case(_prefix().start_ram(2, {"m": PAGE_}), b"\x01" + be32(3) + b"\x05block" + be32(0) + be32(1)),
        "iterable section 'block'",
        Phase.SETUP,
    )
    add(
        "virtio-mem early",
        _case(
            _prefix().start_ram(2, {"m": PAGE_}),
            b"\x04" + be32(9) + b"\x1d0000:00:03.0/virtio-mem-early" + be32(0) + be32(1),
        ),
        "device section",
        Phase.SETUP,
    )
    add(
        "ram version 3",
        _case(_prefix(), b"\x01" + be32(2) + b"\x03ram" + be32(0) + be32(3)),
        "iterable section 'ram'",
        Phase.SETUP,
    )
    add("unknown section id", _case(_in_ram().eos().footer(2), b"\x02" + be32(7)), "section 7", Phase.ITERATION)
    add("xbzrle", _case(_in_ram(), be64(3 * PAGE_ | 0x60) + b"\x01" + be16(2) + b"ab"), "XBZRLE", Phase.ITERATION)
    add(
        "compress",
        _case(_in_ram(), be64(3 * PAGE_ | 0x120) + be32(10) + b"x" * 10),
        "compressed page",
        Phase.ITERATION,
    )
    add("multifd flush", _case(_in_ram(), be64(0x200)), "MULTIFD_FLUSH", Phase.ITERATION)
    add("rdma hook", _case(_in_ram(), be64(0x80)), "RDMA hook", Phase.ITERATION)
    add("zero|page", _case(_in_ram(), be64(3 * PAGE_ | 0x2A) + b"\0" * 4096), "flags 0x02a", Phase.ITERATION)
    add("mem size again", _case(_in_ram(), be64(PAGE_ | 0x04)), "flags 0x004", Phase.ITERATION)
    add("eos with address", _case(_in_ram(), be64(PAGE_ | 0x10)), "flags 0x010", Phase.ITERATION)
    add("zero fill", _case(_in_ram(), be64(3 * PAGE_ | 0x22) + b"\x5a"), "fill byte 0x5a", Phase.ITERATION)
    add(
        "offset beyond block",
        _case(_in_ram(), be64(16 * PAGE_ | 0x28) + b"\1" * 4096),
        "beyond the end of block pc.ram",
        Phase.ITERATION,
    )
    add(
        "unknown block",
        _case(_in_ram(), be64(0x08) + b"\x05other" + b"\1" * 4096),
        "not listed in MEM_SIZE",
        Phase.ITERATION,
    )
    add(
        "continue before naming",
        _case(_prefix().start_ram(2, {"m": PAGE_}).part(2), be64(0x28) + b"\1" * 4096),
        "CONTINUE before any block",
        Phase.ITERATION,
    )
    add(
        "mem size sum",
        _case(_prefix().section_start(2, b"ram"), be64(2 * PAGE_ | 4) + b"\x01m" + be64(3 * PAGE_) + be64(0x10)),
        "MEM_SIZE total",
        Phase.SETUP,
    )
    add("footer id", _case(_in_ram().eos(), b"\x7e" + be32(3)), "section footer 3", Phase.ITERATION)
    add(
        "missing footer",
        _case(_in_ram().eos().footer(2).part(2).eos(), b"\x02" + be32(2)),
        "missing section footer",
        Phase.ITERATION,
    )
    add("eof in ram phase", _case(_in_ram().eos().footer(2), b"\x00"), "EOF before", Phase.ITERATION)
    add("odd item", _case(_in_ram().eos().footer(2), b"\x09"), "item type 0x09", Phase.ITERATION)
    add(
        "part after end",
        _case(_in_ram().eos().footer(2).end(2).eos().footer(2), b"\x02" + be32(2)),
        "",
        Phase.DEVICE_STATE,
    )
    return cases


FALLBACKS = _fallback_cases()


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_gives_up_at_the_first_byte_it_cannot_prove(name: str) -> None:
    data, at, reason, phase = FALLBACKS[name]
    p = parse_all(data)
    if phase is Phase.DEVICE_STATE:
        # after the ram END section nothing is parsed, so nothing can be refused
        assert p.phase is Phase.DEVICE_STATE and p.fallback is None
        return
    assert p.phase is Phase.PASSTHROUGH
    assert p.fallback is not None
    assert reason in p.fallback.reason
    assert p.fallback.offset == at
    assert p.fallback.phase is phase
    assert not p.parsing
    # pages before the bad item are still reported, none after it
    assert all(end <= at for _, end, _, _ in p.pages)
    # and byte by byte it gives up at the same place
    q, _ = parse_chunked(data, list(range(1, len(data))))
    assert q.fallback is not None and q.fallback.offset == at
    # as does the separate reference reader the fuzz tests compare against
    assert reference_read(data).stop == at


def test_an_incomplete_item_longer_than_the_bound_is_refused() -> None:
    b = _prefix().section_start(2, b"ram")
    b.raw(be64((1 << 40) | 4))  # claims 1 TiB of blocks, then lists tiny ones forever
    n = 0
    while len(b.orig) < MAX_ITEM + 1000:
        b.raw(bytes([5]) + f"{n:05d}".encode() + be64(PAGE_))
        n += 1
    data = bytes(b.orig)
    p = StreamParser()
    pos = p.feed(bytearray(data), 0, len(data), 0)
    assert p.phase is Phase.PASSTHROUGH and p.fallback is not None
    assert "longer than" in p.fallback.reason
    assert pos == len(_prefix().orig) + 17  # the MEM_SIZE record, after the START header


def test_truncation_keeps_waiting_without_giving_up() -> None:
    data = bytes(typical_stream().orig)
    for k in (3, 9, 30, 200, len(data) // 2):
        p = StreamParser()
        p.feed(bytearray(data[:k]), 0, k, 0)
        assert p.fallback is None and p.parsing
