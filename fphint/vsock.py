"""vsock for gRPC, whatever the grpcio build.

PyPI's grpcio wheels are built without vsock ("VSOCK is not supported" when
binding), so both sides bridge it through Unix sockets:

* the collector accepts AF_VSOCK connections and relays each to its gRPC
  server's private Unix socket, from a client socket bound to the abstract
  name ``fphint-vsock-peer/<CID>/<n>``. gRPC then reports the peer as
  ``unix-abstract:fphint-vsock-peer/<CID>/<n>``: the CID the host kernel
  assigned to the guest, which the guest cannot choose. Only the collector can
  reach the private socket (a 0700 directory), so nobody else can forge it;
* the agent runs a local relay on an abstract Unix name and points its gRPC
  channel at it; each connection gRPC makes becomes one AF_VSOCK connection.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket

log = logging.getLogger(__name__)

PEER_PREFIX = "unix-abstract:fphint-vsock-peer/"
_counter = itertools.count()


def peer_cid(peer: str) -> int | None:
    """The guest CID of a call that came through :class:`VsockListener`."""
    if not peer.startswith(PEER_PREFIX):
        return None
    try:
        return int(peer[len(PEER_PREFIX) :].split("/")[0])
    except ValueError:
        return None


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.close()
        except (ConnectionError, OSError):
            pass


async def relay(a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                b: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
    """Copy both ways until both directions end."""
    await asyncio.gather(_pipe(a[0], b[1]), _pipe(b[0], a[1]))


class VsockListener:
    """Collector side: vsock port -> the gRPC server's private Unix socket.

    ``family``/``address`` default to AF_VSOCK on every CID; tests pass a Unix
    socket and ``cid_of`` to stand in for a guest.
    """

    def __init__(self, port: int, backend: str, *, family: int = socket.AF_VSOCK,
                 address: object = None, cid_of: object = None) -> None:
        self.port = port
        self.backend = backend
        self.family = family
        self.address = address if address is not None else (socket.VMADDR_CID_ANY, port)
        self._cid_of = cid_of
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.bind(self.address)  # type: ignore[arg-type]
        sock.listen(128)
        sock.setblocking(False)
        self._server = await asyncio.start_server(self._handle, sock=sock)

    def _cid(self, writer: asyncio.StreamWriter) -> int:
        if callable(self._cid_of):
            return int(self._cid_of(writer))
        peer = writer.get_extra_info("peername")
        return int(peer[0])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        cid = self._cid(writer)
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            up.bind(f"\0fphint-vsock-peer/{cid}/{os.getpid()}-{next(_counter)}")
            up.setblocking(False)
            await asyncio.get_running_loop().sock_connect(up, self.backend)
            backend = await asyncio.open_unix_connection(sock=up)
        except OSError as e:
            log.warning("vsock bridge: cannot reach the collector's socket: %s", e, extra={"cid": cid})
            up.close()
            writer.close()
            return
        await relay((reader, writer), backend)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


class VsockDialer:
    """Agent side: a local abstract Unix name whose connections go out over vsock."""

    def __init__(self, cid: int, port: int, *, family: int = socket.AF_VSOCK, address: object = None) -> None:
        self.family = family
        self.address = address if address is not None else (cid, port)
        self.name = f"fphint-agent-vsock/{os.getpid()}-{next(_counter)}"
        self._server: asyncio.AbstractServer | None = None

    @property
    def target(self) -> str:
        """What to give grpc.aio.insecure_channel."""
        return f"unix-abstract:{self.name}"

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._handle, "\0" + self.name)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        out = socket.socket(self.family, socket.SOCK_STREAM)
        out.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(out, self.address), 10)  # type: ignore[arg-type]
            remote = await asyncio.open_connection(sock=out)
        except (OSError, asyncio.TimeoutError) as e:
            log.debug("vsock connect to %s failed: %s", self.address, e)
            out.close()
            writer.close()
            return
        await relay((reader, writer), remote)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
