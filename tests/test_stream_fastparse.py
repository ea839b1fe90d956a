"""The parser's C record loop (_fastparse.c) against its own Python loop.

Both loops must give identical results on any input: the same position
returned by every ``feed``, the same PAGE records, phases, counters and
give-up (reason, offset, phase). Inputs: synthetic streams cut at and around
every record boundary, every give-up case of test_stream_parser.py, random
streams built to sit on the C loop's bounds (last page of a block, one past
it, fill bytes, odd flags, block switches), damaged, and a real QEMU stream
truncated and with flipped bytes. The buffer given to ``feed`` always holds
more bytes after ``end`` (the stream's own continuation, as a reused proxy
buffer may), so a read past ``end`` changes the outcome.

The existing parser and fuzz tests also run once more here with the
extension switched off (``FPH_NO_C_PARSER=1``).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import pytest

from host_collector.stream import parser as parser_mod
from host_collector.stream.parser import NO_C_ENV, PageRecord, StreamParser
from host_collector.stream.wire import Phase
from tests.stream_helpers import PAGE, StreamBuilder, be32, be64, typical_stream
from tests.test_stream_fuzz import captured  # noqa: F401  (the fixture: a real QEMU stream)
from tests.test_stream_parser import FALLBACKS

try:
    from host_collector.stream import _fastparse
except ImportError:  # pragma: no cover - see test_the_c_extension_is_built
    _fastparse = None  # type: ignore[assignment]

needs_c = pytest.mark.skipif(_fastparse is None, reason="the C extension is not built")

ROOT = Path(__file__).resolve().parent.parent


class Step(NamedTuple):
    """Everything observable after one ``feed`` call (positions are stream offsets)."""

    pos: int
    pages: list[PageRecord]
    transitions: list[tuple[Phase, int]]
    fallback: tuple[str, int, Phase] | None
    phase: Phase
    zero_records: int
    page_records: int
    blocks: dict[str, int]


def trace(data: bytes, cuts: Sequence[int], accelerate: bool, *, ahead: int = 2 * PAGE + 64) -> list[Step]:
    """Feed ``data`` as the proxy does, stopping at each cut; what the parser reports after each call.

    At every cut the parser sees a buffer that starts at the first unparsed
    byte (or, on odd cuts, keeps the older start, as the proxy does until its
    buffer is full) and holds ``ahead`` bytes more than ``end`` says.
    """
    p = StreamParser(accelerate=accelerate)
    assert p.accelerated is accelerate
    steps: list[Step] = []
    base, parsed = 0, 0
    for k, cut in enumerate([*sorted(set(cuts)), len(data)]):
        if cut <= base + parsed or cut > len(data):
            continue
        buf = bytearray(data[base : cut + ahead])
        pos = p.feed(buf, parsed, cut - base, base)
        fb = p.fallback
        steps.append(
            Step(
                base + pos,
                [(base + a, base + b, blk, pg) for a, b, blk, pg in p.pages],
                list(p.transitions),
                None if fb is None else (fb.reason, fb.offset, fb.phase),
                p.phase,
                p.zero_records,
                p.page_records,
                dict(p.blocks),
            )
        )
        p.pages.clear()
        p.transitions.clear()
        if not p.parsing:
            break
        if k % 2:
            parsed = pos  # same buffer, more bytes
        else:
            base, parsed = base + pos, 0  # the unparsed tail moves to a fresh buffer
    return steps


def same(data: bytes, cuts: Sequence[int]) -> list[Step]:
    """Both loops' traces, required identical; returns it."""
    c = trace(data, cuts, True)
    py = trace(data, cuts, False)
    for i, (a, b) in enumerate(zip(c, py)):
        assert a == b, f"feed #{i} differs:\n C      {_brief(a)}\n Python {_brief(b)}"
    assert len(c) == len(py)
    return c


def _brief(st: Step) -> str:
    last = st.pages[-1] if st.pages else None
    return f"pos={st.pos} fallback={st.fallback} phase={st.phase.value} zeros={st.zero_records} last page={last}"


def boundary_cuts(data: bytes, starts: Sequence[int]) -> list[int]:
    """Split points on and around every record start (inside its header and around its end)."""
    cuts: set[int] = set()
    for s in starts:
        cuts.update(range(max(1, s - 2), s + 11))
    return sorted(c for c in cuts if c < len(data))


# -- the extension itself ------------------------------------------------------


def test_the_c_extension_is_built() -> None:
    """`pip install -e .` builds it wherever gcc and Python's headers are (scripts/install-deps.sh)."""
    assert _fastparse is not None, (
        f"{parser_mod.accelerator()}: install gcc and python3-dev, then `pip install -e .` again"
    )


@needs_c
def test_the_switch_selects_the_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NO_C_ENV, raising=False)
    assert StreamParser().accelerated and parser_mod.accelerator() == "c"
    monkeypatch.setenv(NO_C_ENV, "0")
    assert StreamParser().accelerated
    monkeypatch.setenv(NO_C_ENV, "1")
    assert not StreamParser().accelerated
    assert NO_C_ENV in parser_mod.accelerator()
    assert StreamParser(accelerate=True).accelerated  # explicit beats the environment


def _cont_run(n: int) -> bytes:
    """n CONTINUE records: PAGE for even i, ZERO for odd i, pages 0..n-1 of a block."""
    out = bytearray()
    for i in range(n):
        if i % 2 == 0:
            out += be64(i * PAGE | 0x28) + bytes([i + 1]) * PAGE
        else:
            out += be64(i * PAGE | 0x22) + b"\0"
    return bytes(out)


@needs_c
def test_continue_records_takes_runs_and_stops_at_anything_else() -> None:
    run = _cont_run(6)
    tail = be64(0x10)  # EOS
    buf = bytearray(b"xx" + run + tail)
    pages: list[tuple[int, int, str, int]] = []
    pos, zeros = _fastparse.continue_records(buf, 2, len(buf), "mem", 8 * PAGE, pages)
    assert pos == 2 + len(run) and zeros == 3
    assert pages == [(2, 2 + 4104, "mem", 0), (4115, 4115 + 4104, "mem", 2), (8228, 8228 + 4104, "mem", 4)]
    # the last page of the block is inside, the page after it is not
    last = be64(7 * PAGE | 0x28) + b"\1" * PAGE
    beyond = be64(8 * PAGE | 0x22) + b"\0"
    buf = bytearray(last + beyond)
    pages.clear()
    assert _fastparse.continue_records(buf, 0, len(buf), "mem", 8 * PAGE, pages) == (len(last), 0)
    assert pages == [(0, len(last), "mem", 7)]
    # a non-zero fill byte stops it, at the record's first byte
    buf = bytearray(be64(0x22) + b"\0" + be64(PAGE | 0x22) + b"\x01")
    assert _fastparse.continue_records(buf, 0, len(buf), "mem", 8 * PAGE, []) == (9, 1)


@needs_c
def test_continue_records_reports_page_indexes_of_any_size() -> None:
    huge = 1 << 63
    for page in (0, 1, (1 << 20) + 3, (1 << 32) + 5, (1 << 51) - 1):
        buf = bytearray(be64(page * PAGE | 0x28) + b"\1" * PAGE)
        pages: list[tuple[int, int, str, int]] = []
        assert _fastparse.continue_records(buf, 0, len(buf), "mem", huge, pages) == (len(buf), 0)
        assert pages == [(0, len(buf), "mem", page)]


@needs_c
def test_continue_records_reads_nothing_past_end() -> None:
    rec = be64(PAGE | 0x28) + b"\7" * PAGE
    zero = be64(2 * PAGE | 0x22) + b"\0"
    buf = bytearray(rec + zero + rec)
    pages: list[tuple[int, int, str, int]] = []
    # `end` one byte short of each record: it stays unparsed though the bytes are there
    for end, want in ((len(rec) - 1, 0), (len(rec) + len(zero) - 1, len(rec)), (7, 0)):
        pages.clear()
        assert _fastparse.continue_records(buf, 0, end, "mem", 8 * PAGE, pages)[0] == want
    # and from the other side: a buffer that ends exactly where the data does
    exact = bytes(rec + zero)
    assert _fastparse.continue_records(exact, 0, len(exact), "mem", 8 * PAGE, []) == (len(exact), 1)


_GUARD_PAGE_CHECK = """
import ctypes, mmap
from host_collector.stream._fastparse import continue_records

PAGE = 4096
libc = ctypes.CDLL(None, use_errno=True)
mm = mmap.mmap(-1, 4 * PAGE)
area = (ctypes.c_char * (4 * PAGE)).from_buffer(mm)
assert libc.mprotect(ctypes.c_void_p(ctypes.addressof(area) + 3 * PAGE), PAGE, 0) == 0
data = memoryview(area).cast("B")[: 3 * PAGE]  # its last byte is followed by the guard page

def be64(v):
    return v.to_bytes(8, "big")

zero = be64(PAGE | 0x22) + b"\\0"
page = be64(PAGE | 0x28) + b"\\1" * PAGE
for tail, want in (
    (page[:-1], 0),  # a PAGE record one byte short
    (zero[:-1], 0),  # a ZERO record without its fill byte
    (zero[:5], 0),  # part of a header
    (zero * 3, 27),  # complete records up to the last byte
    (page + zero + zero[:8], 4113),
):
    start = 3 * PAGE - len(tail)
    data[start:] = tail
    pos, _ = continue_records(data, start, 3 * PAGE, "mem", 1 << 40, [])
    assert pos - start == want, (tail[:9], pos - start)
print("ok")
"""


@needs_c
def test_continue_records_never_touches_the_byte_after_end() -> None:
    """Records flush against an unmapped page: one byte read too far is a segfault."""
    r = subprocess.run([sys.executable, "-c", _GUARD_PAGE_CHECK], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "ok", (r.returncode, r.stderr[-2000:])


@needs_c
def test_continue_records_refuses_bad_arguments_and_releases_the_buffer() -> None:
    buf = bytearray(_cont_run(2))
    n = len(buf)
    bad: list[tuple[tuple[object, ...], type[Exception]]] = [
        ((buf, 0, n + 1, "mem", 8 * PAGE, []), ValueError),  # end beyond the buffer
        ((buf, 5, 4, "mem", 8 * PAGE, []), ValueError),
        ((buf, -1, n, "mem", 8 * PAGE, []), ValueError),
        ((buf, 0, n, "mem", -1, []), OverflowError),
        ((buf, 0, n, "mem", 1 << 64, []), OverflowError),
        ((buf, 0, n, "mem", 8 * PAGE, ()), TypeError),  # not a list: after the buffer was taken
        ((buf, 0, n, b"mem", 8 * PAGE, []), TypeError),
        (("text", 0, 4, "mem", 8 * PAGE, []), TypeError),
    ]
    for args, exc in bad:
        with pytest.raises(exc):
            _fastparse.continue_records(*args)  # type: ignore[arg-type]
        # a leaked buffer export would make the bytearray impossible to resize
        buf.append(0)
        del buf[-1]
    with memoryview(buf) as mv, pytest.raises(BufferError):  # not contiguous
        _fastparse.continue_records(mv[::2], 0, 4, "mem", 8 * PAGE, [])
    buf.append(0)
    del buf[-1]
    # bytes and memoryviews are read the same way as a bytearray
    want = _fastparse.continue_records(buf, 0, n, "mem", 8 * PAGE, [])
    assert _fastparse.continue_records(bytes(buf), 0, n, "mem", 8 * PAGE, []) == want
    assert _fastparse.continue_records(memoryview(buf), 0, n, "mem", 8 * PAGE, []) == want


@needs_c
def test_continue_records_keeps_reference_counts_balanced() -> None:
    block = "".join(["blk", "-", "refcount"])  # a fresh string object
    buf = bytearray(_cont_run(40))
    before = sys.getrefcount(block)
    pages: list[tuple[int, int, str, int]] = []
    for _ in range(50):
        _fastparse.continue_records(buf, 0, len(buf), block, 64 * PAGE, pages)
    assert sys.getrefcount(block) == before + 50 * 20
    pages.clear()
    assert sys.getrefcount(block) == before


# -- both loops, same results --------------------------------------------------


@needs_c
def test_typical_stream_cut_around_every_record() -> None:
    b = typical_stream()
    data = bytes(b.orig)
    # ZERO records sit between PAGE records here, so these are all record boundaries
    cuts = boundary_cuts(data, [a for a, _, _, _ in b.pages] + [e for _, e, _, _ in b.pages])
    for k in range(0, len(cuts), 3):
        steps = same(data, cuts[k : k + 3])
        assert steps[-1].phase is Phase.DEVICE_STATE
    steps = same(data, cuts)
    assert sum(len(s.pages) for s in steps) == len(b.pages)


@needs_c
@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_every_give_up_case_gives_up_the_same_way(name: str) -> None:
    data, at, _, _ = FALLBACKS[name]
    whole = same(data, [])
    fb = whole[-1].fallback
    if fb is not None:
        assert fb[1] == at
    same(data, list(range(max(1, at - 12), min(len(data), at + 24))))
    same(data, list(range(1, len(data), 97)))


def random_stream(rng: random.Random) -> tuple[bytes, list[int]]:
    """A stream whose ram records sit on the C loop's bounds; and its record starts."""
    b = StreamBuilder(footers=rng.random() < 0.7)
    b.header().config()
    names = rng.sample(["pc.ram", "mem", "pc.bios", "/rom@etc/acpi/tables", "x"], rng.randint(1, 3))
    # small blocks, so the last page comes up often, and huge ones (page indexes above 2**32)
    blocks = {n: rng.choice([rng.randint(1, 6), rng.randint(1, 1 << 44)]) * PAGE for n in names}
    b.start_ram(2, blocks)
    starts: list[int] = []
    sections = rng.randint(1, 4)
    for section in range(sections):
        last = section == sections - 1
        (b.end if last else b.part)(2)
        blk = rng.choice(names)
        for _ in range(rng.randint(0, 50)):
            starts.append(len(b.orig))
            if rng.random() < 0.1:
                blk = rng.choice(names)  # named when it changes
            if rng.random() < 0.03:
                b.forget_block()  # named again though it did not change
            pages = blocks[blk] // PAGE
            r = rng.random()
            if r < 0.006:
                pg = pages  # one past the end
            elif r < 0.3:
                pg = pages - 1  # the last page
            else:
                pg = rng.randrange(pages)
            if rng.random() < 0.995:
                if rng.random() < 0.5:
                    b.page(blk, pg)
                else:
                    b.zero(blk, pg, fill=1 if rng.random() < 0.003 else 0)
            else:
                flags = rng.choice([0x10 | PAGE, 0x2A, 0x60, 0x24, 0x120, 0x200, 0x80, 0x30, 0x28 | 0x800])
                b.raw(be64(pg * PAGE | flags) + b"\0" * rng.choice([0, 1, PAGE]))
        b.eos().footer(2)
    b.full(3, b"timer", be64(1) + be32(2))
    b.eof()
    data = bytearray(b.orig)
    # damage: a byte of a record header, or anywhere
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        if starts and rng.random() < 0.8:
            k = rng.choice(starts) + rng.randrange(9)
        else:
            k = rng.randrange(len(data))
        if k < len(data):
            data[k] ^= rng.randrange(1, 256)
    return bytes(data), starts


@needs_c
@pytest.mark.parametrize("seed", range(6))
def test_random_streams_on_the_bounds(seed: int) -> None:
    rng = random.Random(seed)
    outcomes = {"gave up": 0, "complete": 0, "pages": 0}
    for _ in range(60):
        data, starts = random_stream(rng)
        near = boundary_cuts(data, rng.sample(starts, min(len(starts), 4)))
        cuts = sorted(rng.sample(near, min(len(near), 12)) + rng.sample(range(1, len(data)), 8))
        steps = same(data, cuts)
        same(data, [])
        last = steps[-1]
        outcomes["gave up"] += last.fallback is not None
        outcomes["complete"] += last.phase is Phase.DEVICE_STATE
        outcomes["pages"] += sum(len(s.pages) for s in steps)
    # the generator reaches both endings and real records, or the comparison proves little
    assert outcomes["gave up"] > 5 and outcomes["complete"] > 5 and outcomes["pages"] > 500, outcomes


@needs_c
@pytest.mark.qemu
def test_a_real_stream_truncated_and_flipped(captured: bytes) -> None:  # noqa: F811
    rng = random.Random(7)
    whole = same(captured, [])
    assert whole[-1].phase is Phase.DEVICE_STATE and len(whole[-1].pages) > 256
    records = [r[0] for r in whole[-1].pages] + [r[1] for r in whole[-1].pages]
    for i in range(40):
        data = bytearray(captured if i % 4 else captured[: rng.randrange(1, len(captured))])
        if i % 3:
            k = rng.choice(records) + rng.randrange(9) if rng.random() < 0.7 else rng.randrange(len(data))
            if k < len(data):
                data[k] ^= rng.randrange(1, 256)
        near = boundary_cuts(bytes(data), rng.sample(records, 10))
        cuts = rng.sample(range(1, len(data)), min(20, len(data) - 1)) + rng.sample(near, min(20, len(near)))
        same(bytes(data), cuts)


@pytest.mark.qemu
@pytest.mark.slow
def test_parser_and_fuzz_tests_pass_with_the_python_loop() -> None:
    env = {**os.environ, NO_C_ENV: "1"}
    check = "from host_collector.stream.parser import StreamParser; assert not StreamParser().accelerated"
    subprocess.run([sys.executable, "-c", check], env=env, check=True, cwd=ROOT)
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/test_stream_parser.py", "tests/test_stream_fuzz.py"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout
