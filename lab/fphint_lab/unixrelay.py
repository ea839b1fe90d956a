"""A Unix-socket relay whose connections can be cut: put between the
collector and a QEMU monitor, it is how a fault test disconnects the
collector's QMP session of the source mid-migration (fphint_lab/faults.py)
while QEMU, the guest and the test's own monitor carry on.

Each connection to ``path`` is relayed to the current target socket
(``retarget`` changes it for later connections: a chain of migrations has a
new source each time). ``cut()`` shuts every open connection on both sides;
the relay keeps accepting, so the collector's next session (the next
migration) gets through.
"""

from __future__ import annotations

import logging
import socket
import threading
from pathlib import Path

LOG = logging.getLogger(__name__)


class UnixRelay:
    """Relays connections made to ``path`` to ``target`` (both Unix sockets)."""

    def __init__(self, path: Path, target: Path | None = None) -> None:
        self.path = path
        self.target = target
        self._lock = threading.Lock()
        self._open: list[tuple[socket.socket, socket.socket]] = []
        self.accepted = 0
        self.cuts = 0
        path.unlink(missing_ok=True)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(8)
        self._closing = False
        self._thread = threading.Thread(target=self._accept_loop, name=f"unixrelay-{path.name}", daemon=True)
        self._thread.start()

    def retarget(self, target: Path) -> None:
        """Connections made from now on go to ``target``."""
        with self._lock:
            self.target = target

    def open_connections(self) -> int:
        with self._lock:
            return len(self._open)

    def cut(self) -> int:
        """Shut every open connection on both sides; how many were cut."""
        with self._lock:
            pairs, self._open = self._open, []
            self.cuts += len(pairs)
        for a, b in pairs:
            _shut(a)
            _shut(b)
        return len(pairs)

    def close(self) -> None:
        self._closing = True
        self.cut()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(5)
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> UnixRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._closing:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                target = self.target
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                if target is None:
                    raise OSError("no target yet")
                up.connect(str(target))
            except OSError as exc:
                LOG.warning("unix relay %s: cannot reach %s: %s", self.path, target, exc)
                _shut(client)
                _shut(up)
                continue
            pair = (client, up)
            with self._lock:
                self._open.append(pair)
                self.accepted += 1
            for a, b in ((client, up), (up, client)):
                threading.Thread(target=self._pump, args=(pair, a, b), daemon=True).start()

    def _pump(self, pair: tuple[socket.socket, socket.socket], a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(1 << 16):
                b.sendall(data)
        except OSError:
            pass
        with self._lock:
            if pair in self._open:
                self._open.remove(pair)
        _shut(a)
        _shut(b)


def _shut(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
