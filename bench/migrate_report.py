#!/usr/bin/env python3
"""`fph-collector migrate` on a 1 GiB paused guest with half of its RAM hinted free.

Each round migrates the same guest three ways, side by side: through the
daemon with an agent hinting the upper half of RAM, through the daemon with
no agent (the proxy and gate, nothing to skip), and straight from QEMU to
QEMU (no fphint at all). Every page of RAM has distinct non-zero content, so
the hinted half is what the proxy can turn into ZERO records. Prints each
run's report figures and, on its last line, one JSON object with medians and
ratios against the direct migration.

    .venv/bin/python bench/migrate_report.py [--rounds 3] [--ram-mib 1024] [--show]

``--show`` runs one hinted migration with the command's own text output
(progress line and report) on this terminal, for a person to look at.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from fphint_lab.migrate_harness import Daemon, dest_vm, fixed_agent, report_of, source_vm
from fphint_lab.qemu_pair import Machine, MiB, Vm, compare_ram, pattern, write_gpa

VM = "bench"
ARGS = ("--max-bandwidth", "8G", "--downtime-limit", "0")


def fill(src: Vm, ram: int) -> None:
    step = 64 * MiB
    for start in range(0, ram, step):
        write_gpa(src, start, pattern(start, step // 4096, seed=5))


def one(daemon: Daemon, machine: Machine, work: Path, shm: Path, mode: str, show: bool = False) -> dict[str, Any]:
    src = source_vm(daemon, VM, machine, work, ram_dir=shm)
    dst = dest_vm(machine, work, ram_dir=shm)
    try:
        fill(src, machine.ram)
        src.start()
        dst.start()
        port = dst.listen_incoming()
        if mode == "direct":
            src.cmd(
                "migrate-set-capabilities",
                capabilities=[{"capability": "return-path", "state": True}, {"capability": "events", "state": True}],
            )
            src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 30, "downtime-limit": 0})
            t0 = time.monotonic()
            src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
            info = src.wait_migration(("completed", "failed"), 300)
            wall = time.monotonic() - t0
            assert info["status"] == "completed", info
            out = {
                "wall_s": wall,
                "total_time_ms": info["total-time"],
                "downtime_ms": info["downtime"],
                "qemu_transferred_bytes": info["ram"]["transferred"],
            }
        else:
            t0 = time.monotonic()
            if show:
                rc = subprocess.call(daemon.cli("migrate", VM, "--to", f"tcp:127.0.0.1:{port}", *ARGS))
                return {"rc": rc}
            proc = daemon.run("migrate", VM, "--to", f"tcp:127.0.0.1:{port}", "--json", *ARGS, timeout=600)
            cli_wall = time.monotonic() - t0
            r = report_of(proc)
            assert proc.returncode == 0 and r["outcome"] == "completed", (proc.stderr, r)
            keys = (
                "wall_s",
                "total_time_ms",
                "downtime_ms",
                "source_bytes",
                "destination_bytes",
                "pages_rewritten",
                "pages_held",
                "pages_released_unjudged",
                "page_records",
                "zero_records",
                "passes",
                "polls",
            )
            out = {k: r[k] for k in keys}
            out["cli_wall_s"] = cli_wall
            out["epochs"] = [{k: e[k] for k in ("sync", "hint_pages", "request_to_last_chunk_s")} for e in r["epochs"]]
        diff = compare_ram(src, dst)
        assert not diff.other, "destination differs"
        out["pages_zeroed_on_destination"] = len(diff.zeroed.get("mem", set()))
        return out
    finally:
        for vm in (src, dst):
            vm.kill()
            for f in vm.files.values():
                f.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ram-mib", type=int, default=1024)
    ap.add_argument("--show", action="store_true")
    a = ap.parse_args()
    machine = Machine("pc", a.ram_mib * MiB)
    half = (machine.ram // 2, machine.ram)
    daemon = Daemon([VM])
    work = Path(tempfile.mkdtemp(prefix="fph-bench-migrate-"))
    shm = Path(tempfile.mkdtemp(prefix="fph-bench-migrate-", dir="/dev/shm"))
    daemon.start()
    agent = None
    runs: dict[str, list[dict[str, Any]]] = {"hinted": [], "no_agent": [], "direct": []}
    try:
        if a.show:
            agent = fixed_agent(daemon, VM, [half])
            daemon.wait_attached(VM)
            one(daemon, machine, work, shm, "hinted", show=True)
            return
        for rnd in range(a.rounds):
            for mode in ("hinted", "no_agent", "direct"):
                if mode == "hinted":
                    agent = fixed_agent(daemon, VM, [half])
                    daemon.wait_attached(VM)
                res = one(daemon, machine, work, shm, mode)
                if agent is not None:
                    agent.close()
                    agent = None
                    while daemon.list_vms()[VM].attached:
                        time.sleep(0.05)
                runs[mode].append(res)
                print(f"round {rnd + 1} {mode}: {json.dumps(res)}", flush=True)
    finally:
        if agent is not None:
            agent.close()
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)

    def med(mode: str, key: str) -> float:
        return float(statistics.median(r[key] for r in runs[mode]))

    summary: dict[str, Any] = {"ram_bytes": machine.ram, "hinted_bytes": half[1] - half[0], "rounds": a.rounds}
    for mode in runs:
        summary[mode] = {k: med(mode, k) for k in runs[mode][0] if isinstance(runs[mode][0][k], (int, float))}
    per_round = [h["total_time_ms"] / d["total_time_ms"] for h, d in zip(runs["hinted"], runs["direct"])]
    per_round_plain = [n["total_time_ms"] / d["total_time_ms"] for n, d in zip(runs["no_agent"], runs["direct"])]
    summary["ratio_total_time_hinted_vs_direct"] = statistics.median(per_round)
    summary["ratio_total_time_no_agent_vs_direct"] = statistics.median(per_round_plain)
    summary["ratio_destination_bytes_hinted_vs_no_agent"] = (
        summary["hinted"]["destination_bytes"] / summary["no_agent"]["destination_bytes"]
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
