"""Fuzz the parser and the proxy with real QEMU streams, truncated and with flipped bytes.

The streams are captured once per run from a real migration (source -> tap ->
destination) of a small running guest. A mutated stream must end in a clean
give-up or in a complete parse, never in an exception or a hang; the parser,
fed in random pieces, must agree exactly with fphint_lab/stream_reference.py (a
separate, naive reader of the loader's rules: same PAGE records, same
stopping byte), so it never takes for a page record what QEMU's loader would
not; and before the first damaged byte it must report exactly the original's
records. (After it, a flip can make a valid record out of another one, e.g.
ZERO|CONTINUE 0x22 ^ 0x0a = PAGE|CONTINUE 0x28, which the destination reads
the same way; no parser can tell.)
"""

from __future__ import annotations

import bisect
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fphint_lab.qemu_pair import PAGE, Machine, MiB, Tap, Vm, boot_image, pattern, wait_loop_running, write_gpa
from fphint_lab.stream_reference import reference_read
from host_collector.proxy.results import ProxyOutcome
from host_collector.stream.parser import StreamParser
from host_collector.stream.wire import Phase
from tests.stream_helpers import FixedGate, run_proxy

pytestmark = pytest.mark.qemu

Record = tuple[int, int, str, int]


@pytest.fixture(scope="module")
def captured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[bytes]:
    """The main channel of a real migration: return path on, a running guest, re-sent pages."""
    d: Path = tmp_path_factory.mktemp("fuzz-capture")
    m = Machine("q35", 32 * MiB)
    boot = boot_image(d / "boot.img")
    src = Vm(m, d, "src", incoming=False, running=True, boot=boot)
    dst = Vm(m, d, "dst", incoming=True, boot=boot)
    write_gpa(src, 4 * MiB, pattern(4 * MiB, 128, 3))
    src.start()
    dst.start()
    try:
        wait_loop_running(src)
        for vm in (src, dst):
            vm.set_caps(return_path=True, events=True)
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 30})
        tap = Tap(dst.listen_incoming(), d / "stream.bin")
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{tap.port}")
        assert src.wait_migration(("completed", "failed"), 60)["status"] == "completed"
        tap.join()
        yield (d / "stream.bin").read_bytes()
    finally:
        src.kill()
        dst.kill()


def parse(data: bytes, cuts: list[int]) -> tuple[StreamParser, list[Record]]:
    """Parse as the proxy does: growing buffers, the unparsed tail moved on at each cut."""
    p = StreamParser()
    pages: list[Record] = []
    base, parsed = 0, 0
    buf = bytearray()
    for cut in [*cuts, len(data)]:
        if cut <= base + len(buf):
            continue
        buf += data[base + len(buf) : cut]
        parsed = p.feed(buf, parsed, len(buf), base)
        pages += [(base + a, base + b, blk, pg) for a, b, blk, pg in p.pages]
        p.pages.clear()
        if not p.parsing:
            break
        buf = bytearray(buf[parsed:])
        base += parsed
        parsed = 0
    return p, pages


class Original:
    def __init__(self, data: bytes) -> None:
        p, pages = parse(data, [])
        assert p.fallback is None and p.phase is Phase.DEVICE_STATE, p.fallback
        self.data = data
        self.pages = pages
        self.by_start = {r[0]: r for r in pages}
        self.ends = [r[1] for r in pages]
        # bytes that are not page data: headers, records, sections
        data_ranges = [(r[1] - PAGE, r[1]) for r in pages]
        self.structure: list[int] = []
        pos = 0
        for lo, hi in data_ranges:
            self.structure.extend(range(pos, lo))
            pos = hi
        self.structure.extend(range(pos, len(data)))

    def in_data(self, k: int) -> Record | None:
        """The record whose page data contains byte k, if any."""
        i = bisect.bisect_right(self.ends, k)
        if i < len(self.pages):
            r = self.pages[i]
            if r[1] - PAGE <= k < r[1]:
                return r
        return None


def check_pages(orig: Original, got: list[Record], flipped: set[int]) -> None:
    """Records that end before the first damaged byte are the original's, and all of them are there."""
    first = min(flipped)
    before = [r for r in got if r[1] <= first]
    assert before == [r for r in orig.pages if r[1] <= first][: len(before)]


def test_the_capture_is_a_real_multi_pass_stream(captured: bytes) -> None:
    o = Original(captured)
    blocks = {blk for _, _, blk, _ in o.pages}
    assert "mem" in blocks and len(o.pages) > 128 + 128
    # pages of the guest's loop were sent more than once (later passes)
    counts: dict[tuple[str, int], int] = {}
    for _, _, blk, pg in o.pages:
        counts[blk, pg] = counts.get((blk, pg), 0) + 1
    assert max(counts.values()) >= 2


@pytest.mark.parametrize("seed", range(4))
def test_truncated_streams_are_parsed_up_to_the_cut(captured: bytes, seed: int) -> None:
    o = Original(captured)
    rng = random.Random(seed)
    for _ in range(60):
        k = rng.choice([rng.randrange(len(captured)), rng.choice(o.structure)])
        cuts = sorted(rng.sample(range(1, max(2, k)), min(5, k - 1))) if k > 2 else []
        p, pages = parse(captured[:k], cuts)
        assert p.fallback is None  # a cut stream is incomplete, not wrong
        assert pages == [r for r in o.pages if r[1] <= k]


@pytest.mark.parametrize("seed", range(8))
def test_flipped_bytes_never_yield_a_record_that_is_not_there(captured: bytes, seed: int) -> None:
    o = Original(captured)
    rng = random.Random(1000 + seed)
    outcomes = {"fallback": 0, "complete": 0, "incomplete": 0}
    for _ in range(150):
        data = bytearray(captured)
        flipped = set()
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            k = rng.choice(o.structure) if rng.random() < 0.85 else rng.randrange(len(data))
            data[k] ^= rng.randrange(1, 256)
            flipped.add(k)
        cuts = sorted(rng.sample(range(1, len(data)), 20))
        t0 = time.monotonic()
        p, pages = parse(bytes(data), cuts)
        assert time.monotonic() - t0 < 5
        check_pages(o, pages, flipped)
        ref = reference_read(bytes(data))
        assert pages == ref.pages
        if ref.stop is not None:
            outcomes["fallback"] += 1
            assert p.fallback is not None and p.fallback.offset == ref.stop, (p.fallback, ref.stop)
        elif ref.complete:
            outcomes["complete"] += 1
            assert p.fallback is None and p.phase is Phase.DEVICE_STATE
        else:
            outcomes["incomplete"] += 1
            assert p.fallback is None and p.parsing
    assert outcomes["fallback"] > 10, outcomes  # the flips did hit structure


@pytest.mark.parametrize("seed", range(3))
def test_the_proxy_on_damaged_streams_ends_cleanly(captured: bytes, seed: int) -> None:
    o = Original(captured)
    hinted = {(blk, pg) for _, _, blk, pg in o.pages}
    rng = random.Random(2000 + seed)
    seen: set[ProxyOutcome] = set()
    for _ in range(8):
        data = bytearray(captured)
        cut = len(data) if rng.random() < 0.6 else rng.randrange(1, len(data))
        data = data[:cut]
        flipped = set()
        if rng.random() < 0.8:
            k = rng.choice([x for x in o.structure[::97] if x < len(data)] or [0])
            data[k] ^= rng.randrange(1, 256)
            flipped.add(k)
        gate = FixedGate(hinted)
        chunks = [rng.randrange(1, 200000) for _ in range(10)]
        if sum(chunks) >= len(data):
            chunks = []
        res, out, _ = run_proxy(bytes(data), gate, chunks=chunks, timeout=20)
        st = res.stats
        seen.add(res.outcome)
        assert res.outcome in (ProxyOutcome.FINISHED, ProxyOutcome.ABORTED), res
        assert not (st.abort_reason or "").startswith("internal error"), st.abort_reason
        # every record the gate was asked about ended where a real record ends
        for end, _, _ in gate.asked:
            assert end in set(o.ends)
        if res.outcome is ProxyOutcome.FINISHED:
            # everything arrived, less 4095 bytes per zeroed page
            assert len(data) - len(out) == st.pages_rewritten * 4095
            gave_up = st.fallback_reason is not None and "source closed" not in st.fallback_reason
            assert not (gave_up and st.pages_rewritten), st  # a give-up after rewrites must abort
        else:
            assert st.pages_rewritten > 0 and st.abort_reason
    assert ProxyOutcome.FINISHED in seen
