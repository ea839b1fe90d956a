"""A real collector server and real agents (the Agent class, over gRPC on
loopback): deadlines, stalls, misbehaving guests, isolation between VMs, many
agents at once, health and shutdown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest

from fphint.v1 import hints_pb2
from fphint_lab.collector_harness import (
    FixedSource,
    GiB,
    RawGuest,
    chunk,
    make_config,
    pages_of,
    running_agent,
    running_collector,
    wait_attached,
    wait_for,
)
from guest_agent.agent import Settings
from guest_agent.sources.base import LiveFrees, Part, WholeScan
from host_collector.config import Limits
from host_collector.server import CollectorServer

MiB = 1 << 20
GOOD = [(0x100000, 64 * MiB), (512 * MiB, 4096), (4 * GiB, 8 * MiB)]


def run(coro: Awaitable[None], timeout: float = 60) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


def test_request_answered_within_deadline() -> None:
    async def go() -> None:
        async with running_collector(make_config(["a"])) as srv:
            src = FixedSource(GOOD)
            async with running_agent(srv, "a", src) as agent:
                await wait_attached(srv, "a")
                before = time.monotonic()
                ep = srv.collector.open_epoch("a", 2.0)
                await asyncio.wait_for(ep.snapshot_done.wait(), 2.0)
                st = ep.stats()
                assert ep.is_open and st.free_pages == pages_of(GOOD) and st.reports == 1
                assert st.request_to_last_chunk_s is not None and st.request_to_last_chunk_s < 2.0
                assert ep.is_free("pc.ram", 0x100) and ep.is_free("pc.ram", (2 * GiB) // 4096)
                assert not ep.is_free("pc.ram", 0xFF)
                # A fresh snapshot, taken after the request was queued.
                assert len(src.calls) == 1 and src.calls[0] >= before
                assert st.agent["rss_bytes"] > 0 and st.agent["cpu_seconds"] > 0
                # (A newer request cancels an older one still waiting for its ack.)
                await wait_for(lambda: agent.reports_sent == 1, 2, "first ack")
                ep2 = srv.collector.open_epoch("a", 2.0)
                await asyncio.wait_for(ep2.snapshot_done.wait(), 2.0)
                assert len(src.calls) == 2 and not ep.is_open and ep.close_reason == "superseded"
                text = generate_latest(srv.collector.metrics.registry).decode()
                assert f'fphint_pages_hinted_total{{vm="a"}} {2.0 * pages_of(GOOD)}' in text
                await wait_for(lambda: agent.reports_sent == 2, 2, "second ack")

    run(go())


def test_stalled_agent_does_not_hold_the_epoch_or_others() -> None:
    async def go() -> None:
        async with running_collector(make_config(["slow", "fast"])) as srv:
            async with (
                running_agent(srv, "slow", FixedSource(GOOD, delay=3.0)),
                running_agent(srv, "fast", FixedSource(GOOD)),
            ):
                await wait_attached(srv, "slow", "fast")
                t0 = time.monotonic()
                slow = srv.collector.open_epoch("slow", 0.5)
                assert slow.hints_pending
                await asyncio.sleep(0.3)
                assert not slow.hints_pending  # no first chunk in time: not worth holding records for
                fast = srv.collector.open_epoch("fast", 0.5)
                await asyncio.wait_for(slow.wait_closed(), 2.0)
                took = time.monotonic() - t0
                assert slow.close_reason == "deadline" and 0.45 < took < 1.5
                assert not slow.hints_pending
                assert slow.free_pages() == 0
                assert fast.free_pages() == pages_of(GOOD)
                again = srv.collector.open_epoch("fast", 1.0)
                await asyncio.wait_for(again.snapshot_done.wait(), 2.0)
                assert again.free_pages() == pages_of(GOOD)

    run(go())


def test_server_cuts_a_report_that_stalls_at_the_epoch_deadline() -> None:
    """A guest that sends one chunk and then neither sends nor closes, with no
    client deadline: the server ends the call when the epoch closes."""

    async def go() -> None:
        async with running_collector(make_config(["a"])) as srv:
            g = RawGuest(srv, "a")
            await g.attach()
            await wait_attached(srv, "a")
            ep = srv.collector.open_epoch("a", 0.4)
            req = await g.next_request()
            t0 = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await g.report([chunk(req.epoch, GOOD[:1], end=False)], stall=30, timeout=None)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "closed" in (e.value.details() or "")
            assert time.monotonic() - t0 < 1.5
            assert ep.free_pages() == pages_of(GOOD[:1])  # what arrived in time stays
            await g.close()

    run(go())


# Each misbehaviour: (name, limits, builder of the bad call) -> expected status and message part.
BadCall = Callable[[RawGuest, hints_pb2.HintRequest, int], Awaitable[object]]


def _flood(g: RawGuest, req: hints_pb2.HintRequest, _: int) -> Awaitable[object]:
    rs = [(i * 8192, 4096) for i in range(60)]
    return g.report([chunk(req.epoch, rs[:30], 0, False), chunk(req.epoch, rs[30:], 1)])


CASES: list[tuple[str, Limits, BadCall, grpc.StatusCode, str]] = [
    ("flood", Limits(max_ranges_per_epoch=40), _flood, grpc.StatusCode.RESOURCE_EXHAUSTED, "exceed 40 ranges"),
    (
        "outside RAM",
        Limits(),
        lambda g, r, _: g.report([chunk(r.epoch, [(2 * GiB, 4096)])]),
        grpc.StatusCode.OUT_OF_RANGE,
        "not inside guest RAM",
    ),
    (
        "beyond 2**64",
        Limits(),
        lambda g, r, _: g.report(
            [
                hints_pb2.ReportChunk(
                    epoch=r.epoch, ranges=[(1 << 64) - 4096, 8192], end=True, kind=hints_pb2.REPORT_KIND_SNAPSHOT
                )
            ]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "beyond 2**64",
    ),
    (
        "overlap",
        Limits(),
        lambda g, r, _: g.report(
            [
                hints_pb2.ReportChunk(
                    epoch=r.epoch, ranges=[0x100000, 8192, 4096, 4096], end=True, kind=hints_pb2.REPORT_KIND_SNAPSHOT
                )
            ]
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "overlaps",
    ),
    (
        "unknown epoch",
        Limits(),
        lambda g, r, _: g.report([chunk(r.epoch + 12345, GOOD)]),
        grpc.StatusCode.FAILED_PRECONDITION,
        "unknown",
    ),
    (
        "other VM's epoch",
        Limits(),
        lambda g, r, other: g.report([chunk(other, GOOD)]),
        grpc.StatusCode.FAILED_PRECONDITION,
        "unknown",
    ),
    (
        "bad sequence",
        Limits(),
        lambda g, r, _: g.report([chunk(r.epoch, GOOD, seq=1)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "seq",
    ),
    (
        "chunk too big",
        Limits(max_ranges_per_chunk=2),
        lambda g, r, _: g.report([chunk(r.epoch, GOOD)]),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "in one chunk",
    ),
    (
        "oversize message",
        Limits(max_message_bytes=64 << 10),
        lambda g, r, _: g.report([chunk(r.epoch, [(i * 8192, 4096) for i in range(20000)])]),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "larger than max",
    ),
    (
        "live hints not asked",
        Limits(),
        lambda g, r, _: g.report([chunk(r.epoch, GOOD, kind=hints_pb2.REPORT_KIND_LIVE)]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "live",
    ),
]


@pytest.mark.parametrize("name,limits,bad,code,message", CASES, ids=[c[0] for c in CASES])
def test_misbehaving_guest(name: str, limits: Limits, bad: BadCall, code: grpc.StatusCode, message: str) -> None:
    """Clear status, nothing merged for the offender, the honest VM untouched."""

    async def go() -> None:
        async with running_collector(make_config(["evil", "honest"], limits=limits)) as srv:
            async with running_agent(srv, "honest", FixedSource(GOOD[:1])):
                g = RawGuest(srv, "evil")
                await g.attach()
                await wait_attached(srv, "evil", "honest")
                evil = srv.collector.open_epoch("evil", 5.0, live_hints=False)
                honest = srv.collector.open_epoch("honest", 5.0)
                req = await g.next_request()
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await bad(g, req, honest.id)
                assert e.value.code() == code, e.value.details()
                assert message in (e.value.details() or ""), e.value.details()
                assert evil.free_pages() == 0
                await asyncio.wait_for(honest.snapshot_done.wait(), 5.0)
                assert honest.free_pages() == pages_of(GOOD[:1]) and honest.is_open
                await g.close()

    run(go())


def test_wrong_and_missing_token_are_refused() -> None:
    async def go() -> None:
        async with running_collector(make_config(["a"])) as srv:
            for tok in ("not-a-real-token-at-all", ""):
                g = RawGuest(srv, "a", tok=tok)
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await g.attach()
                    await g.next_request(timeout=2)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await g.report([chunk(1, GOOD)])
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                await g.close()
            assert srv.collector.vms["a"].attachment is None

    run(go())


def test_closed_epoch_is_refused_without_touching_bitmaps() -> None:
    async def go() -> None:
        async with running_collector(make_config(["a"])) as srv:
            g = RawGuest(srv, "a")
            await g.attach()
            await wait_attached(srv, "a")
            ep = srv.collector.open_epoch("a", 5.0)
            req = await g.next_request()
            await g.report([chunk(req.epoch, GOOD[:1])])
            srv.collector.close_epoch("a", ep.id)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await g.report([chunk(req.epoch, GOOD[1:])])
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "closed" in (e.value.details() or "")
            assert ep.free_pages() == pages_of(GOOD[:1])  # kept, and nothing added
            await g.close()

    run(go())


def test_agent_drops_a_request_when_its_epoch_closes() -> None:
    async def go() -> None:
        async with running_collector(make_config(["a"])) as srv:
            src = FixedSource(GOOD, delay=0.6)
            async with running_agent(srv, "a", src) as agent:
                await wait_attached(srv, "a")
                ep = srv.collector.open_epoch("a", 5.0)
                await wait_for(lambda: len(src.calls) == 1, 5, "scan start")
                srv.collector.close_epoch("a", ep.id)
                await asyncio.sleep(1.0)
                assert agent.reports_sent == 0 and ep.free_pages() == 0
                src.delay = 0
                ep2 = srv.collector.open_epoch("a", 5.0)
                await asyncio.wait_for(ep2.snapshot_done.wait(), 5.0)
                await wait_for(lambda: agent.reports_sent == 1, 2, "ack")
                assert ep2.free_pages() == pages_of(GOOD)

    run(go())


def test_fifty_agents_at_once() -> None:
    names = [f"vm{i:02d}" for i in range(50)]

    async def go() -> None:
        async with running_collector(make_config(names)) as srv:
            sources = {n: FixedSource([(0x100000 + i * 8 * MiB, (i + 1) * MiB)]) for i, n in enumerate(names)}
            agents = [running_agent(srv, n, sources[n]) for n in names]
            for a in agents:
                await a.__aenter__()
            try:
                await wait_attached(srv, *names, timeout=30)
                eps = {n: srv.collector.open_epoch(n, 10.0) for n in names}
                await asyncio.wait_for(asyncio.gather(*(e.snapshot_done.wait() for e in eps.values())), 20)
                for i, n in enumerate(names):
                    assert eps[n].free_pages() == (i + 1) * MiB // 4096, n
                    assert eps[n].is_free("pc.ram", (0x100000 + i * 8 * MiB) // 4096)
            finally:
                for a in agents:
                    await a.__aexit__(None, None, None)

    run(go(), timeout=120)


def test_health_reflection_and_graceful_shutdown() -> None:
    async def go() -> None:
        srv = CollectorServer(make_config(["a"]))
        await srv.start()
        ch = grpc.aio.insecure_channel(srv.bound[0].grpc_target())
        hstub = health_pb2_grpc.HealthStub(ch)
        resp = await hstub.Check(health_pb2.HealthCheckRequest(service="fphint.v1.FreePageHints"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        rstub = reflection_pb2_grpc.ServerReflectionStub(ch)

        async def ask() -> object:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for r in rstub.ServerReflectionInfo(ask()):
            names = {s.name for s in r.list_services_response.service}
            assert {"fphint.v1.FreePageHints", "grpc.health.v1.Health"} <= names
            break
        watch = hstub.Watch(health_pb2.HealthCheckRequest(service=""))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        g = RawGuest(srv, "a")
        await g.attach()
        await wait_attached(srv, "a")
        stopping = asyncio.ensure_future(srv.stop(grace=1.0))
        second = await asyncio.wait_for(watch.read(), 2)
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await asyncio.wait_for(stopping, 5)
        with pytest.raises(EOFError):  # the attach stream ended with the server
            await g.next_request(timeout=2)
        await g.close()
        await ch.close()

    run(go())


class FakeLive(LiveFrees):
    """Pages 'freed' after start(): one new range per drain."""

    def __init__(self) -> None:
        self.started = False
        self.next = 1 * GiB

    def start(self) -> None:
        self.started = True

    def drain(self, max_ranges: int) -> list[tuple[int, int]]:
        assert self.started
        out = [(self.next + i * 8192, 4096) for i in range(max_ranges)]
        self.next += max_ranges * 8192
        return out

    def stop(self) -> None:
        self.started = False


class LiveSource(FixedSource):
    def __init__(self) -> None:
        super().__init__(GOOD[:1])
        self.live = FakeLive()

    def live_frees(self) -> LiveFrees:
        return self.live


def test_live_hints_follow_the_snapshot_rate_bounded() -> None:
    async def go() -> None:
        async with running_collector(make_config(["a"])) as srv:
            src = LiveSource()
            settings = Settings(backoff_initial_s=0.05, live_interval_s=0.05, live_max_ranges_per_s=200)
            async with running_agent(srv, "a", src, settings):
                await wait_attached(srv, "a")
                ep = srv.collector.open_epoch("a", 1.0)
                await ep.wait_closed()
                live_pages = ep.free_pages() - pages_of(GOOD[:1])
                # 200 ranges/s of one page each for at most ~1 s, in 10-range batches.
                assert 10 <= live_pages <= 200, live_pages
                assert ep.stats().reports >= 2
                assert ep.is_free("pc.ram", GiB // 4096)
                no_live = srv.collector.open_epoch("a", 0.5, live_hints=False)
                await no_live.wait_closed()
                assert no_live.free_pages() == pages_of(GOOD[:1])
                assert not src.live.started

    run(go())


class SlowPartsSource(FixedSource):
    """A scan whose second half takes a second: the first half must not wait for it."""

    def parts(self, deadline: float | None = None) -> Iterator[Part]:
        yield WholeScan(GOOD[:2], pages_of(GOOD[:2]))
        time.sleep(1.0)
        yield WholeScan(GOOD[2:], pages_of(GOOD[2:]))


def test_agent_streams_scan_parts_as_they_come() -> None:
    async def go() -> None:
        async with running_collector(make_config(["a"])) as srv:
            async with running_agent(srv, "a", SlowPartsSource(GOOD)):
                await wait_attached(srv, "a")
                ep = srv.collector.open_epoch("a", 5.0)
                await asyncio.sleep(0.5)
                assert ep.free_pages() == pages_of(GOOD[:2])  # the first part is in, the scan is not over
                assert ep.hints_pending
                await asyncio.wait_for(ep.snapshot_done.wait(), 5.0)
                assert not ep.hints_pending
                st = ep.stats()
                assert ep.free_pages() == pages_of(GOOD) and st.reports == 1
                assert st.request_to_first_chunk_s is not None and st.request_to_first_chunk_s < 0.5
                assert st.request_to_last_chunk_s is not None and st.request_to_last_chunk_s >= 1.0
                assert st.agent["snapshot_pages"] == pages_of(GOOD)

    run(go())


def test_no_hints_pending_without_an_agent() -> None:
    async def go() -> None:
        async with running_collector(make_config(["a"])) as srv:
            ep = srv.collector.open_epoch("a", 5.0)
            assert not ep.request_sent and not ep.hints_pending

    run(go())
