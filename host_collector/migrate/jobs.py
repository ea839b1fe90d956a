"""Migrations and standing proxies running in the daemon, one per VM at a time.

A job runs in its own task, so an admin call that goes away (the operator's
Ctrl-C, a dead CLI) only *asks* it to cancel: the job then cancels the
migration on the source, waits for QEMU to settle and cleans up by itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import replace

from fphint.v1 import admin_pb2
from host_collector.epochs import Collector

from .observer import NO_OBSERVER, MigrationObserver
from .run import MigrateError, MigrationRun, Plan, connect, make_plan

log = logging.getLogger(__name__)

#: Progress events queued for a slow reader beyond this are dropped (the report never is).
MAX_QUEUED = 64


class Job:
    """One ``migrate`` or ``proxy`` call: its events, its current run, its cancel switch."""

    def __init__(self, vm: str, kind: str) -> None:
        self.vm = vm
        self.kind = kind
        self.queue: asyncio.Queue[admin_pb2.MigrateEvent | None] = asyncio.Queue()
        self.run: MigrationRun | None = None
        self.cancelled: str | None = None
        self.stopped = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def emit(self, ev: admin_pb2.MigrateEvent) -> None:
        if ev.WhichOneof("kind") == "progress" and self.queue.qsize() >= MAX_QUEUED:
            return
        self.queue.put_nowait(ev)

    def cancel(self, reason: str) -> bool:
        """Cancel the migration in progress (if any) and stop; False if there was nothing to stop."""
        if self.cancelled is not None:
            return False
        self.cancelled = reason
        self.stopped.set()
        if self.run is not None:
            self.run.request_cancel(reason)
        return True

    async def events(self) -> AsyncGenerator[admin_pb2.MigrateEvent, None]:
        """What the admin call streams; re-raises a :class:`MigrateError` from the job."""
        assert self.task is not None
        try:
            while True:
                ev = await self.queue.get()
                if ev is None:
                    break
                yield ev
            await self.task
        finally:
            if not self.task.done():
                self.cancel("the admin call ended before the migration did")


class Migrations:
    """The daemon's registry of jobs (the admin service's back end)."""

    def __init__(self, collector: Collector, observer: MigrationObserver = NO_OBSERVER) -> None:
        self.collector = collector
        self.observer = observer
        self.jobs: dict[str, Job] = {}

    def migrate(self, req: admin_pb2.MigrateRequest) -> Job:
        """Start ``fph-collector migrate``. :raise MigrateError: bad request or VM busy."""
        plan = make_plan(
            self.collector,
            req.vm,
            req.to,
            listen=req.listen,
            dest_qmp=req.dest_qmp,
            progress_interval_ms=req.progress_interval_ms,
            hint_deadline_ms=req.hint_deadline_ms,
            timeout_s=req.timeout_s,
            max_bandwidth=req.max_bandwidth if req.HasField("max_bandwidth") else None,
            downtime_limit_ms=req.downtime_limit_ms if req.HasField("downtime_limit_ms") else None,
            switchover_bandwidth=req.switchover_bandwidth if req.HasField("switchover_bandwidth") else None,
        )
        return self._start(plan, "migrate", lambda job: self._migrate(job, plan))

    def proxy(self, req: admin_pb2.ProxyRequest) -> Job:
        """Start a standing proxy. :raise MigrateError: bad request or VM busy."""
        if not req.listen:
            raise MigrateError(
                "INVALID_ARGUMENT",
                "a standing proxy needs a listen address the orchestrator "
                "can be told (--listen tcp:HOST:PORT or unix:PATH)",
            )
        plan = make_plan(
            self.collector,
            req.vm,
            req.to,
            listen=req.listen,
            dest_qmp=req.dest_qmp,
            progress_interval_ms=req.progress_interval_ms,
            hint_deadline_ms=req.hint_deadline_ms,
        )
        return self._start(plan, "proxy", lambda job: self._standing(job, plan, req.count))

    def cancel(self, vm: str) -> bool:
        job = self.jobs.get(vm)
        return job is not None and job.cancel("cancelled by the operator")

    async def shutdown(self, timeout_s: float = 40.0) -> None:
        """Cancel every migration (safely, on the source) and wait for the jobs to finish."""
        tasks = [j.task for j in self.jobs.values() if j.task is not None]
        for job in list(self.jobs.values()):
            job.cancel("the collector is shutting down")
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

    # ---- internals ----------------------------------------------------------

    def _start(self, plan: Plan, kind: str, body: Callable[[Job], Awaitable[None]]) -> Job:
        busy = self.jobs.get(plan.vm)
        if busy is not None:
            raise MigrateError("FAILED_PRECONDITION", f"VM {plan.vm!r} already has a {busy.kind} running")
        job = Job(plan.vm, kind)
        self.jobs[plan.vm] = job

        async def main() -> None:
            try:
                await body(job)
            except MigrateError:
                raise
            except Exception as e:
                log.exception("%s of %s failed", kind, plan.vm)
                raise MigrateError("INTERNAL", f"{kind} of {plan.vm!r} failed: {e!r}") from e
            finally:
                if self.jobs.get(plan.vm) is job:
                    del self.jobs[plan.vm]
                job.queue.put_nowait(None)

        job.task = asyncio.create_task(main(), name=f"fph-{kind}-{plan.vm}")
        job.task.add_done_callback(_consume)
        return job

    async def _migrate(self, job: Job, plan: Plan) -> None:
        src, dst = await connect(plan)
        try:
            run = job.run = MigrationRun(self.collector, plan, src, dst, job.emit, observer=self.observer)
            if job.cancelled is not None:
                run.request_cancel(job.cancelled)
            report = await run.run()
            if report is not None:
                job.emit(admin_pb2.MigrateEvent(report=report))
        finally:
            await src.close()
            if dst is not None:
                await dst.close()

    async def _standing(self, job: Job, plan: Plan, count: int) -> None:
        src, dst = await connect(plan)
        try:
            n = 0
            while job.cancelled is None and (count == 0 or n < count):
                n += 1
                run = job.run = MigrationRun(
                    self.collector, plan, src, dst, job.emit, number=n, issue_migrate=False, observer=self.observer
                )
                report = await run.run()
                if report is None:
                    break  # cancelled while waiting for a source
                job.emit(admin_pb2.MigrateEvent(report=report))
                if (report.outcome == "error" and not run.connected) or run.source_lost:
                    break  # could not listen, or no monitor: trying again would only repeat it
                if run.listen_address:
                    # Keep the resolved port (and path) for the orchestrator's next migration.
                    plan = _with_listen(plan, run.listen_address)
        finally:
            await src.close()
            if dst is not None:
                await dst.close()


def _with_listen(plan: Plan, listen: str) -> Plan:
    return replace(plan, listen=listen)


def _consume(task: asyncio.Task[None]) -> None:
    """The job's error reaches the caller through Job.events; never log it as unretrieved."""
    if not task.cancelled():
        task.exception()
