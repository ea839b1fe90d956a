#!/usr/bin/env python3
"""eBPF free-page scan against /proc/kpageflags on this machine, side by side.

Prints, with medians over alternating runs (the machine is shared and noisy):

* scan time per GiB of RAM and CPU per scan, ebpf and kpageflags, and their
  ratio (goal: ebpf <= 3 ms/GiB, kpageflags >= 5x slower);
* time from request to the first chunk: source side (a scan's first part
  ready) and through the real agent and collector on loopback (goal <= 20 ms);
* agent RSS with the BPF programs loaded (a fresh process: baseline, source
  open, after scans and live frees; bcc and LLVM stay in the loader child,
  and ``bcc_in_agent`` says whether that held), and the loader child's time;
* the cost of draining live frees.

The last line is one JSON object. Needs root.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import mmap
import os
import resource
import statistics
import subprocess
import sys
import time

from guest_agent.sources.base import FreePageSource
from guest_agent.sources.ebpf import EbpfSource, system
from guest_agent.sources.kpageflags import KpageflagsSource

GiB = 1 << 30


def cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def scan_side_by_side(ebpf: EbpfSource, kpf: KpageflagsSource, runs: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, list[float]]] = {
        n: {"wall": [], "cpu": [], "pages": [], "ranges": []} for n in ("ebpf", "kpageflags")
    }
    for _ in range(runs):
        for name, src in (("ebpf", ebpf), ("kpageflags", kpf)):
            c0, t0 = cpu(), time.perf_counter()
            snap = src.snapshot()
            wall, used = time.perf_counter() - t0, cpu() - c0
            row = out[name]
            row["wall"].append(wall)
            row["cpu"].append(used)
            row["pages"].append(snap.pages)
            row["ranges"].append(len(snap.ranges))
    return {n: {k: med(v) for k, v in row.items()} for n, row in out.items()}


def first_part(ebpf: EbpfSource, runs: int) -> dict[str, float]:
    firsts, wholes = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        it = ebpf.parts()
        next(it)
        firsts.append(time.perf_counter() - t0)
        for _part in it:
            pass
        wholes.append(time.perf_counter() - t0)
    return {"first_part_ms": med(firsts) * 1000, "all_parts_ms": med(wholes) * 1000}


async def _agent_latency(source: FreePageSource, epochs: int) -> list[float]:
    from fphint_lab.collector_harness import make_config, running_agent, running_collector, wait_attached
    from host_collector.layout import RamLayout, RamRange

    offset, rr = 0, []
    for s, e in system.ram_pfn_ranges():
        rr.append(RamRange(s * 4096, (e - s) * 4096, "pc.ram", offset))
        offset += (e - s) * 4096
    cfg = make_config(["bench"])
    vm = dataclasses.replace(cfg.vms[0], layout=RamLayout.from_ranges(rr))
    cfg = dataclasses.replace(cfg, vms=(vm,))
    out = []
    async with running_collector(cfg) as srv:
        async with running_agent(srv, "bench", source):
            await wait_attached(srv, "bench")
            for _ in range(epochs):
                ep = srv.collector.open_epoch("bench", 10.0, live_hints=False)
                await asyncio.wait_for(ep.snapshot_done.wait(), 20)
                st = ep.stats()
                assert st.rejected_ranges == 0 and st.request_to_first_chunk_s is not None
                out.append(st.request_to_first_chunk_s)
                srv.collector.close_epoch("bench", ep.id)
                await asyncio.sleep(0.05)
    return out


def agent_latency(source: FreePageSource, epochs: int) -> float | None:
    try:
        return med(asyncio.run(_agent_latency(source, epochs))) * 1000
    except ImportError as e:  # the agent is not on this branch
        print(f"agent latency skipped: {e}", file=sys.stderr)
        return None


RSS_PROBE = """
import json, mmap, sys, time
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
out = {"baseline": rss()}
from guest_agent.sources.ebpf import EbpfSource
s = EbpfSource(); s.open()
out["open"] = rss()
out["bcc_in_agent"] = "bcc" in sys.modules
out["loader_child_s"] = s.scanner.prog.load_s
for _ in range(5):
    s.snapshot()
out["after_scans"] = rss()
lf = s.live_frees(); lf.start()
m = mmap.mmap(-1, 64 << 20); m.write(b"x" * (64 << 20)); m.close()
time.sleep(0.05); lf.drain(1 << 20); lf.stop()
out["after_live"] = rss()
s.close()
print(json.dumps(out))
"""


def rss_profile() -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE], capture_output=True, text=True, timeout=120)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    raw = json.loads(proc.stdout.strip().splitlines()[-1])
    mib = {k: v / 2**20 for k, v in raw.items() if k not in ("bcc_in_agent", "loader_child_s")}
    return {**mib, "bcc_in_agent": float(raw["bcc_in_agent"]), "loader_child_s": raw["loader_child_s"]}


def live_cost(ebpf: EbpfSource) -> dict[str, float]:
    live = ebpf.live_frees()
    live.start()
    m = mmap.mmap(-1, 64 << 20)
    m.write(b"x" * (64 << 20))
    lost0 = live.lost
    m.close()
    time.sleep(0.05)
    c0, t0 = cpu(), time.perf_counter()
    got = live.drain(1 << 20)
    wall, used = time.perf_counter() - t0, cpu() - c0
    pages = sum(n for _, n in got) // 4096
    live.stop()
    return {
        "pages": pages,
        "ranges": len(got),
        "drain_ms": wall * 1000,
        "drain_cpu_ms": used * 1000,
        "lost": live.lost - lost0,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--epochs", type=int, default=9)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root", file=sys.stderr)
        return 2
    ram_gib = sum(e - s for s, e in system.ram_pfn_ranges()) * 4096 / GiB
    ebpf = EbpfSource()
    t0 = time.perf_counter()
    ebpf.open()
    open_s = time.perf_counter() - t0
    kpf = KpageflagsSource()
    kpf.open()
    try:
        side = scan_side_by_side(ebpf, kpf, args.runs)
        first = first_part(ebpf, args.runs)
        live = live_cost(ebpf)
        agent_ebpf = agent_latency(ebpf, args.epochs)
        agent_kpf = agent_latency(kpf, max(3, args.epochs // 3))
    finally:
        ebpf.close()
        kpf.close()
    rss = rss_profile()

    e, k = side["ebpf"], side["kpageflags"]
    print(f"RAM scanned: {ram_gib:.2f} GiB; ebpf open (compile, load, self-test): {open_s:.2f} s", file=sys.stderr)
    print(
        f"{'source':>11} {'ms/scan':>8} {'ms/GiB':>7} {'CPU ms':>7} {'ranges':>7} {'free pages':>10}", file=sys.stderr
    )
    for name, row in side.items():
        print(
            f"{name:>11} {row['wall'] * 1000:8.1f} {row['wall'] * 1000 / ram_gib:7.2f} {row['cpu'] * 1000:7.1f} "
            f"{row['ranges']:7.0f} {row['pages']:10.0f}",
            file=sys.stderr,
        )
    print(
        f"first part ready {first['first_part_ms']:.2f} ms, all parts {first['all_parts_ms']:.1f} ms; "
        f"agent request->first chunk ebpf {agent_ebpf} ms, kpageflags {agent_kpf} ms",
        file=sys.stderr,
    )
    print(f"RSS MiB: {rss}", file=sys.stderr)
    print(f"live frees: {live}", file=sys.stderr)
    result = {
        "bench": "ebpf_scan",
        "runs": args.runs,
        "ram_gib": round(ram_gib, 2),
        "ebpf_ms_per_gib": round(e["wall"] * 1000 / ram_gib, 3),
        "kpageflags_ms_per_gib": round(k["wall"] * 1000 / ram_gib, 3),
        "kpageflags_over_ebpf": round(k["wall"] / e["wall"], 2),
        "ebpf_cpu_ms_per_scan": round(e["cpu"] * 1000, 2),
        "kpageflags_cpu_ms_per_scan": round(k["cpu"] * 1000, 2),
        "ebpf_free_pages": int(e["pages"]),
        "kpageflags_free_pages": int(k["pages"]),
        "source_first_part_ms": round(first["first_part_ms"], 3),
        "agent_request_to_first_chunk_ms_ebpf": None if agent_ebpf is None else round(agent_ebpf, 2),
        "agent_request_to_first_chunk_ms_kpageflags": None if agent_kpf is None else round(agent_kpf, 2),
        "ebpf_open_s": round(open_s, 2),
        "rss_mib": {k2: round(v, 1) for k2, v in rss.items()},
        "live_drain": {k2: round(v, 2) for k2, v in live.items()},
        "goals": {
            "ebpf_ms_per_gib_le_3": e["wall"] * 1000 / ram_gib <= 3,
            "kpageflags_ge_5x_slower": k["wall"] >= 5 * e["wall"],
            "first_chunk_le_20ms_source": first["first_part_ms"] <= 20,
            "first_chunk_le_20ms_agent": None if agent_ebpf is None else agent_ebpf <= 20,
        },
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
