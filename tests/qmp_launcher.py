"""Start throw-away QEMU processes for the QMP tests (no guest OS needed).

Each QEMU gets a private directory under /tmp (unix socket paths must stay
short), runs under TCG, and is killed by its own PID on exit: other people's
QEMUs on this machine are never touched.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from host_collector.qmp.session import QmpError, QmpSession

QEMU = os.environ.get("FPH_QEMU", "qemu-system-x86_64")
#: Extra -L directories (firmware) for a QEMU given by FPH_QEMU, ':'-separated.
QEMU_DATA_DIRS = [d for d in os.environ.get("FPH_QEMU_DATA", "").split(":") if d]


def qemu_version() -> tuple[int, int]:
    """(major, minor) of the QEMU the tests run, from its --version line."""
    import re

    out = subprocess.run([qemu_binary(), "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"version (\d+)\.(\d+)", out)
    if m is None:
        pytest.fail(f"cannot tell the version of {QEMU}: {out!r}")
    return int(m.group(1)), int(m.group(2))


#: First QEMU whose TCG keeps migration dirty tracking right (see preflight.py).
TCG_FIXED = (9, 0)


def qemu_binary() -> str:
    path = shutil.which(QEMU)
    if path is None:
        pytest.fail(f"{QEMU} not found: scripts/install-deps.sh installs qemu-system-x86")
    return path


@dataclass
class Qemu:
    proc: subprocess.Popen[bytes]
    dir: Path
    qmp_path: str
    args: list[str]
    sessions: list[QmpSession] = field(default_factory=list)

    async def qmp(self, timeout_s: float = 10.0) -> QmpSession:
        """A new QMP session (QEMU's monitor serves one client at a time)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                session = await QmpSession.connect(self.qmp_path, label=self.dir.name, timeout_s=timeout_s)
            except QmpError as err:
                # The socket file appears at bind(), before listen(): on a busy
                # host a connect can fall between the two and be refused.
                if "refused" in str(err) and self.alive() and loop.time() < deadline:
                    await asyncio.sleep(0.05)
                    continue
                await asyncio.sleep(0.2)  # let a dying QEMU finish its error message
                raise RuntimeError(
                    f"{err}\nQEMU alive: {self.alive()}\nstderr: {self.stderr()}\nargv: {self.args}"
                ) from err
            self.sessions.append(session)
            return session

    def stderr(self) -> str:
        try:
            return (self.dir / "stderr").read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None


def _spawn(args: Sequence[str], name: str) -> Qemu:
    d = Path(tempfile.mkdtemp(prefix=f"fph-qmp-{name}-", dir="/tmp"))
    qmp = str(d / "qmp.sock")
    argv = [qemu_binary(), "-nodefaults", "-display", "none", "-accel", "tcg"]
    for data_dir in QEMU_DATA_DIRS:
        argv += ["-L", data_dir]
    argv += ["-qmp", f"unix:{qmp},server=on,wait=off", *args]
    with open(d / "stderr", "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    return Qemu(proc, d, qmp, list(argv))


async def _wait_socket(q: Qemu, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not os.path.exists(q.qmp_path):
        if not q.alive():
            raise RuntimeError(f"QEMU exited with {q.proc.returncode}: {q.stderr()}\nargv: {q.args}")
        if loop.time() > deadline:
            raise RuntimeError(f"QEMU made no QMP socket within {timeout_s} s\nargv: {q.args}")
        await asyncio.sleep(0.02)


async def _stop(q: Qemu) -> None:
    for s in q.sessions:
        await s.close()
    if q.alive():
        q.proc.send_signal(signal.SIGKILL)
    try:
        await asyncio.get_running_loop().run_in_executor(None, q.proc.wait, 10)
    finally:
        shutil.rmtree(q.dir, ignore_errors=True)


@asynccontextmanager
async def qemu(args: Sequence[str], name: str = "vm", *, start_timeout_s: float = 20.0) -> AsyncIterator[Qemu]:
    """A QEMU with ``-S`` semantics left to the caller (pass ``-S`` to keep it paused)."""
    q = _spawn(args, name)
    try:
        await _wait_socket(q, start_timeout_s)
        yield q
    finally:
        await _stop(q)
