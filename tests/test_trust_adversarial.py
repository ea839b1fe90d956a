"""The adversarial gRPC suite: a real collector daemon attacked from this
process while a real agent of VM "good" runs in another. Each case asserts
that the legitimate agent is still served (a fresh CollectHints returns
every page it reports), that the daemon is alive and its memory bounded,
and that the attack got the refusal it should.

VM "bad" is a guest with a valid token that misbehaves; anyone else has no
token at all. tests/test_trust_findings.py has the four cases of the review.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from fphint import ranges
from fphint.v1 import admin_pb2, hints_pb2, hints_pb2_grpc
from tests.adversary import (
    AgentProcess,
    Daemon,
    MiB,
    bearer,
    call_code,
    channels,
    daemon_and_agent,
    raw_attach,
    token,
)

pytestmark = pytest.mark.slow

#: How much the daemon's RSS may grow during one attack.
RSS_SLACK = 96 * MiB
END = 1 << 64


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    with daemon_and_agent(tmp_path, ("good", "bad")) as d:
        yield d


def run(coro: Any, timeout: float = 120) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def held(d: Daemon, rss0: int) -> None:
    """What every case ends with: alive, bounded, and the good VM served."""
    assert d.alive()
    assert d.served(), "the legitimate agent is no longer served"
    grew = d.rss() - rss0
    assert grew < RSS_SLACK, f"collector RSS grew {grew / MiB:.0f} MiB"


class BadGuest:
    """VM "bad" speaking the protocol by hand (valid token, wrong behaviour)."""

    def __init__(self, d: Daemon, tok: str | None = None) -> None:
        self.d = d
        self.channel = grpc.aio.insecure_channel(
            d.target, options=[("grpc.max_send_message_length", 256 * MiB), ("grpc.use_local_subchannel_pool", 1)]
        )
        self.stub = hints_pb2_grpc.FreePageHintsStub(self.channel)
        self.md = bearer(token("bad") if tok is None else tok)
        self.attach_call: Any = None

    async def attach(self) -> None:
        self.attach_call = await raw_attach(self.channel, token("bad"))
        await asyncio.wait_for(self.attach_call.initial_metadata(), 10)

    async def epoch(self, deadline_ms: int = 5000) -> tuple[int, threading.Thread]:
        """Open an epoch of VM bad (admin side, in a thread) and return its id from the request."""
        t = threading.Thread(target=lambda: self._collect(deadline_ms), daemon=True)
        t.start()
        while True:
            msg = await asyncio.wait_for(self.attach_call.read(), 10)
            if msg.WhichOneof("kind") == "request":
                return int(msg.request.epoch), t

    def _collect(self, deadline_ms: int) -> None:
        try:
            self.d.hints("bad", deadline_ms)
        except grpc.RpcError:
            pass

    async def report(self, chunks: list[hints_pb2.ReportChunk]) -> grpc.StatusCode:
        async def gen() -> AsyncIterator[hints_pb2.ReportChunk]:
            for c in chunks:
                yield c

        return await call_code(self.stub.Report(gen(), metadata=self.md, timeout=20))

    async def close(self) -> None:
        if self.attach_call is not None:
            self.attach_call.cancel()
        await self.channel.close(None)


def chunk(epoch: int, words: list[int], seq: int = 0, end: bool = True) -> hints_pb2.ReportChunk:
    return hints_pb2.ReportChunk(epoch=epoch, seq=seq, kind=hints_pb2.REPORT_KIND_SNAPSHOT, ranges=words, end=end)


def test_absent_wrong_and_other_tokens(daemon: Daemon) -> None:
    rss0 = daemon.rss()

    async def go() -> None:
        async with channels(daemon.target, 1) as (ch,):
            stub = hints_pb2_grpc.FreePageHintsStub(ch)
            for tok in (None, "", "wrong-token-0123456789", token("good") + "x", token("good")[:-1]):
                code = await call_code(stub.Report(iter([chunk(1, [0, 4096])]), metadata=bearer(tok), timeout=5))
                assert code == grpc.StatusCode.UNAUTHENTICATED, (tok, code)
            # claims in metadata are not identity
            md = (("fphint-vm", "good"), ("x-forwarded-for", "10.0.0.7"))
            assert (
                await call_code(stub.Report(iter([chunk(1, [0, 4096])]), metadata=md, timeout=5))
                == grpc.StatusCode.UNAUTHENTICATED
            )
        # bad's token against good's epoch: an epoch of another VM is no epoch at all
        bad = BadGuest(daemon)
        try:
            t = threading.Thread(target=lambda: daemon.hints("good", 2000), daemon=True)
            t.start()
            await asyncio.sleep(0.3)
            codes = {
                await bad.report([chunk(ep, ranges.encode([(1 << 30, 64 * MiB)]))])
                for ep in range(int(time.time() * 1e6) - 10_000_000, int(time.time() * 1e6), 1_000_000)
            }
            assert codes == {grpc.StatusCode.FAILED_PRECONDITION}, codes
            t.join(10)
        finally:
            await bad.close()

    run(go())
    held(daemon, rss0)


def test_closed_and_future_epochs(daemon: Daemon) -> None:
    rss0 = daemon.rss()

    async def go() -> None:
        bad = BadGuest(daemon)
        try:
            await bad.attach()
            ep, t = await bad.epoch(deadline_ms=300)
            t.join(10)  # closed and released by now
            words = ranges.encode([(0x100000, 4096)])
            assert await bad.report([chunk(ep, words)]) == grpc.StatusCode.FAILED_PRECONDITION
            assert await bad.report([chunk(ep + 10**9, words)]) == grpc.StatusCode.FAILED_PRECONDITION
            assert await bad.report([chunk(END - 1, words)]) == grpc.StatusCode.FAILED_PRECONDITION
        finally:
            await bad.close()

    run(go())
    text = daemon.metrics()
    assert 'reason="unknown_epoch",vm="bad"' in text
    held(daemon, rss0)


BAD = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE}


@pytest.mark.parametrize(
    ("words", "codes"),
    [
        ([END - 4096, 8192], BAD),  # ends beyond 2**64
        ([END - 4096, 4096, 4096, 4096], BAD),  # the next start wraps
        ([END - 8192, 4096], BAD),  # the last whole page: not guest RAM
        ([0, END - 1], BAD),  # covers everything
        ([END - 1, 1], {grpc.StatusCode.OK}),  # the last byte: no whole page, counted as rejected
    ],
    ids=["end-beyond", "start-wraps", "last-page", "huge-length", "last-byte"],
)
def test_ranges_at_2_to_the_64(daemon: Daemon, words: list[int], codes: set[grpc.StatusCode]) -> None:
    rss0 = daemon.rss()

    async def go() -> grpc.StatusCode:
        bad = BadGuest(daemon)
        try:
            await bad.attach()
            ep, t = await bad.epoch()
            code = await bad.report([chunk(ep, words)])
            t.join(10)
            return code
        finally:
            await bad.close()

    code = run(go())
    assert code in codes, code
    held(daemon, rss0)


def test_ten_million_tiny_ranges(daemon: Daemon) -> None:
    """10 M one-byte ranges: in one message (over the size limit), and in
    chunks (refused at the per-chunk and per-epoch range limits)."""
    rss0 = daemon.rss()
    per_chunk = 1 << 16
    one = ranges.encode([(i * 4096, 1) for i in range(per_chunk)])

    async def go() -> tuple[grpc.StatusCode, ...]:
        bad = BadGuest(daemon)
        try:
            await bad.attach()
            ep, t = await bad.epoch(deadline_ms=20000)
            # all 10 M in one chunk: 20 M varints, far over the message limit
            big = [4096, 1] * 10_000_000
            c1 = await bad.report([chunk(ep, big)])
            # 2 x 64 Ki in one chunk: over the per-chunk limit
            c2 = await bad.report([chunk(ep, [4096, 1] * (2 * per_chunk))])
            ep2, t2 = await bad.epoch(deadline_ms=20000)
            # 153 chunks of 64 Ki: the epoch's limit (1 Mi ranges) ends it
            state = ranges.CodecState()
            gen = (
                chunk(
                    ep2,
                    ranges.encode([(4096 * (i * per_chunk + k), 1) for k in range(per_chunk)], state),
                    seq=i,
                    end=(i == 152),
                )
                for i in range(153)
            )

            async def chunks() -> AsyncIterator[hints_pb2.ReportChunk]:
                for c in gen:
                    yield c

            c3 = await call_code(bad.stub.Report(chunks(), metadata=bad.md, timeout=60))
            t.join(25)
            t2.join(25)
            return c1, c2, c3
        finally:
            await bad.close()

    c1, c2, c3 = run(go(), 180)
    assert c1 == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert c2 == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert c3 == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert one  # (the encoder handles a chunk of that size)
    held(daemon, rss0)


def test_sixty_four_mib_messages(daemon: Daemon) -> None:
    rss0 = daemon.rss()

    async def go() -> tuple[grpc.StatusCode, grpc.StatusCode, grpc.StatusCode]:
        bad = BadGuest(daemon)
        anon = BadGuest(daemon, tok="")
        try:
            facts = hints_pb2.AgentFacts(hostname="h" * (64 * MiB))
            a = await call_code(
                bad.stub.Attach(hints_pb2.AttachRequest(facts=facts), metadata=bad.md, timeout=20).read()
            )
            r = await anon.report([chunk(1, [4096] * (8 * MiB))])  # 64 MiB of words, no token
            # just under the message limit but far over the facts limit
            facts = hints_pb2.AgentFacts(hostname="h" * (3 * MiB))
            b = await call_code(
                bad.stub.Attach(hints_pb2.AttachRequest(facts=facts), metadata=bad.md, timeout=20).read()
            )
            return a, r, b
        finally:
            await bad.close()
            await anon.close()

    a, r, b = run(go())
    assert a == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert r in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAUTHENTICATED)
    assert b == grpc.StatusCode.RESOURCE_EXHAUSTED
    held(daemon, rss0)


def test_a_flood_of_connections_and_calls(daemon: Daemon) -> None:
    """200 connections making calls without a token for 5 s, the good VM asked meanwhile."""
    rss0 = daemon.rss()

    async def go() -> list[bool]:
        served: list[bool] = []
        async with channels(daemon.target, 200) as chans:
            stubs = [hints_pb2_grpc.FreePageHintsStub(ch) for ch in chans]
            end = time.monotonic() + 5

            async def hammer(stub: hints_pb2_grpc.FreePageHintsStub) -> None:
                while time.monotonic() < end:
                    await call_code(stub.Report(iter([]), timeout=5))

            async def ask() -> None:
                while time.monotonic() < end:
                    served.append(await asyncio.to_thread(daemon.served))

            await asyncio.gather(ask(), *(hammer(s) for s in stubs))
        return served

    served = run(go())
    assert served and all(served), served
    held(daemon, rss0)


def test_slowloris(daemon: Daemon) -> None:
    """Connections that never finish the HTTP/2 preface, and a Report that
    trickles: the first are cut at the handshake timeout, the second at the
    idle timeout or the epoch's deadline; neither holds anything of good's."""
    rss0 = daemon.rss()
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    socks = [socket.create_connection(("127.0.0.1", daemon.port)) for _ in range(300)]
    try:
        for i, s in enumerate(socks):
            s.sendall(preface[: 1 + i % 10])
        assert daemon.served()

        async def trickle() -> grpc.StatusCode:
            bad = BadGuest(daemon)
            try:
                await bad.attach()
                ep, t = await bad.epoch(deadline_ms=1500)

                async def gen() -> AsyncIterator[hints_pb2.ReportChunk]:
                    for i in range(100):
                        yield chunk(
                            ep, ranges.encode([(0x100000 + i * 8192, 4096)]) if i == 0 else [], seq=i, end=False
                        )
                        await asyncio.sleep(0.5)

                code = await call_code(bad.stub.Report(gen(), metadata=bad.md, timeout=30))
                t.join(10)
                return code
            finally:
                await bad.close()

        t0 = time.monotonic()
        assert run(trickle()) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - t0 < 10
        time.sleep(max(0.0, 6.5 - (time.monotonic() - t0)))  # past the 5 s handshake timeout
        closed = 0
        for s in socks:
            s.settimeout(0.01)
            try:
                while s.recv(65536):
                    pass
                closed += 1
            except (TimeoutError, BlockingIOError):
                pass
            except OSError:
                closed += 1
        assert closed == len(socks), f"{len(socks) - closed} half-open connections still held"
    finally:
        for s in socks:
            s.close()
    held(daemon, rss0)


def test_clients_that_never_read(daemon: Daemon) -> None:
    """An Attach that is never read while many epochs are opened for it,
    reflection requests whose answers are never read, Watch streams never read."""
    rss0 = daemon.rss()

    async def go() -> None:
        bad = BadGuest(daemon)
        async with channels(daemon.target, 4) as chans:
            try:
                await bad.attach()  # then never reads
                admin = daemon.admin()
                for _ in range(100):  # 100 epochs: the queue to bad's agent is bounded, the rest dropped
                    await asyncio.to_thread(
                        admin.CollectHints, admin_pb2.CollectHintsRequest(vm="bad", deadline_ms=10), timeout=10
                    )
                watches = [
                    health_pb2_grpc.HealthStub(chans[0]).Watch(health_pb2.HealthCheckRequest()) for _ in range(8)
                ]
                refl = reflection_pb2_grpc.ServerReflectionStub(chans[1])

                async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
                    for _ in range(20000):
                        yield reflection_pb2.ServerReflectionRequest(list_services="")

                calls = [refl.ServerReflectionInfo(requests()) for _ in range(2)]
                await asyncio.sleep(3)  # they send; nobody reads
                for c in [*watches, *calls]:
                    c.cancel()
            finally:
                await bad.close()

    run(go())
    held(daemon, rss0)


def test_duplicate_agents(tmp_path: Path) -> None:
    """A second agent with good's token: the newer replaces the older, again
    and again; good still gets hints from one of them, VM other (its own
    agent) is never disturbed, and the log stays bounded."""
    with daemon_and_agent(tmp_path, ("good", "other")) as d:
        other = AgentProcess(tmp_path, f"tcp:{d.target}", "other", name="other-agent")
        twin = AgentProcess(tmp_path, f"tcp:{d.target}", "good", name="twin")
        try:
            d.wait_attached("other")
            rss0 = d.rss()
            lines0 = len(d.log_lines())
            good = [d.served("good") for _ in range(10)]
            others = [d.served("other") for _ in range(10)]
            assert all(others), others
            assert any(good), good
            assert len(d.log_lines()) - lines0 < 200
            held(d, rss0)
        finally:
            twin.stop()
            other.stop()


def test_forged_metadata_and_peers_over_the_unix_listener(daemon: Daemon) -> None:
    """Over the unix: listener a call without a token is nobody, whatever its
    socket is called; with bad's token it is bad (and the peer the kernel's)."""

    async def go() -> tuple[grpc.StatusCode, grpc.StatusCode]:
        async with grpc.aio.insecure_channel(f"unix:{daemon.unix}") as ch:
            stub = hints_pb2_grpc.FreePageHintsStub(ch)
            a = await call_code(stub.Report(iter([chunk(1, [0, 4096])]), timeout=5))
            call = await raw_attach(ch, token("bad"))
            initial = tuple(await asyncio.wait_for(call.initial_metadata(), 5))
            peer = daemon.peer_of("bad")
            call.cancel()
            assert ("fphint-vm", "bad") in initial
            assert peer.startswith("unix:pid="), peer
            return a, grpc.StatusCode.OK

    a, _ = run(go())
    assert a == grpc.StatusCode.UNAUTHENTICATED
    assert daemon.served()
