#!/usr/bin/python3
"""Physical addresses of a process's pages, from /proc/<pid>/pagemap.

For tests that need to name pages the guest is *using*: e.g. a test-only
agent that lies by reporting a workload's own pages as free. Needs root
(the kernel hides PFNs from others since Linux 4.2). Prints one JSON object:
``{"pid", "page_size", "pages", "absent", "ranges": [[phys_addr, length], ...]}``
with adjacent pages merged and ranges sorted by physical address; "absent"
counts virtual pages not in RAM (never touched, or swapped).

usage: pagemap.py PID [--addr ADDR --len LEN]   (default: every mapping in /proc/PID/maps)
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys

PAGE = os.sysconf("SC_PAGE_SIZE")
#: pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
PRESENT = 1 << 63
SWAPPED = 1 << 62
PFN_MASK = (1 << 55) - 1


def mappings(pid: int) -> list[tuple[int, int]]:
    """(start, end) of every mapping of ``pid``."""
    spans = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            lo, hi = line.split()[0].split("-")
            spans.append((int(lo, 16), int(hi, 16)))
    return spans


def pfns(pid: int, start: int, end: int) -> tuple[list[int], int]:
    """PFNs of the present pages in [start, end), and the count of absent pages."""
    if start % PAGE or end % PAGE or end <= start:
        raise ValueError(f"range {start:#x}-{end:#x} is not page-aligned and non-empty")
    npages = (end - start) // PAGE
    found: list[int] = []
    absent = 0
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek(start // PAGE * 8)
        done = 0
        while done < npages:
            n = min(npages - done, 65536)
            raw = f.read(n * 8)
            if len(raw) != n * 8:
                raise OSError(f"short read from /proc/{pid}/pagemap")
            for entry in struct.unpack(f"<{n}Q", raw):
                if entry & PRESENT and not entry & SWAPPED:
                    pfn = entry & PFN_MASK
                    if pfn == 0:
                        raise PermissionError("pagemap shows PFN 0: run as root")
                    found.append(pfn)
                else:
                    absent += 1
            done += n
    return found, absent


def merge(pfn_list: list[int]) -> list[list[int]]:
    """[[phys_addr, length], ...] of adjacent pages, sorted."""
    ranges: list[list[int]] = []
    for pfn in sorted(set(pfn_list)):
        addr = pfn * PAGE
        if ranges and ranges[-1][0] + ranges[-1][1] == addr:
            ranges[-1][1] += PAGE
        else:
            ranges.append([addr, PAGE])
    return ranges


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("pid", type=int)
    p.add_argument("--addr", type=lambda s: int(s, 0), help="start of a virtual range")
    p.add_argument("--len", dest="length", type=lambda s: int(s, 0), help="length of the range in bytes")
    args = p.parse_args(argv)
    if (args.addr is None) != (args.length is None):
        p.error("--addr and --len go together")
    spans = [(args.addr, args.addr + args.length)] if args.addr is not None else mappings(args.pid)
    all_pfns: list[int] = []
    absent = 0
    try:
        for lo, hi in spans:
            found, missing = pfns(args.pid, lo, hi)
            all_pfns += found
            absent += missing
    except (OSError, ValueError) as exc:
        print(f"pagemap.py: error: {exc}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {"pid": args.pid, "page_size": PAGE, "pages": len(set(all_pfns)), "absent": absent, "ranges": merge(all_pfns)}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
