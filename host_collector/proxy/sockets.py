"""Socket plumbing for the proxy: endpoints, listening, connecting, sending, closing, waking.

The opening helpers succeed or raise :class:`OSError` (the callers word it
for the stats, see :func:`describe`); the closing ones never raise: a peer
that is already gone is what they are for.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading

from fphint import addresses

#: Most buffers one sendmsg takes (Linux's UIO_MAXIOV).
IOV_MAX = 1024


def parse_endpoint(spec: str) -> addresses.Address:
    """``tcp:HOST:PORT`` or ``unix:PATH``; anything else raises :class:`addresses.AddressError`."""
    a = addresses.parse(spec)
    if a.kind not in ("unix", "tcp"):
        raise addresses.AddressError(f"{spec!r}: the proxy speaks tcp: and unix: only")
    return a


def listen(ep: addresses.Address) -> tuple[socket.socket, str]:
    """A listening socket on ``ep`` and its address with the port resolved."""
    if ep.kind == "unix":
        ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            ls.bind(ep.path)
            ls.listen(16)
        except OSError:
            ls.close()
            raise
        return ls, f"unix:{ep.path}"
    family = socket.AF_INET6 if ":" in ep.host else socket.AF_INET
    ls = socket.create_server((ep.host, ep.port), family=family, backlog=16)
    ls.listen(16)
    host, port = ls.getsockname()[:2]
    return ls, (f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}")


def close_listener(ls: socket.socket, ep: addresses.Address) -> None:
    """Stop listening; a unix socket's path is removed too."""
    shutdown(ls)
    ls.close()
    if ep.kind == "unix":
        try:
            os.unlink(ep.path)
        except OSError:
            pass


def connect(ep: addresses.Address) -> socket.socket:
    """A connection to ``ep`` (TCP: at most 10 s to connect)."""
    if ep.kind == "unix":
        sk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sk.connect(ep.path)
        except OSError:
            sk.close()
            raise
        return sk
    return socket.create_connection((ep.host, ep.port), timeout=10.0)


def tune(sk: socket.socket) -> None:
    """No Nagle delay on TCP: records held back already cost latency."""
    if sk.family in (socket.AF_INET, socket.AF_INET6):
        sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def shutdown(sk: socket.socket) -> None:
    """Both directions, now; whoever blocks on ``sk`` wakes up."""
    try:
        sk.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def half_close(sk: socket.socket) -> None:
    """Forward an EOF: no more bytes this way, the other direction stays open."""
    try:
        sk.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def hard_close(sk: socket.socket) -> None:
    """Close with a reset, so a peer still writing fails at once."""
    try:
        sk.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    shutdown(sk)
    sk.close()


def sendmsg_all(sk: socket.socket, iov: list[memoryview]) -> int:
    """Send every buffer of ``iov`` in order, :data:`IOV_MAX` per call; the byte count.

    ``iov`` is consumed: a buffer sent in part is replaced by its rest.
    """
    total = 0
    i = 0
    while i < len(iov):
        batch = iov[i : i + IOV_MAX]
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


def describe(e: OSError) -> str:
    """The errno's name (``ECONNRESET``) where there is one, for the stats."""
    return errno.errorcode.get(e.errno or 0, str(e)) if e.errno else str(e)


class WakePipe:
    """Wakes a poll loop from any thread: the loop polls :attr:`fd` and calls :meth:`drain`.

    One byte is written per wake-up until the loop drains it, so a burst of
    wake-ups costs one write; after :meth:`close`, waking is a no-op.
    """

    def __init__(self) -> None:
        self.fd, self._w = os.pipe()
        os.set_blocking(self.fd, False)
        os.set_blocking(self._w, False)
        self._lock = threading.Lock()  # the pipe is closed under the same lock
        self._woken = False
        self._closed = False

    def wake(self) -> None:
        with self._lock:
            if self._woken or self._closed:
                return
            self._woken = True
            try:
                os.write(self._w, b"\0")
            except OSError:
                pass

    def drain(self) -> None:
        with self._lock:
            self._woken = False
            try:
                while os.read(self.fd, 512):
                    pass
            except OSError:
                pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for fd in (self.fd, self._w):
                os.close(fd)
