"""A blocking QMP client: qemu.qmp's async QMPClient on a private loop thread.

Tests are synchronous; qemu.qmp is asyncio. Rather than a second protocol
implementation, one background thread runs an event loop that owns the
QMPClient, and every call is submitted to it with a deadline. Events are
collected from the moment of connection, so a test can wait for an event that
arrived before it started waiting.

Exceptions::

    QMPError
     +-- QMPConnectError   could not connect (or the process died meanwhile)
     +-- QMPCommandError   QEMU answered with an error (.error_class, .desc)
     +-- QMPTimeout        no answer / no event before the deadline
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import EventListener, ExecuteError, QMPClient

LOG = logging.getLogger(__name__)

T = TypeVar("T")
#: A QMP message as plain data.
Message = dict[str, Any]


class QMPError(Exception):
    """Base of this module's errors."""


class QMPConnectError(QMPError):
    pass


class QMPTimeout(QMPError, TimeoutError):
    pass


class QMPCommandError(QMPError):
    """QEMU rejected a command."""

    def __init__(self, cmd: str, error_class: str, desc: str) -> None:
        super().__init__(f"{cmd}: {error_class}: {desc}")
        #: The command that failed.
        self.cmd = cmd
        #: QMP error class, e.g. "GenericError".
        self.error_class = error_class
        #: QEMU's human-readable description.
        self.desc = desc


class QMP:
    """One QMP connection, usable from synchronous code."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"qmp-{name}", daemon=True)
        self._thread.start()
        self._client: QMPClient | None = None
        self._listener: EventListener | None = None
        self._pump: asyncio.Task[None] | None = None
        self._events: list[Message] = []
        self._cond = threading.Condition()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        fut = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), self._loop)
        try:
            return fut.result(timeout + 5.0)
        except TimeoutError as exc:
            fut.cancel()
            raise QMPTimeout(f"QMP {self.name}: no answer within {timeout:.0f} s") from exc

    # Section: connection

    def connect(self, path: Path, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
        """Connect to QEMU's QMP socket, retrying until it exists or ``timeout``.

        :param alive: returns False once the QEMU process is gone, to stop early.
        """
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not alive():
                raise QMPConnectError(f"QMP {self.name}: QEMU exited before QMP came up")
            if path.exists():
                client = QMPClient(self.name)
                # Listen before connecting, so no event after the greeting is missed.
                listener = EventListener()
                client.register_listener(listener)
                try:
                    self._call(client.connect(str(path)), max(0.5, deadline - time.monotonic()))
                except Exception as exc:  # qemu.qmp's ConnectError, or a timeout
                    last = exc
                else:
                    self._client = client
                    self._listener = listener
                    self._pump = self._call(self._start_pump(), 5.0)
                    return
            time.sleep(0.05)
        raise QMPConnectError(f"QMP {self.name}: cannot connect to {path} within {timeout:.0f} s: {last}")

    async def _start_pump(self) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(self._collect())

    async def _collect(self) -> None:
        assert self._listener is not None
        async for event in self._listener:
            msg: Message = dict(event)
            LOG.debug("QMP %s event: %s", self.name, msg)
            with self._cond:
                self._events.append(msg)
                self._cond.notify_all()

    def close(self) -> None:
        """Disconnect and stop the loop thread; safe to call twice."""
        if self._loop.is_closed():
            return
        try:
            self._call(self._shutdown(), 10.0)
        except Exception as exc:  # the peer may already be gone
            LOG.debug("QMP %s: disconnect: %s", self.name, exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()

    async def _shutdown(self) -> None:
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump
        client, self._client = self._client, None
        if client is not None:
            await client.disconnect()

    # Section: commands and events

    def cmd(self, name: str, args: Mapping[str, object] | None = None, timeout: float = 30.0) -> Any:
        """Execute a command and return its "return" value.

        :raise QMPCommandError: QEMU answered with an error.
        :raise QMPTimeout: no answer in time.
        :raise QMPError: not connected or the connection broke.
        """
        client = self._client
        if client is None:
            raise QMPError(f"QMP {self.name}: not connected")
        LOG.debug("QMP %s --> %s %s", self.name, name, dict(args or {}))
        try:
            result = self._call(client.execute(name, dict(args) if args else None), timeout)
        except ExecuteError as exc:
            raise QMPCommandError(name, exc.error_class, exc.error.error.desc) from exc
        except QMPTimeout:
            raise
        except Exception as exc:
            raise QMPError(f"QMP {self.name}: {name} failed: {exc}") from exc
        LOG.debug("QMP %s <-- %s", self.name, result)
        return result

    def events(self) -> list[Message]:
        """Every event received so far, oldest first."""
        with self._cond:
            return list(self._events)

    def event_wait(
        self,
        name: str,
        timeout: float,
        match: Mapping[str, object] | None = None,
        start: int = 0,
    ) -> Message:
        """The first event ``name`` (from index ``start``) whose data includes ``match``.

        :raise QMPTimeout: none arrived within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self._events):
                    ev = self._events[i]
                    i += 1
                    if ev.get("event") == name and _matches(ev.get("data", {}), match or {}):
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    raise QMPTimeout(f"QMP {self.name}: no {name} event {dict(match or {})} within {timeout:.0f} s")
                self._cond.wait(min(left, 0.5))


def _matches(data: object, pattern: Mapping[str, object]) -> bool:
    """Recursive sub-dict match, as qemu.machine's event_match."""
    if not isinstance(data, Mapping):
        return False
    for key, want in pattern.items():
        if key not in data:
            return False
        if isinstance(want, Mapping):
            if not _matches(data[key], want):
                return False
        elif data[key] != want:
            return False
    return True
