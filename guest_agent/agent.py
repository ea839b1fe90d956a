"""The agent's connection loop: attach, answer hint requests, reconnect.

For each HintRequest the agent takes a fresh snapshot (never one from before
the request), streams it in bounded chunks as one Report call whose gRPC
deadline is the request's, and stops early when the deadline passes or the
epoch closes. With live hints on, pages freed after the request follow as
extra Report calls of the same epoch, rate-bounded, until the epoch ends.

The agent never exits because the collector is away: it reconnects with
exponential backoff and jitter, and looks its token and address up again
each time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import grpc

from fphint import addresses, vsock
from fphint.v1 import hints_pb2, hints_pb2_grpc

from .chunks import ChunkEncoder
from .facts import self_usage
from .sources.base import FreePageSource, LiveFrees, Part

log = logging.getLogger(__name__)

#: Channel settings: keepalive notices a vanished collector; the collector
#: allows pings every 5 s without data.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 20000),
    ("grpc.keepalive_timeout_ms", 10000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 1 << 20),
    ("grpc.enable_retries", 0),
    # Our own connection, never one shared with other channels in the process
    # (the collector caps streams per connection).
    ("grpc.use_local_subchannel_pool", 1),
]


@dataclass(frozen=True)
class Settings:
    chunk_ranges: int = 4096
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    #: Live hints: how often frees are drained, and at most how many ranges a second.
    live_interval_s: float = 0.1
    live_max_ranges_per_s: int = 20000


@dataclass(frozen=True)
class Endpoint:
    address: addresses.Address
    token: str | None


class Backoff:
    """Exponential backoff with jitter: half fixed, half random, capped."""

    def __init__(self, initial: float, cap: float, rng: random.Random | None = None) -> None:
        self.initial, self.cap = initial, cap
        self.attempt = 0
        self.rng = rng or random.Random()

    def next(self) -> float:
        d = min(self.cap, self.initial * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        return float(d / 2 + self.rng.uniform(0, d / 2))

    def reset(self) -> None:
        self.attempt = 0


class Agent:
    def __init__(
        self,
        source: FreePageSource | None,
        facts: hints_pb2.AgentFacts,
        endpoint: Callable[[], Endpoint],
        settings: Settings = Settings(),
    ) -> None:
        self.source = source
        self.facts = facts
        self.endpoint = endpoint
        self.settings = settings
        self.backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
        # One scan at a time; a thread so the loop keeps serving the stream.
        self._scanner = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fph-scan")
        self._tasks: dict[int, asyncio.Task[None]] = {}
        #: Counters for tests and logs.
        self.attaches = 0
        self.requests = 0
        self.reports_sent = 0
        self._last_error = ""

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set; never returns on collector failures."""
        stop = stop or asyncio.Event()
        while not stop.is_set():
            try:
                ep = self.endpoint()
            except Exception as e:  # discovery errors are retried like outages
                self._note_error(f"cannot find the collector: {e}")
                ep = None
            if ep is not None:
                session = asyncio.ensure_future(self._session(ep))
                stopper = asyncio.ensure_future(stop.wait())
                await asyncio.wait({session, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if not session.done():
                    session.cancel()
                    await asyncio.gather(session, return_exceptions=True)
                    break
                exc = session.exception()
                if exc is not None:
                    self._note_error(str(exc))
            delay = self.backoff.next()
            log.debug("reconnecting in %.2fs", delay)
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass
        self._cancel_all()
        self._scanner.shutdown(wait=False, cancel_futures=True)

    def _note_error(self, msg: str) -> None:
        # Log a given failure once, not on every retry.
        if msg != self._last_error:
            log.warning("collector unreachable: %s (retrying with backoff)", msg)
            self._last_error = msg

    def _metadata(self, ep: Endpoint) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {ep.token}"),) if ep.token else ()

    async def _session(self, ep: Endpoint) -> None:
        target = ep.address.grpc_target()
        dialer = None
        if ep.address.kind == "vsock":
            # grpcio wheels lack vsock: relay through a local abstract socket.
            dialer = vsock.VsockDialer(ep.address.cid, ep.address.port)
            await dialer.start()
            target = dialer.target
        try:
            await self._attached_session(ep, target)
        finally:
            if dialer is not None:
                dialer.close()

    async def _attached_session(self, ep: Endpoint, target: str) -> None:
        md = self._metadata(ep)
        async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            stub = hints_pb2_grpc.FreePageHintsStub(channel)
            call = stub.Attach(hints_pb2.AttachRequest(facts=self.facts), metadata=md)
            try:
                initial = await call.initial_metadata()
                # The collector names the VM only once it has accepted our identity.
                if any(k == "fphint-vm" for k, _ in (initial or ())):
                    self.attaches += 1
                    self.backoff.reset()
                    self._last_error = ""
                    log.info("attached to collector %s", ep.address, extra={"source": self.facts.chosen_source})
                async for msg in call:
                    which = msg.WhichOneof("kind")
                    if which == "request":
                        self._start_request(stub, msg.request, md)
                    elif which == "closed":
                        task = self._tasks.pop(msg.closed.epoch, None)
                        if task is not None:
                            task.cancel()
                raise ConnectionError("collector ended the attach stream")
            except grpc.aio.AioRpcError as e:
                raise ConnectionError(f"{e.code().name}: {e.details()}") from None
            finally:
                call.cancel()
                self._cancel_all()

    def _cancel_all(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()

    def _start_request(
        self, stub: hints_pb2_grpc.FreePageHintsStub, req: hints_pb2.HintRequest, md: tuple[tuple[str, str], ...]
    ) -> None:
        received = time.monotonic()
        self.requests += 1
        # A newer request makes older ones pointless: the collector has closed them.
        self._cancel_all()
        task = asyncio.ensure_future(self._answer(stub, req, md, received))
        self._tasks[req.epoch] = task
        epoch = req.epoch
        task.add_done_callback(lambda t: self._done(epoch, t))

    def _done(self, epoch: int, task: asyncio.Task[None]) -> None:
        if self._tasks.get(epoch) is task:
            del self._tasks[epoch]
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, grpc.aio.AioRpcError):
                log.info("report for epoch %d ended: %s %s", epoch, exc.code().name, exc.details())
            else:
                log.error("answering epoch %d failed: %r", epoch, exc)

    async def _answer(
        self,
        stub: hints_pb2_grpc.FreePageHintsStub,
        req: hints_pb2.HintRequest,
        md: tuple[tuple[str, str], ...],
        received: float,
    ) -> None:
        if self.source is None:
            return
        deadline = received + req.deadline_ms / 1000
        live: LiveFrees | None = self.source.live_frees() if req.live_hints else None
        if live is not None:
            live.start()  # frees from now on: after the request arrived
        try:
            per_chunk = max(1, min(self.settings.chunk_ranges, req.max_ranges_per_chunk or self.settings.chunk_ranges))
            sent = await self._stream_snapshot(stub, md, req, per_chunk, deadline)
            if live is not None:
                budget = req.max_ranges - sent if req.max_ranges else 1 << 62
                await self._live(stub, md, req.epoch, live, per_chunk, deadline, budget)
        finally:
            if live is not None:
                live.stop()

    async def _stream_snapshot(
        self,
        stub: hints_pb2_grpc.FreePageHintsStub,
        md: tuple[tuple[str, str], ...],
        req: hints_pb2.HintRequest,
        per_chunk: int,
        deadline: float,
    ) -> int:
        """Scan in the scanner thread and send each part as it is ready, as
        chunks of one Report call; returns the ranges sent."""
        assert self.source is not None
        source = self.source
        loop = asyncio.get_running_loop()
        parts: asyncio.Queue[Part | BaseException | None] = asyncio.Queue()
        stop = threading.Event()
        timing = {"start": 0.0, "end": 0.0}

        def scan() -> None:
            timing["start"] = time.monotonic()
            try:
                for part in source.parts(deadline):
                    loop.call_soon_threadsafe(parts.put_nowait, part)
                    if stop.is_set():
                        break
                loop.call_soon_threadsafe(parts.put_nowait, None)
            except BaseException as e:  # handed to the loop, raised there
                loop.call_soon_threadsafe(parts.put_nowait, e)
            finally:
                timing["end"] = time.monotonic()

        max_ranges = req.max_ranges or (1 << 62)
        counts = {"sent": 0, "truncated": 0, "pages": 0}

        async def chunks() -> AsyncIterator[hints_pb2.ReportChunk]:
            enc = ChunkEncoder(req.epoch, hints_pb2.REPORT_KIND_SNAPSHOT, per_chunk)
            pending: list[tuple[int, int]] = []
            done = False
            while not done:
                item = await parts.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    done = True
                else:
                    counts["pages"] += item.pages
                    room = max_ranges - counts["sent"] - len(pending)
                    pending.extend(item.ranges[:room])
                    counts["truncated"] += max(0, len(item.ranges) - room)
                # Send what is ready: full chunks now, the remainder when the
                # scan ends or no more parts are waiting (first chunk early).
                while pending and (len(pending) >= per_chunk or done or parts.empty()):
                    if time.monotonic() >= deadline:
                        return  # out of time: stop early; what was sent still counts
                    batch, pending = pending[:per_chunk], pending[per_chunk:]
                    last = done and not pending
                    counts["sent"] += len(batch)
                    yield enc.chunk(batch, last, _scan_stats(timing, counts) if last else None)
            if not enc.ended:  # everything was sent early: close the call with an empty end chunk
                yield enc.chunk([], True, _scan_stats(timing, counts))

        worker = loop.run_in_executor(self._scanner, scan)
        remaining = deadline - time.monotonic()
        try:
            if remaining > 0:
                await stub.Report(chunks(), timeout=remaining, metadata=md)
                self.reports_sent += 1
        finally:
            stop.set()
            await asyncio.shield(worker)
        return counts["sent"]

    async def _send(
        self,
        stub: hints_pb2_grpc.FreePageHintsStub,
        md: tuple[tuple[str, str], ...],
        epoch: int,
        kind: "hints_pb2.ReportKind",
        rs: Sequence[tuple[int, int]],
        per_chunk: int,
        deadline: float,
        stats: hints_pb2.AgentStats | None,
    ) -> hints_pb2.ReportAck | None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None

        async def chunks() -> AsyncIterator[hints_pb2.ReportChunk]:
            for msg in ChunkEncoder(epoch, kind, per_chunk).whole(rs, stats):
                if time.monotonic() >= deadline:
                    return  # out of time: stop early; what was sent still counts
                yield msg

        ack: hints_pb2.ReportAck = await stub.Report(chunks(), timeout=remaining, metadata=md)
        self.reports_sent += 1
        return ack

    async def _live(
        self,
        stub: hints_pb2_grpc.FreePageHintsStub,
        md: tuple[tuple[str, str], ...],
        epoch: int,
        live: LiveFrees,
        per_chunk: int,
        deadline: float,
        budget: int,
    ) -> None:
        s = self.settings
        per_tick = max(1, int(s.live_max_ranges_per_s * s.live_interval_s))
        while budget > 0 and time.monotonic() + s.live_interval_s < deadline:
            await asyncio.sleep(s.live_interval_s)
            freed = live.drain(min(per_tick, budget))
            if freed:
                budget -= len(freed)
                await self._send(stub, md, epoch, hints_pb2.REPORT_KIND_LIVE, freed, per_chunk, deadline, None)


def _scan_stats(timing: dict[str, float], counts: dict[str, int]) -> hints_pb2.AgentStats:
    """What the snapshot's last chunk says about the agent and the scan."""
    cpu, rss = self_usage()
    scan_s = max(0.0, (timing["end"] or time.monotonic()) - timing["start"])
    return hints_pb2.AgentStats(
        cpu_seconds=cpu, rss_bytes=rss, snapshot_us=min(int(scan_s * 1e6), 2**32 - 1),
        snapshot_pages=counts["pages"], truncated_ranges=counts["truncated"],
    )
