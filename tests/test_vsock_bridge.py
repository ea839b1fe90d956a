"""The vsock and Unix bridges (host_collector/peers.py). This machine has no
vsock loopback and no vhost-vsock, so the relay and the identity it carries
are exercised with a Unix socket standing in for AF_VSOCK (the CID given by a
stand-in for the kernel); binding a real AF_VSOCK port is checked separately.
What could not be run here: a real guest connecting over AF_VSOCK, where the
CID comes from getpeername (peers.vsock_peer)."""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import grpc
import pytest

from fphint import addresses, vsock
from fphint.v1 import hints_pb2, hints_pb2_grpc
from fphint_lab.collector_harness import LAYOUT, token
from host_collector.config import CollectorConfig, VmEntry
from host_collector.peers import Bridge, KernelPeer, PeerTable, unix_peer
from host_collector.server import CollectorServer


def test_unix_peer_reads_so_peercred() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        peer = unix_peer(a)
    assert (peer.kind, peer.pid, peer.uid, peer.gid) == ("unix", os.getpid(), os.getuid(), os.getgid())
    assert str(peer) == f"unix:pid={os.getpid()},uid={os.getuid()},gid={os.getgid()}"


def test_peer_table_knows_only_its_own_paths(tmp_path: Path) -> None:
    t = PeerTable(tmp_path)
    p = t.new_path()
    t.add(p, KernelPeer("vsock", cid=9))
    assert t.lookup(f"unix:{p}") == KernelPeer("vsock", cid=9)
    for forged in (
        p,
        f"unix-abstract:{p}",
        f"unix:{tmp_path}/p999",
        "unix-abstract:fphint-vsock-peer/9/1",
        "ipv4:127.0.0.1:5",
        "unix:",
    ):
        assert t.lookup(forged) is None
    t.remove(p)
    assert t.lookup(f"unix:{p}") is None


async def _stand_in(srv: CollectorServer, tmp_path: Path, cid: int) -> tuple[Bridge, vsock.VsockDialer]:
    """A bridge whose 'kernel' says every peer is ``cid``, and a dialer to it."""
    assert srv.peers is not None and srv._private is not None
    stand_in = str(tmp_path / f"guest-side-{cid}.sock")
    bridge = Bridge(
        "test-vsock",
        srv.peers,
        str(srv._private / "grpc.sock"),
        socket.AF_UNIX,
        stand_in,
        lambda s: KernelPeer("vsock", cid=cid),
        srv.collector.metrics,
    )
    await bridge.start()
    dialer = vsock.VsockDialer(0, 0, family=socket.AF_UNIX, address=stand_in)
    await dialer.start()
    return bridge, dialer


async def _attach(target: str, md: tuple[tuple[str, str], ...]) -> tuple[grpc.StatusCode, tuple[object, ...]]:
    async with grpc.aio.insecure_channel(target) as ch:
        call = hints_pb2_grpc.FreePageHintsStub(ch).Attach(hints_pb2.AttachRequest(), metadata=md)
        try:
            initial = tuple(await call.initial_metadata())
            if ("fphint-vm", "seven") in initial or ("fphint-vm", "other") in initial:
                call.cancel()
                return grpc.StatusCode.OK, initial
            await call.read()
        except grpc.aio.AioRpcError as e:
            return e.code(), ()
        return await call.code(), ()


def test_identity_comes_from_the_bridged_cid(tmp_path: Path) -> None:
    async def go() -> None:
        cfg = CollectorConfig(
            listen=(addresses.parse(f"unix:{tmp_path}/grpc.sock"),),
            vms=(
                VmEntry("seven", token("seven"), vsock_cid=7, layout=LAYOUT),
                VmEntry("other", token("other"), layout=LAYOUT),
            ),
        )
        srv = CollectorServer(cfg)
        await srv.start()
        b7, d7 = await _stand_in(srv, tmp_path, 7)
        b9, d9 = await _stand_in(srv, tmp_path, 9)
        try:
            # no token: the CID alone identifies the VM
            code, initial = await _attach(d7.target, ())
            assert code == grpc.StatusCode.OK and ("fphint-vm", "seven") in initial
            bearer = (("authorization", f"Bearer {token('other')}"),)
            assert (await _attach(d7.target, bearer))[0] == grpc.StatusCode.PERMISSION_DENIED
            # an unregistered CID needs a token, and may not use one bound to CID 7
            assert (await _attach(d9.target, ()))[0] == grpc.StatusCode.UNAUTHENTICATED
            seven = (("authorization", f"Bearer {token('seven')}"),)
            assert (await _attach(d9.target, seven))[0] == grpc.StatusCode.PERMISSION_DENIED
            assert (await _attach(d9.target, bearer))[0] == grpc.StatusCode.OK
            # the Unix listener: no CID, whatever the client's socket is called
            unix = f"unix:{tmp_path}/grpc.sock"
            assert (await _attach(unix, ()))[0] == grpc.StatusCode.UNAUTHENTICATED
            assert (await _attach(unix, bearer))[0] == grpc.StatusCode.OK
        finally:
            for x in (d7, d9, b7, b9):
                x.close()
            await srv.stop(0.2)

    asyncio.run(asyncio.wait_for(go(), 30))


def test_attachment_peer_is_what_the_kernel_said(tmp_path: Path) -> None:
    async def go() -> None:
        cfg = CollectorConfig(
            listen=(addresses.parse(f"unix:{tmp_path}/grpc.sock"),),
            vms=(
                VmEntry("seven", token("seven"), vsock_cid=7, layout=LAYOUT),
                VmEntry("other", token("other"), layout=LAYOUT, unix_uid=os.getuid()),
            ),
        )
        srv = CollectorServer(cfg)
        await srv.start()
        b7, d7 = await _stand_in(srv, tmp_path, 7)
        try:
            async with grpc.aio.insecure_channel(d7.target) as ch:
                call = hints_pb2_grpc.FreePageHintsStub(ch).Attach(hints_pb2.AttachRequest())
                await call.initial_metadata()
                att = srv.collector.vms["seven"].attachment
                assert att is not None and att.peer == "vsock:7"
                call.cancel()
            md = (("authorization", f"Bearer {token('other')}"),)
            async with grpc.aio.insecure_channel(f"unix:{tmp_path}/grpc.sock") as ch:
                call = hints_pb2_grpc.FreePageHintsStub(ch).Attach(hints_pb2.AttachRequest(), metadata=md)
                await call.initial_metadata()
                att = srv.collector.vms["other"].attachment
                assert att is not None and att.peer == f"unix:pid={os.getpid()},uid={os.getuid()},gid={os.getgid()}"
                call.cancel()
        finally:
            d7.close()
            b7.close()
            await srv.stop(0.2)

    asyncio.run(asyncio.wait_for(go(), 30))


def test_a_token_bound_to_a_uid_counts_only_from_that_uid(tmp_path: Path) -> None:
    async def go() -> None:
        cfg = CollectorConfig(
            listen=(addresses.parse(f"unix:{tmp_path}/grpc.sock"), addresses.parse("tcp:127.0.0.1:0")),
            vms=(VmEntry("other", token("other"), layout=LAYOUT, unix_uid=os.getuid() + 1),),
        )
        srv = CollectorServer(cfg)
        await srv.start()
        try:
            md = (("authorization", f"Bearer {token('other')}"),)
            assert (await _attach(f"unix:{tmp_path}/grpc.sock", md))[0] == grpc.StatusCode.PERMISSION_DENIED
            # over TCP there is no uid to check: the token alone decides
            assert (await _attach(srv.bound[1].grpc_target(), md))[0] == grpc.StatusCode.OK
        finally:
            await srv.stop(0.2)

    asyncio.run(asyncio.wait_for(go(), 30))


def test_bridge_caps_connections_per_peer(tmp_path: Path) -> None:
    async def go() -> None:
        cfg = CollectorConfig(
            listen=(addresses.parse(f"unix:{tmp_path}/grpc.sock"),),
            vms=(VmEntry("other", token("other"), layout=LAYOUT),),
        )
        srv = CollectorServer(cfg)
        await srv.start()
        bridge = srv.bridges[0]
        held = []
        try:
            for _ in range(bridge.max_per_process + 3):
                r, w = await asyncio.open_unix_connection(f"{tmp_path}/grpc.sock")
                held.append((r, w))
            await asyncio.sleep(0.3)
            assert bridge.connections == bridge.max_per_process
            closed = 0
            for r, _ in held:
                try:
                    if await asyncio.wait_for(r.read(1 << 16), 0.5) == b"":
                        closed += 1
                except TimeoutError:
                    pass
            assert closed >= 3
            from prometheus_client import generate_latest

            text = generate_latest(srv.collector.metrics.registry).decode()
            assert 'fphint_bridge_refused_total{reason="peer_full"} 3.0' in text
        finally:
            for _, w in held:
                w.close()
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


def test_bridge_caps_connections_per_guest(tmp_path: Path) -> None:
    async def go() -> None:
        cfg = CollectorConfig(
            listen=(addresses.parse(f"unix:{tmp_path}/grpc.sock"),),
            vms=(VmEntry("seven", token("seven"), vsock_cid=7, layout=LAYOUT),),
        )
        srv = CollectorServer(cfg)
        await srv.start()
        bridge, dialer = await _stand_in(srv, tmp_path, 7)
        held = []
        try:
            for _ in range(bridge.max_per_cid + 2):
                held.append(await asyncio.open_unix_connection(str(tmp_path / "guest-side-7.sock")))
            await asyncio.sleep(0.3)
            assert bridge.connections == bridge.max_per_cid
        finally:
            for _, w in held:
                w.close()
            dialer.close()
            bridge.close()
            await srv.stop(0.2)

    asyncio.run(asyncio.wait_for(go(), 30))
