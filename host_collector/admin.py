"""The operator-side service (admin socket only): list VMs, collect hints, migrate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
import numpy.typing as npt

from fphint import ranges
from fphint.v1 import admin_pb2, admin_pb2_grpc

from .epochs import Collector, Epoch
from .errors import CollectorError, abort
from .migrate.jobs import Job, Migrations
from .migrate.observer import NO_OBSERVER, MigrationObserver
from .migrate.run import MigrateError


def page_runs(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """(first page, count) runs of True in a bitmap."""
    d = np.diff(np.concatenate(([0], mask.view(np.int8), [0])).astype(np.int8))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    return list(zip(starts.tolist(), (ends - starts).tolist()))


def epoch_response(ep: Epoch, include_ranges: bool) -> admin_pb2.CollectHintsResponse:
    st = ep.stats()
    resp = admin_pb2.CollectHintsResponse(
        vm=ep.vm,
        epoch=ep.id,
        close_reason=ep.close_reason,
        free_pages=st.free_pages,
        accepted_ranges=st.accepted_ranges,
        rejected_ranges=st.rejected_ranges,
        reports=st.reports,
        rejected_reports=st.rejected_reports,
        request_to_last_chunk_s=st.request_to_last_chunk_s or 0.0,
        agent_source=st.agent_source,
        agent_cpu_seconds=st.agent.get("cpu_seconds", 0.0),
        agent_rss_bytes=int(st.agent.get("rss_bytes", 0)),
        agent_snapshot_us=int(st.agent.get("snapshot_us", 0)),
        page_size=ep.index.layout.page_size,
    )
    for block in ep.blocks():
        mask = ep.free_mask(block)
        assert mask is not None
        bp = resp.blocks.add(block=block, pages=int(np.count_nonzero(mask)))
        if include_ranges:
            bp.ranges.extend(ranges.encode(page_runs(mask)))
    return resp


class AdminService(admin_pb2_grpc.CollectorAdminServicer):
    def __init__(self, collector: Collector, observer: MigrationObserver = NO_OBSERVER) -> None:
        self.collector = collector
        self.migrations = Migrations(collector, observer)

    async def Migrate(
        self, request: admin_pb2.MigrateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[admin_pb2.MigrateEvent]:
        try:
            job = self.migrations.migrate(request)
        except MigrateError as e:
            await abort(context, e)
        async for ev in _stream(job, context):
            yield ev

    async def Proxy(
        self, request: admin_pb2.ProxyRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[admin_pb2.MigrateEvent]:
        try:
            job = self.migrations.proxy(request)
        except MigrateError as e:
            await abort(context, e)
        async for ev in _stream(job, context):
            yield ev

    async def CancelMigration(
        self, request: admin_pb2.CancelMigrationRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CancelMigrationResponse:
        return admin_pb2.CancelMigrationResponse(cancelled=self.migrations.cancel(request.vm))

    async def ListVMs(
        self, request: admin_pb2.ListVMsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.ListVMsResponse:
        out = admin_pb2.ListVMsResponse()
        for name, vm in sorted(self.collector.vms.items()):
            info = out.vms.add(
                name=name, attached=vm.attachment is not None, ram_bytes=vm.index.layout.ram_bytes if vm.index else 0
            )
            if vm.attachment is not None:
                f = vm.attachment.facts
                info.peer = vm.attachment.peer
                info.chosen_source = f.chosen_source
                info.refusal = f.refusal
                info.agent_version = f.agent_version
                info.kernel_release = f.kernel_release
        return out

    async def CollectHints(
        self, request: admin_pb2.CollectHintsRequest, context: grpc.aio.ServicerContext
    ) -> admin_pb2.CollectHintsResponse:
        col = self.collector
        deadline = request.deadline_ms / 1000 if request.deadline_ms else None
        try:
            ep = col.open_epoch(request.vm, deadline)
        except CollectorError as e:  # UnknownVm: NOT_FOUND; EpochError: FAILED_PRECONDITION
            await abort(context, e)
        try:
            if request.close_on_snapshot:
                await ep.snapshot_done.wait()
                col.close_epoch(request.vm, ep.id, "snapshot complete")
            await ep.wait_closed()
            return epoch_response(ep, request.include_ranges)
        except asyncio.CancelledError:
            col.close_epoch(request.vm, ep.id, "admin call cancelled")
            raise
        finally:
            col.release_epoch(request.vm, ep.id)


async def _stream(job: Job, context: grpc.aio.ServicerContext) -> AsyncIterator[admin_pb2.MigrateEvent]:
    """A job's events; its MigrateError becomes the call's status."""
    events = job.events()
    try:
        async for ev in events:
            yield ev
    except MigrateError as e:
        await abort(context, e)
    finally:
        await events.aclose()
