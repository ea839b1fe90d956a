"""The agent's own memory: what is resident, and giving back what a scan used.

Every resident page of the agent is guest memory each migration sends, so
the agent reports its RSS and PSS (AgentStats) and, once a request has been
answered, returns the heap its scan and encoding used: a full collection,
then glibc's ``malloc_trim`` (Python's small-object arenas go back by
themselves when empty; larger lists live in malloc's heap, which keeps its
top otherwise).

At start, before its memory is locked, the agent also pages out the file
pages of its libraries (``MADV_PAGEOUT``): loading gRPC's 17 MB library maps
~10 MiB of it (its 500 static initialisers, fault-around and readahead),
most never run again. The kernel reclaims only pages no other process maps
(page cache included), so what the agent really uses comes back on first
use and stays (locked), and the rest is free guest memory again.
"""

from __future__ import annotations

import ctypes
import gc
import os

MADV_RANDOM, MADV_PAGEOUT = 1, 21


def usage(path: str = "/proc/self/smaps_rollup") -> dict[str, int]:
    """Bytes by kind from smaps_rollup (Rss, Pss, Pss_Anon, Pss_File,
    Anonymous, Locked, ...); empty where the file is missing."""
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                words = rest.split()
                if len(words) == 2 and words[1] == "kB" and words[0].isdigit():
                    out[key] = int(words[0]) * 1024
    except OSError:
        pass
    return out


def give_back() -> None:
    """Collect garbage and return free heap to the kernel (a few ms)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def page_out_libraries(maps: str = "/proc/self/maps") -> int:
    """MADV_PAGEOUT every file-backed mapping; bytes asked (the kernel skips
    pages others map, and dirty or locked ones). Call before mlockall."""
    libc = ctypes.CDLL(None, use_errno=True)
    asked = 0
    try:
        with open(maps) as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    files = set()
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or not fields[5].startswith("/") or fields[5].startswith("/dev/"):
            continue
        files.add(fields[5])
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        # Fails with EINVAL before Linux 5.4 or on special mappings: nothing lost.
        # MADV_RANDOM: a page faulted back brings no readahead with it.
        addr, size = ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo)
        if libc.madvise(addr, size, MADV_PAGEOUT) == 0:
            libc.madvise(addr, size, MADV_RANDOM)
            asked += hi - lo
    # Unmapped now, the pages may still sit in the page cache: drop those
    # nobody maps (the kernel keeps mapped and dirty ones).
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        finally:
            os.close(fd)
    return asked
