"""A loopback run of the real migration proxy: a stream in, what a fake
destination received out (the stream tests and the rewriter fuzz target)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable

from host_collector.proxy.migration_proxy import MigrationProxy
from host_collector.proxy.results import ProxyResult


def run_proxy(
    stream: bytes,
    gate: object,
    *,
    chunks: Iterable[int] | None = None,
    pause: float = 0.0,
    reply: bytes = b"",
    timeout: float = 20.0,
    before_close: Callable[[MigrationProxy], None] | None = None,
    after_chunk: Callable[[MigrationProxy], None] | None = None,
    **kw: object,
) -> tuple[ProxyResult, bytes, bytes]:
    """Send ``stream`` through a proxy to a fake destination.

    ``chunks`` are the sizes of the source's writes (the rest in one write),
    ``pause`` the sleep between them (``after_chunk`` is called there too). The destination sends ``reply`` on the
    return path once it saw the source's EOF, then closes. Returns the
    proxy's result, what the destination received and what came back to the
    source.
    """
    dest = socket.create_server(("127.0.0.1", 0))
    got = bytearray()
    back = bytearray()

    def destination() -> None:
        try:
            c, _ = dest.accept()
        except OSError:
            return
        with c:
            while True:
                try:
                    d = c.recv(1 << 20)
                except OSError:
                    return
                if not d:
                    break
                got.extend(d)
            if reply:
                c.sendall(reply)

    td = threading.Thread(target=destination, daemon=True)
    td.start()
    dest_addr = f"tcp:127.0.0.1:{dest.getsockname()[1]}"
    px = MigrationProxy("tcp:127.0.0.1:0", dest_addr, gate, **kw)  # type: ignore[arg-type]
    px.start()
    port = int(px.listen_address.rsplit(":", 1)[1])
    src = socket.create_connection(("127.0.0.1", port))

    def source_reader() -> None:
        while True:
            try:
                d = src.recv(1 << 16)
            except OSError:
                return
            if not d:
                return
            back.extend(d)

    tr = threading.Thread(target=source_reader, daemon=True)
    tr.start()
    pos = 0
    try:
        for n in chunks or ():
            src.sendall(stream[pos : pos + n])
            pos += n
            if pause:
                time.sleep(pause)
            if after_chunk is not None:
                after_chunk(px)
        src.sendall(stream[pos:])
        if before_close is not None:
            before_close(px)
        src.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the proxy cut the connection
    result = px.wait(timeout)
    assert result is not None, f"proxy did not finish: {px.stats()}"
    td.join(timeout)
    tr.join(timeout)
    src.close()
    dest.close()
    return result, bytes(got), bytes(back)
