"""Running build commands: one log per build, a clear error on failure.

Every command's argv, output, exit status and duration go to the build log
(kept next to a failed build, and inside the cache entry of a good one); a
failure raises :class:`BuildError` naming the command and the log's tail.

Commands inside the guest rootfs run through :func:`chroot_argv`: a private
mount and PID namespace with its own /proc, so nothing stays mounted and no
stray daemon survives the build, even if the builder is killed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

LOG = logging.getLogger(__name__)

#: The environment of commands run in the guest rootfs: nothing of the host's
#: (proxies, PIP_* settings, locale) leaks into the image.
CHROOT_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "DEBIAN_FRONTEND": "noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN": "true",
}


class BuildError(RuntimeError):
    """A build step failed.

    :param message: what failed.
    :param log_path: the build log with the full output.
    :param tail: the last lines of output, for the exception text.
    """

    def __init__(self, message: str, log_path: Path | None = None, tail: str = "") -> None:
        super().__init__(message)
        #: What failed, in one line.
        self.message = message
        #: The build log with every command's full output.
        self.log_path = log_path
        #: The end of the failing command's output.
        self.tail = tail

    def __str__(self) -> str:
        text = self.message
        if self.tail:
            text += "\n--- output tail ---\n" + self.tail
        if self.log_path is not None:
            text += f"\n(full log: {self.log_path})"
        return text


def chroot_argv(root: Path, argv: Sequence[str]) -> list[str]:
    """``argv`` run in ``root`` with a private /proc that dies with it."""
    return [
        "unshare", "--mount", "--pid", "--fork", "--propagation", "private",
        f"--mount-proc={root}/proc", "chroot", str(root), *argv,
    ]  # fmt: skip


class BuildLog:
    """The log of one build: commands, their output and step timings."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("a", encoding="utf-8", errors="replace")
        #: (step title, seconds) for every finished step, in order.
        self.timings: list[tuple[str, float]] = []

    def close(self) -> None:
        self._f.close()

    def note(self, text: str) -> None:
        self._f.write(text.rstrip("\n") + "\n")
        self._f.flush()

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[None]:
        """Time a step; its title goes to the log and to this module's logger."""
        LOG.info("%s ...", title)
        self.note(f"\n=== {title}")
        t0 = time.monotonic()
        yield
        dt = time.monotonic() - t0
        self.timings.append((title, round(dt, 1)))
        self.note(f"=== {title}: {dt:.1f} s")
        LOG.info("%s: %.1f s", title, dt)

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = 1800.0,
    ) -> str:
        """Run a command to completion and return its stdout.

        stderr goes to the log only. :raise BuildError: on a non-zero exit or
        a timeout, with the end of the output.
        """
        self.note("$ " + " ".join(argv))
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                list(argv),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                errors="replace",
                env=dict(env) if env is not None else None,
                cwd=cwd,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            out = _text(exc.stdout) + _text(exc.stderr)
            self.note(out)
            raise BuildError(f"{argv[0]} timed out after {timeout:.0f} s", self.path, _tail(out)) from exc
        except OSError as exc:
            raise BuildError(f"cannot run {argv[0]}: {exc}", self.path) from exc
        if proc.stdout:
            self.note(proc.stdout)
        if proc.stderr:
            self.note("[stderr]\n" + proc.stderr)
        self.note(f"[exit {proc.returncode}, {time.monotonic() - t0:.1f} s]")
        if proc.returncode != 0:
            raise BuildError(
                f"command failed with exit status {proc.returncode}: {' '.join(argv)}",
                self.path,
                _tail(proc.stdout + proc.stderr),
            )
        return proc.stdout


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def write_new(path: Path, data: str | bytes, *, mode: int) -> None:
    """Replace ``path`` by a new inode (never writes through a hard link)."""
    if path.is_symlink() or path.exists():
        path.unlink()
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(raw)
    os.chmod(path, mode)
    os.chown(path, 0, 0)
