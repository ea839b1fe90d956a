"""vsock for gRPC, whatever the grpcio build.

PyPI's grpcio wheels are built without vsock ("VSOCK is not supported" when
binding), so both sides bridge it through Unix sockets:

* the collector accepts AF_VSOCK connections itself and relays each to its
  gRPC server's private socket (host_collector/peers.py), learning the guest's
  CID from the kernel on the way;
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

_counter = itertools.count()


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


async def relay(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter], b: tuple[asyncio.StreamReader, asyncio.StreamWriter]
) -> None:
    """Copy both ways until both directions end."""
    await asyncio.gather(_pipe(a[0], b[1]), _pipe(b[0], a[1]))


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
        except (TimeoutError, OSError) as e:
            log.debug("vsock connect to %s failed: %s", self.address, e)
            out.close()
            writer.close()
            return
        await relay((reader, writer), remote)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
