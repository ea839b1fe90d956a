"""The vsock bridge. This machine has no vsock loopback and no vhost-vsock, so
the relay and the identity it carries are exercised with a Unix socket standing
in for AF_VSOCK; binding a real AF_VSOCK port is checked separately."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import grpc
import pytest

from fphint import addresses, vsock
from fphint.v1 import hints_pb2, hints_pb2_grpc
from host_collector.config import CollectorConfig, VmEntry
from host_collector.server import CollectorServer

from fphint_lab.collector_harness import LAYOUT, token


def test_peer_cid_parsing() -> None:
    assert vsock.peer_cid("unix-abstract:fphint-vsock-peer/42/123-0") == 42
    assert vsock.peer_cid("unix:") is None and vsock.peer_cid("ipv4:127.0.0.1:5") is None
    assert vsock.peer_cid("unix-abstract:fphint-vsock-peer/x/1") is None


def test_identity_comes_from_the_bridged_cid(tmp_path: Path) -> None:
    async def go() -> None:
        cfg = CollectorConfig(
            listen=(addresses.parse(f"unix:{tmp_path}/grpc.sock"),),
            vms=(VmEntry("seven", token("seven"), vsock_cid=7, layout=LAYOUT),
                 VmEntry("other", token("other"), layout=LAYOUT)),
        )
        srv = CollectorServer(cfg)
        await srv.start()
        stand_in = str(tmp_path / "guest-side.sock")
        listener = vsock.VsockListener(0, f"{tmp_path}/grpc.sock", family=socket.AF_UNIX, address=stand_in,
                                       cid_of=lambda w: 7)
        await listener.start()
        dialer = vsock.VsockDialer(0, 0, family=socket.AF_UNIX, address=stand_in)
        await dialer.start()
        try:
            for md, expect in [((), grpc.StatusCode.OK),  # no token: the CID alone identifies the VM
                               ((("authorization", f"Bearer {token('other')}"),), grpc.StatusCode.PERMISSION_DENIED)]:
                async with grpc.aio.insecure_channel(dialer.target) as ch:
                    call = hints_pb2_grpc.FreePageHintsStub(ch).Attach(hints_pb2.AttachRequest(), metadata=md)
                    initial = await call.initial_metadata()
                    if expect == grpc.StatusCode.OK:
                        assert ("fphint-vm", "seven") in tuple(initial)
                        assert srv.collector.vms["seven"].attachment is not None
                        assert srv.collector.vms["seven"].attachment.peer.startswith(vsock.PEER_PREFIX + "7/")
                        call.cancel()
                    else:
                        with pytest.raises(grpc.aio.AioRpcError) as e:
                            await call.read()
                        assert e.value.code() == expect
        finally:
            dialer.close()
            listener.close()
            await srv.stop(0.2)

    asyncio.run(asyncio.wait_for(go(), 30))


def test_server_binds_a_real_vsock_port() -> None:
    try:
        probe = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        probe.close()
    except (OSError, AttributeError):
        pytest.skip("no AF_VSOCK on this machine")

    async def go() -> None:
        port = 30000 + (hash("fphint") % 20000)
        srv = CollectorServer(CollectorConfig(listen=(addresses.parse(f"vsock:4294967295:{port}"),)))
        await srv.start()
        try:
            clash = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
            with pytest.raises(OSError):  # the port is taken: the bridge is listening
                clash.bind((socket.VMADDR_CID_ANY, port))
            clash.close()
        finally:
            await srv.stop(0.2)

    asyncio.run(asyncio.wait_for(go(), 30))
