"""The three error trees: every error sits under its package's root, the
collector's carry the gRPC status they map to, and ``abort`` ends a real
call with exactly that status and message."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path
from typing import NoReturn

import grpc
import pytest

from fphint import addresses
from fphint.errors import FphintError
from fphint.ranges import RangeError
from fphint.v1 import admin_pb2, admin_pb2_grpc
from fphint_lab.collector_harness import make_config, running_collector, token
from guest_agent.discovery import DiscoveryError
from guest_agent.errors import AgentError
from guest_agent.sources.base import SourceUnavailable
from guest_agent.sources.ebpf.btf import BtfError
from guest_agent.sources.ebpf.headers import HeadersMissing
from guest_agent.sources.ebpf.layout import PageLayoutError
from guest_agent.sources.ebpf.loader import LoaderError
from guest_agent.sources.ebpf.program import LoadError, ProgramRefused
from guest_agent.sources.ebpf.vmemmap import VmemmapError
from host_collector.config import ConfigError, VmEntry
from host_collector.epochs import EpochError, UnknownVm
from host_collector.errors import CollectorError, Refusal, abort, status_code
from host_collector.hintcheck import HintViolation
from host_collector.layout import LayoutError
from host_collector.migrate.run import MigrateError
from host_collector.proxy.migration_proxy import ProxyError
from host_collector.qmp.mtree import MtreeError
from host_collector.qmp.ramblock import RamBlockError
from host_collector.qmp.session import QmpCommandError, QmpError, QmpTimeout

S = grpc.StatusCode
#: One of each collector error as it is raised, and the status it must end a call with.
COLLECTOR_ERRORS: list[tuple[CollectorError, grpc.StatusCode]] = [
    (CollectorError("a bug"), S.INTERNAL),
    (CollectorError("replaced", S.ABORTED), S.ABORTED),
    (Refusal("PERMISSION_DENIED", "identity_mismatch", "token of another VM"), S.PERMISSION_DENIED),
    (HintViolation(S.OUT_OF_RANGE, "outside_ram", "not inside guest RAM"), S.OUT_OF_RANGE),
    (UnknownVm("no VM named 'x'"), S.NOT_FOUND),
    (EpochError("no RAM layout yet"), S.FAILED_PRECONDITION),
    (ConfigError("c.toml: bad"), S.INVALID_ARGUMENT),
    (LayoutError("overlaps"), S.FAILED_PRECONDITION),
    (MtreeError("line 3: bad"), S.FAILED_PRECONDITION),
    (RamBlockError("no header"), S.FAILED_PRECONDITION),
    (QmpError("QMP x: gone"), S.UNAVAILABLE),
    (QmpTimeout("QMP x: not answered"), S.DEADLINE_EXCEEDED),
    (QmpCommandError("QMP x: migrate failed", "GenericError"), S.FAILED_PRECONDITION),
    (MigrateError("NOT_FOUND", "no VM named 'x'"), S.NOT_FOUND),
    (ProxyError("cannot listen"), S.UNAVAILABLE),
]


class FakeContext:
    """Records what ``abort`` asks of it and raises as grpc's context does."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        self.aborted = (code, details)
        raise RuntimeError("aborted")


@pytest.mark.parametrize(("error", "status"), COLLECTOR_ERRORS, ids=lambda v: type(v).__name__)
def test_abort_maps_each_collector_error_to_its_status(error: CollectorError, status: grpc.StatusCode) -> None:
    ctx = FakeContext()
    with pytest.raises(RuntimeError, match="aborted"):
        asyncio.run(abort(ctx, error))
    assert ctx.aborted == (status, error.message)
    assert error.code == status.name


def test_abort_never_returns_normally() -> None:
    class Silent:
        async def abort(self, code: grpc.StatusCode, details: str) -> None:
            return None

    with pytest.raises(AssertionError, match="unreachable"):
        asyncio.run(abort(Silent(), CollectorError("x")))


def test_a_status_name_that_does_not_exist_is_refused_at_the_raise() -> None:
    assert status_code("NOT_FOUND") is S.NOT_FOUND and status_code(S.ABORTED) is S.ABORTED
    with pytest.raises(ValueError, match="NOT_FOUNDD"):
        Refusal("NOT_FOUNDD", "typo", "x")


def test_every_error_sits_under_its_packages_root() -> None:
    for cls in (
        Refusal,
        HintViolation,
        UnknownVm,
        EpochError,
        ConfigError,
        LayoutError,
        MtreeError,
        RamBlockError,
        QmpError,
        QmpTimeout,
        QmpCommandError,
        MigrateError,
        ProxyError,
    ):
        assert issubclass(cls, CollectorError), cls
    for agent_cls in (
        DiscoveryError,
        SourceUnavailable,
        BtfError,
        PageLayoutError,
        HeadersMissing,
        LoaderError,
        LoadError,
        ProgramRefused,
        VmemmapError,
    ):
        assert issubclass(agent_cls, AgentError) and not issubclass(agent_cls, CollectorError), agent_cls
    for shared in (addresses.AddressError, RangeError):
        # Still ValueErrors: callers guard parses with except ValueError.
        assert issubclass(shared, FphintError) and issubclass(shared, ValueError), shared
    assert not issubclass(CollectorError, ValueError) and not issubclass(AgentError, (ValueError, RuntimeError))


def test_admin_calls_end_with_the_errors_status(tmp_path: Path) -> None:
    """Real gRPC: each admin path aborts through the one helper with the error's status."""
    cfg = make_config(["a"], admin=addresses.parse(f"unix:{tmp_path}/admin.sock"))
    cfg = dataclasses.replace(cfg, vms=(*cfg.vms, VmEntry("bare", token("bare"))))  # no RAM layout

    async def go() -> None:
        async with running_collector(cfg):
            async with grpc.aio.insecure_channel(f"unix:{tmp_path}/admin.sock") as ch:
                stub = admin_pb2_grpc.CollectorAdminStub(ch)
                cases = [
                    (
                        stub.CollectHints(admin_pb2.CollectHintsRequest(vm="nobody", deadline_ms=100)),
                        S.NOT_FOUND,
                        "no VM named 'nobody'",
                    ),
                    (
                        stub.CollectHints(admin_pb2.CollectHintsRequest(vm="bare", deadline_ms=100)),
                        S.FAILED_PRECONDITION,
                        "has no RAM layout yet",
                    ),
                    (
                        stub.CollectHints(admin_pb2.CollectHintsRequest(vm="a", deadline_ms=3_600_000)),
                        S.FAILED_PRECONDITION,
                        "deadline",
                    ),
                ]
                for call, status, text in cases:
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await call
                    assert e.value.code() == status and text in (e.value.details() or ""), e.value
                streams = [
                    (
                        stub.Migrate(admin_pb2.MigrateRequest(vm="nobody", to="tcp:127.0.0.1:1")),
                        S.NOT_FOUND,
                        "no VM named 'nobody'",
                    ),
                    (
                        stub.Proxy(admin_pb2.ProxyRequest(vm="a", to="tcp:127.0.0.1:1")),
                        S.INVALID_ARGUMENT,
                        "needs a listen address",
                    ),
                ]
                for stream, status, text in streams:
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        async for _ in stream:
                            pass
                    assert e.value.code() == status and text in (e.value.details() or ""), e.value

    asyncio.run(asyncio.wait_for(go(), 30))
