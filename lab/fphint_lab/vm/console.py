"""Drive a root shell on a guest serial port: run a command, get output + status.

The image gives ttyS1 an autologin bash with echo and line editing off
(vm-images/overlay/root/.bash_profile); the kernel console is on ttyS0, so no
kernel message lands in the middle of an answer. Each command is framed by
two markers the *guest* computes (``$((n+1))``): the typed line itself can
never match them, even while echo is still on early in the boot, and output
left over from an earlier command is never mistaken for the current one.
Every wait has a deadline and also ends early when QEMU exits.

Exceptions::

    ConsoleError
     +-- ConsoleTimeout   no marker before the deadline (.tail: what the guest said)
     +-- ConsoleClosed    QEMU closed the socket (it exited)
     +-- CommandFailed    non-zero exit status with check=True (.result)
"""

from __future__ import annotations

import base64
import logging
import re
import shlex
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LOG = logging.getLogger(__name__)


class ConsoleError(Exception):
    """Base of this module's errors."""


class ConsoleTimeout(ConsoleError, TimeoutError):
    def __init__(self, message: str, tail: str) -> None:
        super().__init__(f"{message}\n--- last console output ---\n{tail}")
        #: The end of what the guest sent.
        self.tail = tail


class ConsoleClosed(ConsoleError):
    pass


@dataclass(frozen=True)
class Result:
    """A finished command: its output (stdout and stderr, ``\\n`` line ends) and status."""

    cmd: str
    output: str
    rc: int


class CommandFailed(ConsoleError):
    def __init__(self, result: Result) -> None:
        super().__init__(f"guest command failed (exit {result.rc}): {result.cmd}\n{result.output[-4000:]}")
        self.result = result


class Shell:
    """A serial shell behind a QEMU ``-chardev socket`` (Unix socket)."""

    #: Longest input line the guest tty accepts is 4095 bytes (N_TTY_BUF_SIZE).
    MAX_LINE = 3000

    def __init__(self, path: Path, name: str, alive: Callable[[], bool] = lambda: True) -> None:
        self.path = path
        self.name = name
        self._alive = alive
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        #: Offset in _buf up to which output has been consumed.
        self._pos = 0
        self._closed = False
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._seq = 0

    # Section: connection

    def connect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self._alive():
                raise ConsoleClosed(f"{self.name}: QEMU exited before its serial socket came up")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(self.path))
                break
            except OSError as exc:
                sock.close()
                if time.monotonic() > deadline:
                    raise ConsoleError(f"{self.name}: cannot connect to {self.path}: {exc}") from exc
                time.sleep(0.05)
        self._sock = sock
        self._reader = threading.Thread(target=self._read_loop, name=f"shell-{self.name}", daemon=True)
        self._reader.start()

    def _read_loop(self) -> None:
        sock = self._sock  # close() may clear the attribute while we read
        assert sock is not None
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._closed = True
                    self._cond.notify_all()
                    return
                self._buf += data
                self._cond.notify_all()

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
            self._sock = None
        if self._reader is not None:
            self._reader.join(5.0)

    def _send(self, text: str) -> None:
        if self._sock is None:
            raise ConsoleClosed(f"{self.name}: not connected")
        for line in text.splitlines():
            if len(line.encode()) > self.MAX_LINE:
                raise ValueError(f"{self.name}: input line of {len(line)} bytes is too long for a tty")
        try:
            self._sock.sendall(text.encode())
        except OSError as exc:
            raise ConsoleClosed(f"{self.name}: send failed: {exc}") from exc

    def tail(self, nbytes: int = 2000) -> str:
        with self._cond:
            return bytes(self._buf[-nbytes:]).decode(errors="replace")

    def _wait_for(self, pattern: re.Pattern[bytes], deadline: float, what: str) -> re.Match[bytes]:
        """Wait until ``pattern`` matches unconsumed output; consume up to its end."""
        with self._cond:
            while True:
                m = pattern.search(self._buf, self._pos)
                if m is not None:
                    self._pos = m.end()
                    return m
                if self._closed:
                    raise ConsoleClosed(f"{self.name}: QEMU closed the serial socket while waiting for {what}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ConsoleTimeout(f"{self.name}: timed out waiting for {what}", self.tail_unlocked())
                self._cond.wait(min(left, 0.5))
                if not self._alive() and pattern.search(self._buf, self._pos) is None:
                    raise ConsoleClosed(f"{self.name}: QEMU exited while waiting for {what}")

    def tail_unlocked(self, nbytes: int = 2000) -> str:
        return bytes(self._buf[-nbytes:]).decode(errors="replace")

    def _next(self) -> int:
        self._seq += 3
        return self._seq

    # Section: public interface

    def wait_ready(self, timeout: float, probe_every: float = 1.0) -> float:
        """Probe until the shell answers; return the seconds it took.

        Probes typed while the guest still boots are lost or reach bash as
        garbage; only a computed marker counts as an answer.
        """
        t0 = time.monotonic()
        deadline = t0 + timeout
        while True:
            n = self._next()
            self._send(f"\nprintf '@@R%s@@\\n' $(({n}+1))\n")
            probe_deadline = min(deadline, time.monotonic() + probe_every)
            try:
                self._wait_for(re.compile(rb"@@R%d@@" % (n + 1)), probe_deadline, "the shell prompt")
                return time.monotonic() - t0
            except ConsoleTimeout:
                if time.monotonic() >= deadline:
                    raise

    def run(self, cmd: str, timeout: float = 60.0, check: bool = True) -> Result:
        """Run ``cmd`` (any bash text; stdin is /dev/null) and wait for it.

        :raise CommandFailed: non-zero status and ``check``.
        :raise ConsoleTimeout: not finished within ``timeout`` (the command keeps
            running in the guest; the shell is then unusable until it ends).
        """
        n = self._next()
        begin = re.compile(rb"@@B%d@@\r?\n" % (n + 1))
        end = re.compile(rb"@@E%d:(\d+)@@" % (n + 2))
        LOG.debug("%s $ %s", self.name, cmd)
        # One command list: bash prints its prompt only after the whole list,
        # so no prompt lands between the markers.
        self._send(
            f"printf '@@B%s@@\\n' $(({n}+1)); {{ {cmd}\n}} </dev/null 2>&1; printf '@@E%s:%s@@\\n' $(({n}+2)) \"$?\"\n"
        )
        deadline = time.monotonic() + timeout
        b = self._wait_for(begin, deadline, f"the start of {cmd!r}")
        e = self._wait_for(end, deadline, f"the end of {cmd!r}")
        with self._cond:
            raw = bytes(self._buf[b.end() : e.start()])
        output = raw.decode(errors="replace").replace("\r\n", "\n")
        result = Result(cmd, output, int(e.group(1)))
        LOG.debug("%s exit %d: %s", self.name, result.rc, output[-500:])
        if check and result.rc != 0:
            raise CommandFailed(result)
        return result

    def output(self, cmd: str, timeout: float = 60.0) -> str:
        """stdout of a command that must succeed, stripped."""
        return self.run(cmd, timeout=timeout).output.strip()

    def put_file(self, path: str, data: bytes, mode: int = 0o644, timeout: float = 120.0) -> None:
        """Write ``data`` to ``path`` in the guest (base64 over the console; small files)."""
        lines = base64.encodebytes(data).decode().splitlines()
        quoted = shlex.quote(path)
        body = "\n".join(lines)
        self.run(
            f"base64 -d > {quoted}.part <<'@@EOF@@'\n{body}\n@@EOF@@\n"
            f"chmod {mode:o} {quoted}.part && mv {quoted}.part {quoted}",
            timeout=timeout,
        )

    def get_file(self, path: str, timeout: float = 120.0) -> bytes:
        """Read a file from the guest (base64 over the console; small files)."""
        return base64.b64decode(self.run(f"base64 {shlex.quote(path)}", timeout=timeout).output)
