"""The fuzz targets: each takes one input (bytes) and raises only if a property breaks.

Plain functions, so the committed corpus can be replayed without atheris
(tests/test_fuzz_campaign.py) and atheris can drive them (fphint_lab/fuzz/run.py).

* ``stream``: the migration stream parser, fed in slices chosen from the
  input, against the reference reader (fphint_lab/stream_reference.py): the same
  PAGE records, the same stopping byte; the C record loop and the Python one
  give identical results.
* ``rewriter``: the real proxy (sockets, threads) relays the input through a
  gate that hints a fixed third of all pages; the output may differ from the
  input only in records the reference reader sees as PAGE records of hinted
  pages, each turned into a ZERO record (flag byte, one zero fill byte).
* ``mtree``: ``info mtree`` parsing and RAM mapping raise nothing but MtreeError.
* ``ranges``: the collector's numpy range decoder against the exact
  reference codec, on a protobuf ReportChunk or on raw words.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable

from fphint_lab.fuzz import subjects as S
from fphint_lab.stream_reference import reference_read

PAGE = 4096


def _slices(data: bytes) -> list[int]:
    """Cut points the proxy's reads might have produced, derived from the input."""
    rng = random.Random(zlib.crc32(data))
    cuts, pos = [], 0
    while pos < len(data):
        pos += rng.choice((1, 7, 8, 9, 100, 4096, 4104, 8192, rng.randrange(1, 65536)))
        cuts.append(min(pos, len(data)))
    return cuts


def _parse(data: bytes, cuts: list[int], accelerate: bool) -> tuple[S.StreamParser, list[tuple[int, int, str, int]]]:
    """Feed as the proxy does: a growing buffer, the unparsed tail moved on at each cut."""
    p = S.StreamParser(accelerate=accelerate)
    pages: list[tuple[int, int, str, int]] = []
    base, parsed = 0, 0
    buf = bytearray()
    for cut in cuts:
        buf += data[base + len(buf) : cut]
        parsed = p.feed(buf, parsed, len(buf), base)
        assert 0 <= parsed <= len(buf)
        pages += [(base + a, base + b, blk, pg) for a, b, blk, pg in p.pages]
        p.pages.clear()
        if not p.parsing:
            break
        if parsed > len(buf) // 2:
            buf = bytearray(buf[parsed:])
            base += parsed
            parsed = 0
    return p, pages


def stream(data: bytes) -> None:
    cuts = _slices(data)
    p, pages = _parse(data, cuts, accelerate=False)
    ref = reference_read(data)
    assert pages == ref.pages, "parser and reference disagree on PAGE records"
    if ref.stop is not None:
        assert p.fallback is not None and p.fallback.offset == ref.stop, (p.fallback, ref.stop)
    elif ref.complete:
        assert p.fallback is None and p.phase is S.Phase.DEVICE_STATE, p.fallback
    else:
        assert p.fallback is None or "longer than" in p.fallback.reason, p.fallback
    if S.accelerator() == "c":
        pc, pages_c = _parse(data, cuts, accelerate=True)
        assert pages_c == pages and pc.fallback == p.fallback and pc.phase == p.phase
        assert (pc.zero_records, pc.page_records) == (p.zero_records, p.page_records)


class _ThirdGate(S.RewriteGate):
    """Decides at once; pages whose index is a multiple of 3 are free, in every block."""

    def __init__(self) -> None:
        self.hinted = 0

    def received(self, total: int) -> None:
        pass

    def decided_through(self) -> int:
        return 1 << 62

    def oracle_for(self, end: int) -> S.PageOracle | None:
        return self

    def add_listener(self, callback: Callable[[], None]) -> None:
        pass

    def is_free(self, block: str, page: int) -> bool:
        return page % 3 == 0


def _is_hinted(page: int) -> bool:
    return page % 3 == 0


def rewriter(data: bytes) -> None:
    from fphint_lab.proxy_loopback import run_proxy

    cuts = _slices(data)
    sizes = [b - a for a, b in zip([0, *cuts], cuts)][:64]
    res, out, _ = run_proxy(data, _ThirdGate(), chunks=sizes[:-1] if len(sizes) > 1 else None, timeout=20)
    assert res.outcome in (S.Outcome.FINISHED, S.Outcome.ABORTED), res
    assert not (res.stats.abort_reason or "").startswith("internal error"), res.stats.abort_reason
    finished = res.outcome is S.Outcome.FINISHED
    ref = reference_read(data)
    shift = prev = rewritten = 0

    def same(a: int, b: int) -> bool:
        """data[a:b] went out unchanged (or as much of it as went out at all)."""
        got = out[a - shift : b - shift]
        return got == data[a : a + len(got)] and (len(got) == b - a or not finished)

    for a, b, _blk, pg in ref.pages:
        if a + 7 - shift >= len(out):
            break
        assert same(prev, a + 7), f"bytes changed before the record at {a}"
        flag, new = data[a + 7], out[a + 7 - shift]
        fill = b - PAGE
        if new == flag:
            assert same(a + 7, b), f"page data of the record at {a} changed"
        else:
            assert _is_hinted(pg), f"record at {a} (page {pg}) rewritten without a hint"
            assert new == (flag & ~0x08) | 0x02, f"record at {a}: flags {flag:#x} became {new:#x}"
            assert same(a + 8, fill), f"record at {a}: its header changed"
            if fill - shift < len(out):
                assert out[fill - shift] == 0, f"record at {a}: fill byte {out[fill - shift]}"
            shift += PAGE - 1
            rewritten += 1
        prev = b
    assert same(prev, len(data)), "bytes after the last record changed"
    if finished:
        assert len(out) == len(data) - shift and rewritten == res.stats.pages_rewritten


def mtree(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        S.map_ram(S.parse_mtree(text))
    except S.MtreeError:
        pass


_END = 1 << 64
#: Four blocks of 2**62 bytes tiling the whole address space: every well-formed range maps.
_WHOLE = S.LayoutIndex(
    S.RamLayout.from_ranges([S.RamRange(gpa=i << 62, size=1 << 62, block=f"b{i}", offset=0) for i in range(4)])
)


def _words(data: bytes) -> list[int] | None:
    if not data:
        return None
    if data[0] % 2 == 0:
        chunk = S.ReportChunk()
        try:
            chunk.ParseFromString(data[1:])
        except Exception:  # protobuf's DecodeError: refused before any decoder runs
            return None
        return list(chunk.ranges)
    out = []
    body = data[1:]
    for i in range(0, len(body) - len(body) % 3, 3):  # a shift and 16 bits: small and huge values alike
        sh, v = body[i] % 64, int.from_bytes(body[i + 1 : i + 3], "big")
        out.append(((v << sh) - (body[i] >> 6 == 3)) % _END)
    return out


def ranges(data: bytes) -> None:
    words = _words(data)
    if words is None:
        return
    dec = S.ReportDecoder(_WHOLE)
    if len(words) % 2:
        try:
            dec.decode(words)
        except S.HintViolation:
            return
        raise AssertionError("odd word count accepted")
    try:
        ref = S.decode_ranges(words)
    except S.RangeError:
        ref = None
    split = max(2, (len(words) // (1 + data[0] % 5)) // 2 * 2)
    got: list[tuple[str, int, int]] = []
    accepted = 0
    refused = False
    for i in range(0, len(words), split):
        try:
            p = dec.decode(words[i : i + split])
        except S.HintViolation:
            refused = True
            break
        accepted += p.accepted
        got += [(p.blocks[b], f, c) for b, f, c in zip(p.block_idx.tolist(), p.first.tolist(), p.count.tolist())]
    assert refused == (ref is None), (refused, ref is None)
    if ref is None:
        return
    whole = [(s, n) for s, n in ref if -(-s // PAGE) < (s + n) // PAGE]
    assert accepted == len(whole)
    expect = []
    for s, n in whole:
        pg, last = -(-s // PAGE), (s + n) // PAGE
        while pg < last:
            stop = min(last, ((pg >> 50) + 1) << 50)
            expect.append((f"b{pg >> 50}", pg & ((1 << 50) - 1), stop - pg))
            pg = stop
    assert sorted(got) == sorted(expect)


#: name -> (target, corpus directory under tests/fuzz/corpus)
TARGETS: dict[str, tuple[Callable[[bytes], None], str]] = {
    "stream": (stream, "stream"),
    "rewriter": (rewriter, "stream"),
    "mtree": (mtree, "mtree"),
    "ranges": (ranges, "ranges"),
}
