"""The guest-facing gRPC service: Attach and Report.

Every call is identified before anything it sends is read, from the kernel's
account of the connection (peers.py) and the token, and every wait is bounded
on the server side (idle timeout, epoch deadline) because a guest may omit
deadlines or simply stall. A refusal is one gRPC status and one count in the
metrics, logged at a bounded rate, and never touches another VM's state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from fphint.v1 import hints_pb2, hints_pb2_grpc

from .epochs import Collector, Epoch, VmState
from .errors import CollectorError, Refusal, abort
from .hintcheck import ReportDecoder
from .peers import PeerTable

log = logging.getLogger(__name__)

TOKEN_HEADER = "authorization"
#: Longest string kept from the agent's self-description.
FACT_TEXT_MAX = 256


def bearer_token(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == TOKEN_HEADER and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None


def sanitize_facts(facts: hints_pb2.AgentFacts) -> hints_pb2.AgentFacts:
    """Clip the guest's free text so logs and the admin API stay bounded."""
    out = hints_pb2.AgentFacts()
    out.CopyFrom(facts)
    for name in ("agent_version", "kernel_release", "chosen_source", "refusal", "memory_encryption", "hostname"):
        value = getattr(out, name)
        clean = "".join(ch if ch.isprintable() else "?" for ch in value[:FACT_TEXT_MAX])
        setattr(out, name, clean)
    del out.sources[16:]
    details = sorted(out.source_details.items())[:32]
    out.ClearField("source_details")
    for k, v in details:
        out.source_details[k[:64]] = "".join(ch if ch.isprintable() else "?" for ch in v[:FACT_TEXT_MAX])
    for s in out.sources:
        s.name = s.name[:64]
        s.reason = s.reason[:FACT_TEXT_MAX]
    return out


class FreePageHintsService(hints_pb2_grpc.FreePageHintsServicer):
    def __init__(self, collector: Collector, peers: PeerTable | None = None) -> None:
        self.collector = collector
        #: Kernel identities of bridged (Unix/vsock) connections.
        self.peers = peers

    def peer_text(self, context: grpc.aio.ServicerContext) -> str:
        """The peer as the kernel describes it (bridged) or as gRPC does (TCP)."""
        raw = context.peer() or ""
        kernel = self.peers.lookup(raw) if self.peers is not None else None
        return str(kernel) if kernel is not None else raw

    async def _identify(self, context: grpc.aio.ServicerContext) -> VmState:
        raw = context.peer() or ""
        kernel = self.peers.lookup(raw) if self.peers is not None else None
        try:
            return self.collector.identify(bearer_token(context), kernel)
        except Refusal as r:
            self.collector.metrics.rejects.labels("", r.tag).inc()
            who = str(kernel) if kernel is not None else raw
            self.collector.ratelog.warning(
                f"unidentified:{r.tag}", "refused call from %s: %s", who, r.message, extra={"reason": r.tag}
            )
            await abort(context, r)

    async def Attach(
        self, request: hints_pb2.AttachRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[hints_pb2.CollectorMessage]:
        vm = await self._identify(context)
        await self._check_attach_size(vm, request, context)
        att = self.collector.attach(vm, sanitize_facts(request.facts), self.peer_text(context))
        try:
            await context.send_initial_metadata((("fphint-vm", vm.name),))
            while True:
                msg = await att.queue.get()
                if msg is None:
                    if vm.attachment is not att and vm.attachment is not None:
                        await abort(
                            context,
                            CollectorError("replaced by a newer Attach from the same VM", grpc.StatusCode.ABORTED),
                        )
                    return
                yield msg
        finally:
            self.collector.detach(att)

    async def _check_attach_size(
        self, vm: VmState, request: hints_pb2.AttachRequest, context: grpc.aio.ServicerContext
    ) -> None:
        """Facts are a few hundred bytes; a huge AttachRequest is refused before it is copied."""
        limit = self.collector.limits.max_attach_bytes
        size = request.ByteSize()
        if size > limit:
            r = Refusal("RESOURCE_EXHAUSTED", "attach_too_big", f"AttachRequest of {size} bytes, limit {limit}")
            self.collector.metrics.budget_refused.labels("attach_bytes").inc()
            self.collector.violation(vm, None, r)
            await abort(context, r)

    async def Report(
        self, request_iterator: AsyncIterator[hints_pb2.ReportChunk], context: grpc.aio.ServicerContext
    ) -> hints_pb2.ReportAck:
        vm = await self._identify(context)
        limits = self.collector.limits
        if vm.active_reports >= limits.max_reports_per_vm:
            r = Refusal(
                "RESOURCE_EXHAUSTED", "too_many_reports", f"more than {limits.max_reports_per_vm} Report calls at once"
            )
            self.collector.violation(vm, None, r)
            await abort(context, r)
        vm.active_reports += 1
        try:
            return await self._report(vm, context)
        finally:
            vm.active_reports -= 1

    async def _report(self, vm: VmState, context: grpc.aio.ServicerContext) -> hints_pb2.ReportAck:
        col = self.collector
        limits = col.limits
        ep: Epoch | None = None
        decoder: ReportDecoder | None = None
        kind = hints_pb2.REPORT_KIND_UNSPECIFIED
        ack = hints_pb2.ReportAck()
        stats: hints_pb2.AgentStats | None = None
        try:
            while True:
                chunk = await self._next_chunk(context, ep, limits.report_idle_timeout_s)
                if chunk is None:
                    break
                if chunk.seq != ack.chunks:
                    raise Refusal("INVALID_ARGUMENT", "sequence", f"chunk seq {chunk.seq}, expected {ack.chunks}")
                if ep is None:
                    ep = col.report_epoch(vm, chunk.epoch)
                    ack.epoch = ep.id
                    kind = chunk.kind
                    if kind not in (hints_pb2.REPORT_KIND_SNAPSHOT, hints_pb2.REPORT_KIND_LIVE):
                        raise Refusal("INVALID_ARGUMENT", "kind", "report kind must be SNAPSHOT or LIVE")
                    if kind == hints_pb2.REPORT_KIND_LIVE and not ep.live_hints:
                        raise Refusal("INVALID_ARGUMENT", "kind", f"epoch {ep.id} did not ask for live hints")
                    decoder = ReportDecoder(ep.index)
                elif chunk.epoch != ep.id or chunk.kind != kind:
                    raise Refusal("INVALID_ARGUMENT", "mixed", "all chunks of a Report must share epoch and kind")
                assert decoder is not None
                n = len(chunk.ranges) // 2
                if n > limits.max_ranges_per_chunk:
                    raise Refusal(
                        "RESOURCE_EXHAUSTED",
                        "chunk_too_big",
                        f"{n} ranges in one chunk, limit {limits.max_ranges_per_chunk}",
                    )
                pieces = decoder.decode(chunk.ranges)
                ack.accepted_pages += col.accept(ep, pieces, n, kind, chunk.end)
                ack.chunks += 1
                ack.accepted_ranges += pieces.accepted
                ack.rejected_ranges += pieces.rejected
                if chunk.HasField("stats"):
                    stats = chunk.stats
                if chunk.end:
                    break
        except Refusal as r:
            col.violation(vm, ep, r)
            await abort(context, r)
        if ep is None:
            empty = Refusal("INVALID_ARGUMENT", "empty", "Report call carried no chunk")
            col.violation(vm, None, empty)
            await abort(context, empty)
        src = vm.attachment.facts.chosen_source if vm.attachment else ""
        col.report_finished(ep, stats, src)
        return ack

    async def _next_chunk(
        self, context: grpc.aio.ServicerContext, ep: Epoch | None, idle_s: float
    ) -> hints_pb2.ReportChunk | None:
        """The next chunk, None at the end of the call; bounded by the idle
        timeout and, once the epoch is known, by its closing."""
        timeout = idle_s
        if ep is not None:
            timeout = min(timeout, max(0.0, ep.deadline - time.monotonic()))
        read: asyncio.Future[Any] = asyncio.ensure_future(context.read())
        waits: set[asyncio.Future[Any]] = {read}
        closed: asyncio.Future[Any] | None = None
        if ep is not None:
            closed = asyncio.ensure_future(ep.wait_closed())
            waits.add(closed)
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if closed is not None:
                closed.cancel()
        if read in done:
            chunk = read.result()
            if chunk is grpc.aio.EOF:
                return None
            assert isinstance(chunk, hints_pb2.ReportChunk)
            return chunk
        read.cancel()
        if ep is not None and (not ep.is_open or time.monotonic() >= ep.deadline):
            reason = ep.close_reason or "deadline"
            raise Refusal("DEADLINE_EXCEEDED", "epoch_closed", f"epoch {ep.id} closed ({reason})")
        raise Refusal("DEADLINE_EXCEEDED", "idle", f"no chunk for {idle_s:.1f}s")
