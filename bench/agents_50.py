#!/usr/bin/env python3
"""Many concurrent agents against one collector daemon.

The collector runs as its own process (`fph-collector serve`); agents (the real
Agent class, each on its own gRPC connection, answering with a fixed set of
ranges like a fragmented guest) run in worker processes; this script drives
rounds of hint requests to every VM at once through the admin socket. It runs
the same load with 1 agent first as the baseline, then with N.

Prints a table and, on its last line, one JSON object: requests per second,
p50/p99 request-to-last-chunk latency, collector RSS, and the ratios to the
1-agent baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from fphint import addresses
from fphint.v1 import admin_pb2, admin_pb2_grpc

if TYPE_CHECKING:
    from guest_agent.agent import Endpoint

GiB = 1 << 30
TOKEN = "bench-token-{}-0123456789abcdef"


def ranges_for(vm: int, n: int) -> list[tuple[int, int]]:
    """A fragmented guest: n page-aligned free ranges in the 3 GiB layout."""
    rng = random.Random(vm)
    starts = sorted(rng.sample(range(0, (2 * GiB) // 4096 - 64), n))
    out, prev_end = [], 0
    for s in starts:
        s = max(s, prev_end)
        length = rng.choice([1, 1, 2, 4, 8, 16, 64])
        out.append((s * 4096, length * 4096))
        prev_end = s + length
    return out


def write_config(work: Path, n: int) -> Path:
    lines = ["[collector]", f'listen = ["unix:{work}/agents.sock"]', f'admin = "unix:{work}/admin.sock"', ""]
    for i in range(n):
        lines += [
            "[[vm]]",
            f'name = "vm{i}"',
            f'token = "{TOKEN.format(i)}"',
            'ram = [{ gpa = 0, size = 0x80000000, block = "pc.ram", offset = 0 },',
            '       { gpa = 0x100000000, size = 0x40000000, block = "pc.ram", offset = 0x80000000 }]',
            "",
        ]
    p = work / "collector.toml"
    p.write_text("\n".join(lines))
    return p


def _fixed(ep: Endpoint) -> Callable[[], Endpoint]:
    return lambda: ep


async def worker(socket: str, first: int, count: int, n_ranges: int) -> None:
    """Run agents vm{first}..vm{first+count-1} until killed."""
    from fphint_lab.collector_harness import FixedSource
    from guest_agent.agent import Agent, Endpoint, Settings
    from guest_agent.facts import GuestSafety, build_facts

    agents = []
    for i in range(first, first + count):
        src = FixedSource(ranges_for(i, n_ranges))
        facts = build_facts(GuestSafety(), [], src.name, "")
        ep = Endpoint(addresses.parse(f"unix:{socket}"), TOKEN.format(i))
        agents.append(Agent(src, facts, _fixed(ep), Settings(backoff_initial_s=0.1)))
    await asyncio.gather(*(a.run() for a in agents))


def rss_kib(pid: int) -> tuple[int, int]:
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def run_load(n_agents: int, rounds: int, n_ranges: int, workers: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="fphint-bench-") as tmp:
        work = Path(tmp)
        cfg = write_config(work, n_agents)
        col = subprocess.Popen(
            [sys.executable, "-m", "host_collector", "serve", "--config", str(cfg)],
            stderr=open(work / "collector.log", "w"),
        )
        procs = []
        per = -(-n_agents // workers)
        for w in range(0, n_agents, per):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--worker",
                        str(work / "agents.sock"),
                        str(w),
                        str(min(per, n_agents - w)),
                        str(n_ranges),
                    ],
                    stderr=open(work / f"worker{w}.log", "w"),
                )
            )
        try:
            ch = grpc.insecure_channel(f"unix:{work}/admin.sock")
            stub = admin_pb2_grpc.CollectorAdminStub(ch)
            end = time.monotonic() + 60
            while True:
                try:
                    if sum(v.attached for v in stub.ListVMs(admin_pb2.ListVMsRequest(), timeout=2).vms) == n_agents:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > end:
                    raise SystemExit("agents did not attach within 60 s")
                time.sleep(0.2)
            rss0, _ = rss_kib(col.pid)
            lat: list[float] = []
            failures = 0
            t0 = time.perf_counter()

            async def rounds_() -> None:
                nonlocal failures
                async with grpc.aio.insecure_channel(f"unix:{work}/admin.sock") as ach:
                    astub = admin_pb2_grpc.CollectorAdminStub(ach)
                    for r in range(rounds):
                        reqs = [
                            astub.CollectHints(
                                admin_pb2.CollectHintsRequest(vm=f"vm{i}", deadline_ms=10000, close_on_snapshot=True),
                                timeout=30,
                            )
                            for i in range(n_agents)
                        ]
                        for resp in await asyncio.gather(*reqs):
                            if resp.reports and resp.accepted_ranges == n_ranges:
                                lat.append(resp.request_to_last_chunk_s)
                            else:
                                failures += 1
                        print(f"  {n_agents} agents: round {r + 1}/{rounds} done", file=sys.stderr)

            asyncio.run(rounds_())
            wall = time.perf_counter() - t0
            rss, hwm = rss_kib(col.pid)
            ch.close()
        finally:
            for p in [*procs, col]:
                p.kill()
                p.wait()
    lat.sort()
    return {
        "agents": n_agents,
        "requests": len(lat) + failures,
        "failures": failures,
        "requests_per_s": (len(lat) + failures) / wall,
        "p50_ms": statistics.median(lat) * 1000,
        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1000,
        "collector_rss_mib": rss / 1024,
        "collector_rss_idle_mib": rss0 / 1024,
        "collector_peak_rss_mib": hwm / 1024,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--agents", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--ranges", type=int, default=2000, help="ranges each agent reports")
    ap.add_argument("--workers", type=int, default=5, help="agent processes")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        sock, first, count, n = args.worker
        asyncio.run(worker(sock, int(first), int(count), int(n)))
        return 0
    base = run_load(1, args.rounds, args.ranges, 1)
    many = run_load(args.agents, args.rounds, args.ranges, args.workers)
    print(f"\n{'agents':>6} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'RSS MiB':>8} {'peak MiB':>9} {'failed':>6}")
    for r in (base, many):
        print(
            f"{r['agents']:6.0f} {r['requests_per_s']:8.1f} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f} "
            f"{r['collector_rss_mib']:8.1f} {r['collector_peak_rss_mib']:9.1f} {r['failures']:6.0f}"
        )
    out = {"bench": "agents_concurrent", "ranges_per_report": args.ranges, "rounds": args.rounds}
    out.update({k: round(v, 2) for k, v in many.items()})
    out["baseline_1_agent"] = {k: round(v, 2) for k, v in base.items()}
    out["rps_ratio_vs_1_agent"] = round(many["requests_per_s"] / base["requests_per_s"], 2)
    out["p99_ratio_vs_1_agent"] = round(many["p99_ms"] / base["p99_ms"], 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
