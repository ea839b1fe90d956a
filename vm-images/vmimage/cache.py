"""The on-disk cache of built layers: locking, atomic publication, pruning.

Layout under the cache directory::

    base-<key>/       rootfs/, vmlinuz, initrd.img, packages.txt, manifest.json, build.log
    image-<key>/      rootfs.raw, vmlinuz, initrd.img, manifest.json, build.log
    .tmp-<kind>-<key>-<pid>/   a build in progress (or a failed one, kept for its log)
    .lock             flock: one builder at a time per cache

An entry is built in a ``.tmp-`` directory and renamed into place when
complete, so a reader never sees half an entry and a killed build leaves only
a ``.tmp-`` directory, removed by the next build once its pid is gone.
Several worktrees on one machine may share a cache: keys say what is inside.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

LOG = logging.getLogger(__name__)

#: Environment variable that overrides the cache location.
CACHE_ENV = "FPHINT_VM_CACHE"
#: Shared by every worktree of this machine when running as root.
SYSTEM_CACHE = Path("/var/cache/fphint/vm-images")
#: Entries kept per kind after a build; older ones (by last use) are removed.
KEEP_BASES = 2
KEEP_IMAGES = 6


class CacheLockTimeout(TimeoutError):
    """Another build held the cache lock for too long."""


def default_cache_dir(repo: Path) -> Path:
    """$FPHINT_VM_CACHE, else the system cache as root, else vm-images/cache."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return SYSTEM_CACHE
    return repo / "vm-images" / "cache"


def entry(cache: Path, kind: str, key: str) -> Path:
    return cache / f"{kind}-{key}"


@contextlib.contextmanager
def locked(cache: Path, timeout: float) -> Iterator[None]:
    """Hold the cache's build lock, waiting at most ``timeout`` seconds."""
    cache.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise CacheLockTimeout(
                        f"{cache}/.lock: another image build still runs after {timeout:.0f} s"
                    ) from None
                time.sleep(1.0)
        yield
    finally:
        os.close(fd)  # releases the lock


def tmp_dir(cache: Path, kind: str, key: str) -> Path:
    """A fresh work directory for building ``kind-key`` (under the lock)."""
    path = cache / f".tmp-{kind}-{key}-{os.getpid()}"
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def publish(tmp: Path, final: Path) -> None:
    """Move a finished build into place atomically."""
    os.rename(tmp, final)


def touch(path: Path) -> None:
    """Mark an entry as used now (pruning removes the least recently used)."""
    with contextlib.suppress(OSError):
        os.utime(path)


def remove_stale(cache: Path) -> None:
    """Remove ``.tmp-`` directories of builds whose process is gone.

    Builds chroot in private mount namespaces, so a dead build leaves no mount
    under its directory and removing it cannot reach outside the cache.
    """
    for path in cache.glob(".tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _alive(int(pid)):
            continue
        LOG.info("removing stale build directory %s", path)
        shutil.rmtree(path, ignore_errors=True)


def prune(cache: Path, keep_bases: int = KEEP_BASES, keep_images: int = KEEP_IMAGES) -> list[Path]:
    """Remove least recently used entries beyond the limits; return them.

    A running QEMU keeps its open image alive after the unlink; only later
    launches of a pruned key would need a rebuild.
    """
    removed: list[Path] = []
    for kind, keep in (("base", keep_bases), ("image", keep_images)):
        entries = sorted(cache.glob(f"{kind}-*"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in entries[keep:]:
            LOG.info("pruning %s", old)
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
