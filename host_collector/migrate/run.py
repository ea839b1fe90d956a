"""One migration through the proxy, run inside the collector daemon.

Order (docs/migrate.md): pre-flight over QMP (unsafe: plain relay, reason in
the report) -> RAM layout -> ``collector.set_layout`` -> the proxy listens ->
the epoch gate starts -> ``migrate`` to the proxy (or, for a standing proxy,
the orchestrator's source connects and the settings are checked once more)
-> progress until the source reaches a terminal state -> the proxy's result
-> the report.

Nothing here waits on the guest: a VM with no agent, or an agent that never
answers, only gets empty epochs. What may wait is bounded: every QMP call
has a deadline, and a source that does not stop after ``migrate_cancel``, or
a stream that outlives its migration, is cut after :data:`STUCK_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from fphint import addresses
from fphint.v1 import admin_pb2
from host_collector.epochs import Collector, Epoch, UnknownVm
from host_collector.errors import CollectorError
from host_collector.layout import LayoutError, RamLayout
from host_collector.proxy.migration_proxy import MigrationProxy, ProxyError
from host_collector.proxy.results import ProxyOutcome, ProxyResult
from host_collector.qmp.preflight import Problem, SafetyReport, check_migration_safety
from host_collector.qmp.ram_layout import read_layout
from host_collector.qmp.session import QmpError, QmpSession, QmpTimeout
from host_collector.rewrite.epoch_gate import EpochGate
from host_collector.rewrite.gate import NoHints, RewriteGate
from host_collector.rewrite.held import HeldGate
from host_collector.rewrite.recorder import EpochRecorder

from .coverage import CoverageCounter
from .observer import NO_OBSERVER, MigrationObserver
from .report import preflight_message, progress_message, progress_text

log = logging.getLogger(__name__)

#: query-migrate states after which the source does nothing more for this migration.
TERMINAL = frozenset({"completed", "failed", "cancelled"})
DEFAULT_LISTEN = "tcp:127.0.0.1:0"
#: How long a source may stay un-terminal after migrate_cancel, or after the
#: proxy's streams ended, before fphint gives up on it (and cuts the stream).
STUCK_S = 30.0
#: How long the proxy may take to finish once the source is terminal.
PROXY_DRAIN_S = 30.0
#: A migration whose stream has not moved for this long is cancelled as stalled.
STALL_S = 60.0
#: Status polls while following a migration (progress is sent less often).
STATUS_POLL_S = 0.1
QMP_TIMEOUT_S = 5.0
DEFAULT_HINT_DEADLINE_S = 5.0
#: A pre-flight problem that only says a migration is running: expected once
#: the orchestrator of a standing proxy has issued ``migrate``.
_RUNNING = "migration state"

Emit = Callable[[admin_pb2.MigrateEvent], None]


class MigrateError(CollectorError):
    """A request that cannot start: a gRPC status (named at each raise) and a message for the operator."""

    def __init__(self, code: grpc.StatusCode | str, message: str) -> None:
        super().__init__(message, code)


@dataclass(frozen=True)
class Plan:
    vm: str
    source_qmp: str
    to: str
    listen: str = DEFAULT_LISTEN
    dest_qmp: str | None = None
    progress_interval_s: float = 0.5
    hint_deadline_s: float = DEFAULT_HINT_DEADLINE_S
    timeout_s: float | None = None
    max_bandwidth: int | None = None
    downtime_limit_ms: int | None = None
    #: avail-switchover-bandwidth, bytes/s (QEMU >= 8.2).
    switchover_bandwidth: int | None = None


def _endpoint(spec: str, what: str) -> str:
    try:
        a = addresses.parse(spec)
    except addresses.AddressError as e:
        raise MigrateError("INVALID_ARGUMENT", f"{what}: {e}") from None
    if a.kind not in ("tcp", "unix"):
        raise MigrateError("INVALID_ARGUMENT", f"{what} {spec!r}: migration streams use tcp:HOST:PORT or unix:PATH")
    return str(a) if a.kind == "tcp" else f"unix:{a.path}"


def make_plan(
    collector: Collector,
    vm: str,
    to: str,
    *,
    listen: str = "",
    dest_qmp: str = "",
    progress_interval_ms: int = 0,
    hint_deadline_ms: int = 0,
    timeout_s: float = 0.0,
    max_bandwidth: int | None = None,
    downtime_limit_ms: int | None = None,
    switchover_bandwidth: int | None = None,
) -> Plan:
    """Check a request against the registry. :raise MigrateError: with a message naming what is wrong."""
    try:
        entry = collector.vm(vm).entry
    except UnknownVm as e:
        raise MigrateError("NOT_FOUND", e.message) from None
    if not entry.qmp:
        raise MigrateError(
            "FAILED_PRECONDITION",
            f'VM {vm!r} has no QMP monitor in the registry: add qmp = "unix:/path" to its [[vm]] entry '
            "and start QEMU with -qmp unix:/path,server=on,wait=off (docs/migrate.md)",
        )
    if not to:
        raise MigrateError("INVALID_ARGUMENT", "no destination: give where the destination QEMU listens (--to)")
    limits = collector.limits
    deadline = hint_deadline_ms / 1000 if hint_deadline_ms else min(DEFAULT_HINT_DEADLINE_S, limits.max_deadline_s)
    if not 0 < deadline <= limits.max_deadline_s:
        raise MigrateError("INVALID_ARGUMENT", f"hint deadline {deadline:g} s outside (0, {limits.max_deadline_s:g}]")
    if timeout_s < 0:
        raise MigrateError("INVALID_ARGUMENT", "timeout must not be negative")
    return Plan(
        vm=vm,
        source_qmp=entry.qmp,
        to=_endpoint(to, "destination"),
        listen=_endpoint(listen, "proxy listen address") if listen else DEFAULT_LISTEN,
        dest_qmp=dest_qmp or None,
        progress_interval_s=max(0.05, progress_interval_ms / 1000) if progress_interval_ms else 0.5,
        hint_deadline_s=deadline,
        timeout_s=timeout_s or None,
        max_bandwidth=max_bandwidth,
        downtime_limit_ms=downtime_limit_ms,
        switchover_bandwidth=switchover_bandwidth,
    )


async def connect(plan: Plan) -> tuple[QmpSession, QmpSession | None]:
    """The source's (and the destination's) QMP. :raise MigrateError: UNAVAILABLE, naming the monitor."""
    try:
        src = await QmpSession.connect(plan.source_qmp, label=f"{plan.vm} source", timeout_s=QMP_TIMEOUT_S)
    except QmpError as e:
        raise MigrateError("UNAVAILABLE", f"cannot reach the QMP monitor of {plan.vm!r}: {e}") from None
    if plan.dest_qmp is None:
        return src, None
    try:
        dst = await QmpSession.connect(plan.dest_qmp, label=f"{plan.vm} destination", timeout_s=QMP_TIMEOUT_S)
    except QmpError as e:
        await src.close()
        raise MigrateError("UNAVAILABLE", f"cannot reach the destination's QMP monitor: {e}") from None
    return src, dst


class MigrationRun:
    """One migration: ``issue_migrate`` (``fph-collector migrate``) or wait for the source (standing proxy)."""

    def __init__(
        self,
        collector: Collector,
        plan: Plan,
        src: QmpSession,
        dst: QmpSession | None,
        emit: Emit,
        *,
        number: int = 1,
        issue_migrate: bool = True,
        observer: MigrationObserver = NO_OBSERVER,
    ) -> None:
        self.collector = collector
        self.plan = plan
        self.src = src
        self.dst = dst
        self.emit = emit
        self.number = number
        self.issue_migrate = issue_migrate
        self.cancel_reason: str | None = None
        self._cancel = asyncio.Event()
        self.report = admin_pb2.MigrationReport(vm=plan.vm, migration=number, to=plan.to, issued_migrate=issue_migrate)
        self.listen_address = ""
        self.connected = False
        self.rewriting = False
        self._layout: RamLayout | None = None
        self._watch = observer.migration(plan.vm, number)
        self._recorder = EpochRecorder(on_release=self._epoch_released)
        self._coverage: CoverageCounter | None = None
        self._ended_at: float | None = None
        self._epoch_gate: EpochGate[Epoch] | None = None
        self._held: HeldGate | None = None
        self._proxy: MigrationProxy | None = None
        self._migrate_sent = False
        self._source_lost: str | None = None
        self._t0 = time.monotonic()
        self._notes: list[str] = []

    @property
    def connected_or_sent(self) -> bool:
        """A stream may have flowed: ``migrate`` was issued, or the orchestrator's source connected."""
        return self._migrate_sent or self.connected

    def _epoch_released(self, epoch: Epoch) -> None:
        if self._coverage is not None:
            self._coverage.epoch_released(epoch)
        self._watch.epoch_released(epoch)

    @property
    def source_lost(self) -> bool:
        """The source's QMP monitor stopped answering during the run."""
        return self._source_lost is not None

    def request_cancel(self, reason: str) -> None:
        """Cancel the migration (migrate_cancel on the source); the report says ``reason``."""
        if self.cancel_reason is None:
            self.cancel_reason = reason
            self._cancel.set()

    # ---- the whole run ------------------------------------------------------

    async def run(self) -> admin_pb2.MigrationReport | None:
        """The report; None only for a standing proxy cancelled before any source connected."""
        try:
            report = await self._run()  # its cleanup released every epoch, so their figures are final
        finally:
            self._watch.finished(self._proxy.wait(0) if self._proxy is not None else None)
        if report is not None:
            report.epochs.extend(self._recorder.reports())
            report.epochs_not_listed = self._recorder.dropped
            if self._coverage is not None and self._proxy is not None and self.connected_or_sent:
                report.coverage.CopyFrom(self._coverage.report(self._t0, self._ended_at or time.monotonic()))
            await self._read_states()
            self._log(report)
        return report

    async def _run(self) -> admin_pb2.MigrationReport | None:
        r = self.report
        r.started_at_unix = time.time()
        try:
            preflight = await self._preflight()
            gate = self._make_gate(preflight)
            if self.issue_migrate and not await self._set_parameters():
                return self.report  # _error() said why; _finish() would word it as an unknown end state
            limits = self.collector.limits
            proxy = self._proxy = MigrationProxy(
                self.plan.listen,
                self.plan.to,
                self._watch.gate(gate),
                hold_bytes=limits.proxy_hold_bytes,
                hold_seconds=limits.proxy_hold_s,
                readahead_bytes=limits.proxy_readahead_bytes,
                tap=self._coverage.batch if self._coverage is not None else None,
            )
            try:
                proxy.start()
            except (ProxyError, OSError) as e:
                return self._error(f"the proxy cannot listen: {e}")
            self.listen_address = r.proxy_address = proxy.listen_address
            self.emit(
                admin_pb2.MigrateEvent(
                    ready=admin_pb2.ProxyReady(
                        migration=self.number,
                        listen_address=self.listen_address,
                        rewriting=self.rewriting,
                        plain_relay_reason=r.plain_relay_reason,
                    )
                )
            )
            if self._epoch_gate is not None:
                await self._epoch_gate.start()
                await self._note_paused(self._epoch_gate)
            if self.issue_migrate:
                if self._cancel.is_set():  # cancelled while preparing: nothing to undo on the source
                    proxy.close()
                    r.outcome, r.message = "cancelled", f"cancelled before migrate was issued: {self.cancel_reason}"
                    return r
                self._t0 = time.monotonic()
                self._migrate_sent = True
                try:
                    await self.src.execute("migrate", {"uri": self.listen_address}, timeout_s=QMP_TIMEOUT_S)
                except QmpError as e:
                    proxy.close()
                    return self._error(f"the source refused to migrate: {e}")
            else:
                if not await self._wait_for_source(proxy):
                    return None
                self._t0 = time.monotonic()
                await self._check_in_flight()
            info = await self._follow(proxy)
            result = await self._drain(proxy)
            return self._finish(info, result)
        except asyncio.CancelledError:
            await asyncio.shield(self._abandon())
            raise
        finally:
            await asyncio.shield(self._cleanup())

    # ---- steps ----------------------------------------------------------------

    async def _preflight(self) -> SafetyReport:
        rep = await check_migration_safety(self.src, self.dst, enable=True)
        self.report.preflight.CopyFrom(preflight_message(rep, self.dst is not None))
        reasons = [str(p) for p in rep.problems]
        try:
            self._layout = await read_layout(self.src)
            self.collector.set_layout(self.plan.vm, self._layout)
        except (LayoutError, QmpError) as e:
            reasons.append(f"RAM layout: {e}")
        self.rewriting = not reasons
        self.report.plain_relay_reason = "; ".join(reasons)
        return rep

    def _make_gate(self, preflight: SafetyReport) -> RewriteGate:
        vm = self.collector.vm(self.plan.vm)
        r = self.report
        r.agent_attached = vm.attachment is not None
        if vm.attachment is not None:
            r.agent_source = vm.attachment.facts.chosen_source or f"none ({vm.attachment.facts.refusal})"
        if self._layout is not None:
            r.ram_bytes = self._layout.ram_bytes
            r.page_size = self._layout.page_size
        if not self.rewriting:
            return NoHints()
        if self._layout is not None:
            self._coverage = CoverageCounter(self._layout, guest_stopped=lambda: gate.guest_stopped)
        r.same_sync_rule = preflight.same_sync_allowed
        gate = self._epoch_gate = EpochGate(
            self.src,
            self.collector,
            self.plan.vm,
            hint_deadline_s=self.plan.hint_deadline_s,
            on_release=self._recorder.released,
            same_sync=r.same_sync_rule,
            on_open=self._coverage.epoch_opened if self._coverage is not None else None,
        )
        if self.issue_migrate:
            return gate
        self._held = HeldGate(gate)
        return self._held

    async def _set_parameters(self) -> bool:
        params: dict[str, Any] = {}
        if self.plan.max_bandwidth is not None:
            params["max-bandwidth"] = self.plan.max_bandwidth
        if self.plan.downtime_limit_ms is not None:
            params["downtime-limit"] = self.plan.downtime_limit_ms
        if self.plan.switchover_bandwidth is not None:
            # Not a limit: the rate QEMU's switchover test assumes instead of the one it
            # measures, which behind the proxy is how fast the proxy reads (docs/migrate.md).
            params["avail-switchover-bandwidth"] = self.plan.switchover_bandwidth
            self.report.switchover_bandwidth = self.plan.switchover_bandwidth
        if not params:
            return True
        try:
            await self.src.execute("migrate-set-parameters", params)
        except QmpError as e:
            self._error(f"the source refused migration parameters {params}: {e}")
            return False
        return True

    async def _wait_for_source(self, proxy: MigrationProxy) -> bool:
        """Until the orchestrator's source connects (or the proxy ends, which also means one did)."""
        while True:
            if proxy.stats().source_bytes > 0:
                self.connected = True
                return True
            if proxy.wait(0) is not None:
                self.connected = not self._cancel.is_set()
                return self.connected
            if self._cancel.is_set():
                proxy.close()
                return False
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._cancel.wait(), 0.05)

    async def _check_in_flight(self) -> None:
        """The orchestrator may have changed settings just before ``migrate``: check again, now frozen."""
        held = self._held
        if held is None:
            return
        rep = await check_migration_safety(self.src, self.dst, enable=True)
        problems: list[Problem] = [p for p in rep.problems if p.setting != _RUNNING]
        if not problems:
            held.clear()
            return
        reason = "; ".join(f"{p} (seen once the migration started)" for p in problems)
        held.refuse(reason)
        self.rewriting = False
        r = self.report
        r.plain_relay_reason = reason
        r.preflight.safe = False
        for p in problems:
            r.preflight.problems.add(side=p.side, setting=p.setting, why=p.why)

    async def _follow(self, proxy: MigrationProxy) -> Mapping[str, Any] | None:
        """Poll the source until its migration is terminal; send progress; act on cancel and timeout."""
        plan = self.plan
        last: Mapping[str, Any] | None = None
        next_progress = 0.0
        cancel_sent: float | None = None
        proxy_ended: float | None = None
        moved: tuple[int, int, int] = (-1, -1, -1)
        moved_at = time.monotonic()
        answered_at = time.monotonic()
        timeouts = 0
        while True:
            now = time.monotonic()
            try:
                reply = await self.src.execute("query-migrate", timeout_s=QMP_TIMEOUT_S)
            except QmpTimeout as e:
                # QEMU answers only once it lets its lock go, which its completion holds while
                # it writes the final pass: into a slow link that can outlast one timeout. A
                # monitor that is still connected is not lost until STUCK_S without an answer.
                timeouts += 1
                if time.monotonic() - answered_at > STUCK_S:
                    self._source_lost = str(e)
                    return last
                if timeouts == 1:
                    self._notes.append(f"query-migrate timed out while the migration ran ({e}); waited for it")
                continue
            except QmpError as e:
                self._source_lost = str(e)
                return last
            answered_at = time.monotonic()
            info: Mapping[str, Any] = reply if isinstance(reply, Mapping) else {}
            last = info
            if self._coverage is not None:
                self._coverage.drain()  # off the relay's thread (coverage.py)
            status = info.get("status")
            if now >= next_progress or status in TERMINAL:
                next_progress = now + plan.progress_interval_s
                progress = self._progress(info, proxy)
                log.debug("migration %s: %s", status, progress_text(progress), extra={"vm": plan.vm})
                self.emit(admin_pb2.MigrateEvent(progress=progress))
            if status in TERMINAL:
                return info
            st = proxy.stats()
            ram = info.get("ram")
            mark = (
                st.source_bytes,
                st.destination_bytes,
                int(ram.get("transferred", 0)) if isinstance(ram, Mapping) else 0,
            )
            if mark != moved:
                moved, moved_at = mark, now
            elif now - moved_at > STALL_S:
                self.request_cancel(
                    f"the migration stream did not move for {STALL_S:g} s (source {status}, proxy {st.phase.value})"
                )
            if plan.timeout_s is not None and now - self._t0 > plan.timeout_s:
                self.request_cancel(f"timed out after {plan.timeout_s:g} s")
            if self._cancel.is_set() and cancel_sent is None:
                cancel_sent = now
                await self._migrate_cancel()
            if proxy.wait(0) is not None and proxy_ended is None:
                proxy_ended = now
            stuck = [
                (cancel_sent, "the source did not stop after migrate_cancel"),
                (proxy_ended, "the migration streams ended but the source's migration did not"),
            ]
            for since, why in stuck:
                if since is not None and now - since > STUCK_S:
                    proxy.abort(why)
                    self._notes.append(why)
                    if cancel_sent is None:
                        cancel_sent = now
                        await self._migrate_cancel()
                    else:
                        return info
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._cancel.wait() if cancel_sent is None else asyncio.sleep(1), STATUS_POLL_S)

    async def _migrate_cancel(self) -> None:
        try:
            await self.src.execute("migrate_cancel", timeout_s=QMP_TIMEOUT_S)
        except QmpError as e:
            self._notes.append(f"migrate_cancel failed: {e}")
            if self._proxy is not None:
                self._proxy.abort(f"cancelled ({self.cancel_reason}) and migrate_cancel failed")

    async def _drain(self, proxy: MigrationProxy) -> ProxyResult:
        try:
            return await asyncio.wait_for(proxy.wait_async(), PROXY_DRAIN_S)
        except TimeoutError:
            why = "the source's migration ended but its stream did not"
            self._notes.append(why)
            proxy.abort(why)
        try:
            return await asyncio.wait_for(proxy.wait_async(), 10)
        except TimeoutError:
            self._notes.append("the proxy did not stop after an abort")
            return ProxyResult(ProxyOutcome.ABORTED, proxy.stats())

    async def _abandon(self) -> None:
        """The run itself is cancelled (daemon shutting down): stop the migration safely."""
        if self._migrate_sent or self.connected:
            with contextlib.suppress(QmpError):
                await self.src.execute("migrate_cancel", timeout_s=QMP_TIMEOUT_S)
        if self._proxy is not None:
            self._proxy.abort("the collector stopped this migration")

    async def _cleanup(self) -> None:
        if self._proxy is not None:
            self._proxy.close()
        if self._epoch_gate is not None:
            await self._epoch_gate.stop()  # releases every epoch: the recorder has them all

    # ---- reporting --------------------------------------------------------------

    def _progress(self, info: Mapping[str, Any], proxy: MigrationProxy) -> admin_pb2.MigrateProgress:
        latest = self._epoch_gate.ledger.latest if self._epoch_gate is not None else None
        return progress_message(
            number=self.number,
            elapsed_s=time.monotonic() - self._t0,
            info=info,
            stats=proxy.stats(),
            epoch=latest.epoch if latest else None,
            sync=latest.sync if latest else 0,
            layout=self._layout,
            rewriting=self.rewriting,
        )

    def _error(self, message: str) -> admin_pb2.MigrationReport:
        r = self.report
        r.outcome = "error"
        r.message = message
        r.notes.extend(self._notes)
        return r

    def _finish(self, info: Mapping[str, Any] | None, result: ProxyResult | None) -> admin_pb2.MigrationReport:
        r = self.report
        self._ended_at = time.monotonic()
        r.wall_s = self._ended_at - self._t0
        info = info or {}
        r.source_status = str(info.get("status", ""))
        r.source_error = str(info.get("error-desc", ""))
        r.downtime_ms = int(info.get("downtime", -1))
        r.total_time_ms = int(info.get("total-time", -1))
        r.setup_time_ms = int(info.get("setup-time", -1))
        ram = info.get("ram")
        if isinstance(ram, Mapping):
            r.dirty_sync_count = int(ram.get("dirty-sync-count", 0))
            r.qemu_transferred_bytes = int(ram.get("transferred", 0))
            r.qemu_normal_pages = int(ram.get("normal", 0))
            r.qemu_zero_pages = int(ram.get("duplicate", 0))
        if result is not None:
            st = result.stats
            r.proxy_outcome = result.outcome.value
            r.source_bytes = st.source_bytes
            r.destination_bytes = st.destination_bytes
            r.return_bytes = st.return_bytes
            r.extra_connections = st.extra_connections
            r.page_records = st.page_records
            r.zero_records = st.zero_records
            r.pages_rewritten = st.pages_rewritten
            r.pages_held = st.pages_held
            r.pages_released_unjudged = st.pages_released_unjudged
            r.fallback_reason = st.fallback_reason or ""
            r.abort_reason = st.abort_reason or ""
            r.proxy_error = st.error or ""
            r.timing.paced_s = st.paced_s
            r.timing.send_s = st.send_s
            r.timing.held_wait_s = st.held_wait_s
            r.timing.backlog_at_stop_bytes = st.backlog_at_stop
            for field, at in (
                ("stop_to_end_section_ms", st.end_section_at),
                ("stop_to_drained_ms", st.drained_at),
                ("stop_to_eof_ms", st.eof_at),
            ):
                since = at - st.stop_seen_at if at is not None and st.stop_seen_at is not None else None
                setattr(r.timing, field, -1.0 if since is None else 1000 * since)
        r.rewriting = self.rewriting
        gate = self._epoch_gate
        if gate is not None:
            gst = gate.stats()
            r.passes = gst.passes
            r.polls = gst.polls_answered
            r.timing.polls = gate.poll_rtt_n
            if gate.poll_rtt_n:
                r.timing.poll_ms_mean = 1000 * gate.poll_rtt_sum / gate.poll_rtt_n
                r.timing.poll_ms_max = 1000 * gate.poll_rtt_max
            if gate.failure and not (self._held is not None and self._held.refusal):
                r.gate_failure = gate.failure
        r.notes.extend(self._notes)
        r.outcome, r.message = self._outcome(r, result)
        return r

    def _outcome(self, r: admin_pb2.MigrationReport, result: ProxyResult | None) -> tuple[str, str]:
        status = r.source_status
        proxy_problem = r.proxy_error or r.abort_reason
        if self._source_lost is not None:
            return "error", f"lost the source's QMP monitor, so the outcome is unknown: {self._source_lost}"
        if self.cancel_reason is not None and status != "completed":
            return "cancelled", f"cancelled: {self.cancel_reason}"
        if status == "completed":
            if result is not None and result.outcome is not ProxyOutcome.FINISHED:
                return "failed", (
                    f"the source reports completed but the proxy's stream was {result.outcome.value}: "
                    f"{proxy_problem}; check the destination"
                )
            return "completed", ""
        if status == "cancelled":
            return "cancelled", "the migration was cancelled on the source"
        if status == "failed":
            why = proxy_problem or r.source_error or "the source reports the migration failed"
            return "failed", why
        return "error", f"the source's migration ended in state {status!r}"

    def _log(self, r: admin_pb2.MigrationReport) -> None:
        log.info(
            "migration %s: %s",
            r.outcome,
            r.message or "ok",
            extra={
                "vm": r.vm,
                "migration": r.migration,
                "to": r.to,
                "wall_s": round(r.wall_s, 3),
                "pages_rewritten": r.pages_rewritten,
                "source_bytes": r.source_bytes,
            },
        )

    async def _note_paused(self, gate: EpochGate[Epoch]) -> None:
        """A guest paused before the migration sends no STOP: tell the gate
        (listening by now) so it neither paces the source nor awaits hints."""
        try:
            st = await self.src.execute("query-status", timeout_s=QMP_TIMEOUT_S)
        except QmpError:
            return  # the gate's STOP handling and poll timeout still bound the wait
        if isinstance(st, Mapping) and st.get("running") is False:
            gate.guest_not_running()

    async def _read_states(self) -> None:
        """Read the source's (and destination's) run state into the report, after the end."""
        r = self.report
        try:
            st = await self.src.execute("query-status", timeout_s=QMP_TIMEOUT_S)
            r.source_runstate = str(st.get("status", "")) if isinstance(st, Mapping) else ""
        except QmpError as e:
            r.notes.append(f"source run state unknown: {e}")
        if self.dst is None:
            r.notes.append("destination not checked (no --dest-qmp): return-path is on at the source only")
            return
        try:
            info = await self.dst.execute("query-migrate", timeout_s=QMP_TIMEOUT_S)
            r.destination_status = str(info.get("status", "")) if isinstance(info, Mapping) else ""
        except QmpError as e:
            r.destination_status = "gone"
            r.notes.append(f"destination QMP: {e}")
        if r.outcome == "completed" and r.destination_status != "completed":
            r.outcome = "failed"
            r.message = f"the source reports completed but the destination is {r.destination_status}"
