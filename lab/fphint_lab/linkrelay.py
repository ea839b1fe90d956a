"""An emulated network link: a threaded TCP relay with a bit-rate limit that
counts the bytes going each way.

Put in front of a migration destination (``migrate`` to the relay, the relay
to the destination's ``-incoming`` address), it makes every scenario of a
comparison cross the same link, however each one sends its pages, and it is
where "bytes on the wire" are counted: what QEMU reports counts what the
source produced, not what a proxy in between let through.

The link is full duplex: each direction has one token bucket, shared by every
connection through the relay (several connections share the link's rate, as
on a real wire). Each connection is relayed by two threads, one per
direction, doing ``recv_into`` / wait for tokens / ``sendall``; while one
waits it does not read, so TCP back-pressure reaches the sender. A
connection's half close is passed on (``shutdown(SHUT_WR)``), so a migration's
return path keeps working after the source has finished.

Used by the VM tests (tests/vm/test_e2e_*.py), the comparison benchmark
(bench/migration_comparison.py) and the demo::

    with LinkRelay(("127.0.0.1", dst_port), rate_bps=1e9) as link:
        migrate(src, link.uri, dst=dst)
        wire = link.stats().main.forward_bytes
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field, replace

LOG = logging.getLogger(__name__)

#: The comparison's link: 1 Gbit/s.
GIGABIT = 1e9
#: Bytes per recv: a trade-off between per-call overhead and pacing granularity.
CHUNK = 256 << 10


class TokenBucket:
    """Paces a byte stream to ``rate_bps`` bits per second, allowing bursts of
    up to ``burst_bytes`` after an idle period. Thread-safe; ``rate_bps`` None
    means unlimited."""

    def __init__(self, rate_bps: float | None, burst_bytes: int = CHUNK) -> None:
        if rate_bps is not None and rate_bps <= 0:
            raise ValueError(f"rate must be positive, not {rate_bps}")
        if burst_bytes <= 0:
            raise ValueError(f"burst must be positive, not {burst_bytes}")
        self.rate_bps = rate_bps
        self.burst_bytes = burst_bytes
        self._lock = threading.Lock()
        # Generic cell rate algorithm: the theoretical time at which everything
        # granted so far has left the wire; a send may start up to one burst
        # earlier than that.
        self._tat = time.monotonic()

    def wait(self, nbytes: int) -> float:
        """Block until ``nbytes`` may be sent; return the seconds waited."""
        if self.rate_bps is None or nbytes <= 0:
            return 0.0
        bytes_per_s = self.rate_bps / 8
        with self._lock:
            now = time.monotonic()
            tat = max(self._tat, now)
            send_at = max(now, tat - self.burst_bytes / bytes_per_s)
            self._tat = tat + nbytes / bytes_per_s
            delay = send_at - now
        if delay > 0:
            time.sleep(delay)
            return delay
        return 0.0


@dataclass(frozen=True)
class ConnStats:
    """One relayed connection. Forward is client -> target (for a migration:
    source -> destination), backward the other way (the return path)."""

    index: int
    forward_bytes: int = 0
    backward_bytes: int = 0
    opened: float = 0.0
    #: time.monotonic() of the first and last forward byte (0.0: none yet).
    first_forward: float = 0.0
    last_forward: float = 0.0
    closed: bool = False
    error: str = ""


@dataclass(frozen=True)
class LinkStats:
    rate_bps: float | None
    connections: tuple[ConnStats, ...] = field(default=())
    #: Seconds the relay threads spent waiting for tokens, per direction.
    forward_wait_s: float = 0.0
    backward_wait_s: float = 0.0

    @property
    def main(self) -> ConnStats:
        """The first connection: a migration's main channel."""
        if not self.connections:
            return ConnStats(index=-1)
        return self.connections[0]

    @property
    def forward_bytes(self) -> int:
        return sum(c.forward_bytes for c in self.connections)

    @property
    def backward_bytes(self) -> int:
        return sum(c.backward_bytes for c in self.connections)


class LinkError(Exception):
    pass


class _Conn:
    def __init__(self, index: int, client: socket.socket, target: socket.socket) -> None:
        self.client = client
        self.target = target
        self.stats = ConnStats(index=index, opened=time.monotonic())
        self.lock = threading.Lock()
        self.pumps_done = 0

    def update(self, **changes: object) -> None:
        with self.lock:
            self.stats = replace(self.stats, **changes)  # type: ignore[arg-type]


class LinkRelay:
    """Relays every connection made to its listening address to ``target``.

    :param target: (host, port) of the real destination, or "tcp:HOST:PORT".
    :param rate_bps: bits per second each way; None for no limit.
    :param rcvbuf: receive buffer of the accepted socket, so that the sender
        sees the link's rate soon (loopback buffers grow to megabytes).
    """

    def __init__(
        self,
        target: tuple[str, int] | str,
        *,
        rate_bps: float | None = GIGABIT,
        listen: tuple[str, int] = ("127.0.0.1", 0),
        burst_bytes: int = CHUNK,
        rcvbuf: int | None = 1 << 20,
    ) -> None:
        self.target = parse_target(target) if isinstance(target, str) else target
        self.rate_bps = rate_bps
        self.rcvbuf = rcvbuf
        self._buckets = (TokenBucket(rate_bps, burst_bytes), TokenBucket(rate_bps, burst_bytes))
        self._waited = [0.0, 0.0]
        self._lock = threading.Lock()
        self._conns: list[_Conn] = []
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._sock = socket.create_server(listen, reuse_port=False)
        self._sock.settimeout(0.2)
        self.address: tuple[str, int] = self._sock.getsockname()[:2]
        self._acceptor = threading.Thread(target=self._accept_loop, name="link-accept", daemon=True)

    @property
    def uri(self) -> str:
        """The address to give QEMU's ``migrate`` (or a proxy's destination)."""
        return f"tcp:{self.address[0]}:{self.address[1]}"

    def start(self) -> LinkRelay:
        self._acceptor.start()
        return self

    def __enter__(self) -> LinkRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> LinkStats:
        with self._lock:
            conns = tuple(c.stats for c in self._conns)
            waited = tuple(self._waited)
        return LinkStats(self.rate_bps, conns, waited[0], waited[1])

    def wait_idle(self, timeout: float = 30.0) -> LinkStats:
        """Wait until every connection made so far has closed both ways."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats()
            if all(c.closed for c in st.connections):
                return st
            if time.monotonic() > deadline:
                raise LinkError(f"connections still open after {timeout:.0f} s: {st}")
            time.sleep(0.02)

    def close(self) -> None:
        """Stop accepting and cut every connection."""
        self._closing = True
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            _close_quietly(c.client)
            _close_quietly(c.target)
        if self._acceptor.is_alive():
            self._acceptor.join(5)
        for t in list(self._threads):
            t.join(5)

    # Section: relaying

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                target = socket.create_connection(self.target, timeout=10)
                target.settimeout(None)
            except OSError as exc:
                LOG.warning("link: cannot reach %s: %s", self.target, exc)
                _close_quietly(client)
                continue
            client.settimeout(None)
            if self.rcvbuf:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
                target.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            for s in (client, target):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                conn = _Conn(len(self._conns), client, target)
                self._conns.append(conn)
            for forward in (True, False):
                t = threading.Thread(
                    target=self._pump,
                    args=(conn, forward),
                    name=f"link-{conn.stats.index}-{'fwd' if forward else 'back'}",
                    daemon=True,
                )
                self._threads.append(t)
                t.start()

    def _pump(self, conn: _Conn, forward: bool) -> None:
        src, dst = (conn.client, conn.target) if forward else (conn.target, conn.client)
        bucket = self._buckets[0 if forward else 1]
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        total = 0
        error = ""
        try:
            while True:
                n = src.recv_into(buf)
                if n == 0:
                    dst.shutdown(socket.SHUT_WR)  # pass the half close on
                    break
                waited = bucket.wait(n)
                dst.sendall(view[:n])
                total += n
                now = time.monotonic()
                with self._lock:
                    self._waited[0 if forward else 1] += waited
                if forward:
                    first = conn.stats.first_forward or now
                    conn.update(forward_bytes=total, first_forward=first, last_forward=now)
                else:
                    conn.update(backward_bytes=total)
        except OSError as exc:
            # A reset on one side: cut the other at once, like a broken link.
            if not self._closing:
                error = f"{'forward' if forward else 'backward'}: {exc}"
            _close_quietly(conn.client)
            _close_quietly(conn.target)
        with conn.lock:
            conn.pumps_done += 1
            done = conn.pumps_done == 2
        if error:
            conn.update(error=error)
        if done:
            _close_quietly(conn.client)
            _close_quietly(conn.target)
            conn.update(closed=True)


def parse_target(uri: str) -> tuple[str, int]:
    """ "tcp:HOST:PORT" -> (HOST, PORT)."""
    kind, _, rest = uri.partition(":")
    host, _, port = rest.rpartition(":")
    if kind != "tcp" or not host or not port.isdigit():
        raise ValueError(f"not a tcp:HOST:PORT address: {uri!r}")
    return host, int(port)


def _close_quietly(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
