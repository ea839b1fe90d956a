"""The emulated link used by the e2e tests and the comparison benchmark:
bytes arrive intact and are counted exactly each way, the rate limit holds,
half closes pass through, and a reset on one side cuts the other. The fault
controls: a stall forwards nothing until resumed (bytes intact after it), a
cut resets both sides (ECONNRESET, not a clean EOF), the rate changes live."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

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


def pair(link: LinkRelay, server: socket.socket) -> tuple[socket.socket, socket.socket]:
    """A client connected through ``link`` and the server's end of it."""
    client = socket.create_connection(link.address, timeout=5)
    conn, _ = server.accept()
    conn.settimeout(5)
    return client, conn


def test_stall_forwards_nothing_until_resumed() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    with LinkRelay(("127.0.0.1", server.getsockname()[1]), rate_bps=None, stalled=True) as link:
        client, conn = pair(link, server)
        client.sendall(b"a" * 1000)
        conn.settimeout(0.5)
        with pytest.raises(TimeoutError):
            conn.recv(10)
        assert link.stalled and link.stats().main.forward_bytes == 0
        link.resume()
        conn.settimeout(5)
        got = b""
        while len(got) < 1000:
            got += conn.recv(1000)
        assert got == b"a" * 1000
        # Stalled mid-stream: both directions stop, and go on intact afterwards.
        link.stall()
        time.sleep(0.2)  # the pumps are waiting now
        conn.sendall(b"back")
        client.sendall(b"more")
        client.settimeout(0.5)
        with pytest.raises(TimeoutError):
            client.recv(10)
        link.resume()
        client.settimeout(5)
        assert client.recv(10) == b"back" and conn.recv(10) == b"more"
        # The counts are updated just after each send, so they may trail the
        # receiver by a moment.
        deadline = time.monotonic() + 5
        while (link.stats().main.forward_bytes, link.stats().main.backward_bytes) != (1004, 4):
            assert time.monotonic() < deadline, link.stats().main
            time.sleep(0.01)
        client.close()
        conn.close()
    server.close()


def test_cut_resets_both_sides_even_while_stalled() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    with LinkRelay(("127.0.0.1", server.getsockname()[1]), rate_bps=None) as link:
        for stall in (False, True):
            client, conn = pair(link, server)
            client.sendall(b"x")
            assert conn.recv(1) == b"x"
            if stall:
                link.stall()
            assert link.cut() == 1
            for s in (client, conn):
                with pytest.raises(ConnectionResetError):
                    s.settimeout(5)
                    s.recv(10)  # a reset, not a clean end of stream
                s.close()
            link.resume()
            deadline = time.monotonic() + 5
            while not link.stats().connections[-1].closed:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert link.stats().connections[-1].error.endswith("cut")
        # The link itself still works after a cut.
        client, conn = pair(link, server)
        client.sendall(b"ok")
        assert conn.recv(2) == b"ok"
        client.close()
        conn.close()
    server.close()


def test_a_tap_sees_each_direction_and_can_stall_right_after_a_chunk() -> None:
    server = socket.create_server(("127.0.0.1", 0))
    seen: list[tuple[int, bool, bytes]] = []
    link: LinkRelay

    def tap(index: int, forward: bool) -> Callable[[memoryview], None]:
        def feed(chunk: memoryview) -> None:
            seen.append((index, forward, bytes(chunk)))
            if forward and bytes(chunk).endswith(b"?"):
                link.stall()  # a request passed: hold whatever answers it

        return feed

    with LinkRelay(("127.0.0.1", server.getsockname()[1]), rate_bps=None, tap=tap) as link:
        client, conn = pair(link, server)
        client.sendall(b"request?")
        got = b""
        while len(got) < 8:
            got += conn.recv(100)
        conn.sendall(b"answer")
        client.settimeout(0.5)
        with pytest.raises(TimeoutError):
            client.recv(10)
        assert link.stalled
        link.resume()
        client.settimeout(5)
        assert client.recv(10) == b"answer"
        deadline = time.monotonic() + 5
        while (0, False, b"answer") not in seen:  # the tap runs just after the send
            assert time.monotonic() < deadline, seen
            time.sleep(0.01)
        client.close()
        conn.close()
    server.close()
    assert seen[0] == (0, True, b"request?")


def test_rate_changes_live(sink: EchoSink) -> None:
    data = os.urandom(2_000_000)
    with LinkRelay(("127.0.0.1", sink.port), rate_bps=1e6) as link:
        link.set_rate(None)
        t = time.monotonic()
        send_all(link.address, data)  # 16 s at the old rate
        assert time.monotonic() - t < 3
        link.set_rate(40e6)
        t = time.monotonic()
        send_all(link.address, data)  # 0.4 s at the new one
        assert 0.3 < time.monotonic() - t < 2
    with pytest.raises(ValueError):
        link.set_rate(0)


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
