"""The proxy over loopback with synthetic streams: rewriting, holding, fallback, abort, I/O failures."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
import time
from pathlib import Path

import pytest

from host_collector.proxy.migration_proxy import MigrationProxy, ProxyError
from host_collector.proxy.results import ProxyOutcome
from host_collector.rewrite.gate import NoHints
from host_collector.stream.wire import Phase
from tests.stream_helpers import (
    FixedGate,
    SpanSteppedGate,
    SteppedGate,
    StreamBuilder,
    be16,
    be32,
    be64,
    run_proxy,
    typical_stream,
)

HINTED = {("pc.ram", 1), ("pc.ram", 2), ("pc.ram", 20), ("pc.ram", 41), ("pc.bios", 1)}


def iteration_pages(b: StreamBuilder) -> list[tuple[int, int, str, int]]:
    """PAGE records before the ram END section: the only ones the gate is asked about."""
    end_at = bytes(b.orig).rindex(b"\x03" + be32(2))
    return [r for r in b.pages if r[0] < end_at]


def test_no_hints_relays_byte_for_byte_both_ways() -> None:
    b = typical_stream()
    data = bytes(b.orig)
    res, out, back = run_proxy(data, NoHints(), chunks=[7, 100, 5000, 3], reply=b"\x00\x02\x00\x04\x00\x00\x00\x01")
    assert res.outcome is ProxyOutcome.FINISHED
    assert out == data
    assert back == b"\x00\x02\x00\x04\x00\x00\x00\x01"
    st = res.stats
    assert st.source_bytes == st.destination_bytes == len(data)
    assert st.return_bytes == 8
    assert st.pages_rewritten == 0 and st.fallback_reason is None and st.phase is Phase.DEVICE_STATE


def test_hinted_page_records_become_zero_records() -> None:
    b = typical_stream(HINTED)
    gate = FixedGate(HINTED | {("pc.rom", 0), ("pc.ram", 3)})  # pc.ram 3 is sent as ZERO anyway
    res, out, _ = run_proxy(bytes(b.orig), gate)
    assert res.outcome is ProxyOutcome.FINISHED
    assert out == bytes(b.want)
    assert res.stats.pages_rewritten == 5  # pc.ram 41 once: its re-send in the END section is never judged
    assert len(b.orig) - len(out) == 5 * 4095
    # every PAGE record before END was judged, with the offset at which it ended
    assert [(end, blk, pg) for end, blk, pg in gate.asked] == [(e, blk, pg) for _, e, blk, pg in iteration_pages(b)]


@pytest.mark.parametrize("seed", range(8))
def test_rewrites_do_not_depend_on_how_the_source_writes(seed: int) -> None:
    b = typical_stream(HINTED)
    rng = random.Random(seed)
    data = bytes(b.orig)
    chunks = []
    left = len(data)
    while left > 0:
        n = rng.choice([1, 2, 9, 100, 4104, 4105, 20000])
        chunks.append(min(n, left))
        left -= n
    res, out, _ = run_proxy(data, FixedGate(HINTED), chunks=chunks[:-1])
    assert out == bytes(b.want)
    assert res.stats.pages_rewritten == 5


def test_small_buffers_move_partial_records_along() -> None:
    """Chunk handover mid-record, many times over (a 512 KiB buffer, 4 KiB pages)."""
    b = StreamBuilder().header().config().start_ram(2, {"pc.ram": 1024 * 4096})
    b.part(2)
    hinted = set()
    for pg in range(1024):
        h = pg % 5 == 0
        b.page("pc.ram", pg, hinted=h)
        if h:
            hinted.add(("pc.ram", pg))
    b.eos().footer(2).end(2).eos().footer(2).eof()
    res, out, _ = run_proxy(bytes(b.orig), FixedGate(hinted), chunk_size=512 << 10, chunks=[4000] * 50)
    assert out == bytes(b.want)
    assert res.stats.pages_rewritten == len(hinted)


def test_held_records_wait_for_the_gate_and_a_new_sync_window_goes_out_unchanged() -> None:
    b0 = typical_stream()
    mid_record = b0.pages[len(b0.pages) // 2]
    mid = mid_record[1]  # the window of the first "poll" ends with this record
    # expected: hinted pages whose records end after `mid` are zeroed, the rest unchanged
    late = {(blk, pg) for _, end, blk, pg in b0.pages if end > mid and (blk, pg) in HINTED}
    early = {(blk, pg) for _, end, blk, pg in b0.pages if end <= mid and (blk, pg) in HINTED}
    assert late and early
    # rebuild with only the late occurrences hinted (pc.ram 41 is sent twice, both late)
    want = typical_stream(late)
    gate = SteppedGate(HINTED)
    seen_before: dict[str, int] = {}

    def decide(px: MigrationProxy) -> None:
        deadline = time.monotonic() + 5
        while px.stats().source_bytes < len(b0.orig) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        st = px.stats()
        seen_before["sent"] = st.destination_bytes
        seen_before["held"] = st.pages_held
        gate.step(mid, confirmed=False)  # the poll saw a new sync count
        time.sleep(0.1)
        seen_before["sent_after_first_poll"] = px.stats().destination_bytes
        gate.step(gate.total, confirmed=True)

    res, out, _ = run_proxy(bytes(b0.orig), gate, before_close=decide, hold_seconds=30)
    first_page = b0.pages[0][0]
    assert seen_before["sent"] == first_page  # nothing from the first PAGE record on
    assert seen_before["held"] == len(iteration_pages(b0))
    # after the first poll: everything up to the first record it did not decide
    assert seen_before["sent_after_first_poll"] == min(a for a, end, _, _ in b0.pages if end > mid)
    assert out == bytes(want.want)
    assert gate.rewritten == late
    assert res.stats.pages_released_unjudged == 0


def test_a_gate_that_answers_per_window_is_asked_once_per_window() -> None:
    b0 = typical_stream()
    mid = b0.pages[len(b0.pages) // 2][1]
    late = {(blk, pg) for _, end, blk, pg in b0.pages if end > mid and (blk, pg) in HINTED}
    gate = SpanSteppedGate(HINTED)

    def decide(px: MigrationProxy) -> None:
        deadline = time.monotonic() + 5
        while px.stats().pages_held < len(iteration_pages(b0)) and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.step(mid, confirmed=False)
        gate.step(gate.total, confirmed=True)

    _res, out, _ = run_proxy(bytes(b0.orig), gate, before_close=decide, hold_seconds=30)
    assert out == bytes(typical_stream(late).want)
    assert gate.per_record_calls == 0
    # one question per window (each step may wake the proxy separately: at most 2 more)
    assert 2 <= len(gate.span_calls) <= 4 < len(b0.pages)


def test_windows_decided_while_the_stream_flows_through_small_recycled_buffers() -> None:
    """Held records spread over many 512 KiB buffers; windows alternate confirmed / new sync."""
    rng = random.Random(5)
    npages = 3000
    b0 = StreamBuilder().header().config().command(1).command(2, be32(1))
    b0.start_ram(2, {"pc.ram": npages * 4096, "vga": 64 * 4096})
    for part in range(6):
        b0.part(2)
        for pg in range(part * 500, part * 500 + 500):
            if pg % 7 == 0:
                b0.zero("pc.ram", pg)
            else:
                b0.page("pc.ram", pg, data=bytes([pg % 251 + 1]) * 4096)
            if pg % 97 == 0:
                b0.page("vga", pg % 64)
        b0.eos().footer(2)
    b0.end(2).eos().footer(2).eof()
    data = bytes(b0.orig)
    hinted = {(blk, pg) for _, _, blk, pg in b0.pages if rng.random() < 0.5}
    # windows: cut points at record ends, alternately confirmed and refused
    ends = sorted({end for _, end, _, _ in b0.pages})
    cuts = [*sorted(rng.sample(ends[:-1], 9)), len(data)]
    verdicts = [i % 2 == 0 for i in range(len(cuts))]

    def window_of(end: int) -> int:
        return next(i for i, c in enumerate(cuts) if end <= c)

    zeroed = {(a, blk, pg) for a, end, blk, pg in b0.pages if (blk, pg) in hinted and verdicts[window_of(end)]}
    # the expected stream, record by record from the original
    want = bytearray()
    pos = 0
    zero_starts = {a for a, _, _ in zeroed}
    for a, end, _, _ in b0.pages:
        want += data[pos:a]
        if a in zero_starts:
            hdr = bytearray(data[a : end - 4096])
            hdr[7] = (hdr[7] & ~0x08) | 0x02
            want += hdr + b"\x00"
        else:
            want += data[a:end]
        pos = end
    want += data[pos:]

    gate = SteppedGate(hinted)
    stepped = threading.Event()

    def poller(px: MigrationProxy) -> None:
        # answer each window once the proxy has received 2 MB past it (a slow
        # poll), so held records span several buffers
        for c, ok in zip(cuts, verdicts):
            deadline = time.monotonic() + 10
            while gate.total < min(c + 2_000_000, len(data)) and time.monotonic() < deadline:
                time.sleep(0.002)
            gate.step(c, ok)
        stepped.set()

    started: list[threading.Thread] = []

    def after_chunk(px: MigrationProxy) -> None:
        if not started:
            th = threading.Thread(target=poller, args=(px,), daemon=True)
            th.start()
            started.append(th)

    res, out, _ = run_proxy(
        data,
        gate,
        chunks=[300_000] * (len(data) // 300_000),
        pause=0.002,
        after_chunk=after_chunk,
        chunk_size=512 << 10,
        hold_seconds=30,
        hold_bytes=1 << 30,
    )
    assert stepped.wait(10)
    assert res.outcome is ProxyOutcome.FINISHED and res.stats.pages_released_unjudged == 0
    assert res.stats.pages_held > 1000
    assert out == bytes(want)
    assert res.stats.pages_rewritten == len(zeroed) > 100


def test_records_of_the_end_section_are_neither_held_nor_judged() -> None:
    """The guest is stopped and a sync ran before they were picked: no hint can apply, no downtime added."""
    b = StreamBuilder().header().config().command(1).command(2, be32(1))
    b.start_ram(2, {"pc.ram": 64 * 4096}).part(2).zero("pc.ram", 0).eos().footer(2)
    b.end(2)
    for pg in range(1, 33):
        b.page("pc.ram", pg)
    b.eos().footer(2).full(3, b"cpu", b"\x00" * 20).eof()
    gate = SteppedGate({("pc.ram", p) for p in range(64)})  # would hold anything it is asked about
    t0 = time.monotonic()
    res, out, _ = run_proxy(bytes(b.orig), gate, hold_seconds=30, timeout=10)
    assert time.monotonic() - t0 < 5
    assert out == bytes(b.orig) and res.outcome is ProxyOutcome.FINISHED
    assert res.stats.pages_held == 0 and not gate.asked and not gate.none_windows_asked


def test_a_silent_gate_delays_records_at_most_hold_seconds() -> None:
    b = typical_stream(HINTED)
    gate = SteppedGate(HINTED)  # never decides anything
    t0 = time.monotonic()
    res, out, _ = run_proxy(bytes(b.orig), gate, hold_seconds=0.3, timeout=10)
    took = time.monotonic() - t0
    assert out == bytes(b.orig)
    assert res.stats.pages_rewritten == 0
    assert res.stats.pages_released_unjudged == len(iteration_pages(b))
    assert 0.3 <= took < 3


def test_hold_bytes_bounds_what_waits_for_the_gate() -> None:
    b = StreamBuilder().header().config().start_ram(2, {"pc.ram": 256 * 4096}).part(2)
    for pg in range(256):
        b.page("pc.ram", pg)
    b.eos().footer(2).end(2).eos().footer(2).eof()
    data = bytes(b.orig)
    gate = SteppedGate({("pc.ram", p) for p in range(256)})
    seen: dict[str, int] = {}

    def look(px: MigrationProxy) -> None:
        deadline = time.monotonic() + 5
        while px.stats().source_bytes < len(data) and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.1)
        st = px.stats()
        seen["sent"], seen["held"] = st.destination_bytes, st.held_bytes

    res, out, _ = run_proxy(data, gate, before_close=look, hold_bytes=64 << 10, hold_seconds=1)
    assert out == data
    assert seen["held"] <= (64 << 10) and len(data) - seen["sent"] <= (64 << 10) + 4104
    assert res.stats.pages_released_unjudged == 256


def _with_bad_record(hinted_before: bool) -> tuple[StreamBuilder, int]:
    b = StreamBuilder().header().config().command(1).command(2, be32(1))
    b.start_ram(2, {"pc.ram": 64 * 4096}).part(2)
    b.page("pc.ram", 1, hinted=hinted_before).page("pc.ram", 2)
    bad_at = len(b.orig)
    b.raw(be64(3 * 4096 | 0x60) + b"\x01" + be16(3) + b"\x00\x01\x07")  # an XBZRLE record
    b.page("pc.ram", 4, hinted=False).eos().footer(2).end(2).eos().footer(2).eof()
    return b, bad_at


def test_unknown_record_before_any_rewrite_falls_back_to_pass_through() -> None:
    b, bad_at = _with_bad_record(hinted_before=False)
    gate = FixedGate({("pc.ram", 4)})  # only a page after the XBZRLE record is hinted
    res, out, _ = run_proxy(bytes(b.orig), gate)
    assert res.outcome is ProxyOutcome.FINISHED
    assert out == bytes(b.orig)
    assert res.stats.fallback_reason is not None and "XBZRLE" in res.stats.fallback_reason
    assert f"offset {bad_at}" in res.stats.fallback_reason
    assert res.stats.phase is Phase.PASSTHROUGH and not gate.rewritten


def test_unknown_record_in_the_same_read_as_a_hinted_page_wins() -> None:
    """Parsing runs ahead of judging: a give-up found in the same read comes first, so no rewrite."""
    b, _ = _with_bad_record(hinted_before=True)
    res, out, _ = run_proxy(bytes(b.orig), FixedGate({("pc.ram", 1)}))
    assert res.outcome is ProxyOutcome.FINISHED and out == bytes(b.orig)
    assert res.stats.pages_released_unjudged == 2


def test_unknown_record_after_a_rewrite_aborts_both_connections() -> None:
    b, bad_at = _with_bad_record(hinted_before=True)
    gate = FixedGate({("pc.ram", 1)})

    def wait_for_rewrite(px: MigrationProxy) -> None:
        deadline = time.monotonic() + 5
        while px.stats().pages_rewritten < 1 and time.monotonic() < deadline:
            time.sleep(0.01)

    res, out, _ = run_proxy(bytes(b.orig), gate, chunks=[bad_at], after_chunk=wait_for_rewrite)
    assert res.outcome is ProxyOutcome.ABORTED
    assert res.stats.abort_reason is not None and "XBZRLE" in res.stats.abort_reason
    # the destination got the rewritten prefix and not one byte of the XBZRLE record
    assert out == bytes(b.want)[: bad_at - 4095]
    assert res.stats.pages_rewritten == 1


def test_give_up_sends_held_records_unchanged() -> None:
    b, _ = _with_bad_record(hinted_before=True)
    gate = SteppedGate({("pc.ram", 1), ("pc.ram", 2)})  # holds, never decides
    res, out, _ = run_proxy(bytes(b.orig), gate, hold_seconds=30, timeout=10)
    assert res.outcome is ProxyOutcome.FINISHED
    assert out == bytes(b.orig)
    assert res.stats.pages_released_unjudged == 2 and res.stats.pages_rewritten == 0


def test_source_closing_mid_stream_forwards_what_came() -> None:
    b = typical_stream(HINTED)
    data = bytes(b.orig)[: len(b.orig) // 2 + 10]
    res, out, _ = run_proxy(data, FixedGate(HINTED))
    assert res.outcome is ProxyOutcome.FINISHED
    assert res.stats.fallback_reason is not None and "source closed the stream" in res.stats.fallback_reason
    # complete records were judged; the torn one at the end went out as it came
    n = res.stats.pages_rewritten
    assert n >= 1 and len(data) - len(out) == n * 4095
    assert out[-10:] == data[-10:]


def test_on_phase_abort_cuts_the_stream_before_that_phase() -> None:
    b = typical_stream()
    data = bytes(b.orig)
    cut: dict[str, int] = {}
    holder: list[MigrationProxy] = []

    def on_phase(phase: Phase, offset: int) -> None:
        if phase is Phase.COMPLETION:
            cut["at"] = offset
            holder[0].abort("test cut")

    dest = socket.create_server(("127.0.0.1", 0))
    got = bytearray()

    def destination() -> None:
        c, _ = dest.accept()
        while d := c.recv(65536):
            got.extend(d)
        c.close()

    t = threading.Thread(target=destination, daemon=True)
    t.start()
    px = MigrationProxy("tcp:127.0.0.1:0", f"tcp:127.0.0.1:{dest.getsockname()[1]}", NoHints(), on_phase=on_phase)
    holder.append(px)
    px.start()
    src = socket.create_connection(("127.0.0.1", int(px.listen_address.rsplit(":", 1)[1])))
    src.sendall(data)
    res = px.wait(10)
    t.join(5)
    assert res is not None and res.outcome is ProxyOutcome.ABORTED and res.stats.abort_reason == "test cut"
    assert data[cut["at"]] == 0x03
    assert bytes(got) == data[: len(got)] and len(got) <= cut["at"]
    # the source's connection is gone too
    src.settimeout(5)
    with pytest.raises(OSError):
        for _ in range(100):
            src.sendall(b"\0" * 65536)
            if not src.recv(1):
                raise ConnectionResetError("EOF")


def test_destination_unreachable_breaks_the_migration() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        px = MigrationProxy("tcp:127.0.0.1:0", f"tcp:127.0.0.1:{port}", NoHints())
        px.start()
        src = socket.create_connection(("127.0.0.1", int(px.listen_address.rsplit(":", 1)[1])))
        res = px.wait(10)
    assert res is not None and res.outcome is ProxyOutcome.BROKEN
    assert res.stats.error is not None and "cannot connect to the destination" in res.stats.error
    src.settimeout(5)
    try:
        assert src.recv(1) == b""
    except ConnectionResetError:
        pass


def test_destination_vanishing_mid_stream_closes_the_source_at_once() -> None:
    b = StreamBuilder().header().config().start_ram(2, {"pc.ram": 4096 * 4096}).part(2)
    for pg in range(4096):
        b.page("pc.ram", pg)
    data = bytes(b.orig)
    dest = socket.create_server(("127.0.0.1", 0))

    def destination() -> None:
        c, _ = dest.accept()
        c.recv(100000)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()  # a reset, like a killed QEMU with unread data

    threading.Thread(target=destination, daemon=True).start()
    px = MigrationProxy("tcp:127.0.0.1:0", f"tcp:127.0.0.1:{dest.getsockname()[1]}", NoHints())
    px.start()
    src = socket.create_connection(("127.0.0.1", int(px.listen_address.rsplit(":", 1)[1])))
    src.settimeout(10)
    with pytest.raises(OSError):
        src.sendall(data)
        src.sendall(data)
    res = px.wait(10)
    assert res is not None and res.outcome is ProxyOutcome.BROKEN
    assert res.stats.error is not None


def test_return_path_stays_open_after_the_source_finished_sending() -> None:
    b = typical_stream()
    reply = b"\x00\x01\x00\x04\x00\x00\x00\x00"  # SHUT 0, sent after the whole stream
    res, out, back = run_proxy(bytes(b.orig), NoHints(), reply=reply)
    assert out == bytes(b.orig) and back == reply and res.outcome is ProxyOutcome.FINISHED


def test_extra_connections_are_relayed_in_accept_order_and_stop_rewriting() -> None:
    b = typical_stream(set())
    data = bytes(b.orig)
    dest = socket.create_server(("127.0.0.1", 0))
    conns: list[bytearray] = []
    done = threading.Event()

    def destination() -> None:
        threads = []
        for i in range(3):
            c, _ = dest.accept()
            buf = bytearray()
            conns.append(buf)

            def pump(c: socket.socket = c, buf: bytearray = buf, i: int = i) -> None:
                while d := c.recv(65536):
                    buf.extend(d)
                if i:
                    c.sendall(b"ack%d" % i)
                c.close()

            t = threading.Thread(target=pump)
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
        done.set()

    threading.Thread(target=destination, daemon=True).start()
    gate = FixedGate(HINTED)
    px = MigrationProxy("tcp:127.0.0.1:0", f"tcp:127.0.0.1:{dest.getsockname()[1]}", gate)
    px.start()
    port = int(px.listen_address.rsplit(":", 1)[1])
    main = socket.create_connection(("127.0.0.1", port))
    head = b0 = data[: b.pages[0][0]]  # everything before the first PAGE record
    main.sendall(head)
    extras = []
    for i in (1, 2):
        e = socket.create_connection(("127.0.0.1", port))
        e.sendall(be32(0x11223344) + be32(1) + b"channel%d" % i)
        e.shutdown(socket.SHUT_WR)
        extras.append(e)
        time.sleep(0.1)  # accept order = connect order
    main.sendall(data[len(b0) :])
    main.shutdown(socket.SHUT_WR)
    res = px.wait(10)
    assert done.wait(5)
    assert res is not None and res.outcome is ProxyOutcome.FINISHED
    assert bytes(conns[0]) == data  # nothing rewritten once an extra connection came
    assert bytes(conns[1]).endswith(b"channel1") and bytes(conns[2]).endswith(b"channel2")
    assert [e.recv(10) for e in extras] == [b"ack1", b"ack2"]
    st = res.stats
    assert st.extra_connections == 2 and st.pages_rewritten == 0
    assert st.fallback_reason is not None and "extra connection" in st.fallback_reason


def test_an_extra_connection_after_rewrites_aborts() -> None:
    b = typical_stream(HINTED)
    data = bytes(b.orig)
    dest = socket.create_server(("127.0.0.1", 0))

    def destination() -> None:
        for _ in range(2):
            c, _ = dest.accept()
            threading.Thread(target=lambda c=c: [None for _ in iter(lambda: c.recv(65536), b"")], daemon=True).start()

    threading.Thread(target=destination, daemon=True).start()
    px = MigrationProxy("tcp:127.0.0.1:0", f"tcp:127.0.0.1:{dest.getsockname()[1]}", FixedGate(HINTED))
    px.start()
    port = int(px.listen_address.rsplit(":", 1)[1])
    main = socket.create_connection(("127.0.0.1", port))
    main.sendall(data[: b.pages[3][1]])  # pc.ram 1 and 2 are rewritten by now
    deadline = time.monotonic() + 5
    while px.stats().pages_rewritten < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    socket.create_connection(("127.0.0.1", port)).sendall(be32(0x11223344))
    res = px.wait(10)
    assert res is not None and res.outcome is ProxyOutcome.ABORTED
    assert res.stats.abort_reason is not None and "extra connection" in res.stats.abort_reason


def test_unix_sockets_and_wait_async(tmp_path: Path) -> None:
    b = typical_stream(HINTED)
    dpath = tmp_path / "dest.sock"
    dest = socket.socket(socket.AF_UNIX)
    dest.bind(str(dpath))
    dest.listen()
    got = bytearray()

    def destination() -> None:
        c, _ = dest.accept()
        while d := c.recv(65536):
            got.extend(d)
        c.close()

    threading.Thread(target=destination, daemon=True).start()
    px = MigrationProxy(f"unix:{tmp_path / 'proxy.sock'}", f"unix:{dpath}", FixedGate(HINTED))
    px.start()
    assert px.listen_address == f"unix:{tmp_path / 'proxy.sock'}"

    async def migrate() -> ProxyOutcome:
        loop = asyncio.get_running_loop()

        def source() -> None:
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(tmp_path / "proxy.sock"))
            s.sendall(bytes(b.orig))
            s.shutdown(socket.SHUT_WR)
            s.recv(1)
            s.close()

        fut = loop.run_in_executor(None, source)
        result = await asyncio.wait_for(px.wait_async(), 10)
        await fut
        return result.outcome

    assert asyncio.run(migrate()) is ProxyOutcome.FINISHED
    assert bytes(got) == bytes(b.want)
    assert not (tmp_path / "proxy.sock").exists()


def test_bad_addresses_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="vsock"):
        MigrationProxy("vsock:3:1234", "tcp:127.0.0.1:1", NoHints())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        px = MigrationProxy(f"tcp:127.0.0.1:{s.getsockname()[1]}", "tcp:127.0.0.1:1", NoHints())
        with pytest.raises(ProxyError, match="cannot listen"):
            px.start()


def test_close_before_any_connection_ends_the_proxy() -> None:
    px = MigrationProxy("tcp:127.0.0.1:0", "tcp:127.0.0.1:1", NoHints())
    px.start()
    addr = px.listen_address
    px.close()
    res = px.wait(5)
    assert res is not None and res.outcome is ProxyOutcome.ABORTED
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(addr.rsplit(":", 1)[1])), timeout=2)


class HintHoldingGate(FixedGate):
    """Holds every decision, as the epoch gate does while hints are on their
    way, until the proxy says the guest has stopped (``stop_holding``)."""

    def __init__(self, free: set[tuple[str, int]]) -> None:
        super().__init__(free)
        self.holding = True
        self.total = 0
        self.stopped_at: list[int] = []

    def received(self, total: int) -> None:
        super().received(total)
        self.total = total

    def decided_through(self) -> int:
        return 0 if self.holding else 1 << 62

    def stop_holding(self) -> None:
        self.holding = False
        self.stopped_at.append(self.total)


def test_completion_stops_the_wait_for_hints() -> None:
    """When the ram END section begins the guest is stopped, so hints still
    awaited will not come: the proxy tells the gate at once, rather than
    holding the iteration's last records (and the final pass behind them)
    to its hold bound, which would all be downtime."""
    b = typical_stream(HINTED)
    end_at = bytes(b.orig).rindex(b"\x03" + be32(2))
    gate = HintHoldingGate(HINTED)
    res, out, _ = run_proxy(bytes(b.orig), gate, hold_seconds=60.0, timeout=15.0)
    assert res is not None and res.outcome is ProxyOutcome.FINISHED
    assert len(gate.stopped_at) == 1 and gate.stopped_at[0] > end_at
    assert out == bytes(b.want)  # decided after the stop: the hints still apply
    assert res.stats.pages_rewritten == 5


def _many_pages(n: int) -> StreamBuilder:
    b = StreamBuilder().header().config().start_ram(2, {"pc.ram": n * 4096}).part(2)
    for pg in range(n):
        b.page("pc.ram", pg, hinted=True)
    return b.eos().footer(2).end(2).eos().footer(2).eof()


def test_the_source_is_paced_while_the_readahead_waits_for_the_gate() -> None:
    """What QEMU has written but the proxy holds is invisible to its switchover
    estimate: past the read-ahead the proxy stops reading, so QEMU waits too."""
    b = _many_pages(1024)
    data = bytes(b.orig)
    gate = SteppedGate({("pc.ram", p) for p in range(1024)})
    seen: dict[str, int] = {}

    def look(px: MigrationProxy) -> None:
        time.sleep(0.5)
        st = px.stats()
        seen["received"], seen["held"] = st.source_bytes, st.held_bytes
        gate.step(len(data), confirmed=True)

    res, out, _ = run_proxy(data, gate, before_close=look, hold_seconds=30, readahead_bytes=256 << 10)
    assert seen["held"] <= (256 << 10) + (64 << 10), seen
    assert seen["received"] < len(data) // 2, seen
    assert res.outcome is ProxyOutcome.FINISHED and out == bytes(b.want)
    assert res.stats.pages_rewritten == 1024 and res.stats.pages_released_unjudged == 0


def test_a_gate_slower_than_the_hold_stops_the_pacing() -> None:
    """Pacing must not turn a stuck gate into a crawl: once a record's hold
    time runs out the proxy reads ahead again (up to hold_bytes)."""
    b = _many_pages(1024)
    data = bytes(b.orig)
    gate = SteppedGate(set())  # never decides
    t0 = time.monotonic()
    res, out, _ = run_proxy(data, gate, hold_seconds=0.3, readahead_bytes=64 << 10, timeout=10)
    assert res.outcome is ProxyOutcome.FINISHED and out == data
    # paced throughout, 4 MiB at 64 KiB per 0.3 s would take ~20 s
    assert time.monotonic() - t0 < 3
