#!/usr/bin/env python3
"""The long fuzz campaign: every target of fphint_lab.fuzz under atheris, one after the other.

Each target starts from the committed seed corpus (tests/fuzz/corpus) plus
what earlier runs of this benchmark found (kept in --work, default
/var/tmp/fphint-fuzz, never in the tree). A crash is written there as a
libFuzzer artifact, counted, and ends that target's run (libFuzzer stops at
the first); once fixed, add the input to the corpus as a regression seed.
Run it under the shared lock:

    flock /tmp/fphint-heavy.lock .venv/bin/python bench/fuzz.py --seconds 300

Last line: one JSON object with, per target and in total, executions,
crashes and coverage (libFuzzer's ``cov:``, edges seen in the instrumented
host_collector and fphint code).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from fphint_lab.fuzz.campaign import campaign
from fphint_lab.fuzz.targets import TARGETS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="per target (default 120)")
    ap.add_argument("--targets", default=",".join(sorted(TARGETS)), help="comma-separated subset")
    ap.add_argument("--work", default="/var/tmp/fphint-fuzz", help="found inputs and crash artifacts")
    args = ap.parse_args()
    names = [n for n in args.targets.split(",") if n]
    unknown = set(names) - set(TARGETS)
    if unknown:
        ap.error(f"unknown targets {sorted(unknown)}; known: {sorted(TARGETS)}")
    results: dict[str, dict[str, object]] = {}
    t0 = time.monotonic()
    for name in names:
        work = Path(args.work) / name
        stats = campaign(name, args.seconds, -1, work)  # -runs=-1: until the time is up (or a crash)
        results[name] = {
            "executions": stats.get("number_of_executed_units", 0),
            "crashes": stats["crashes"],
            "coverage": stats.get("coverage", 0),
            "exec_per_s": stats.get("average_exec_per_sec", 0),
            "new_units": stats.get("new_units_added", 0),
            "peak_rss_mb": stats.get("peak_rss_mb", 0),
            "exit": stats["returncode"],
        }
        if stats["crashes"] or stats["returncode"]:
            results[name]["artifacts"] = str(work / "artifacts")
            print(stats["tail"], file=sys.stderr)
        print(name, results[name], file=sys.stderr)
    total_exec = sum(int(str(r["executions"])) for r in results.values())
    total_crashes = sum(int(str(r["crashes"])) for r in results.values())
    print(
        json.dumps(
            {
                "seconds_per_target": args.seconds,
                "wall_s": round(time.monotonic() - t0, 1),
                "executions": total_exec,
                "crashes": total_crashes,
                "targets": results,
            }
        )
    )


if __name__ == "__main__":
    main()
