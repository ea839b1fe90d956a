"""The migration proxy: relays source <-> destination and zeroes provably free pages.

One :class:`MigrationProxy` serves one migration. The first connection it
accepts is the main channel (QEMU 7.2's destination also takes the first
connection as the main one); it is parsed and may be rewritten. Every later
connection (multifd, postcopy-preempt) is relayed verbatim to its own upstream
connection, opened in accept order, and stops all rewriting on the main
channel. The destination -> source direction (the return path) is always
relayed verbatim and kept open until the destination closes it.

Rewriting follows the gate (gate.py): a PAGE record that ended at stream
offset ``end`` is held until ``gate.decided_through() >= end``, then it is
turned into a ZERO record if ``gate.oracle_for(end)`` says its page is free.
A record held longer than ``hold_seconds``, or while more than ``hold_bytes``
are held, goes out unchanged: the proxy never waits on the guest. While
``readahead_bytes`` are held the proxy stops reading from the source, so the
source's idea of what it has sent stays close to what crossed the link (its
switchover decision depends on it); the first record that goes out unjudged
because its time ran out turns this off for the rest of the migration (a gate
that slow should not pace the source), and so does the ram END section. Records of
the ram END section are never held nor judged: QEMU stops the guest and then
runs a dirty sync before it picks them (migration_completion ->
ram_save_complete), so no hint can be both later than that sync and earlier
than the pick, and holding them would only add downtime. When that section
begins the gate is also told the guest has stopped (``stop_holding``, if it
has one), so it no longer holds decisions for hints that cannot come.

When the parser meets something it does not understand it gives up and the
rest goes through byte for byte. If pages were already rewritten by then the
proxy cannot prove those rewrites stay sound (a later record could be a delta
against the page, as XBZRLE is), so it aborts instead: both sockets are shut
at once, which fails the migration and, with ``return-path`` on, leaves the
guest running on the source (qemu-stream.md section 9).

Threads: one accepts, one parses and relays source -> destination (the hot
path), one relays the return path, two per extra connection. All gate calls
come from the parsing thread. Use :meth:`MigrationProxy.wait_async` from
asyncio code.

A gate may also offer ``oracle_until(end) -> (oracle, valid_through)``
(:class:`SpanGate`): the answer ``oracle_for(end)`` would give, and the last
offset through which every record gets that same answer. The proxy then asks
once per window instead of once per PAGE record.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import grpc

from fphint import addresses
from host_collector.errors import CollectorError
from host_collector.migration import stream as s
from host_collector.migration.gate import NoHints, PageOracle, RewriteGate
from host_collector.migration.parser import PageRecord, StreamParser
from host_collector.migration.stream import Phase

log = logging.getLogger(__name__)

#: Receive buffer size; also the largest single recv.
CHUNK_SIZE = 4 << 20
#: Smallest read while pacing: past the read-ahead by at most this much.
_MIN_READ = 64 << 10
#: While paced, how often the gate is asked again without a wake-up.
_PACED_RECHECK_S = 0.01
_RELAY_SIZE = 1 << 20
_IOV_MAX = 1024
_PAGE = s.PAGE_SIZE
_NOT_PAGE = ~s.FLAG_PAGE & 0xFF
_ZERO = s.FLAG_ZERO


class Outcome(enum.Enum):
    """How a migration through the proxy ended (as far as the proxy can tell)."""

    #: Both ends closed their connections; everything received was forwarded.
    FINISHED = "finished"
    #: The proxy cut every connection on purpose (see ``abort_reason``).
    ABORTED = "aborted"
    #: A connection failed (refused, reset, a peer vanished mid-stream) and
    #: the proxy closed every other one at once.
    BROKEN = "broken"


@dataclass(frozen=True)
class ProxyStats:
    """Counters of one migration; a snapshot, safe to read from any thread."""

    phase: Phase = Phase.HEADER
    #: Main channel bytes received from the source (the gate's offsets).
    source_bytes: int = 0
    #: Main channel bytes sent to the destination.
    destination_bytes: int = 0
    #: Return-path bytes relayed destination -> source.
    return_bytes: int = 0
    extra_connections: int = 0
    #: Bytes relayed on extra connections, both directions.
    extra_bytes: int = 0
    page_records: int = 0
    zero_records: int = 0
    pages_rewritten: int = 0
    #: PAGE records that had to wait for the gate.
    pages_held: int = 0
    #: Held records sent unchanged because a bound was hit or parsing stopped.
    pages_released_unjudged: int = 0
    #: Bytes currently held back.
    held_bytes: int = 0
    #: Why the parser gave up (the rest went through verbatim), if it did.
    fallback_reason: str | None = None
    #: Why the proxy cut the connections on purpose, if it did.
    abort_reason: str | None = None
    #: The I/O error that ended the migration, if any.
    error: str | None = None


@dataclass(frozen=True)
class ProxyResult:
    outcome: Outcome
    stats: ProxyStats


PhaseListener = Callable[[Phase, int], None]


class SpanGate(Protocol):
    """Optional extension of :class:`RewriteGate` (see the module docstring)."""

    def oracle_until(self, end: int) -> tuple[PageOracle | None, int]:
        """(``oracle_for(end)``, last offset >= ``end`` with the same answer)."""
        ...


class ProxyError(CollectorError):
    """The proxy could not start (bad address, port in use)."""

    default_status = grpc.StatusCode.UNAVAILABLE


class MigrationProxy:
    """Relay one migration from ``listen`` to ``dest`` through ``gate``.

    ``listen`` and ``dest`` are ``tcp:HOST:PORT`` or ``unix:PATH``; port 0
    picks a free port, see :attr:`listen_address` after :meth:`start`.
    ``on_phase(phase, offset)`` is called from the parsing thread each time
    the main channel enters a new :class:`Phase`, before any byte of that
    phase is forwarded (so calling :meth:`abort` from it cuts the stream
    exactly there).
    """

    def __init__(
        self,
        listen: str,
        dest: str,
        gate: RewriteGate,
        *,
        hold_bytes: int = 64 << 20,
        hold_seconds: float = 1.0,
        readahead_bytes: int | None = None,
        on_phase: PhaseListener | None = None,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        if hold_bytes < 0 or hold_seconds < 0 or (readahead_bytes is not None and readahead_bytes <= 0):
            raise ValueError("hold bounds must not be negative, read-ahead must be positive")
        if chunk_size < 2 * (256 << 10):
            raise ValueError("chunk_size too small for the largest parsed item")
        self._listen = _parse_endpoint(listen)
        self._dest = _parse_endpoint(dest)
        self._gate = gate
        self._hold_bytes = hold_bytes
        self._hold_seconds = hold_seconds
        #: None: read ahead up to hold_bytes.
        self._readahead = readahead_bytes
        self._on_phase = on_phase
        self._chunk_size = chunk_size
        self._lock = threading.Lock()
        self._stats = ProxyStats()
        self._listener: socket.socket | None = None
        self._address = ""
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._main: _MainRelay | None = None
        self._done = threading.Event()
        self._result: ProxyResult | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[ProxyResult]]] = []
        self._outcome: Outcome | None = None

    # -- public API --------------------------------------------------------

    def start(self) -> None:
        """Bind and listen; returns at once. Connections are served in threads."""
        if self._address:
            raise ProxyError("already started")
        ep = self._listen
        try:
            if ep.kind == "unix":
                ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                ls.bind(ep.path)
            else:
                ls = socket.create_server((ep.host, ep.port), family=_family(ep.host), backlog=16)
            ls.listen(16)
        except OSError as e:
            raise ProxyError(f"cannot listen on {ep}: {e}") from e
        self._listener = ls
        if ep.kind == "unix":
            self._address = f"unix:{ep.path}"
        else:
            host, port = ls.getsockname()[:2]
            self._address = f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"
        self._gate.add_listener(self._wake_main)
        t = threading.Thread(target=self._accept_loop, name="fph-proxy-accept", daemon=True)
        self._threads.append(t)
        t.start()

    @property
    def listen_address(self) -> str:
        """Where the source must connect (``tcp:HOST:PORT`` / ``unix:PATH``), port resolved."""
        if not self._address:
            raise ProxyError("not started")
        return self._address

    def stats(self) -> ProxyStats:
        main = self._main
        with self._lock:
            st = self._stats
        if main is not None:
            st = main.snapshot(st)
        return st

    def abort(self, reason: str) -> None:
        """Cut every connection now (any thread). A no-op once the migration ended."""
        self._fail(Outcome.ABORTED, reason)

    def close(self) -> None:
        """Stop listening; abort a migration in progress. Idempotent."""
        if self._main is None and not self._done.is_set():
            self._finish(Outcome.ABORTED, "proxy closed before the source connected")
        elif not self._done.is_set():
            self.abort("proxy closed")
        self._close_listener()

    def wait(self, timeout: float | None = None) -> ProxyResult | None:
        """Block until the migration ended; None on timeout."""
        if not self._done.wait(timeout):
            return None
        return self._result

    async def wait_async(self) -> ProxyResult:
        """The asyncio form of :meth:`wait`."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[ProxyResult] = loop.create_future()
        with self._lock:
            if self._result is None:
                self._waiters.append((loop, fut))
            else:
                fut.set_result(self._result)
        return await fut

    # -- connections ---------------------------------------------------------

    def _accept_loop(self) -> None:
        ls = self._listener
        assert ls is not None
        n = 0
        while not self._done.is_set():
            try:
                conn, _ = ls.accept()
            except OSError:
                return  # listener closed
            try:
                up = self._connect_dest()
            except OSError as e:
                _hard_close(conn)
                self._fail(Outcome.BROKEN, f"cannot connect to the destination {self._dest}: {e}")
                return
            for sk in (conn, up):
                _tune(sk)
            with self._lock:
                if self._done.is_set():
                    _hard_close(conn)
                    _hard_close(up)
                    return
                self._sockets += [conn, up]
            if n == 0:
                self._start_main(conn, up)
            else:
                self._start_extra(n, conn, up)
            n += 1

    def _connect_dest(self) -> socket.socket:
        ep = self._dest
        if ep.kind == "unix":
            sk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sk.connect(ep.path)
            except OSError:
                sk.close()
                raise
            return sk
        return socket.create_connection((ep.host, ep.port), timeout=10.0)

    def _start_main(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(None)
        dst.settimeout(None)
        main = _MainRelay(self, src, dst)
        self._main = main
        fwd = threading.Thread(target=main.run, name="fph-proxy-main", daemon=True)
        back = threading.Thread(
            target=self._relay_return, args=(dst, src), name="fph-proxy-return", daemon=True
        )
        self._threads += [fwd, back]
        fwd.start()
        back.start()
        watcher = threading.Thread(target=self._watch, name="fph-proxy-watch", daemon=True)
        watcher.start()

    def _start_extra(self, n: int, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(None)
        dst.settimeout(None)
        with self._lock:
            self._stats = replace(self._stats, extra_connections=self._stats.extra_connections + 1)
        assert self._main is not None
        self._main.extra_connection(n)
        for a, b, name in ((src, dst, "fwd"), (dst, src, "back")):
            t = threading.Thread(
                target=self._relay_extra, args=(a, b), name=f"fph-proxy-extra{n}-{name}", daemon=True
            )
            self._threads.append(t)
            t.start()

    def _relay_return(self, dst: socket.socket, src: socket.socket) -> None:
        def count(n: int) -> None:
            with self._lock:
                self._stats = replace(self._stats, return_bytes=self._stats.return_bytes + n)

        self._pipe(dst, src, count, "destination", "source")

    def _relay_extra(self, a: socket.socket, b: socket.socket) -> None:
        def count(n: int) -> None:
            with self._lock:
                self._stats = replace(self._stats, extra_bytes=self._stats.extra_bytes + n)

        self._pipe(a, b, count, "extra connection", "extra connection")

    def _pipe(
        self,
        a: socket.socket,
        b: socket.socket,
        count: Callable[[int], None],
        a_name: str,
        b_name: str,
    ) -> None:
        """Verbatim relay a -> b; forward a's EOF as a half close."""
        buf = bytearray(_RELAY_SIZE)
        view = memoryview(buf)
        while True:
            try:
                n = a.recv_into(buf)
            except OSError as e:
                self._fail(Outcome.BROKEN, f"{a_name} connection failed: {_err(e)}")
                return
            if n == 0:
                _half_close(b)
                return
            try:
                b.sendall(view[:n])
            except OSError as e:
                self._fail(Outcome.BROKEN, f"{b_name} stopped reading: {_err(e)}")
                return
            count(n)

    def _watch(self) -> None:
        """Ends the migration once every relay thread has returned."""
        while True:
            with self._lock:
                threads = [t for t in self._threads if t.name != "fph-proxy-accept"]
            for t in threads:
                t.join()
            with self._lock:
                if all(not t.is_alive() for t in self._threads if t.name != "fph-proxy-accept"):
                    break
        self._finish(self._outcome or Outcome.FINISHED, None)

    # -- ending --------------------------------------------------------------

    def _fail(self, outcome: Outcome, reason: str) -> None:
        """Shut every connection at once; the first failure names the outcome."""
        with self._lock:
            if self._done.is_set() or self._outcome is not None:
                return
            self._outcome = outcome
            if outcome is Outcome.ABORTED:
                self._stats = replace(self._stats, abort_reason=reason)
            else:
                self._stats = replace(self._stats, error=reason)
            socks = list(self._sockets)
        log.warning("migration proxy: %s: %s", outcome.value, reason)
        for sk in socks:
            _shutdown(sk)
        if self._main is None:
            self._finish(outcome, None)
        else:
            self._main.wake()
        self._close_listener()

    def _finish(self, outcome: Outcome, reason: str | None) -> None:
        with self._lock:
            if self._done.is_set():
                return
            if reason is not None:
                self._stats = replace(self._stats, abort_reason=reason)
            socks = list(self._sockets)
            self._sockets.clear()
        for sk in socks:
            if outcome is Outcome.FINISHED:
                sk.close()
            else:
                _hard_close(sk)
        self._close_listener()
        result = ProxyResult(outcome, self.stats())
        if self._main is not None:
            self._main.release()
        with self._lock:
            self._result = result
            waiters, self._waiters = self._waiters, []
        self._done.set()
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_set_result, fut, result)

    def _close_listener(self) -> None:
        with self._lock:
            ls, self._listener = self._listener, None
        if ls is None:
            return
        try:
            ls.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        ls.close()
        if self._listen.kind == "unix":
            try:
                os.unlink(self._listen.path)
            except OSError:
                pass

    def _wake_main(self) -> None:
        main = self._main
        if main is not None:
            main.wake()

    def _note_fallback(self, reason: str) -> None:
        with self._lock:
            if self._stats.fallback_reason is None:
                self._stats = replace(self._stats, fallback_reason=reason)


class _Chunk:
    """A receive buffer; bytes [sent, limit) still have to go to the destination."""

    __slots__ = ("buf", "view", "base", "fill", "parsed", "sent", "limit", "cuts")

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
    """

    __slots__ = ("chunk", "pages", "i", "deadline", "final")

    def __init__(self, chunk: _Chunk, pages: list[PageRecord], deadline: float, final: bool = False) -> None:
        self.chunk = chunk
        self.pages = pages
        self.i = 0
        self.deadline = deadline
        self.final = final


class _MainRelay:
    """Source -> destination on the main channel: parse, hold, judge, send."""

    def __init__(self, proxy: MigrationProxy, src: socket.socket, dst: socket.socket) -> None:
        self.proxy = proxy
        self.gate = proxy._gate
        self.src = src
        self.dst = dst
        self.parser = StreamParser()
        span = getattr(self.gate, "oracle_until", None)
        if span is None and type(self.gate) is NoHints:
            span = _never  # one window covering everything: batches are skipped whole
        self._oracle_until: Callable[[int], tuple[PageOracle | None, int]] | None = span
        self.chunks: collections.deque[_Chunk] = collections.deque([_Chunk(proxy._chunk_size)])
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
        self._paced = proxy._readahead is not None
        self._completion_at: int | None = None  # stream offset of the ram END section
        self._extra: int | None = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_lock = threading.Lock()
        self._woken = False
        self._released = False
        self._poller = select.poll()

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
        )

    def wake(self) -> None:
        """Make the loop look at the gate and the clock again (any thread)."""
        with self._wake_lock:  # the pipe is closed under the same lock
            if self._woken or self._released:
                return
            self._woken = True
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass

    def extra_connection(self, n: int) -> None:
        """(acceptor thread) A connection beyond the main one arrived."""
        self._extra = n
        if self.rewritten:
            # The parsing thread may sit in recv on an idle source; do not wait for it.
            self.proxy.abort(
                f"extra connection #{n} (multifd or postcopy-preempt) after {self.rewritten} pages were rewritten"
            )
        self.wake()

    def release(self) -> None:
        with self._wake_lock:
            self._released = True
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
        self.chunks.clear()
        self.spare.clear()
        self.held.clear()

    # -- the loop --------------------------------------------------------------

    def run(self) -> None:
        proxy = self.proxy
        try:
            self._loop()
        except _SideError as e:
            proxy._fail(Outcome.BROKEN, str(e))
        except Exception as e:  # a bug must not leave a half-relayed migration behind
            log.exception("migration proxy: internal error")
            proxy._fail(Outcome.ABORTED, f"internal error: {e!r}")

    def _loop(self) -> None:
        proxy = self.proxy
        poller = self._poller
        poller.register(self.src, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while proxy._outcome is None:
            self._check_extra()
            if self.held:
                self._pace()
                # Wait for data, the gate (wake) or the first hold deadline.
                timeout = max(0.0, self.held[0].deadline - time.monotonic())
                if not self._reading:
                    # Not every change of decided_through wakes us (hints that
                    # stop being awaited do not): look again soon.
                    timeout = min(timeout, _PACED_RECHECK_S)
                events = poller.poll(int(timeout * 1000) + 1)
                readable = False
                for fd, _ in events:
                    if fd == self._wake_r:
                        self._drain_wake()
                    else:
                        readable = True
                if readable:
                    self._receive()
            elif self.src_eof:
                break  # everything is out
            else:
                self._receive()  # nothing held: block in recv
            if proxy._outcome is not None:
                break
            if self.held:
                self._judge()
            self._send_ready()
        if proxy._outcome is None:
            log.debug("migration proxy: everything sent (%d bytes)", self.sent_bytes)
            _half_close(self.dst)

    def _pace(self) -> None:
        """Read from the source only while less than the read-ahead is held."""
        if self.src_eof:
            return
        limit = self.proxy._readahead
        if self._paced and getattr(self.gate, "guest_stopped", False):
            self._paced = False
        want = not self._paced or limit is None or self._held_bytes() < limit
        if want != self._reading:
            self._poller.modify(self.src, select.POLLIN if want else 0)
            self._reading = want

    def _drain_wake(self) -> None:
        with self._wake_lock:
            self._woken = False
            try:
                while os.read(self._wake_r, 512):
                    pass
            except OSError:
                pass

    def _held_bytes(self) -> int:
        try:
            bt = self.held[0]
            return self.received - (bt.chunk.base + bt.pages[bt.i][0])
        except IndexError:
            return 0

    def _check_extra(self) -> None:
        if self._extra is not None and self.parser.parsing:
            self.parser.give_up(
                f"extra connection #{self._extra} (multifd or postcopy-preempt)", self.received
            )
            self._after_parse()

    def _receive(self) -> None:
        ck = self.chunks[-1]
        if ck.fill == len(ck.buf):
            ck = self._next_chunk(ck)
        view = ck.view[ck.fill :]
        limit = self.proxy._readahead
        if self.held and self._paced and limit is not None:  # _pace() ran first: not stopped
            view = view[: max(_MIN_READ, limit - self._held_bytes())]
        try:
            n = self.src.recv_into(view)
        except OSError as e:
            raise _SideError(f"source connection failed: {_err(e)}") from e
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
            deadline = time.monotonic() + self.proxy._hold_seconds
            final: list[PageRecord] = []
            if self._completion_at is not None:
                split = self._completion_at - ck.base
                i = next((k for k, rec in enumerate(pages) if rec[0] > split), len(pages))
                pages, final = pages[:i], pages[i:]
            if pages:
                bt = _Batch(ck, pages, deadline)
                self.held.append(bt)
                self._judge()
                if self.held and self.held[-1] is bt:
                    self.pages_held += len(pages) - bt.i
            if final:
                self.held.append(_Batch(ck, final, deadline, final=True))
                self._judge()
        if not parser.parsing:
            ck.parsed = ck.fill

    def _after_parse(self) -> None:
        parser = self.parser
        proxy = self.proxy
        for phase, offset in parser.transitions:
            log.debug("migration proxy: %s at offset %d (received %d, sent %d, held %d bytes)",
                      phase.value, offset, self.received, self.sent_bytes, self._held_bytes())
            if phase is Phase.COMPLETION:
                self._completion_at = offset
                stop_holding = getattr(self.gate, "stop_holding", None)
                if stop_holding is not None:
                    stop_holding()
                # The guest is stopped: no switchover left to inform, and QEMU
                # may write the final pass holding the lock its QMP answers
                # need, so a paced source could not let the gate decide.
                self._paced = False
            if proxy._on_phase is not None and proxy._outcome is None:
                proxy._on_phase(phase, offset)
        parser.transitions.clear()
        if proxy._outcome is not None:
            return  # e.g. on_phase aborted: nothing of what follows counts
        fb = parser.fallback
        if fb is None or parser.parsing:
            return
        if self.rewritten:
            proxy.abort(f"{fb.reason} at offset {fb.offset} after {self.rewritten} pages were rewritten")
            return
        proxy._note_fallback(f"{fb.reason} at offset {fb.offset} ({fb.phase.value})")
        self.unjudged += len(parser.pages)
        parser.pages.clear()
        self._release_all()
        ck = self.chunks[-1]
        ck.parsed = ck.fill

    def _release_all(self) -> None:
        """Send every held record unchanged."""
        for bt in self.held:
            self.unjudged += len(bt.pages) - bt.i
        self.held.clear()

    def _source_closed(self) -> None:
        self.src_eof = True
        log.debug("migration proxy: source EOF at %d (sent %d, held %d bytes)",
                  self.received, self.sent_bytes, self._held_bytes())
        self._poller.unregister(self.src)  # POLLIN stays set at EOF
        parser = self.parser
        if parser.parsing:
            # The stream ended mid-way: the destination fails at its end anyway,
            # so held records go out unchanged and no abort is needed.
            phase = parser.phase
            parser.give_up(f"the source closed the stream in phase {phase.value}", self.received)
            for ph, offset in parser.transitions:
                if self.proxy._on_phase is not None:
                    self.proxy._on_phase(ph, offset)
            parser.transitions.clear()
            self.proxy._note_fallback(f"the source closed the stream in phase {phase.value}")
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
        oracle_for = gate.oracle_for
        oracle_until = self._oracle_until
        oracle: PageOracle | None = None
        valid_through = -1  # the last record end `oracle` is known to answer for
        decided = gate.decided_through()
        now = time.monotonic()
        received = self.received
        limit = self.proxy._hold_bytes
        rewritten = 0
        unjudged = 0
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
                expired = bt.deadline <= now
                last_end = base + pages[-1][1]
                if bt.final or (oracle is None and last_end <= valid_through):
                    held.popleft()  # the rest of the batch goes out unchanged
                    continue
                while i < n:
                    a, b, blk, pg = pages[i]
                    end = base + b
                    if end <= decided:
                        if end > valid_through:
                            if oracle_until is None:
                                oracle, valid_through = oracle_for(end), end
                            else:
                                oracle, valid_through = oracle_until(end)
                                valid_through = min(max(valid_through, end), decided)
                        if oracle is not None and oracle.is_free(blk, pg):
                            buf[a + 7] = (buf[a + 7] & _NOT_PAGE) | _ZERO
                            fill = b - _PAGE
                            buf[fill] = 0
                            cuts.append(fill)
                            rewritten += 1
                    elif expired or received - (base + a) > limit:
                        unjudged += 1
                        if expired and self._paced:
                            self._paced = False
                            log.info("migration proxy: the gate took longer than %.1f s; no longer pacing the source",
                                     self.proxy._hold_seconds)
                    else:
                        bt.i = i
                        return
                    i += 1
                held.popleft()
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
        try:
            sent = _sendmsg_all(self.dst, iov)
        except OSError as e:
            raise _SideError(f"destination stopped reading: {_err(e)}") from e
        self.sent_bytes += sent
        for ck, pos in marks:
            ck.sent = pos
        # Recycle buffers that are fully sent and no longer written to.
        chunks = self.chunks
        while len(chunks) > 1 and chunks[0].sent >= chunks[0].limit:
            old = chunks.popleft()
            if len(self.spare) < 2:
                self.spare.append(old)


def _never(end: int) -> tuple[PageOracle | None, int]:
    return None, 1 << 63


class _SideError(Exception):
    """An I/O error on one connection, worded for the stats."""


def _sendmsg_all(sk: socket.socket, iov: list[memoryview]) -> int:
    total = 0
    i = 0
    while i < len(iov):
        batch = iov[i : i + _IOV_MAX]
        n = sk.sendmsg(batch)
        total += n
        for v in batch:
            if n >= len(v):
                n -= len(v)
                i += 1
            else:
                iov[i] = v[n:]
                break
    return total


def _set_result(fut: asyncio.Future[ProxyResult], result: ProxyResult) -> None:
    if not fut.done():
        fut.set_result(result)


def _parse_endpoint(spec: str) -> addresses.Address:
    a = addresses.parse(spec)
    if a.kind not in ("unix", "tcp"):
        raise addresses.AddressError(f"{spec!r}: the proxy speaks tcp: and unix: only")
    return a


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _tune(sk: socket.socket) -> None:
    if sk.family in (socket.AF_INET, socket.AF_INET6):
        sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _shutdown(sk: socket.socket) -> None:
    try:
        sk.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _half_close(sk: socket.socket) -> None:
    try:
        sk.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _hard_close(sk: socket.socket) -> None:
    """Close with a reset, so a peer still writing fails at once."""
    try:
        sk.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    _shutdown(sk)
    sk.close()


def _err(e: OSError) -> str:
    return errno.errorcode.get(e.errno or 0, str(e)) if e.errno else str(e)
