"""Helpers for tests that run a real collector server and real agents in one
asyncio loop on loopback, plus a hand-driven client for misbehaving guests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import grpc

from fphint import addresses, ranges
from fphint.v1 import hints_pb2, hints_pb2_grpc
from guest_agent.agent import Agent, Endpoint
from guest_agent.facts import GuestSafety, build_facts
from guest_agent.reclaim import PageCacheReclaim
from guest_agent.settings import Settings
from guest_agent.sources.base import FreePageSource, Part, Probe, WholeScan
from host_collector.config import CollectorConfig, Limits, VmEntry
from host_collector.layout import RamLayout, RamRange
from host_collector.server import CollectorServer

GiB = 1 << 30
#: A q35-like 3 GiB guest: 2 GiB below 4G, 1 GiB above, one RAMBlock.
LAYOUT = RamLayout.from_ranges([RamRange(0, 2 * GiB, "pc.ram", 0), RamRange(4 * GiB, 1 * GiB, "pc.ram", 2 * GiB)])


def token(name: str) -> str:
    return f"test-token-{name}-0123456789"


def make_config(names: Sequence[str], limits: Limits | None = None, **kw: Any) -> CollectorConfig:
    return CollectorConfig(
        listen=(addresses.parse("tcp:127.0.0.1:0"),),
        limits=limits or Limits(),
        vms=tuple(VmEntry(n, token(n), layout=LAYOUT) for n in names),
        **kw,
    )


class FixedSource(FreePageSource):
    """A source that reports given ranges, optionally after a delay (a slow scan)."""

    name = "fixed"

    def __init__(self, rs: Sequence[tuple[int, int]], delay: float = 0.0) -> None:
        self.rs = list(rs)
        self.delay = delay
        self.calls: list[float] = []

    def probe(self) -> Probe:
        return Probe(self.name, True)

    def parts(self, deadline: float | None = None) -> Iterator[Part]:
        self.calls.append(time.monotonic())
        if self.delay:
            time.sleep(self.delay)
        yield WholeScan(self.rs, sum(n for _, n in self.rs) // 4096)


def pages_of(rs: Sequence[tuple[int, int]]) -> int:
    return sum(n // 4096 for _, n in rs)


@contextlib.asynccontextmanager
async def running_collector(cfg: CollectorConfig) -> AsyncIterator[CollectorServer]:
    srv = CollectorServer(cfg)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(0.5)


@contextlib.asynccontextmanager
async def running_agent(
    srv: CollectorServer,
    vm: str,
    source: FreePageSource | None,
    settings: Settings = Settings(backoff_initial_s=0.05, backoff_max_s=0.5),
    tok: str | None = None,
    reclaim: PageCacheReclaim | None = None,
) -> AsyncIterator[Agent]:
    facts = build_facts(GuestSafety(), [], source.name if source else "", "" if source else "test refusal")
    addr = srv.bound[0]
    agent = Agent(source, facts, lambda: Endpoint(addr, tok or token(vm)), settings, reclaim=reclaim)
    stop = asyncio.Event()
    task = asyncio.ensure_future(agent.run(stop))
    try:
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def wait_for(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def wait_attached(srv: CollectorServer, *names: str, timeout: float = 10.0) -> None:
    await wait_for(lambda: all(srv.collector.vms[n].attachment is not None for n in names), timeout, "attach")


class RawGuest:
    """A guest that speaks the protocol by hand, to send what a real agent never would."""

    def __init__(self, srv: CollectorServer, vm: str, tok: str | None = None) -> None:
        self.channel = grpc.aio.insecure_channel(srv.bound[0].grpc_target())
        self.stub = hints_pb2_grpc.FreePageHintsStub(self.channel)
        self.md = (("authorization", f"Bearer {tok if tok is not None else token(vm)}"),)
        self.attach_call: Any = None

    async def attach(self) -> None:
        self.attach_call = self.stub.Attach(
            hints_pb2.AttachRequest(facts=hints_pb2.AgentFacts(chosen_source="raw")), metadata=self.md
        )
        await self.attach_call.initial_metadata()

    async def next_request(self, timeout: float = 5.0) -> hints_pb2.HintRequest:
        while True:
            msg = await asyncio.wait_for(self.attach_call.read(), timeout)
            if msg is grpc.aio.EOF:
                raise EOFError("the collector ended the attach stream")
            if msg.WhichOneof("kind") == "request":
                request: hints_pb2.HintRequest = msg.request
                return request

    async def report(
        self, chunks: Sequence[hints_pb2.ReportChunk], stall: float = 0.0, timeout: float | None = 10.0
    ) -> hints_pb2.ReportAck:
        async def gen() -> AsyncIterator[hints_pb2.ReportChunk]:
            for c in chunks:
                yield c
            if stall:
                await asyncio.sleep(stall)

        ack: hints_pb2.ReportAck = await self.stub.Report(gen(), metadata=self.md, timeout=timeout)
        return ack

    async def close(self) -> None:
        if self.attach_call is not None:
            self.attach_call.cancel()
        await self.channel.close()


def chunk(
    epoch: int,
    rs: Sequence[tuple[int, int]],
    seq: int = 0,
    end: bool = True,
    kind: int = hints_pb2.REPORT_KIND_SNAPSHOT,
) -> hints_pb2.ReportChunk:
    return hints_pb2.ReportChunk(epoch=epoch, seq=seq, kind=kind, ranges=ranges.encode(rs), end=end)  # type: ignore[arg-type]


class CollectorThread:
    """A real CollectorServer on its own asyncio loop in a background thread,
    for tests that drive QEMU and guests synchronously."""

    def __init__(self, cfg: CollectorConfig) -> None:
        import threading

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="collector", daemon=True)
        self._thread.start()
        self.server: CollectorServer = self.call(self._start(cfg))

    async def _start(self, cfg: CollectorConfig) -> CollectorServer:
        srv = CollectorServer(cfg)
        await srv.start()
        return srv

    @property
    def collector(self) -> Any:
        return self.server.collector

    @property
    def port(self) -> int:
        return self.server.bound[0].port

    def call(self, coro: Any, timeout: float = 60.0) -> Any:
        """Run a coroutine on the collector's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def wait_attached(self, vm: str, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while self.collector.vms[vm].attachment is None:
            if time.monotonic() > end:
                raise AssertionError(f"agent of {vm} did not attach within {timeout:.0f}s")
            time.sleep(0.2)

    def close(self) -> None:
        try:
            self.call(self.server.stop(0.5), timeout=15)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
