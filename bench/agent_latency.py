#!/usr/bin/env python3
"""Request to first chunk and to last chunk, tracked against rescan, idle and
under churn, on this machine.

A real collector and the real agent with the eBPF source, on loopback. Each
scenario opens epochs one after another (a few hundred ms apart, like QEMU's
later passes) and reads the collector's own clock: request (epoch opened) to
the first chunk of any Report, and to the end of the last snapshot call.

* ``rescan``: ``track="off"``, every request scans afresh (the agent before
  tracking);
* ``tracked``: the tracked answer first, then the fresh scan (the first
  epoch of a run, with nothing tracked yet, is left out of the medians).

``churn`` runs two processes beside it that map, touch and unmap 8-128 MiB in
a loop (the churn test's storm). The last line is one JSON object: medians
per scenario and the tracked/rescan ratios side by side. Needs root and BPF;
run it under the heavy lock on a shared machine.

    .venv/bin/python bench/agent_latency.py [--epochs 12]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import statistics
import subprocess
import sys
import time

from guest_agent.agent import Settings
from guest_agent.sources.ebpf import EbpfSource, system

STORM = r"""
import mmap, random, sys
rnd = random.Random(int(sys.argv[1]))
while True:
    size = rnd.choice([8, 32, 64, 128]) << 20
    m = mmap.mmap(-1, size)
    if rnd.random() < 0.3:
        m.madvise(mmap.MADV_HUGEPAGE)
    m.write(b"x" * size)
    if rnd.random() < 0.5:
        m.madvise(mmap.MADV_DONTNEED, 0, size // 2)
    m.close()
"""


async def _epochs(source: EbpfSource, track: str, epochs: int, gap_s: float) -> list[dict[str, float]]:
    from fphint_lab.collector_harness import make_config, running_agent, running_collector, wait_attached, wait_for
    from host_collector.layout import RamLayout, RamRange

    offset, rr = 0, []
    for s, e in system.ram_pfn_ranges():
        rr.append(RamRange(s * 4096, (e - s) * 4096, "pc.ram", offset))
        offset += (e - s) * 4096
    cfg = make_config(["bench"])
    cfg = dataclasses.replace(cfg, vms=(dataclasses.replace(cfg.vms[0], layout=RamLayout.from_ranges(rr)),))
    out = []
    settings = Settings(backoff_initial_s=0.05, track=track)
    async with running_collector(cfg) as srv:
        async with running_agent(srv, "bench", source, settings):
            await wait_attached(srv, "bench")
            for i in range(epochs):
                ep = srv.collector.open_epoch("bench", 10.0, live_hints=False)
                tracked = track != "off" and i > 0
                await wait_for(lambda: ep.stats().reports >= (2 if tracked else 1), 20, "the epoch's snapshot calls")
                st = ep.stats()
                assert st.rejected_ranges == 0 and st.request_to_first_chunk_s is not None
                assert st.request_to_last_chunk_s is not None
                out.append(
                    {
                        "first_ms": st.request_to_first_chunk_s * 1000,
                        "last_ms": st.request_to_last_chunk_s * 1000,
                        "pages": float(st.free_pages),
                        "counted": float(i > 0),
                    }
                )
                srv.collector.close_epoch("bench", ep.id)
                await asyncio.sleep(gap_s)
    source.set_tracking(False)
    return out


def scenario(source: EbpfSource, track: str, churn: bool, epochs: int, gap_s: float) -> dict[str, float]:
    procs = [subprocess.Popen([sys.executable, "-c", STORM, str(i)]) for i in range(2)] if churn else []
    try:
        time.sleep(0.5 if churn else 0)
        rows = asyncio.run(_epochs(source, track, epochs, gap_s))
    finally:
        for p in procs:
            p.send_signal(signal.SIGKILL)
            p.wait()
    counted = [r for r in rows if r["counted"]]
    return {
        "first_ms": statistics.median(r["first_ms"] for r in counted),
        "first_ms_max": max(r["first_ms"] for r in counted),
        "last_ms": statistics.median(r["last_ms"] for r in counted),
        "pages": statistics.median(r["pages"] for r in counted),
        "epochs": float(len(counted)),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--gap", type=float, default=0.3, help="seconds between epochs")
    args = ap.parse_args()
    source = EbpfSource()
    source.open()
    results: dict[str, dict[str, float]] = {}
    try:
        for load in ("idle", "churn"):
            for track, name in (("off", "rescan"), ("migration", "tracked")):
                r = results[f"{load}/{name}"] = scenario(source, track, load == "churn", args.epochs, args.gap)
                print(
                    f"{load:6s} {name:8s} first {r['first_ms']:8.2f} ms (max {r['first_ms_max']:.1f})  "
                    f"last {r['last_ms']:8.2f} ms  pages {r['pages']:.0f}"
                )
    finally:
        source.close()
    ratios = {
        load: {
            "first_tracked_over_rescan": results[f"{load}/tracked"]["first_ms"] / results[f"{load}/rescan"]["first_ms"],
            "last_tracked_over_rescan": results[f"{load}/tracked"]["last_ms"] / results[f"{load}/rescan"]["last_ms"],
        }
        for load in ("idle", "churn")
    }
    print(
        json.dumps(
            {
                "machine": "this host (shared: other jobs may run; numbers are noisy)",
                "ram_gib": round(system.ram_pfn_ranges()[-1][1] * 4096 / 2**30, 1),
                "tracking": source.facts.get("tracking", ""),
                "results": results,
                "ratios": ratios,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
