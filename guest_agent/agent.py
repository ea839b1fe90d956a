"""The agent's connection loop: attach, answer hint requests, reconnect.

For each HintRequest, within the request's deadline and stopping early when
the epoch closes:

1. if the source tracks (scan once, then track: docs/safety-rule.md §5.6),
   its tracked set minus everything allocated since, computed at once in the
   loop thread, goes out as the epoch's first Report call (SNAPSHOT);
2. a fresh scan, begun after the request arrived, streams as a second
   SNAPSHOT call, part by part, and becomes the tracked set;
3. with live hints on, pages freed after the request follow as extra Report
   calls of the same epoch, rate-bounded, until the epoch ends.

A newer request cancels what an older one still does (its scan stops between
two BPF runs) and never waits for it: its tracked answer needs no scan.
Tracking starts with the first request and stops when requests have stopped
for ``Settings.track_idle_s`` (``track="always"``: from the start, the set
refreshed every ``refresh_s``; ``"off"``: scans only).

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

from . import memory, priority
from .chunks import ChunkEncoder
from .facts import self_usage
from .reclaim import PageCacheReclaim
from .settings import TRACK_MODES as TRACK_MODES  # re-exported: the agent's settings
from .settings import Settings as Settings
from .sources.base import FreePageSource, LiveFrees, Part, TrackedPart

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
class Endpoint:
    address: addresses.Address
    token: str | None


#: Ranges in the tracked answer's first chunk: the collector stamps the
#: epoch's first chunk once it has checked it.
FIRST_CHUNK_RANGES = 256
#: Seconds of no request in flight before the agent gives its heap back.
TRIM_AFTER_S = 1.0


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
        reclaim: PageCacheReclaim | None = None,
    ) -> None:
        """``reclaim``: where and how the opt-in page-cache reclaim runs
        (default: /proc/sys/vm/drop_caches, when ``settings.reclaim_page_cache``)."""
        self.source = source
        self.facts = facts
        self.endpoint = endpoint
        self.settings = settings
        self.backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
        # One scan at a time; a thread so the loop keeps serving the stream,
        # one step below it in priority.
        self._scanner = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="fph-scan", initializer=priority.scanner_thread
        )
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._last_request = 0.0
        self._track_timer: asyncio.TimerHandle | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._trim: asyncio.TimerHandle | None = None
        if settings.reclaim_page_cache and reclaim is None:
            reclaim = PageCacheReclaim(settings.track_idle_s)
        self._reclaim = reclaim if settings.reclaim_page_cache else None
        #: Counters for tests and logs.
        self.attaches = 0
        self.requests = 0
        self.reports_sent = 0
        self._last_error = ""

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set; never returns on collector failures."""
        stop = stop or asyncio.Event()
        if self.source is not None and self.settings.track == "always" and self.source.set_tracking(True):
            self._refresher = asyncio.ensure_future(self._refresh())
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
            except TimeoutError:
                pass
        self._cancel_all()
        if self._refresher is not None:
            self._refresher.cancel()
        if self._track_timer is not None:
            self._track_timer.cancel()
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
        self._last_request = received
        # A newer request makes older ones pointless: the collector has closed
        # them. Their scan stops between two BPF runs; nothing here waits for it.
        self._cancel_all()
        if self.source is not None:
            self.source.cancel_scans()
        task = asyncio.ensure_future(self._answer(stub, req, md, received))
        self._tasks[req.epoch] = task
        epoch = req.epoch
        task.add_done_callback(lambda t: self._done(epoch, t))

    def _done(self, epoch: int, task: asyncio.Task[None]) -> None:
        if self._tasks.get(epoch) is task:
            del self._tasks[epoch]
        if not self._tasks:  # idle again: give back what the answer used, soon
            if self._trim is not None:
                self._trim.cancel()
            self._trim = asyncio.get_running_loop().call_later(TRIM_AFTER_S, self._give_back)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, grpc.aio.AioRpcError):
                log.info("report for epoch %d ended: %s %s", epoch, exc.code().name, exc.details())
            else:
                log.error("answering epoch %d failed: %r", epoch, exc)

    def _give_back(self) -> None:
        self._trim = None
        if not self._tasks:
            memory.give_back()

    def _track(self) -> bool:
        """Tracking on for this request (per Settings.track); schedules it off
        once requests stop. True when the source tracks now."""
        assert self.source is not None
        mode = self.settings.track
        if mode == "off":
            return False
        on = self.source.set_tracking(True)
        if on and mode == "migration":
            if self._track_timer is not None:
                self._track_timer.cancel()
            self._track_timer = asyncio.get_running_loop().call_later(self.settings.track_idle_s, self._track_idle)
        return on

    def _track_idle(self) -> None:
        self._track_timer = None
        if self.source is not None and not self._tasks:
            self.source.set_tracking(False)
            log.info("no hint request for %.0f s: tracking stopped", self.settings.track_idle_s)
        elif self.source is not None:  # still answering: look again later
            self._track_timer = asyncio.get_running_loop().call_later(self.settings.track_idle_s, self._track_idle)

    async def _refresh(self) -> None:
        """track="always": keep the tracked set fresh with a scan every
        refresh_s while no request is being answered."""
        assert self.source is not None
        source = self.source
        loop = asyncio.get_running_loop()

        def scan() -> None:
            for _part in source.parts(time.monotonic() + 5.0):
                pass

        while True:
            await asyncio.sleep(self.settings.refresh_s)
            if not self._tasks and time.monotonic() - self._last_request >= self.settings.refresh_s:
                try:
                    await loop.run_in_executor(self._scanner, scan)
                except Exception as e:  # a failed refresh only means a staler set
                    log.warning("tracking refresh scan failed: %r", e)

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
        budget = [req.max_ranges or (1 << 62)]
        per_chunk = max(1, min(self.settings.chunk_ranges, req.max_ranges_per_chunk or self.settings.chunk_ranges))
        tracked: TrackedPart | None = None
        if self._track():
            try:
                tracked = self.source.tracked()
            except Exception as e:  # a broken tracked answer only means waiting for the scan
                log.warning("tracked answer failed: %r", e)
        reclaim = self._reclaim if self._reclaim is not None and self._reclaim.due(received) else None
        scan = _Scan(self.source, self._scanner, deadline, reclaim)  # begins now, after the request
        try:
            if tracked is not None and tracked.pages:
                await self._send_tracked(stub, md, req.epoch, tracked, per_chunk, deadline, budget)
            await self._stream_scan(stub, md, req, scan, per_chunk, deadline, budget)
            if live is not None:
                await self._live(stub, md, req.epoch, live, per_chunk, deadline, budget[0])
        finally:
            await scan.stop()
            if live is not None:
                live.stop()

    async def _send_tracked(
        self,
        stub: hints_pb2_grpc.FreePageHintsStub,
        md: tuple[tuple[str, str], ...],
        epoch: int,
        tracked: TrackedPart,
        per_chunk: int,
        deadline: float,
        budget: list[int],
    ) -> None:
        """The tracked answer as a Report call of its own: its ranges run over
        all memory, so the scan's cannot follow in the same (sorted) call."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        words, n = tracked.packed(budget[0])
        budget[0] -= n
        stats = _stats(tracked.pages, tracked.compute_s, max(0, tracked.nranges - n), tracked=True)
        enc = ChunkEncoder(epoch, hints_pb2.REPORT_KIND_SNAPSHOT, per_chunk)

        async def chunks() -> AsyncIterator[hints_pb2.ReportChunk]:
            for msg in enc.packed(words, stats, first=FIRST_CHUNK_RANGES):
                yield msg

        await stub.Report(chunks(), timeout=remaining, metadata=md)
        self.reports_sent += 1

    async def _stream_snapshot(
        self,
        stub: hints_pb2_grpc.FreePageHintsStub,
        md: tuple[tuple[str, str], ...],
        req: hints_pb2.HintRequest,
        per_chunk: int,
        deadline: float,
    ) -> int:
        """A fresh scan as one Report call, nothing else; the ranges sent
        (the lab's late agent answers this way)."""
        assert self.source is not None
        budget = [req.max_ranges or (1 << 62)]
        scan = _Scan(self.source, self._scanner, deadline)
        try:
            await self._stream_scan(stub, md, req, scan, per_chunk, deadline, budget)
        finally:
            await scan.stop()
        return (req.max_ranges or (1 << 62)) - budget[0]

    async def _stream_scan(
        self,
        stub: hints_pb2_grpc.FreePageHintsStub,
        md: tuple[tuple[str, str], ...],
        req: hints_pb2.HintRequest,
        scan: _Scan,
        per_chunk: int,
        deadline: float,
        budget: list[int],
    ) -> None:
        """Send each part of the fresh scan as it is ready, as chunks of one
        Report call."""
        counts = {"sent": 0, "truncated": 0, "pages": 0}

        async def chunks() -> AsyncIterator[hints_pb2.ReportChunk]:
            enc = ChunkEncoder(req.epoch, hints_pb2.REPORT_KIND_SNAPSHOT, per_chunk)
            pending: list[tuple[int, int]] = []
            done = False
            while not done:
                item = await scan.parts.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    done = True
                else:
                    counts["pages"] += item.pages
                    room = budget[0] - counts["sent"] - len(pending)
                    pending.extend(item.ranges[:room])
                    counts["truncated"] += max(0, len(item.ranges) - room)
                # Send what is ready: full chunks now, the remainder when the
                # scan ends or no more parts are waiting (first chunk early).
                while pending and (len(pending) >= per_chunk or done or scan.parts.empty()):
                    if time.monotonic() >= deadline:
                        return  # out of time: stop early; what was sent still counts
                    batch, pending = pending[:per_chunk], pending[per_chunk:]
                    last = done and not pending
                    counts["sent"] += len(batch)
                    yield enc.chunk(batch, last, scan.stats(counts) if last else None)
            if not enc.ended:  # everything was sent early: close the call with an empty end chunk
                yield enc.chunk([], True, scan.stats(counts))

        remaining = deadline - time.monotonic()
        try:
            if remaining > 0:
                await stub.Report(chunks(), timeout=remaining, metadata=md)
                self.reports_sent += 1
        finally:
            budget[0] -= counts["sent"]

    async def _send(
        self,
        stub: hints_pb2_grpc.FreePageHintsStub,
        md: tuple[tuple[str, str], ...],
        epoch: int,
        kind: hints_pb2.ReportKind,
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


class _Scan:
    """A fresh scan in the scanner thread, its parts queued for the loop.

    Begins when made (after the request arrived). :meth:`stop` makes it stop
    soon and waits for it in the task that made it; a newer request's task
    never waits here.
    """

    def __init__(
        self,
        source: FreePageSource,
        executor: concurrent.futures.Executor,
        deadline: float,
        reclaim: PageCacheReclaim | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self.parts: asyncio.Queue[Part | BaseException | None] = asyncio.Queue()
        self._stop = threading.Event()
        self.timing = {"start": 0.0, "end": 0.0}
        self._source = source

        def scan() -> None:
            self.timing["start"] = time.monotonic()
            try:
                if self._stop.is_set():  # stopped while queued behind an older scan
                    loop.call_soon_threadsafe(self.parts.put_nowait, None)
                    return
                if reclaim is not None:  # before the scan: the pages it frees are found free
                    reclaim.run()
                for part in source.parts(deadline):
                    loop.call_soon_threadsafe(self.parts.put_nowait, part)
                    if self._stop.is_set():
                        break
                loop.call_soon_threadsafe(self.parts.put_nowait, None)
            except BaseException as e:  # handed to the loop, raised there
                loop.call_soon_threadsafe(self.parts.put_nowait, e)
            finally:
                self.timing["end"] = time.monotonic()

        self._worker = loop.run_in_executor(executor, scan)

    def stats(self, counts: dict[str, int]) -> hints_pb2.AgentStats:
        scan_s = max(0.0, (self.timing["end"] or time.monotonic()) - self.timing["start"])
        return _stats(counts["pages"], scan_s, counts["truncated"], tracked=False)

    async def stop(self) -> None:
        if not self._worker.done():
            self._stop.set()
            self._source.cancel_scans()
        await asyncio.shield(self._worker)


def _stats(pages: int, seconds: float, truncated: int, tracked: bool) -> hints_pb2.AgentStats:
    """What a snapshot call's last chunk says about the agent and its answer."""
    cpu, rss, pss = self_usage()
    return hints_pb2.AgentStats(
        cpu_seconds=cpu,
        rss_bytes=rss,
        pss_bytes=pss,
        snapshot_us=min(int(seconds * 1e6), 2**32 - 1),
        snapshot_pages=pages,
        truncated_ranges=truncated,
        tracked=tracked,
    )
