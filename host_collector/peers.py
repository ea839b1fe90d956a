"""Who is on the other end of a guest connection, as the kernel says.

grpcio tells a servicer only the peer's address *string*, and for a Unix
socket that string is whatever name the client bound: any process may bind
any free abstract name, so a name can never prove anything. The collector
therefore never lets gRPC accept Unix or vsock connections from outside.
A :class:`Bridge` accepts them itself, asks the kernel who the peer is
(AF_VSOCK: the CID from ``getpeername``, which the host kernel assigns to the
guest; AF_UNIX: ``SO_PEERCRED``, the pid/uid/gid of the connecting process),
and relays the bytes to the gRPC server's private socket from a client
socket bound to a fresh path inside the collector's private 0700 directory.
gRPC reports that path as the call's peer, and :meth:`PeerTable.lookup` turns
it back into the :class:`KernelPeer` recorded at accept time.

Why that cannot be forged: only processes with the collector's uid can create
a socket file in the private directory (and reach the gRPC socket there at
all); a path is looked up only while its bridged connection lives, and its
file exists for exactly that time, so nobody else can bind the same path
meanwhile. A TCP peer, or any peer string the table does not know, has no
kernel identity: it must prove itself with a token (docs/security.md).

Each bridge caps its connections in total, per guest (CID) and per local
process (pid), so one guest cannot use up another's; relays copy at most 64 KiB at a time and wait
for the other side to take it, so a peer that never reads holds no more.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fphint import vsock

from .metrics import Metrics
from .ratelog import RateLimitedLog

log = logging.getLogger(__name__)

#: Connections one bridge relays at once, per guest (CID) and per local process.
MAX_CONNECTIONS = 1024
MAX_PER_CID = 8
MAX_PER_PROCESS = 64

_UCRED = struct.Struct("3i")


@dataclass(frozen=True)
class KernelPeer:
    """A connection's peer as the kernel reported it at accept time."""

    kind: str  # "vsock" or "unix"
    cid: int = -1  # vsock: the guest's CID
    pid: int = -1  # unix: SO_PEERCRED
    uid: int = -1
    gid: int = -1

    @property
    def key(self) -> str:
        """What the per-peer connection cap counts by: the guest, or the process
        (many VMs' QEMUs may share one uid)."""
        return f"vsock:{self.cid}" if self.kind == "vsock" else f"unix-pid:{self.pid}"

    def __str__(self) -> str:
        if self.kind == "vsock":
            return f"vsock:{self.cid}"
        return f"unix:pid={self.pid},uid={self.uid},gid={self.gid}"


def unix_peer(sock: socket.socket) -> KernelPeer:
    """SO_PEERCRED of a connected AF_UNIX socket."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return KernelPeer("unix", pid=pid, uid=uid, gid=gid)


def vsock_peer(sock: socket.socket) -> KernelPeer:
    """The CID of a connected AF_VSOCK socket's peer."""
    cid, _port = sock.getpeername()
    return KernelPeer("vsock", cid=int(cid))


class PeerTable:
    """Kernel identities of the connections bridged right now, by the path gRPC reports."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._peers: dict[str, KernelPeer] = {}
        self._ids = itertools.count()

    def new_path(self) -> str:
        return str(self.directory / f"p{next(self._ids)}")

    def add(self, path: str, peer: KernelPeer) -> None:
        self._peers[path] = peer

    def remove(self, path: str) -> None:
        self._peers.pop(path, None)

    def lookup(self, grpc_peer: str) -> KernelPeer | None:
        """The kernel identity behind a call's ``context.peer()``; None: none (TCP, unknown)."""
        if not grpc_peer.startswith("unix:"):
            return None
        return self._peers.get(grpc_peer[len("unix:") :])

    def __len__(self) -> int:
        return len(self._peers)


class Bridge:
    """Accepts Unix or vsock connections, learns their kernel identity, relays them to gRPC.

    Use :meth:`unix` or :meth:`vsock`; tests may pass any ``family``/``address``
    and an ``identify`` that stands in for the kernel (there is no vsock
    loopback on every machine).
    """

    def __init__(
        self,
        name: str,
        table: PeerTable,
        backend: str,
        family: int,
        address: object,
        identify: Callable[[socket.socket], KernelPeer],
        metrics: Metrics,
        *,
        max_connections: int = MAX_CONNECTIONS,
        max_per_cid: int = MAX_PER_CID,
        max_per_process: int = MAX_PER_PROCESS,
    ) -> None:
        self.name = name
        self.table = table
        self.backend = backend
        self.family = family
        self.address = address
        self.identify = identify
        self.metrics = metrics
        self.max_connections = max_connections
        self.max_per_cid = max_per_cid
        self.max_per_process = max_per_process
        self._server: asyncio.AbstractServer | None = None
        self._per_peer: dict[str, int] = {}
        self._open: set[asyncio.StreamWriter] = set()
        self._log = RateLimitedLog(log, on_suppressed=lambda k: metrics.log_suppressed.labels(k).inc())

    @classmethod
    def unix(cls, path: str, table: PeerTable, backend: str, metrics: Metrics, **kw: int) -> Bridge:
        return cls(f"unix:{path}", table, backend, socket.AF_UNIX, path, unix_peer, metrics, **kw)

    @classmethod
    def vsock(cls, port: int, table: PeerTable, backend: str, metrics: Metrics, **kw: int) -> Bridge:
        return cls(
            f"vsock:{port}", table, backend, socket.AF_VSOCK, (socket.VMADDR_CID_ANY, port), vsock_peer, metrics, **kw
        )

    @property
    def connections(self) -> int:
        return len(self._open)

    async def start(self) -> None:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            sock.bind(self.address)  # type: ignore[arg-type]
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        self._server = await asyncio.start_server(self._handle, sock=sock)

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
            if self.family == socket.AF_UNIX and isinstance(self.address, str) and not self.address.startswith("\0"):
                try:
                    os.unlink(self.address)
                except OSError:
                    pass

    def close(self) -> None:
        """Stop accepting and cut every relayed connection."""
        self.stop_accepting()
        for w in list(self._open):
            w.close()

    def _refuse(self, writer: asyncio.StreamWriter, reason: str, msg: str, *args: object) -> None:
        self.metrics.bridge_refused.labels(reason).inc()
        self._log.warning(f"bridge:{reason}", "%s: " + msg, self.name, *args, extra={"reason": reason})
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        try:
            peer = self.identify(sock)
        except (OSError, ValueError, TypeError) as e:
            self._refuse(writer, "no_identity", "cannot learn who the peer is: %s", e)
            return
        if len(self._open) >= self.max_connections:
            self._refuse(writer, "bridge_full", "%d connections open; refusing %s", len(self._open), peer)
            return
        n = self._per_peer.get(peer.key, 0)
        if n >= (self.max_per_cid if peer.kind == "vsock" else self.max_per_process):
            self._refuse(writer, "peer_full", "%s already has %d connections", peer, n)
            return
        self._per_peer[peer.key] = n + 1
        self._open.add(writer)
        self.metrics.bridged.inc()
        path = self.table.new_path()
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                up.bind(path)  # the path exists exactly as long as the table entry
                self.table.add(path, peer)
                up.setblocking(False)
                await asyncio.get_running_loop().sock_connect(up, self.backend)
                backend = await asyncio.open_unix_connection(sock=up)
            except OSError as e:
                up.close()
                self._refuse(writer, "backend", "cannot reach the collector's gRPC socket: %s", e)
                return
            await vsock.relay((reader, writer), backend)
        finally:
            self.table.remove(path)
            try:
                os.unlink(path)
            except OSError:
                pass
            self._open.discard(writer)
            self.metrics.bridged.dec()
            left = self._per_peer[peer.key] - 1
            if left:
                self._per_peer[peer.key] = left
            else:
                del self._per_peer[peer.key]
