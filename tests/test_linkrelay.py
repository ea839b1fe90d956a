"""The emulated link used by the e2e tests and the comparison benchmark:
bytes arrive intact and are counted exactly each way, the rate limit holds,
half closes pass through, and a reset on one side cuts the other."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from fphint_lab.linkrelay import LinkRelay, TokenBucket, parse_target


class EchoSink:
    """A server that reads everything, then answers with the SHA-256 of what it
    read followed by ``reply`` bytes, and closes."""

    def __init__(self, reply: int = 0) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.reply = reply
        self.received: list[int] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        h = hashlib.sha256()
        n = 0
        with conn:
            while chunk := conn.recv(1 << 16):
                h.update(chunk)
                n += len(chunk)
            self.received.append(n)
            conn.sendall(h.digest() + b"r" * self.reply)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def sink() -> Iterator[EchoSink]:
    s = EchoSink(reply=12345)
    yield s
    s.close()


def send_all(addr: tuple[str, int], data: bytes) -> bytes:
    """Send data, half close, return everything the other side answered."""
    with socket.create_connection(addr) as c:
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        out = bytearray()
        while chunk := c.recv(1 << 16):
            out += chunk
        return bytes(out)


def test_bytes_intact_and_counted_each_way(sink: EchoSink) -> None:
    data = os.urandom(3 << 20) + b"tail"
    with LinkRelay(("127.0.0.1", sink.port), rate_bps=None) as link:
        answer = send_all(link.address, data)
        second = send_all(link.address, b"x" * 1000)
        st = link.wait_idle()
    assert answer[:32] == hashlib.sha256(data).digest() and len(answer) == 32 + 12345
    assert second[:32] == hashlib.sha256(b"x" * 1000).digest()
    assert [c.forward_bytes for c in st.connections] == [len(data), 1000]
    assert [c.backward_bytes for c in st.connections] == [32 + 12345] * 2
    assert st.main.forward_bytes == len(data) and st.forward_bytes == len(data) + 1000
    assert all(c.closed and not c.error for c in st.connections)


def test_rate_limit_holds(sink: EchoSink) -> None:
    """12.5 MB at 100 Mbit/s takes 1 s: not much less (the limit works), not
    much more (the relay keeps up)."""
    data = os.urandom(12_500_000)
    with LinkRelay(("127.0.0.1", sink.port), rate_bps=100e6) as link:
        t = time.monotonic()
        send_all(link.address, data)
        elapsed = time.monotonic() - t
        st = link.stats()
    assert 0.95 < elapsed < 1.6, elapsed
    assert st.forward_wait_s > 0.5
    spread = st.main.last_forward - st.main.first_forward
    assert 0.9 < spread < 1.6, spread


def test_connections_share_the_link(sink: EchoSink) -> None:
    """Two senders at once get the link's rate together, not each."""
    data = os.urandom(5_000_000)
    with LinkRelay(("127.0.0.1", sink.port), rate_bps=80e6) as link:
        t = time.monotonic()
        threads = [threading.Thread(target=send_all, args=(link.address, data)) for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(10)
        elapsed = time.monotonic() - t
    assert elapsed > 0.9, f"10 MB over 10 MB/s took {elapsed:.2f} s"


def test_reset_cuts_the_other_side() -> None:
    """The target resets: the client sees its connection end, and the relay
    records the error (a broken link, as when a migration peer dies)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    with LinkRelay(("127.0.0.1", port), rate_bps=None) as link:
        client = socket.create_connection(link.address)
        conn, _ = server.accept()
        client.sendall(b"hello")
        assert conn.recv(5) == b"hello"
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()  # RST
        client.settimeout(5)
        assert_ends(client)
        st = link.wait_idle(5)
        client.close()
    server.close()
    assert st.main.closed and st.main.forward_bytes == 5


def assert_ends(s: socket.socket) -> None:
    """The socket's next recv returns EOF or a reset (not a timeout)."""
    try:
        assert s.recv(10) == b""
    except ConnectionError:
        pass


def test_unreachable_target_closes_client() -> None:
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with LinkRelay(("127.0.0.1", port), rate_bps=None) as link:
        with socket.create_connection(link.address, timeout=5) as c:
            assert_ends(c)
        assert link.stats().connections == ()


def test_token_bucket_bursts_then_paces() -> None:
    b = TokenBucket(8e6, burst_bytes=100_000)  # 1 MB/s
    assert b.wait(100_000) == 0.0  # a burst after idle is free
    t = time.monotonic()
    for _ in range(5):
        b.wait(100_000)
    assert 0.4 < time.monotonic() - t < 0.7
    with pytest.raises(ValueError):
        TokenBucket(0)


def test_parse_target() -> None:
    assert parse_target("tcp:127.0.0.1:4444") == ("127.0.0.1", 4444)
    for bad in ("unix:/x", "tcp:1.2.3.4", "tcp::5"):
        with pytest.raises(ValueError):
            parse_target(bad)
