"""The collector's state: VMs, attached agents, epochs and their free-page bitmaps.

An *epoch* is one round of "which pages are free now?" for one VM. The
collector opens it with a deadline, queues a HintRequest to the VM's agent,
merges the ranges that arrive into per-RAMBlock bitmaps, and closes it at the
deadline or on demand. Nothing here ever waits on a guest: requests are queued
without blocking, and an epoch nobody answers simply closes empty.

Everything runs on one asyncio loop. The proxy may read bitmaps
(:meth:`Epoch.is_free`) from another thread: reads of a numpy bool array are
safe, and a page's bit only ever goes from "not hinted" to "hinted" while the
epoch is open, or is cleared as a whole when the epoch is poisoned.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
import numpy.typing as npt

from fphint.v1 import hints_pb2

from .config import CollectorConfig, VmEntry
from .errors import CollectorError, Refusal
from .hintcheck import LayoutIndex, Pieces
from .layout import RamLayout
from .metrics import Metrics
from .peers import KernelPeer
from .ratelog import RateLimitedLog

log = logging.getLogger(__name__)

#: Hint requests queued to one agent and not yet sent; beyond this a request
#: is dropped (its epoch gets no hints) rather than waiting.
ATTACH_QUEUE = 8
#: How long an epoch's hints count as "on their way" (Epoch.hints_pending):
#: the first chunk must come this soon after the request...
WAIT_FIRST_CHUNK_S = 0.25
#: ...and the whole snapshot this soon.
WAIT_SNAPSHOT_S = 1.0


class UnknownVm(CollectorError):
    """No VM of that name in the registry."""

    default_status = grpc.StatusCode.NOT_FOUND


class EpochError(CollectorError):
    """An epoch that cannot be opened now: the VM has no RAM layout yet, or the deadline is out of bounds."""

    default_status = grpc.StatusCode.FAILED_PRECONDITION


@dataclass
class EpochStats:
    vm: str
    epoch: int
    open: bool
    close_reason: str
    reports: int = 0
    rejected_reports: int = 0
    chunks: int = 0
    accepted_ranges: int = 0
    rejected_ranges: int = 0
    hinted_pages: int = 0  # with repeats
    free_pages: int = 0  # distinct pages marked free now
    request_to_first_chunk_s: float | None = None
    request_to_last_chunk_s: float | None = None
    agent: dict[str, float] = field(default_factory=dict)
    agent_source: str = ""


class Epoch:
    """One VM's free-page bitmaps for one round of hints."""

    def __init__(self, vm: str, epoch_id: int, index: LayoutIndex, deadline: float, live_hints: bool) -> None:
        self.vm = vm
        self.id = epoch_id
        self.index = index
        self.opened_at = time.monotonic()
        self.deadline = deadline
        self.live_hints = live_hints
        self.close_reason = ""
        self.request_sent = False
        self._open = True
        self._closed = asyncio.Event()
        self.snapshot_done = asyncio.Event()
        self._masks: dict[str, npt.NDArray[np.bool_]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.ranges_seen = 0
        self._stats = EpochStats(vm, epoch_id, True, "")
        self._first_chunk_at: float | None = None
        self._last_snapshot_chunk_at: float | None = None

    # Section: queries (any thread)

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def hints_pending(self) -> bool:
        """The snapshot is on its way: worth holding records for, briefly.

        A record judged before its page's hint arrived is sent whole, so the
        proxy holds records while this is true (any thread may ask). It is
        true only for a short while: until the first chunk for
        :data:`WAIT_FIRST_CHUNK_S` (a silent agent costs no more), then until
        the snapshot is complete, for at most :data:`WAIT_SNAPSHOT_S`.
        """
        if not (self.request_sent and self._open) or self.snapshot_done.is_set():
            return False
        age = time.monotonic() - self.opened_at
        if age >= WAIT_SNAPSHOT_S or time.monotonic() >= self.deadline:
            return False
        return self._first_chunk_at is not None or age < WAIT_FIRST_CHUNK_S

    @property
    def first_chunk_at(self) -> float | None:
        """``time.monotonic()`` when the agent's first chunk for this epoch arrived (None: not yet)."""
        return self._first_chunk_at

    @property
    def answered(self) -> bool:
        """The agent sent at least one chunk for this epoch."""
        return self._first_chunk_at is not None

    def is_free(self, block: str, page: int) -> bool:
        m = self._masks.get(block)
        return m is not None and 0 <= page < m.shape[0] and bool(m[page])

    def free_mask(self, block: str) -> npt.NDArray[np.bool_] | None:
        """A read-only view: one entry per page of the block, True = hinted free."""
        m = self._masks.get(block)
        if m is None:
            return None
        v = m.view()
        v.flags.writeable = False
        return v

    def blocks(self) -> list[str]:
        return sorted(self._masks)

    def free_pages(self) -> int:
        return sum(int(np.count_nonzero(m)) for m in self._masks.values())

    def stats(self) -> EpochStats:
        s = self._stats
        s.open = self._open
        s.close_reason = self.close_reason
        s.free_pages = self.free_pages()
        if self._first_chunk_at is not None:
            s.request_to_first_chunk_s = self._first_chunk_at - self.opened_at
        if self._last_snapshot_chunk_at is not None:
            s.request_to_last_chunk_s = self._last_snapshot_chunk_at - self.opened_at
        return s

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # Section: updates (the collector's loop only; Collector calls these)

    def arm_deadline(self, delay_s: float, on_deadline: Callable[[], object]) -> None:
        """Call ``on_deadline`` on the running loop after ``delay_s``, unless the epoch closes first."""
        self._timer = asyncio.get_running_loop().call_later(delay_s, on_deadline)

    def merge(self, pieces: Pieces, n_ranges: int, kind: int, end: bool) -> int:
        """Mark a validated chunk's pages free and count the chunk (``n_ranges``
        against the epoch's budget); the pages it hinted, repeats included.

        ``kind``/``end``: a SNAPSHOT chunk with ``end`` completes the snapshot.
        """
        pages = 0
        for b, f, c in zip(pieces.block_idx.tolist(), pieces.first.tolist(), pieces.count.tolist()):
            block = pieces.blocks[b]
            m = self._masks.get(block)
            if m is None:
                m = self._masks[block] = np.zeros(self.index.layout.block_pages(block), dtype=np.bool_)
            if f + c > m.shape[0]:  # validation maps inside blocks; never trust a silent slice
                raise AssertionError(f"piece {block}[{f}:{f + c}] beyond {m.shape[0]} pages")
            m[f : f + c] = True
            pages += c
        self.ranges_seen += n_ranges
        s = self._stats
        s.chunks += 1
        s.accepted_ranges += pieces.accepted
        s.rejected_ranges += pieces.rejected
        s.hinted_pages += pages
        now = time.monotonic()
        if self._first_chunk_at is None:
            self._first_chunk_at = now
        if kind == hints_pb2.REPORT_KIND_SNAPSHOT and end:
            self._last_snapshot_chunk_at = now
            self.snapshot_done.set()
        return pages

    def note_report(self, stats: hints_pb2.AgentStats | None, source: str) -> None:
        """A Report call of this epoch ended well; keep the agent's own figures, if it sent any."""
        self._stats.reports += 1
        if stats is not None and stats.ByteSize():
            self._stats.agent = {
                "cpu_seconds": stats.cpu_seconds,
                "rss_bytes": float(stats.rss_bytes),
                "snapshot_us": float(stats.snapshot_us),
                "snapshot_pages": float(stats.snapshot_pages),
                "truncated_ranges": float(stats.truncated_ranges),
            }
            self._stats.agent_source = source

    def note_rejected_report(self) -> None:
        """A Report call of this epoch was refused."""
        self._stats.rejected_reports += 1

    def poison(self) -> None:
        """Forget every hint: the agent broke the protocol, so none is trusted."""
        for m in self._masks.values():
            m[:] = False

    def close(self, reason: str) -> bool:
        """Stop accepting hints and wake every waiter; False if already closed.

        Only the epoch's half: :meth:`Collector.close_epoch` also counts it and tells the agent.
        """
        if not self._open:
            return False
        self._open = False
        self.close_reason = reason
        if self._timer is not None:
            self._timer.cancel()
        self._closed.set()
        self.snapshot_done.set()
        return True


@dataclass
class Attachment:
    """An agent's open Attach stream."""

    vm: str
    peer: str
    facts: hints_pb2.AgentFacts
    queue: asyncio.Queue[hints_pb2.CollectorMessage | None]
    since: float = field(default_factory=time.monotonic)


class VmState:
    def __init__(self, entry: VmEntry) -> None:
        self.entry = entry
        self.name = entry.name
        self.index: LayoutIndex | None = LayoutIndex(entry.layout) if entry.layout else None
        self.attachment: Attachment | None = None
        self.epochs: OrderedDict[int, Epoch] = OrderedDict()
        self.active_reports = 0


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Collector:
    """VM registry, agent attachments and epochs: the API the proxy uses."""

    def __init__(self, config: CollectorConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.limits = config.limits
        self.metrics = metrics or Metrics()
        self.vms: dict[str, VmState] = {e.name: VmState(e) for e in config.vms}
        # Look tokens up by digest so lookup time says nothing about the token.
        self._by_token = {_digest(e.token): e.name for e in config.vms}
        self._by_cid = {e.vsock_cid: e.name for e in config.vms if e.vsock_cid is not None}
        self._last_epoch_id = 0
        #: Refusals and re-attaches are logged at a bounded rate (a guest
        #: chooses how often they happen); every one is in the metrics.
        self.ratelog = RateLimitedLog(log, on_suppressed=lambda k: self.metrics.log_suppressed.labels(k).inc())

    # Section: identity

    def identify(self, token: str | None, peer: KernelPeer | None) -> VmState:
        """The VM a call comes from, from what the kernel says and the token; never what the guest says.

        ``peer`` is the connection's kernel identity (peers.py), None for TCP.
        A registered vsock CID identifies its VM without a token; everything
        else needs one. A token bound to a CID or a uid counts only from it.
        """
        by_token = self._by_token.get(_digest(token)) if token else None
        if peer is not None and peer.kind == "vsock":
            by_cid = self._by_cid.get(peer.cid)
            if by_cid is not None:
                if by_token is not None and by_token != by_cid:
                    raise Refusal(
                        "PERMISSION_DENIED", "identity_mismatch", "token belongs to another VM than this vsock CID"
                    )
                return self.vms[by_cid]
        if by_token is None:
            raise Refusal("UNAUTHENTICATED", "unknown_token", "no VM has this token (or no token was sent)")
        vm = self.vms[by_token]
        entry = vm.entry
        if peer is not None and peer.kind == "vsock" and entry.vsock_cid is not None and peer.cid != entry.vsock_cid:
            raise Refusal("PERMISSION_DENIED", "identity_mismatch", "token of a VM bound to another vsock CID")
        if peer is not None and peer.kind == "unix" and entry.unix_uid is not None and peer.uid != entry.unix_uid:
            raise Refusal("PERMISSION_DENIED", "identity_mismatch", "token of a VM bound to another uid")
        return vm

    def vm(self, name: str) -> VmState:
        """:raise UnknownVm: no VM of that name."""
        try:
            return self.vms[name]
        except KeyError:
            raise UnknownVm(f"no VM named {name!r} in the registry") from None

    # Section: attachments

    def attach(self, vm: VmState, facts: hints_pb2.AgentFacts, peer: str) -> Attachment:
        """Register an agent's Attach stream; a newer one replaces an older one."""
        old = vm.attachment
        if old is not None:
            old.queue.put_nowait(None)  # ends the old stream (the queue always has room for it)
            self.ratelog.info(
                f"reattach:{vm.name}",
                "agent re-attached, replacing the older stream",
                extra={"vm": vm.name, "peer": peer},
            )
        else:
            self.metrics.attached.inc()
        att = Attachment(vm.name, peer, facts, asyncio.Queue(maxsize=ATTACH_QUEUE + 1))
        vm.attachment = att
        self.ratelog.info(
            f"attach:{vm.name}",
            "agent attached",
            extra={
                "vm": vm.name,
                "peer": peer,
                "agent_version": facts.agent_version,
                "kernel": facts.kernel_release,
                "source": facts.chosen_source,
                "refusal": facts.refusal,
                "source_details": dict(facts.source_details),
            },
        )
        return att

    def detach(self, att: Attachment) -> None:
        vm = self.vms[att.vm]
        if vm.attachment is att:
            vm.attachment = None
            self.metrics.attached.dec()
            self.ratelog.info(f"detach:{vm.name}", "agent detached", extra={"vm": vm.name, "peer": att.peer})

    # Section: epochs (the proxy's API)

    def set_layout(self, vm_name: str, layout: RamLayout) -> None:
        """Replace a VM's RAM layout (e.g. learnt from QMP); open epochs keep theirs."""
        self.vm(vm_name).index = LayoutIndex(layout)

    def layout(self, vm_name: str) -> RamLayout | None:
        ix = self.vm(vm_name).index
        return ix.layout if ix else None

    def _next_epoch_id(self) -> int:
        # Time-based so ids stay unique across collector restarts: a late
        # report from before a restart must never match a new epoch.
        self._last_epoch_id = max(self._last_epoch_id + 1, time.time_ns() // 1000)
        return self._last_epoch_id

    def open_epoch(self, vm_name: str, deadline_s: float | None = None, live_hints: bool = True) -> Epoch:
        """Open an epoch and queue its hint request; never blocks.

        Any epoch of the VM still open is closed first ("superseded").
        :raise UnknownVm: unknown VM. :raise EpochError: no layout or bad deadline.
        """
        vm = self.vm(vm_name)
        if vm.index is None:
            raise EpochError(f"VM {vm_name!r} has no RAM layout yet")
        d = self.config.default_deadline_s if deadline_s is None else deadline_s
        if not 0 < d <= self.limits.max_deadline_s:
            raise EpochError(f"deadline {d}s outside (0, {self.limits.max_deadline_s}]")
        for ep in vm.epochs.values():
            if ep.is_open:
                self._close(ep, "superseded")
        ep = Epoch(vm_name, self._next_epoch_id(), vm.index, time.monotonic() + d, live_hints)
        vm.epochs[ep.id] = ep
        while len(vm.epochs) > self.limits.retained_epochs:
            oldest = next(iter(vm.epochs.values()))
            self._close(oldest, "released")
            del vm.epochs[oldest.id]
        ep.arm_deadline(d, functools.partial(self._close, ep, "deadline"))
        self.metrics.epochs_opened.labels(vm_name).inc()
        att = vm.attachment
        if att is None:
            log.info("epoch opened with no agent attached", extra={"vm": vm_name, "epoch": ep.id})
        elif not att.facts.chosen_source:
            log.info(
                "epoch opened; agent refuses to hint",
                extra={"vm": vm_name, "epoch": ep.id, "refusal": att.facts.refusal},
            )
        else:
            req = hints_pb2.HintRequest(
                epoch=ep.id,
                deadline_ms=max(1, int(d * 1000)),
                max_ranges=self.limits.max_ranges_per_epoch,
                max_ranges_per_chunk=self.limits.max_ranges_per_chunk,
                live_hints=live_hints,
            )
            if att.queue.qsize() >= ATTACH_QUEUE:
                self.ratelog.warning(
                    f"not_reading:{vm_name}",
                    "agent is not reading requests; epoch gets no hints",
                    extra={"vm": vm_name, "epoch": ep.id},
                )
            else:
                att.queue.put_nowait(hints_pb2.CollectorMessage(request=req))
                ep.request_sent = True
                self.metrics.requests_sent.labels(vm_name).inc()
        return ep

    def get_epoch(self, vm_name: str, epoch_id: int) -> Epoch | None:
        return self.vm(vm_name).epochs.get(epoch_id)

    def close_epoch(self, vm_name: str, epoch_id: int, reason: str = "on demand") -> None:
        ep = self.get_epoch(vm_name, epoch_id)
        if ep is not None:
            self._close(ep, reason)

    def release_epoch(self, vm_name: str, epoch_id: int) -> None:
        """Close an epoch and drop its bitmaps."""
        vm = self.vm(vm_name)
        ep = vm.epochs.pop(epoch_id, None)
        if ep is not None:
            self._close(ep, "released")

    def _close(self, ep: Epoch, reason: str) -> None:
        if not ep.close(reason):
            return
        self.metrics.epochs_closed.labels(ep.vm, reason.split(":")[0]).inc()
        st = ep.stats()
        if st.request_to_last_chunk_s is not None:
            self.metrics.latency.labels(ep.vm).observe(st.request_to_last_chunk_s)
        log.info(
            "epoch closed",
            extra={
                "vm": ep.vm,
                "epoch": ep.id,
                "reason": reason,
                "free_pages": st.free_pages,
                "ranges": st.accepted_ranges,
                "reports": st.reports,
            },
        )
        att = self.vms[ep.vm].attachment if ep.vm in self.vms else None
        if att is not None and ep.request_sent and att.queue.qsize() < ATTACH_QUEUE:
            att.queue.put_nowait(hints_pb2.CollectorMessage(closed=hints_pb2.EpochClosed(epoch=ep.id, reason=reason)))

    # Section: reports (used by the gRPC service)

    def report_epoch(self, vm: VmState, epoch_id: int) -> Epoch:
        ep = vm.epochs.get(epoch_id)
        if ep is None:
            raise Refusal("FAILED_PRECONDITION", "unknown_epoch", f"epoch {epoch_id} is unknown for this VM")
        if not ep.is_open:
            raise Refusal("FAILED_PRECONDITION", "closed_epoch", f"epoch {epoch_id} is closed ({ep.close_reason})")
        return ep

    def accept(self, ep: Epoch, pieces: Pieces, n_ranges: int, kind: int, end: bool) -> int:
        """Merge a validated chunk. :raise Refusal: the epoch's range budget is spent."""
        if not ep.is_open:
            raise Refusal("FAILED_PRECONDITION", "closed_epoch", f"epoch {ep.id} is closed ({ep.close_reason})")
        if ep.ranges_seen + n_ranges > self.limits.max_ranges_per_epoch:
            raise Refusal(
                "RESOURCE_EXHAUSTED",
                "too_many_ranges",
                f"epoch {ep.id} would exceed {self.limits.max_ranges_per_epoch} ranges",
            )
        pages = ep.merge(pieces, n_ranges, kind, end)
        m = self.metrics
        m.ranges_accepted.labels(ep.vm).inc(pieces.accepted)
        m.ranges_rejected.labels(ep.vm).inc(pieces.rejected)
        m.pages_hinted.labels(ep.vm).inc(pages)
        return pages

    def report_finished(self, ep: Epoch, stats: hints_pb2.AgentStats | None, source: str) -> None:
        ep.note_report(stats, source)
        if stats is not None and stats.ByteSize():
            self.metrics.agent_cpu.labels(ep.vm).set(stats.cpu_seconds)
            self.metrics.agent_rss.labels(ep.vm).set(stats.rss_bytes)

    def violation(self, vm: VmState, ep: Epoch | None, refusal: Refusal) -> None:
        """A guest broke the protocol: one log line, a metric, and (for data
        faults in an open epoch) every hint of that epoch is dropped."""
        self.metrics.rejects.labels(vm.name, refusal.tag).inc()
        self.ratelog.warning(
            f"refused:{vm.name}:{refusal.tag}",
            "refused: %s",
            refusal.message,
            extra={"vm": vm.name, "epoch": ep.id if ep else None, "reason": refusal.tag},
        )
        if ep is not None:
            ep.note_rejected_report()
            if ep.is_open and refusal.code in ("INVALID_ARGUMENT", "OUT_OF_RANGE", "RESOURCE_EXHAUSTED"):
                ep.poison()
                self._close(ep, f"poisoned: {refusal.tag}")

    def shutdown(self) -> None:
        """Close every epoch and end every Attach stream."""
        for vm in self.vms.values():
            for ep in list(vm.epochs.values()):
                self._close(ep, "collector shutdown")
            if vm.attachment is not None:
                vm.attachment.queue.put_nowait(None)
