"""Compile and load the BPF program in a short-lived child process: the parent side.

bcc compiles with LLVM/clang inside whatever process imports it, and the
libraries, their page cache and the compiler's heap stay for that process's
life: 131 MiB RSS in the agent, 100-130 MiB more guest memory for every
migration to send. So the agent never imports bcc: :func:`run` starts
``python -m guest_agent.sources.ebpf.loader_child FD`` (loader_child.py); the
child compiles, loads the programs, and passes their fds and the map fds back
over a Unix socket (SCM_RIGHTS) with a small JSON manifest, then exits. The
kernel objects live on through the parent's fds.

Request (child's stdin, JSON): ``cflags``, ``kernel_source``, ``programs``
(name -> "raw_tracepoint" | "tracepoint"), ``required`` (names whose refusal
is a verifier refusal of the whole program), ``maps``.
Manifest (one SOCK_SEQPACKET message): ``programs`` and ``maps`` (name -> fd
index), ``errors`` (optional program -> why it did not load), ``error`` and
``refused`` (the load failed), ``mapped_files`` (for pagecache.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from ...errors import AgentError

MODULE = "guest_agent.sources.ebpf.loader_child"
#: Compiling under TCG in a guest takes ~30 s; a refusal costs more.
TIMEOUT_S = 120.0
MANIFEST_MAX = 64 * 1024
MAX_FDS = 64
_STDERR_TAIL = 2000


class LoaderError(AgentError):
    """The child failed, timed out or sent something unusable."""


@dataclass
class Loaded:
    """What a child handed over; the fds are this process's to close."""

    programs: dict[str, int] = field(default_factory=dict)
    maps: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    error: str = ""
    refused: bool = False
    mapped_files: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def close(self) -> None:
        for fd in (*self.programs.values(), *self.maps.values()):
            os.close(fd)
        self.programs.clear()
        self.maps.clear()


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def default_argv() -> list[str]:
    return [sys.executable, "-m", MODULE]


def run(request: dict[str, Any], timeout: float = TIMEOUT_S, argv: list[str] | None = None) -> Loaded:
    """Run the loader child and take what it sends.

    :raise LoaderError: the child died, timed out, or sent a bad manifest.
    """
    t0 = time.monotonic()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
    with ours, tempfile.TemporaryFile() as err:
        with theirs:
            proc = subprocess.Popen(
                (argv or default_argv()) + [str(theirs.fileno())],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=err,
                pass_fds=(theirs.fileno(),),
                env=env,
            )
        try:
            assert proc.stdin is not None
            try:
                proc.stdin.write(json.dumps(request).encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass  # it died; the socket says so below
            ours.settimeout(max(0.0, timeout - (time.monotonic() - t0)))
            try:
                msg, fds, flags, _ = socket.recv_fds(ours, MANIFEST_MAX + 1, MAX_FDS)
            except TimeoutError:
                raise LoaderError(f"the BPF loader child sent nothing within {timeout:.0f} s") from None
            if not msg and not fds:
                raise LoaderError(f"the BPF loader child died: {_died(proc, err)}")
            loaded = _parse(msg, fds, flags)
        finally:
            if proc.poll() is None:
                try:
                    proc.wait(timeout=max(0.1, min(5.0, timeout - (time.monotonic() - t0))))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    loaded.seconds = time.monotonic() - t0
    return loaded


def _died(proc: subprocess.Popen[bytes], err: Any) -> str:
    try:
        rc = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        rc = proc.wait()
    err.seek(0)
    tail = err.read()[-_STDERR_TAIL:].decode(errors="replace").strip()
    return f"exit status {rc}" + (f": {tail}" if tail else " (no output)")


def _parse(msg: bytes, fds: list[int], flags: int) -> Loaded:
    """Check the manifest and give every received fd an owner (or close it)."""
    try:
        if flags & socket.MSG_CTRUNC:
            raise LoaderError(f"the BPF loader child sent more than {MAX_FDS} fds")
        if flags & socket.MSG_TRUNC or len(msg) > MANIFEST_MAX:
            raise LoaderError(f"the BPF loader child's manifest exceeds {MANIFEST_MAX} bytes")
        try:
            m = json.loads(msg)
            loaded = Loaded(
                programs={str(k): fds[_index(v, fds)] for k, v in m["programs"].items()},
                maps={str(k): fds[_index(v, fds)] for k, v in m["maps"].items()},
                errors={str(k): str(v) for k, v in m.get("errors", {}).items()},
                error=str(m.get("error") or ""),
                refused=bool(m.get("refused")),
                mapped_files=[str(p) for p in m.get("mapped_files", [])],
            )
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise LoaderError(f"the BPF loader child sent a bad manifest: {e!r}") from None
        if len(set(loaded.programs.values()) | set(loaded.maps.values())) != len(loaded.programs) + len(loaded.maps):
            raise LoaderError("the BPF loader child sent a bad manifest: an fd named twice")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    for fd in set(fds) - set(loaded.programs.values()) - set(loaded.maps.values()):
        os.close(fd)
    return loaded


def _index(v: object, fds: list[int]) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < len(fds):
        raise ValueError(f"fd index {v!r} out of range (got {len(fds)} fds)")
    return v
