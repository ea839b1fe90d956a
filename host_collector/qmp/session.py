"""One QMP connection to a QEMU process, with a deadline on every call.

Everything fphint asks QEMU goes through here so that a hung or vanished
QEMU turns into a :class:`QmpError` naming the monitor and the command, never
into a migration that waits forever. Built on ``qemu.qmp.QMPClient`` (async).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import grpc
from qemu.qmp import ConnectError, EventListener, ExecuteError, Message, QMPClient, QMPError

from fphint.addresses import AddressError
from fphint.addresses import parse as parse_address
from host_collector.errors import CollectorError

DEFAULT_TIMEOUT_S = 5.0


class QmpError(CollectorError):
    """A QMP call failed, timed out, or the monitor went away."""

    default_status = grpc.StatusCode.UNAVAILABLE


class QmpTimeout(QmpError):
    """QEMU did not answer within the deadline."""

    default_status = grpc.StatusCode.DEADLINE_EXCEEDED


class QmpCommandError(QmpError):
    """QEMU answered with an error object (``class`` is QEMU's error class)."""

    default_status = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, message: str, error_class: str) -> None:
        super().__init__(message)
        self.error_class = error_class


def qmp_socket_address(spec: str) -> str | tuple[str, int]:
    """Turn ``unix:/path``, ``/path`` or ``tcp:HOST:PORT`` into what QMPClient.connect takes."""
    if spec.startswith("/"):
        return spec
    try:
        addr = parse_address(spec)
    except AddressError as err:
        raise QmpError(f"QMP address {spec!r}: {err}") from None
    if addr.kind == "unix":
        return addr.path
    if addr.kind == "tcp":
        return (addr.host, addr.port)
    raise QmpError(f"QMP address {spec!r}: QEMU monitors listen on unix or tcp sockets")


class EventQueue(EventListener):
    """An event listener that keeps no history (qemu.qmp's default keeps every event forever)."""

    async def put(self, event: Message) -> None:
        if self.accept(event):
            self._queue.put_nowait(event)


class QmpSession:
    """A connected QMP monitor. Safe to share between tasks of one event loop."""

    def __init__(self, client: QMPClient, label: str, timeout_s: float) -> None:
        self._client = client
        self.label = label
        self.timeout_s = timeout_s

    @classmethod
    async def connect(cls, spec: str, *, label: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> QmpSession:
        """Connect to the monitor at ``spec`` and negotiate capabilities.

        :raise QmpError: connection refused, no greeting, or the deadline passed.
        """
        label = label or spec
        address = qmp_socket_address(spec)
        if isinstance(address, str) and not os.path.exists(address):
            raise QmpError(f"QMP {label}: no socket at {address}")
        client = QMPClient(label)
        try:
            await asyncio.wait_for(client.connect(address), timeout_s)
        except TimeoutError:
            await _quiet_disconnect(client)
            raise QmpTimeout(f"QMP {label}: no greeting within {timeout_s:g} s") from None
        except (ConnectError, QMPError, OSError) as err:
            await _quiet_disconnect(client)
            raise QmpError(f"QMP {label}: cannot connect: {err}") from err
        return cls(client, label, timeout_s)

    async def execute(
        self, command: str, arguments: Mapping[str, object] | None = None, *, timeout_s: float | None = None
    ) -> Any:
        """Run ``command`` and return its ``return`` value.

        :raise QmpCommandError: QEMU rejected the command.
        :raise QmpTimeout: no answer within ``timeout_s`` (default: the session's).
        :raise QmpError: the connection broke.
        """
        limit = self.timeout_s if timeout_s is None else timeout_s
        try:
            return await asyncio.wait_for(self._client.execute(command, arguments), limit)
        except TimeoutError:
            raise QmpTimeout(f"QMP {self.label}: {command} not answered within {limit:g} s") from None
        except ExecuteError as err:
            raise QmpCommandError(f"QMP {self.label}: {command} failed: {err}", err.error_class) from err
        except (QMPError, OSError, EOFError) as err:
            raise QmpError(f"QMP {self.label}: {command}: {type(err).__name__}: {err}") from err

    async def hmp(self, command_line: str, *, timeout_s: float | None = None) -> str:
        """Run a human-monitor command and return its text output."""
        out = await self.execute("human-monitor-command", {"command-line": command_line}, timeout_s=timeout_s)
        if not isinstance(out, str):
            raise QmpError(f"QMP {self.label}: {command_line!r} returned {type(out).__name__}, not text")
        return out

    def listen(self, *names: str) -> EventQueue:
        """Start queueing the named events; call :meth:`unlisten` when done."""
        queue = EventQueue(names=list(names) or None)
        self._client.register_listener(queue)
        return queue

    def unlisten(self, queue: EventQueue) -> None:
        try:
            self._client.remove_listener(queue)
        except QMPError:
            pass

    @property
    def connected(self) -> bool:
        return bool(self._client.runstate.name == "RUNNING")

    async def close(self) -> None:
        await _quiet_disconnect(self._client)

    async def __aenter__(self) -> QmpSession:
        return self

    async def __aexit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


async def _quiet_disconnect(client: QMPClient) -> None:
    """Disconnect, ignoring the reason the connection already broke (it was reported elsewhere)."""
    try:
        await asyncio.wait_for(client.disconnect(), DEFAULT_TIMEOUT_S)
    except (TimeoutError, QMPError, OSError, EOFError):
        pass
