"""Epoch bitmaps against a plain set-of-pages model, driven through the
Collector's own API (open/accept/violation/close) on a layout with holes,
several RAMBlocks and ranges that touch across blocks."""

from __future__ import annotations

import asyncio

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fphint import ranges
from host_collector.config import CollectorConfig, VmEntry
from host_collector.epochs import Collector
from host_collector.errors import Refusal
from host_collector.hintcheck import ReportDecoder
from host_collector.layout import RamLayout, RamRange

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PS = 4096
LAYOUT = RamLayout(
    (
        RamRange(gpa=0, size=640 * KiB, block="low", offset=0),
        RamRange(gpa=1 * MiB, size=2 * MiB, block="ram", offset=1 * MiB),
        RamRange(gpa=4 * GiB, size=2 * MiB, block="ram", offset=3 * MiB),
        RamRange(gpa=4 * GiB + 2 * MiB, size=1 * MiB, block="dimm", offset=0),  # touches the range before
    ),
    {"low": 640 * KiB, "ram": 5 * MiB, "dimm": 1 * MiB},
    # Guest RAM that is never hinted (like q35's TSEG): touches the "ram" range before it.
    excluded=((3 * MiB, 1 * MiB),),
)
TOKENS = {"a": "token-a-0123456789abcdef", "b": "token-b-0123456789abcdef"}


def model_pages(start: int, length: int) -> set[tuple[str, int]] | None:
    """Pages a well-formed range marks, or None if it leaves guest RAM."""
    first, last = -(-start // PS), (start + length) // PS
    out = set()
    for pg in range(first, last):
        r = LAYOUT.find(pg * PS)
        if r is None:
            if any(g <= pg * PS < g + n for g, n in LAYOUT.excluded):
                continue  # guest RAM, but never hinted: clipped away
            return None
        out.add((r.block, (r.offset + pg * PS - r.gpa) // PS))
    return out


interesting = st.sampled_from(
    [
        0,
        4095,
        4096,
        640 * KiB - 4096,
        640 * KiB,
        1 * MiB - 1,
        1 * MiB,
        3 * MiB - 4096,
        3 * MiB,
        4 * MiB - 4096,
        4 * MiB,
        4 * GiB - 4096,
        4 * GiB,
        4 * GiB + 2 * MiB - 4096,
        4 * GiB + 2 * MiB,
        4 * GiB + 3 * MiB - 1,
        4 * GiB + 3 * MiB,
        (1 << 64) - 4096,
    ]
)


@st.composite
def report(draw: st.DrawFn) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    pos = 0
    for _ in range(draw(st.integers(0, 6))):
        start = max(pos, draw(st.one_of(interesting, st.integers(0, 5 * GiB))))
        start += draw(st.sampled_from([0, 0, 1, 2048]))
        if start >= 1 << 64:
            break
        length = draw(st.one_of(st.just(0), st.integers(1, 3 * MiB), st.sampled_from([1, 4095, 4096, 8192])))
        length = min(length, (1 << 64) - start)
        out.append((start, length))
        pos = start + length
    return out


class MergeMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.loop = asyncio.new_event_loop()
        cfg = CollectorConfig(vms=tuple(VmEntry(n, t, layout=LAYOUT) for n, t in TOKENS.items()))
        self.col = Collector(cfg)
        self.epochs: dict[str, int] = {}
        self.model: dict[str, set[tuple[str, int]]] = {"a": set(), "b": set()}

    def teardown(self) -> None:
        self.loop.close()

    @rule(vm=st.sampled_from(["a", "b"]))
    def open_epoch(self, vm: str) -> None:
        async def go() -> int:
            return self.col.open_epoch(vm, 30).id

        self.epochs[vm] = self.loop.run_until_complete(go())
        self.model[vm] = set()

    @precondition(lambda self: bool(self.epochs))
    @rule(vm=st.sampled_from(["a", "b"]), rs=report(), per_chunk=st.integers(1, 3))
    def send(self, vm: str, rs: list[tuple[int, int]], per_chunk: int) -> None:
        if vm not in self.epochs:
            return
        ep = self.col.get_epoch(vm, self.epochs[vm])
        assert ep is not None
        state = self.col.vms[vm]
        was_open = ep.is_open
        dec = ReportDecoder(ep.index)
        expect_ok = was_open
        pages: set[tuple[str, int]] = set()
        for s, n in rs:
            got = model_pages(s, n)
            if got is None:
                expect_ok = False
            else:
                pages |= got
        accepted: set[tuple[str, int]] = set()
        refused = False
        try:
            for words in ranges.chunked(rs, per_chunk) if rs else [[]]:
                p = dec.decode(words)
                self.col.accept(ep, p, len(words) // 2, 1, False)
        except Refusal as r:
            refused = True
            self.col.violation(state, ep, r)
        assert refused == (not expect_ok)
        if refused:
            if was_open:  # a data fault drops every hint of the epoch
                self.model[vm] = set()
        else:
            self.model[vm] |= pages
        del accepted

    @precondition(lambda self: bool(self.epochs))
    @rule(vm=st.sampled_from(["a", "b"]))
    def close(self, vm: str) -> None:
        if vm in self.epochs:
            self.col.close_epoch(vm, self.epochs[vm])

    @invariant()
    def bitmaps_equal_model(self) -> None:
        for vm, eid in self.epochs.items():
            ep = self.col.get_epoch(vm, eid)
            assert ep is not None
            got = set()
            for block in ep.blocks():
                mask = ep.free_mask(block)
                assert mask is not None
                got |= {(block, int(i)) for i in mask.nonzero()[0]}
            assert got == self.model[vm], vm
            assert ep.free_pages() == len(self.model[vm])


MergeMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)
TestMerge = MergeMachine.TestCase


def test_known_cases() -> None:
    """Edges hypothesis may not hit often: a span over two touching ranges of
    different blocks, a range one byte short of a page, a page in a hole."""

    async def go() -> None:
        col = Collector(CollectorConfig(vms=(VmEntry("a", TOKENS["a"], layout=LAYOUT),)))
        ep = col.open_epoch("a", 30)
        dec = ReportDecoder(ep.index)
        short = (0, 8191)
        straddle = (4 * GiB + 2 * MiB - 4096, 8192)  # one page each side of the block boundary
        p = dec.decode(ranges.encode([short, straddle]))
        col.accept(ep, p, 2, 1, False)
        assert ep.is_free("low", 0) and not ep.is_free("low", 1)
        assert ep.is_free("ram", (5 * MiB - 4096) // PS) and not ep.is_free("ram", (5 * MiB - 8192) // PS)
        assert ep.is_free("dimm", 0) and not ep.is_free("dimm", 1)
        assert ep.free_pages() == 3
        clipped = ReportDecoder(ep.index)  # from the mapped range into the excluded span: clipped
        p = clipped.decode(ranges.encode([(3 * MiB - 4096, 8192), (3 * MiB + 4096, 4096)]))
        assert (p.accepted, p.rejected, p.pages) == (1, 1, 1)
        col.accept(ep, p, 2, 1, False)
        assert ep.is_free("ram", (3 * MiB - 4096) // PS) and ep.free_pages() == 4
        hole = ReportDecoder(ep.index)
        try:
            hole.decode(ranges.encode([(640 * KiB, 4096)]))
        except Refusal as r:
            assert r.code == "OUT_OF_RANGE"
        else:
            raise AssertionError("a page in the VGA hole was accepted")

    asyncio.run(go())
