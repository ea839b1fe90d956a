"""The main channel's hot path: parse, hold, judge, rewrite, send.

A PAGE record that ended at stream offset ``end`` is held until
``gate.decided_through() >= end``, then turned into a ZERO record if the
gate's oracle says its page is free. The relay asks ``gate.oracle_until(end)``
(the oracle and the last offset it holds for), so it asks once per window,
not once per record; records of a window without an oracle are skipped whole.

Holding is bounded (docs/safety-rule.md §3.6): a record held longer than
``hold_seconds``, or while more than ``hold_bytes`` are held, goes out
unchanged. While ``readahead_bytes`` are held the relay stops reading the
source, so what QEMU counts as sent stays close to what crossed the link (its
switchover estimate depends on it); pacing ends for good at the first record
whose time ran out, at the gate's ``guest_stopped`` and at the ram END section.
Records of that section are never held nor judged (§3.7), and the gate is
told to stop holding for hints (``stop_holding``). A give-up of the parser
before any rewrite lets the rest through verbatim; after one, it aborts (§3.8).

The relay runs on one thread and makes every gate call. Of its owner
(:class:`~.migration_proxy.MigrationProxy`) it knows only what it is given:
``ended()``, ``fail(outcome, reason)`` and ``note_fallback(reason)``.
"""

from __future__ import annotations

import collections
import logging
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from host_collector.proxy import sockets
from host_collector.proxy.results import BatchTap, PhaseListener, ProxyOutcome, ProxyStats
from host_collector.rewrite.gate import PageOracle, RewriteGate
from host_collector.stream import wire as s
from host_collector.stream.parser import PageRecord, StreamParser
from host_collector.stream.wire import Phase

log = logging.getLogger(__name__)

#: Receive buffer size; also the largest single recv.
CHUNK_SIZE = 4 << 20
#: Smallest read while pacing: past the read-ahead by at most this much.
_MIN_READ = 64 << 10
#: While paced, how often the gate is asked again without a wake-up.
_PACED_RECHECK_S = 0.01
_PAGE = s.PAGE_SIZE
_NOT_PAGE = ~s.FLAG_PAGE & 0xFF
_ZERO = s.FLAG_ZERO


@dataclass(frozen=True)
class HoldLimits:
    """How much the relay may hold back for the gate, and for how long."""

    #: Most stream bytes held behind the first record waiting for a verdict.
    hold_bytes: int = 64 << 20
    #: Longest a record waits for a verdict.
    hold_seconds: float = 1.0
    #: Stop reading the source while this much waits (None: read up to ``hold_bytes``).
    readahead_bytes: int | None = None
    #: Receive buffer size.
    chunk_size: int = CHUNK_SIZE

    def __post_init__(self) -> None:
        if (
            self.hold_bytes < 0
            or self.hold_seconds < 0
            or (self.readahead_bytes is not None and self.readahead_bytes <= 0)
        ):
            raise ValueError("hold bounds must not be negative, read-ahead must be positive")
        if self.chunk_size < 2 * (256 << 10):
            raise ValueError("chunk_size too small for the largest parsed item")


class _Chunk:
    """A receive buffer; bytes [sent, limit) still have to go to the destination."""

    __slots__ = ("base", "buf", "cuts", "fill", "limit", "parsed", "sent", "view")

    def __init__(self, size: int) -> None:
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.reset(0)

    def reset(self, base: int) -> None:
        self.base = base  # stream offset of buf[0]
        self.fill = 0  # bytes received
        self.parsed = 0  # bytes the parser is done with (or pass-through)
        self.sent = 0
        self.limit = -1  # end of this chunk's bytes once a later chunk took over
        #: Rewritten records not yet sent: the position of their fill byte.
        self.cuts: collections.deque[int] = collections.deque()


class _Batch:
    """PAGE records from one parse call, judged in order; ``i`` is the first not judged.

    A ``final`` batch (the ram END section) goes out unchanged without asking the gate.
    ``rw`` collects the indices of rewritten records for a tap (None: no tap).
    """

    __slots__ = ("chunk", "deadline", "final", "i", "pages", "received_at", "rw")

    def __init__(
        self,
        chunk: _Chunk,
        pages: list[PageRecord],
        received_at: float,
        deadline: float,
        final: bool = False,
        tap: bool = False,
    ) -> None:
        self.chunk = chunk
        self.pages = pages
        self.i = 0
        self.received_at = received_at
        self.deadline = deadline
        self.final = final
        self.rw: list[int] | None = [] if tap else None


class MainRelay:
    """Source -> destination on the main channel: parse, hold, judge, send.

    ``on_phase(phase, offset)`` is called from the relay's thread each time
    the stream enters a new phase, before any byte of it is forwarded.
    ``ended()`` says some thread has ended the migration (the relay then
    stops); ``fail(outcome, reason)`` ends it from here; ``note_fallback``
    records why the rest of the stream goes through unparsed.
    """

    def __init__(
        self,
        src: socket.socket,
        dst: socket.socket,
        gate: RewriteGate,
        limits: HoldLimits,
        *,
        on_phase: PhaseListener | None,
        ended: Callable[[], bool],
        fail: Callable[[ProxyOutcome, str], None],
        note_fallback: Callable[[str], None],
        tap: BatchTap | None = None,
    ) -> None:
        self.gate = gate
        self._tap = tap
        self.src = src
        self.dst = dst
        self._hold_bytes = limits.hold_bytes
        self._hold_seconds = limits.hold_seconds
        #: None: read ahead up to hold_bytes.
        self._readahead = limits.readahead_bytes
        self._on_phase = on_phase
        self._ended = ended
        self._fail = fail
        self._note_fallback = note_fallback
        self.parser = StreamParser()
        self.chunks: collections.deque[_Chunk] = collections.deque([_Chunk(limits.chunk_size)])
        self.spare: list[_Chunk] = []
        #: Batches with records not judged yet; nothing after the first such
        #: record is sent.
        self.held: collections.deque[_Batch] = collections.deque()
        self.received = 0
        self.sent_bytes = 0
        self.rewritten = 0
        self.pages_held = 0
        self.unjudged = 0
        self.src_eof = False
        self._reading = True  # src is polled for input while records are held
        self._paced = limits.readahead_bytes is not None
        self._completion_at: int | None = None  # stream offset of the ram END section
        self._extra: int | None = None
        self._waker = sockets.WakePipe()
        self._poller = select.poll()
        #: Where the time went (ProxyStats): reading stopped by the read-ahead,
        #: inside sendmsg, and held with nothing to send.
        self.paced_s = 0.0
        self._paced_since: float | None = None
        self.send_s = 0.0
        self.held_wait_s = 0.0
        #: The switchover as the relay saw it: when it first saw the guest stopped, what it then
        #: had received but not sent, and when the END section, the last held record and EOF came.
        self.stop_seen_at: float | None = None
        self.backlog_at_stop = 0
        self.end_section_at: float | None = None
        self.drained_at: float | None = None
        self.eof_at: float | None = None

    def snapshot(self, st: ProxyStats) -> ProxyStats:
        p = self.parser
        return replace(
            st,
            phase=p.phase,
            source_bytes=self.received,
            destination_bytes=self.sent_bytes,
            page_records=p.page_records,
            zero_records=p.zero_records,
            pages_rewritten=self.rewritten,
            pages_held=self.pages_held,
            pages_released_unjudged=self.unjudged,
            held_bytes=self._held_bytes(),
            paced_s=self.paced_s + (time.monotonic() - self._paced_since if self._paced_since is not None else 0.0),
            send_s=self.send_s,
            held_wait_s=self.held_wait_s,
            stop_seen_at=self.stop_seen_at,
            backlog_at_stop=self.backlog_at_stop,
            end_section_at=self.end_section_at,
            drained_at=self.drained_at,
            eof_at=self.eof_at,
        )

    def wake(self) -> None:
        """Make the loop look at the gate and the clock again (any thread)."""
        self._waker.wake()

    def extra_connection(self, n: int) -> None:
        """(acceptor thread) A connection beyond the main one arrived."""
        self._extra = n
        if self.rewritten:
            # The parsing thread may sit in recv on an idle source; do not wait for it.
            self._fail(
                ProxyOutcome.ABORTED,
                f"extra connection #{n} (multifd or postcopy-preempt) after {self.rewritten} pages were rewritten",
            )
        self.wake()

    def release(self) -> None:
        self._waker.close()
        self.chunks.clear()
        self.spare.clear()
        self.held.clear()

    # -- the loop --------------------------------------------------------------

    def run(self) -> None:
        try:
            self._loop()
        except _SideError as e:
            self._fail(ProxyOutcome.BROKEN, str(e))
        except Exception as e:  # a bug must not leave a half-relayed migration behind
            log.exception("migration proxy: internal error")
            self._fail(ProxyOutcome.ABORTED, f"internal error: {e!r}")

    def _loop(self) -> None:
        ended = self._ended
        poller = self._poller
        poller.register(self.src, select.POLLIN)
        waker = self._waker
        poller.register(waker.fd, select.POLLIN)
        while not ended():
            self._check_extra()
            if self.held:
                self._pace()
                # Wait for data, the gate (wake) or the first hold deadline.
                timeout = max(0.0, self.held[0].deadline - time.monotonic())
                if not self._reading:
                    # Not every change of decided_through wakes us (hints that
                    # stop being awaited do not): look again soon.
                    timeout = min(timeout, _PACED_RECHECK_S)
                t_wait = time.monotonic()
                events = poller.poll(int(timeout * 1000) + 1)
                self.held_wait_s += time.monotonic() - t_wait
                readable = False
                for fd, _ in events:
                    if fd == waker.fd:
                        waker.drain()
                    else:
                        readable = True
                if readable:
                    self._receive()
            elif self.src_eof:
                break  # everything is out
            else:
                self._receive()  # nothing held: block in recv
            if ended():
                break
            if self.stop_seen_at is None and self.gate.guest_stopped:
                self.stop_seen_at = time.monotonic()
                # Source bytes received and not yet sent (sent_bytes shrinks with every rewrite).
                first = self.chunks[0]
                self.backlog_at_stop = self.received - (first.base + first.sent)
            if self.held:
                self._judge()
                if not self.held and self.drained_at is None and self.stop_seen_at is not None:
                    self.drained_at = time.monotonic()
            self._send_ready()
        if not ended():
            log.debug("migration proxy: everything sent (%d bytes)", self.sent_bytes)
            sockets.half_close(self.dst)

    def _pace(self) -> None:
        """Read from the source only while less than the read-ahead is held."""
        if self.src_eof:
            return
        limit = self._readahead
        if self._paced and self.gate.guest_stopped:
            self._paced = False
        want = not self._paced or limit is None or self._held_bytes() < limit
        if want != self._reading:
            self._poller.modify(self.src, select.POLLIN if want else 0)
            self._reading = want
            now = time.monotonic()
            if want and self._paced_since is not None:
                self.paced_s += now - self._paced_since
                self._paced_since = None
            elif not want:
                self._paced_since = now

    def _held_bytes(self) -> int:
        try:
            bt = self.held[0]
            return self.received - (bt.chunk.base + bt.pages[bt.i][0])
        except IndexError:
            return 0

    def _check_extra(self) -> None:
        if self._extra is not None and self.parser.parsing:
            self.parser.give_up(f"extra connection #{self._extra} (multifd or postcopy-preempt)", self.received)
            self._after_parse()

    def _receive(self) -> None:
        ck = self.chunks[-1]
        if ck.fill == len(ck.buf):
            ck = self._next_chunk(ck)
        view = ck.view[ck.fill :]
        limit = self._readahead
        if self.held and self._paced and limit is not None:  # _pace() ran first: not stopped
            view = view[: max(_MIN_READ, limit - self._held_bytes())]
        try:
            n = self.src.recv_into(view)
        except OSError as e:
            raise _SideError(f"source connection failed: {sockets.describe(e)}") from e
        if n == 0:
            self._source_closed()
            return
        ck.fill += n
        self.received += n
        self.gate.received(self.received)
        self._check_extra()  # before parsing what may have come after it
        parser = self.parser
        if not parser.parsing:
            ck.parsed = ck.fill
            return
        ck.parsed = parser.feed(ck.buf, ck.parsed, ck.fill, ck.base)
        if parser.transitions or not parser.parsing:
            self._after_parse()
        pages = parser.pages
        if pages:
            parser.pages = []
            now = time.monotonic()
            deadline = now + self._hold_seconds
            tap = self._tap is not None
            final: list[PageRecord] = []
            if self._completion_at is not None:
                split = self._completion_at - ck.base
                i = next((k for k, rec in enumerate(pages) if rec[0] > split), len(pages))
                pages, final = pages[:i], pages[i:]
            if pages:
                bt = _Batch(ck, pages, now, deadline, tap=tap)
                self.held.append(bt)
                self._judge()
                if self.held and self.held[-1] is bt:
                    self.pages_held += len(pages) - bt.i
            if final:
                self.held.append(_Batch(ck, final, now, deadline, final=True, tap=tap))
                self._judge()
        if not parser.parsing:
            ck.parsed = ck.fill

    def _after_parse(self) -> None:
        parser = self.parser
        on_phase = self._on_phase
        for phase, offset in parser.transitions:
            log.debug(
                "migration proxy: %s at offset %d (received %d, sent %d, held %d bytes)",
                phase.value,
                offset,
                self.received,
                self.sent_bytes,
                self._held_bytes(),
            )
            if phase is Phase.COMPLETION:
                self._completion_at = offset
                self.end_section_at = time.monotonic()
                self.gate.stop_holding()
                # The guest is stopped: no switchover left to inform, and QEMU
                # may write the final pass holding the lock its QMP answers
                # need, so a paced source could not let the gate decide.
                self._paced = False
            if on_phase is not None and not self._ended():
                on_phase(phase, offset)
        parser.transitions.clear()
        if self._ended():
            return  # e.g. on_phase aborted: nothing of what follows counts
        fb = parser.fallback
        if fb is None or parser.parsing:
            return
        if self.rewritten:
            self._fail(
                ProxyOutcome.ABORTED, f"{fb.reason} at offset {fb.offset} after {self.rewritten} pages were rewritten"
            )
            return
        self._note_fallback(f"{fb.reason} at offset {fb.offset} ({fb.phase.value})")
        self.unjudged += len(parser.pages)
        parser.pages.clear()
        self._release_all()
        ck = self.chunks[-1]
        ck.parsed = ck.fill

    def _release_all(self) -> None:
        """Send every held record unchanged."""
        for bt in self.held:
            self.unjudged += len(bt.pages) - bt.i
            self._tapped(bt)
        self.held.clear()

    def _tapped(self, bt: _Batch) -> None:
        """Hand a batch that is done with (every record judged or let go) to the tap."""
        if self._tap is not None:
            self._tap(bt.received_at, bt.pages, bt.rw, bt.final)

    def _source_closed(self) -> None:
        self.src_eof = True
        self.eof_at = time.monotonic()
        log.debug(
            "migration proxy: source EOF at %d (sent %d, held %d bytes)",
            self.received,
            self.sent_bytes,
            self._held_bytes(),
        )
        self._poller.unregister(self.src)  # POLLIN stays set at EOF
        parser = self.parser
        if parser.parsing:
            # The stream ended mid-way: the destination fails at its end anyway,
            # so held records go out unchanged and no abort is needed.
            phase = parser.phase
            parser.give_up(f"the source closed the stream in phase {phase.value}", self.received)
            for ph, offset in parser.transitions:
                if self._on_phase is not None:
                    self._on_phase(ph, offset)
            parser.transitions.clear()
            self._note_fallback(f"the source closed the stream in phase {phase.value}")
            self._release_all()
        ck = self.chunks[-1]
        ck.parsed = ck.fill

    def _next_chunk(self, ck: _Chunk) -> _Chunk:
        """Continue in a fresh buffer, moving the unparsed tail along."""
        new = self.spare.pop() if self.spare else _Chunk(len(ck.buf))
        tail = ck.fill - ck.parsed
        new.reset(ck.base + ck.parsed)
        if tail:
            new.buf[:tail] = ck.buf[ck.parsed : ck.fill]
            new.fill = tail
        ck.limit = ck.parsed
        self.chunks.append(new)
        return new

    def _judge(self) -> None:
        """Judge held records in order: rewrite, keep, or let go unjudged at a bound."""
        held = self.held
        gate = self.gate
        oracle_until = gate.oracle_until
        oracle: PageOracle | None = None
        valid_through = -1  # the last record end `oracle` is known to answer for
        decided = gate.decided_through()
        now = time.monotonic()
        received = self.received
        limit = self._hold_bytes
        rewritten = 0
        unjudged = 0
        tapped = self._tapped if self._tap is not None else None
        try:
            while held:
                bt = held[0]
                ck = bt.chunk
                base = ck.base
                pages = bt.pages
                n = len(pages)
                i = bt.i
                buf = ck.buf
                cuts = ck.cuts
                rw = bt.rw
                expired = bt.deadline <= now
                last_end = base + pages[-1][1]
                if bt.final or (oracle is None and last_end <= valid_through):
                    held.popleft()  # the rest of the batch goes out unchanged
                    if tapped is not None:
                        tapped(bt)
                    continue
                while i < n:
                    a, b, blk, pg = pages[i]
                    end = base + b
                    if end <= decided:
                        if end > valid_through:
                            oracle, valid_through = oracle_until(end)
                            valid_through = min(max(valid_through, end), decided)
                        if oracle is not None and oracle.is_free(blk, pg):
                            buf[a + 7] = (buf[a + 7] & _NOT_PAGE) | _ZERO
                            fill = b - _PAGE
                            buf[fill] = 0
                            cuts.append(fill)
                            rewritten += 1
                            if rw is not None:
                                rw.append(i)
                    elif expired or received - (base + a) > limit:
                        unjudged += 1
                        if expired and self._paced:
                            self._paced = False
                            log.info(
                                "migration proxy: the gate took longer than %.1f s; no longer pacing the source",
                                self._hold_seconds,
                            )
                    else:
                        bt.i = i
                        return
                    i += 1
                held.popleft()
                if tapped is not None:
                    tapped(bt)
        finally:
            self.rewritten += rewritten
            self.unjudged += unjudged

    def _send_ready(self) -> None:
        """Send everything before the first held record."""
        if self.held:
            bt = self.held[0]
            stop_chunk: _Chunk | None = bt.chunk
            stop_pos = bt.pages[bt.i][0]
        else:
            stop_chunk, stop_pos = None, -1
        iov: list[memoryview] = []
        marks: list[tuple[_Chunk, int]] = []
        for ck in self.chunks:
            if ck is stop_chunk:
                stop = stop_pos
            elif ck.limit >= 0:
                stop = ck.limit
            else:
                stop = ck.parsed
            pos = ck.sent
            cuts = ck.cuts
            view = ck.view
            while cuts and cuts[0] < stop:
                fill = cuts.popleft()
                iov.append(view[pos : fill + 1])
                pos = fill + _PAGE
            if pos < stop:
                iov.append(view[pos:stop])
                pos = stop
            marks.append((ck, pos))
            if ck is stop_chunk:
                break
        if not iov:
            return
        t_send = time.monotonic()
        try:
            sent = sockets.sendmsg_all(self.dst, iov)
        except OSError as e:
            raise _SideError(f"destination stopped reading: {sockets.describe(e)}") from e
        self.send_s += time.monotonic() - t_send
        self.sent_bytes += sent
        for ck, pos in marks:
            ck.sent = pos
        # Recycle buffers that are fully sent and no longer written to.
        chunks = self.chunks
        while len(chunks) > 1 and chunks[0].sent >= chunks[0].limit:
            old = chunks.popleft()
            if len(self.spare) < 2:
                self.spare.append(old)


class _SideError(Exception):
    """An I/O error on one connection, worded for the stats."""
