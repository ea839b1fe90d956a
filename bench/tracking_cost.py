#!/usr/bin/env python3
"""What the eBPF source's allocation-event programs cost an allocation-heavy
loop on this machine: nothing attached, attached with the gate closed (the
agent idle between migrations), and the gate open (tracking).

A worker process maps 32 MiB (no THP), populates it (MADV_POPULATE_WRITE:
8192 page allocations, each firing mm_page_alloc and, per pcp refill,
mm_page_alloc_zone_locked) and unmaps it, N times per batch; the batches of
the three modes alternate, and the worker's own CPU time (user + system) and
wall time per batch are compared by median. The last line is one JSON
object with the medians and the ratios to "none". Needs root and BPF.

    .venv/bin/python bench/tracking_cost.py [--batches 15] [--iterations 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from guest_agent.sources.ebpf import EbpfSource

WORKER = r"""
import json, mmap, os, resource, sys, time
SIZE = 32 << 20
for line in sys.stdin:
    n = int(line)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(n):
        m = mmap.mmap(-1, SIZE)
        m.madvise(mmap.MADV_NOHUGEPAGE)
        m.madvise(23)  # MADV_POPULATE_WRITE
        m.close()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    print(json.dumps({"wall": t1 - t0, "cpu": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)}), flush=True)
"""

MODES = ("none", "gate_closed", "gate_open")


class Modes:
    """Switch the open source between the three states. "none" is what an
    idle agent is now (its exit hooks detached between migrations);
    "gate_closed" what it was (hooks attached, gate closed)."""

    def __init__(self, src: EbpfSource) -> None:
        self.src = src
        self.hooks = src.scanner.hooks
        self.state = "none"

    def set(self, mode: str) -> None:
        if mode == self.state:
            return
        if self.state == "gate_open":
            self.src.set_tracking(False)  # closes the gate and detaches
        if mode == "none":
            self.hooks.detach()
        elif mode == "gate_closed":
            self.hooks.attach()
        else:
            self.src.set_tracking(True)
            for _part in self.src.parts():  # the scan that opens the gate for good
                pass
        self.state = mode


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=15)
    ap.add_argument("--iterations", type=int, default=40, help="32 MiB populate+unmap cycles per batch")
    args = ap.parse_args()
    src = EbpfSource()
    src.open()
    worker = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert worker.stdin is not None and worker.stdout is not None
    modes = Modes(src)
    got: dict[str, dict[str, list[float]]] = {m: {"wall": [], "cpu": []} for m in MODES}
    try:
        worker.stdin.write("5\n")  # warm up
        worker.stdin.flush()
        worker.stdout.readline()
        for b in range(args.batches):
            order = MODES if b % 2 == 0 else MODES[::-1]
            for mode in order:
                modes.set(mode)
                worker.stdin.write(f"{args.iterations}\n")
                worker.stdin.flush()
                r = json.loads(worker.stdout.readline())
                got[mode]["wall"].append(r["wall"])
                got[mode]["cpu"].append(r["cpu"])
    finally:
        worker.kill()
        modes.set("none")
        src.close()
    pages = args.iterations * (32 << 20) // 4096
    med = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in got.items()}
    out = {
        "host": "this machine (shared, noisy: other engineers' jobs may run)",
        "pages_per_batch": pages,
        "batches": args.batches,
        "median_s": med,
        "ns_per_page_cpu": {m: med[m]["cpu"] / pages * 1e9 for m in MODES},
        "ratio_cpu_vs_none": {m: med[m]["cpu"] / med["none"]["cpu"] for m in MODES},
        "ratio_wall_vs_none": {m: med[m]["wall"] / med["none"]["wall"] for m in MODES},
        "tracking": src.facts.get("tracking", ""),
    }
    for m in MODES:
        print(
            f"{m:12s} cpu {med[m]['cpu'] * 1000:8.1f} ms  wall {med[m]['wall'] * 1000:8.1f} ms  "
            f"x{out['ratio_cpu_vs_none'][m]:.3f} cpu  x{out['ratio_wall_vs_none'][m]:.3f} wall"
        )
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
