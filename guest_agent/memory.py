"""The agent's own memory: what is resident, and giving back what a scan used.

Every resident page of the agent is guest memory each migration sends, so
the agent reports its RSS and PSS (AgentStats) and, once a request has been
answered, returns the heap its scan and encoding used: a full collection,
then glibc's ``malloc_trim`` (Python's small-object arenas go back by
themselves when empty; larger lists live in malloc's heap, which keeps its
top otherwise).
"""

from __future__ import annotations

import ctypes
import gc


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
