"""The migration proxy: one migration's connections, threads and ending.

One :class:`MigrationProxy` serves one migration. The first connection it
accepts is the main channel (QEMU 7.2's destination also takes the first
connection as the main one); it is parsed and may be rewritten
(:mod:`.relay`). Every later connection (multifd, postcopy-preempt) is
relayed verbatim to its own upstream connection, opened in accept order, and
stops all rewriting on the main channel. The destination -> source direction
(the return path) is always relayed verbatim and kept open until the
destination closes it.

Whatever ends the migration on purpose (an abort, a give-up after rewrites)
or by accident (a connection failing) shuts every socket at once, which fails
the migration and, with ``return-path`` on, leaves the guest running on the
source (docs/safety-rule.md §3.8).

Threads: one accepts, one parses and relays source -> destination (the hot
path, the only one that calls the gate), one relays the return path, two per
extra connection, one waits for the relays to end. Use
:meth:`MigrationProxy.wait_async` from asyncio code.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import replace

import grpc

from host_collector.errors import CollectorError
from host_collector.proxy import sockets
from host_collector.proxy.relay import CHUNK_SIZE, HoldLimits, MainRelay
from host_collector.proxy.results import BatchTap, PhaseListener, ProxyOutcome, ProxyResult, ProxyStats
from host_collector.rewrite.gate import RewriteGate

log = logging.getLogger(__name__)

#: Buffer of a verbatim relay (return path, extra connections).
_PIPE_SIZE = 1 << 20


class ProxyError(CollectorError):
    """The proxy could not start (bad address, port in use)."""

    default_status = grpc.StatusCode.UNAVAILABLE


class MigrationProxy:
    """Relay one migration from ``listen`` to ``dest`` through ``gate``.

    ``listen`` and ``dest`` are ``tcp:HOST:PORT`` or ``unix:PATH``; port 0
    picks a free port, see :attr:`listen_address` after :meth:`start`.
    ``on_phase(phase, offset)`` is called from the parsing thread each time
    the main channel enters a new :class:`~host_collector.stream.wire.Phase`,
    before any byte of that phase is forwarded (so calling :meth:`abort` from
    it cuts the stream exactly there). ``hold_bytes``, ``hold_seconds``,
    ``readahead_bytes`` and ``chunk_size`` are the relay's
    :class:`~.relay.HoldLimits` (ValueError if out of range). ``tap`` sees
    every batch of PAGE records once it is done with (:data:`~.results.BatchTap`).
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
        tap: BatchTap | None = None,
    ) -> None:
        self._tap = tap
        self._limits = HoldLimits(hold_bytes, hold_seconds, readahead_bytes, chunk_size)
        self._listen = sockets.parse_endpoint(listen)
        self._dest = sockets.parse_endpoint(dest)
        self._gate = gate
        self._on_phase = on_phase
        self._lock = threading.Lock()
        self._stats = ProxyStats()
        self._listener: socket.socket | None = None
        self._address = ""
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._main: MainRelay | None = None
        self._done = threading.Event()
        self._result: ProxyResult | None = None
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[ProxyResult]]] = []
        self._outcome: ProxyOutcome | None = None

    # -- public API --------------------------------------------------------

    def start(self) -> None:
        """Bind and listen; returns at once. Connections are served in threads."""
        if self._address:
            raise ProxyError("already started")
        try:
            self._listener, self._address = sockets.listen(self._listen)
        except OSError as e:
            raise ProxyError(f"cannot listen on {self._listen}: {e}") from e
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
        self._fail(ProxyOutcome.ABORTED, reason)

    def close(self) -> None:
        """Stop listening; abort a migration in progress. Idempotent."""
        if self._main is None and not self._done.is_set():
            self._finish(ProxyOutcome.ABORTED, "proxy closed before the source connected")
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
                up = sockets.connect(self._dest)
            except OSError as e:
                sockets.hard_close(conn)
                self._fail(ProxyOutcome.BROKEN, f"cannot connect to the destination {self._dest}: {e}")
                return
            for sk in (conn, up):
                sockets.tune(sk)
            with self._lock:
                if self._done.is_set():
                    sockets.hard_close(conn)
                    sockets.hard_close(up)
                    return
                self._sockets += [conn, up]
            if n == 0:
                self._start_main(conn, up)
            else:
                self._start_extra(n, conn, up)
            n += 1

    def _start_main(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(None)
        dst.settimeout(None)
        main = MainRelay(
            src,
            dst,
            self._gate,
            self._limits,
            on_phase=self._on_phase,
            ended=self._ended,
            fail=self._fail,
            note_fallback=self._note_fallback,
            tap=self._tap,
        )
        self._main = main
        fwd = threading.Thread(target=main.run, name="fph-proxy-main", daemon=True)
        back = threading.Thread(target=self._relay_return, args=(dst, src), name="fph-proxy-return", daemon=True)
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
            t = threading.Thread(target=self._relay_extra, args=(a, b), name=f"fph-proxy-extra{n}-{name}", daemon=True)
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
        buf = bytearray(_PIPE_SIZE)
        view = memoryview(buf)
        while True:
            try:
                n = a.recv_into(buf)
            except OSError as e:
                self._fail(ProxyOutcome.BROKEN, f"{a_name} connection failed: {sockets.describe(e)}")
                return
            if n == 0:
                sockets.half_close(b)
                return
            try:
                b.sendall(view[:n])
            except OSError as e:
                self._fail(ProxyOutcome.BROKEN, f"{b_name} stopped reading: {sockets.describe(e)}")
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
        self._finish(self._outcome or ProxyOutcome.FINISHED, None)

    # -- ending --------------------------------------------------------------

    def _fail(self, outcome: ProxyOutcome, reason: str) -> None:
        """Shut every connection at once; the first failure names the outcome."""
        with self._lock:
            if self._done.is_set() or self._outcome is not None:
                return
            self._outcome = outcome
            if outcome is ProxyOutcome.ABORTED:
                self._stats = replace(self._stats, abort_reason=reason)
            else:
                self._stats = replace(self._stats, error=reason)
            socks = list(self._sockets)
        log.warning("migration proxy: %s: %s", outcome.value, reason)
        for sk in socks:
            sockets.shutdown(sk)
        if self._main is None:
            self._finish(outcome, None)
        else:
            self._main.wake()
        self._close_listener()

    def _finish(self, outcome: ProxyOutcome, reason: str | None) -> None:
        with self._lock:
            if self._done.is_set():
                return
            if reason is not None:
                self._stats = replace(self._stats, abort_reason=reason)
            socks = list(self._sockets)
            self._sockets.clear()
        for sk in socks:
            if outcome is ProxyOutcome.FINISHED:
                sk.close()
            else:
                sockets.hard_close(sk)
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
        if ls is not None:
            sockets.close_listener(ls, self._listen)

    def _ended(self) -> bool:
        """(any thread) Some failure or abort ended the migration: the relay stops."""
        return self._outcome is not None

    def _wake_main(self) -> None:
        main = self._main
        if main is not None:
            main.wake()

    def _note_fallback(self, reason: str) -> None:
        with self._lock:
            if self._stats.fallback_reason is None:
                self._stats = replace(self._stats, fallback_reason=reason)


def _set_result(fut: asyncio.Future[ProxyResult], result: ProxyResult) -> None:
    if not fut.done():
        fut.set_result(result)
