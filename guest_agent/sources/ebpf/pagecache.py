"""Drop the page cache the loader child's compile brought in.

bcc's compile reads libLLVM, libclang-cpp, libbcc and thousands of kernel
headers: ~70-100 MB of page cache in a 1 GiB guest that nothing uses once the
child has exited. It is guest memory every migration would send, so once the
programs are loaded we tell the kernel to drop it (POSIX_FADV_DONTNEED). That
only evicts clean, unmapped pages: a file this process still maps (libc,
Python) keeps its pages, nothing is ever written, so it is always safe. Bounded
in files and time: this runs inside open().
"""

from __future__ import annotations

import itertools
import os
import platform
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

MAX_FILES = 100_000
BUDGET_S = 5.0
#: uname machine -> the kernel's arch directory.
_KERNEL_ARCH = {"x86_64": "x86", "aarch64": "arm64", "ppc64le": "powerpc", "s390x": "s390", "riscv64": "riscv"}


@dataclass(frozen=True)
class Dropped:
    files: int
    seconds: float
    #: True when the file or time bound stopped it early.
    truncated: bool


def mapped_files(maps: str = "/proc/self/maps") -> list[str]:
    """Regular files mapped by this process (what the child reports)."""
    out: dict[str, None] = {}
    with open(maps) as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/") and not parts[5].endswith("(deleted)\n"):
                out[parts[5].rstrip("\n")] = None
    return list(out)


def header_dirs(kernel_source: str | None, release: str | None = None, modules: str = "/lib/modules") -> list[str]:
    """The include directories bcc compiled against (see headers.py)."""
    release = release or os.uname().release
    roots = [kernel_source] if kernel_source else [os.path.join(modules, release, s) for s in ("build", "source")]
    arch = _KERNEL_ARCH.get(platform.machine(), platform.machine())
    dirs = []
    for root in roots:
        for sub in ("include", os.path.join("arch", arch, "include")):
            d = os.path.join(root, sub)
            if os.path.isdir(d):
                dirs.append(d)
    return dirs


def _walk(dirs: Iterable[str]) -> Iterator[str]:
    for top in dirs:
        for parent, _subdirs, names in os.walk(top):
            for name in names:
                yield os.path.join(parent, name)


def _drop_one(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def drop(files: Iterable[str], dirs: Iterable[str], max_files: int = MAX_FILES, budget_s: float = BUDGET_S) -> Dropped:
    """Drop the clean page cache of ``files`` and of every file under ``dirs``."""
    t0 = time.monotonic()
    n = seen = 0
    for seen, path in enumerate(itertools.chain(files, _walk(dirs)), 1):
        if seen > max_files or time.monotonic() - t0 > budget_s:
            return Dropped(n, time.monotonic() - t0, True)
        n += _drop_one(path)
    return Dropped(n, time.monotonic() - t0, False)
