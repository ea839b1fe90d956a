"""Physical addresses of a process's pages, from /proc/<pid>/pagemap.

For tests that need to name pages the guest is *using*: e.g. a test-only
agent that lies by reporting a workload's own pages as free. Needs root
(the kernel hides PFNs from others since Linux 4.2). Prints one JSON object:
``{"pid", "page_size", "pages", "absent", "ranges": [[phys_addr, length], ...]}``
with adjacent pages merged and ranges sorted by physical address; "absent"
counts virtual pages not in RAM (never touched, or swapped). With --list,
"pfns" also gives each virtual page's PFN in virtual order (null: absent).

Run as ``python3 -m fphint_lab.guest.pagemap``.

usage: pagemap.py PID [--addr ADDR --len LEN [--list]]   (default: every mapping in /proc/PID/maps)
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


def pfns(pid: int, start: int, end: int) -> list[int | None]:
    """The PFN of every virtual page in [start, end), None where absent."""
    if start % PAGE or end % PAGE or end <= start:
        raise ValueError(f"range {start:#x}-{end:#x} is not page-aligned and non-empty")
    npages = (end - start) // PAGE
    found: list[int | None] = []
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
                    found.append(None)
            done += n
    return found


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
    p.add_argument("--list", action="store_true", help="also list each virtual page's PFN, in order")
    args = p.parse_args(argv)
    if (args.addr is None) != (args.length is None):
        p.error("--addr and --len go together")
    if args.list and args.addr is None:
        p.error("--list needs --addr and --len")
    spans = [(args.addr, args.addr + args.length)] if args.addr is not None else mappings(args.pid)
    in_order: list[int | None] = []
    try:
        for lo, hi in spans:
            in_order += pfns(args.pid, lo, hi)
    except (OSError, ValueError) as exc:
        print(f"pagemap.py: error: {exc}", file=sys.stderr)
        return 1
    present = [pfn for pfn in in_order if pfn is not None]
    out: dict[str, object] = {
        "pid": args.pid,
        "page_size": PAGE,
        "pages": len(set(present)),
        "absent": len(in_order) - len(present),
        "ranges": merge(present),
    }
    if args.list:
        out["pfns"] = in_order
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
