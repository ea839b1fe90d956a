#!/usr/bin/env python3
"""kpageflags snapshot of this machine: ms per GiB of RAM scanned, ranges,
pages, CPU per scan; the last line is one JSON object.

Runs the source several times and reports medians, with /proc/buddyinfo read
around each scan as the reference total. Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

from fphint_lab.demo import buddyinfo_pages
from guest_agent.sources.kpageflags import KpageflagsSource


def cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (/proc/kpageflags)", file=sys.stderr)
        return 2
    src = KpageflagsSource()
    walls, cpus, rows = [], [], []
    for i in range(args.runs):
        before = buddyinfo_pages()
        c0, t0 = cpu(), time.perf_counter()
        snap = src.snapshot()
        wall, used = time.perf_counter() - t0, cpu() - c0
        after = buddyinfo_pages()
        span_gib = snap.details["pfns_read"] * 4096 / 2**30
        walls.append(wall)
        cpus.append(used)
        rows.append((wall, used, len(snap.ranges), snap.pages, before, after, span_gib))
        print(
            f"run {i + 1}/{args.runs}: {wall * 1000:7.1f} ms wall, {used * 1000:7.1f} ms CPU, "
            f"{len(snap.ranges):6d} ranges, {snap.pages:9d} pages (buddyinfo {before}..{after})",
            file=sys.stderr,
        )
    span = rows[-1][6]
    med = statistics.median(walls)
    print(f"\n{'scanned GiB':>12} {'ms/scan':>9} {'ms/GiB':>8} {'CPU ms':>8} {'ranges':>8} {'free pages':>11}")
    print(
        f"{span:12.2f} {med * 1000:9.1f} {med * 1000 / span:8.2f} {statistics.median(cpus) * 1000:8.1f} "
        f"{rows[-1][2]:8d} {rows[-1][3]:11d}"
    )
    print(
        json.dumps(
            {
                "bench": "kpageflags_snapshot",
                "runs": args.runs,
                "scanned_gib": round(span, 3),
                "ms_per_scan_median": round(med * 1000, 2),
                "ms_per_gib_median": round(med * 1000 / span, 3),
                "ms_per_scan_min": round(min(walls) * 1000, 2),
                "ms_per_scan_max": round(max(walls) * 1000, 2),
                "cpu_ms_per_scan_median": round(statistics.median(cpus) * 1000, 2),
                "ranges": rows[-1][2],
                "pages": rows[-1][3],
                "buddyinfo_pages_before": rows[-1][4],
                "buddyinfo_pages_after": rows[-1][5],
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
