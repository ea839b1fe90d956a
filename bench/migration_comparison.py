#!/usr/bin/env python3
"""Live migration of a churning 1 GiB guest over one emulated 1 Gbit/s link:
plain QEMU, init_on_free=1, QEMU's virtio-balloon free-page hinting (default
init_on_alloc and init_on_alloc=0), free-page reporting, and fphint.

Every scenario crosses the same rate-limited relay (fphint_lab/linkrelay.py) in
front of the destination, where the bytes on the wire are counted; QEMU's own
bandwidth limit is off. Before each migration the guest fills and frees
--fill-mib of memory (garbage in free memory) and runs a light
allocate/write/verify/free loop that keeps going during the migration; after
it, the destination guest must still run the same boot with a clean kernel
log, and the workload must verify every byte it wrote.

Each scenario boots one guest and migrates it --runs times in a chain (a
failed or crashed run costs a fresh boot). Writes a Markdown table and a PNG
chart (--md, --png; default docs/comparison.md and docs/comparison.png when
every scenario ran), the raw runs as JSON (--raw), and prints one JSON object
on its last line: medians and spreads per scenario, fphint's ratios to the
others, and whether the goals hold.

Needs root (VMs) and matplotlib for the chart. Takes about 2-3 minutes per
scenario with 3 runs on a 2-core host.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmimage.qemu import default_binary, qemu_version

from fphint_lab.linkrelay import GIGABIT
from fphint_lab.vm.fphint_daemon import FphintMigrator
from fphint_lab.vm.scenarios import (
    MiB,
    SCENARIOS,
    Migrator,
    PlainMigrator,
    RunResult,
    Scenario,
    Spread,
    Summary,
    Workload,
    run_chain,
    summarize,
    table,
    vm_session,
)

#: Where the default report goes (docs/comparison.md, .png).
ROOT = Path(__file__).resolve().parent.parent

LOG = logging.getLogger("bench.migration_comparison")
ORDER = ("plain", "init_on_free", "balloon_hint", "balloon_hint_ioa0", "balloon_report", "fphint", "fphint_kpageflags")
#: The scenarios the issue's table needs (the kpageflags variant is extra).
REQUIRED = ORDER[:6]


def fphint_migrator(session: Any) -> Migrator:
    """The daemon path (``fph-collector migrate``), the daemon run as shipped;
    see fphint_lab/vm/fphint_daemon.py."""
    return FphintMigrator(session)


def goals(sums: dict[str, Summary]) -> dict[str, Any]:
    """The issue's goals, judged on medians: fphint's wire bytes at most 1.05x
    init_on_free's and below QEMU's free-page hinting; its total time below
    every other scenario; no corruption and no crash anywhere."""
    out: dict[str, Any] = {}
    f = sums.get("fphint")
    if f is None or not f.completed:
        out["evaluated"] = False
        return out
    out["evaluated"] = True
    fw = f.wire_bytes.median
    ratios = {name: round(fw / s.wire_bytes.median, 3) for name, s in sums.items()
              if name != "fphint" and s.completed and s.wire_bytes.median}
    out["wire_ratio_to"] = ratios
    out["time_ratio_to"] = {name: round(f.total_time_ms.median / s.total_time_ms.median, 3)
                            for name, s in sums.items()
                            if name != "fphint" and s.completed and s.total_time_ms.median}
    checks = {
        "wire_within_1.05x_init_on_free": "init_on_free" in ratios and ratios["init_on_free"] <= 1.05,
        "wire_below_balloon_hint": all(ratios.get(n, 0) < 1 for n in ("balloon_hint", "balloon_hint_ioa0")
                                       if n in ratios),
        "time_below_every_other": all(v < 1 for v in out["time_ratio_to"].values()),
        "no_corruption": all(s.corrupt == 0 for s in sums.values()),
        "no_crash": all(s.survived == s.runs for s in sums.values()),
        "fphint_no_crash_no_corruption": f.corrupt == 0 and f.survived == f.runs,
    }
    out["checks"] = checks
    return out


def chart(sums: Sequence[Summary], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [s.label.replace(", ", ",\n") for s in sums]
    fig, axes = plt.subplots(1, 3, figsize=(15, 5.2))
    panels: list[tuple[str, str, float, str]] = [
        ("bytes on the wire", "wire_bytes", MiB, "MiB"),
        ("total migration time", "total_time_ms", 1.0, "ms"),
        ("downtime", "downtime_ms", 1.0, "ms"),
    ]
    for ax, (what, attr, scale, unit) in zip(axes, panels):
        sp: list[Spread] = [getattr(s, attr) for s in sums]
        med = [x.median / scale for x in sp]
        lo = [max(0.0, (x.median - x.low) / scale) for x in sp]
        hi = [max(0.0, (x.high - x.median) / scale) for x in sp]
        colors = ["#d62728" if s.survived < s.runs or s.corrupt else
                  ("#2ca02c" if s.scenario.startswith("fphint") else "#4c72b0") for s in sums]
        ax.bar(range(len(sums)), med, yerr=[lo, hi], capsize=4, color=colors)
        ax.set_xticks(range(len(sums)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{what} ({unit}, median, min-max)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title + "\nred: a guest crashed or its memory was corrupted in some run", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(sums: Sequence[Summary], results: Sequence[RunResult], meta: dict[str, Any], goal: dict[str, Any],
             png_name: str | None) -> str:
    lines = [
        "# Migration comparison: fphint against QEMU's own ways to skip free memory",
        "",
        f"Generated by `bench/migration_comparison.py` on {meta['date']} (QEMU {meta['qemu']}, TCG, "
        f"guest {meta['guest_mib']} MiB, 1 vCPU; link {meta['link_mbit']:.0f} Mbit/s through a rate-limited relay "
        f"in front of the destination; QEMU's bandwidth limit off). {meta['runs']} runs per scenario, chained on "
        "one boot where the guest survived. Cells: median (min–max).",
        "",
        f"Workload before each migration: fill and free {meta['fill_mib']} MiB (garbage in free memory), then "
        f"a churn loop ({meta['workload']}) that allocates, writes, verifies and frees memory during the "
        "migration. *Wire MiB* is counted in the relay (source → destination); *guest CPU* is the guest's busy "
        "share of its one vCPU from its /proc/stat over the migration; *survived*: the destination guest ran the "
        "same boot with a clean kernel log; *corrupted*: the workload found bytes that were not what it wrote. "
        "Every scenario migrates with QEMU's `return-path` on (fph-collector migrate needs it), so *total time* "
        "and *downtime*, from the source's query-migrate, end when the destination has loaded the last byte.",
        "",
        table(sums),
        "",
    ]
    if png_name:
        lines += [f"![comparison chart]({png_name})", ""]
    lines += ["## Scenarios", ""]
    for s in sums:
        sc = SCENARIOS[s.scenario]
        lines.append(f"* **{sc.label}**: {sc.note}; kernel args `{' '.join(sc.kernel_args) or '-'}`, "
                     f"balloon `{sc.balloon}`.")
    lines += ["", "## Per run", "",
              "| scenario | run | wire MiB | QEMU MiB | normal | zero | syncs | total ms | down ms | wall s "
              "| guest CPU % | ok | problems |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        probs = "; ".join(p.replace("|", "/").replace("\n", " ")[:160] for p in r.problems)
        lines.append(
            f"| {r.scenario} | {r.run} | {r.wire_bytes / MiB:.1f} | {r.qemu_transferred / MiB:.1f} | {r.normal_pages} "
            f"| {r.duplicate_pages} | {r.dirty_sync_count} | {r.total_time_ms} | {r.downtime_ms} | {r.wall_s:.2f} "
            f"| {r.guest_cpu_share * 100:.0f} | {'yes' if r.ok else 'NO'} | {probs} |")
    if goal.get("evaluated"):
        lines += ["", "## Goals (medians)", ""]
        lines += [f"* {k}: **{'met' if v else 'NOT met'}**" for k, v in goal["checks"].items()]
        lines.append(f"* fphint wire bytes / other scenario: {goal['wire_ratio_to']}")
        lines.append(f"* fphint total time / other scenario: {goal['time_ratio_to']}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--scenarios", default=",".join(ORDER), help=f"comma-separated, from {', '.join(ORDER)}")
    ap.add_argument("--fill-mib", type=int, default=Workload.fill_mib)
    ap.add_argument("--link-mbit", type=float, default=GIGABIT / 1e6)
    ap.add_argument("--md", type=Path, help="Markdown output (default docs/comparison.md if all scenarios run)")
    ap.add_argument("--png", type=Path, help="chart (default docs/comparison.png if all scenarios run)")
    ap.add_argument("--raw", type=Path, help="every run as JSON")
    ap.add_argument("--keep", action="store_true", help="keep the VM run directory (logs)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or args.runs < 1:
        ap.error(f"unknown scenarios {unknown}" if unknown else "--runs must be at least 1")
    full = set(REQUIRED) <= set(names)
    md_path = args.md or (ROOT / "docs/comparison.md" if full else None)
    png_path = args.png or (ROOT / "docs/comparison.png" if full else None)
    workload = Workload(fill_mib=args.fill_mib)
    binary = default_binary()
    meta: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "qemu": qemu_version(binary), "qemu_binary": binary,
        "guest_mib": 1024, "link_mbit": args.link_mbit, "runs": args.runs, "fill_mib": args.fill_mib,
        "workload": " ".join(workload.churn_args()),
    }
    results: list[RunResult] = []
    sums: dict[str, Summary] = {}
    started = time.monotonic()

    def show(r: RunResult) -> None:
        print(f"{r.scenario:<18} run {r.run}: wire {r.wire_bytes / MiB:7.1f} MiB, total {r.total_time_ms:6d} ms, "
              f"down {r.downtime_ms:5d} ms, syncs {r.dirty_sync_count}, guest CPU {r.guest_cpu_share * 100:3.0f}%, "
              f"{'ok' if r.ok else 'PROBLEMS: ' + '; '.join(r.problems)[:400]}", flush=True)

    with vm_session("bench-comparison", keep=args.keep) as factory:
        for name in [n for n in ORDER if n in names]:
            scenario: Scenario = SCENARIOS[name]
            migrator: Migrator = fphint_migrator(factory) if scenario.fphint else PlainMigrator()
            guest_fields = getattr(migrator, "guest_fields", None)
            rs = run_chain(factory, scenario, args.runs, migrator, workload=workload,
                           link_rate_bps=args.link_mbit * 1e6, guest_fields=guest_fields, on_result=show)
            results += rs
            sums[name] = summarize(scenario, rs)
            close = getattr(migrator, "close", None)
            if close:
                close()
    meta["seconds"] = round(time.monotonic() - started)
    ordered = [sums[n] for n in ORDER if n in sums]
    print()
    print(table(ordered))
    goal = goals(sums)
    if args.raw:
        args.raw.write_text(json.dumps({"meta": meta, "runs": [r.as_dict() for r in results]}, indent=1))
    if png_path:
        chart(ordered, png_path, f"1 GiB guest, {args.link_mbit:.0f} Mbit/s link, QEMU {meta['qemu']}, "
                                 f"{args.runs} runs per scenario")
    if md_path:
        md_path.write_text(markdown(ordered, results, meta, goal, png_path.name if png_path else None))
    summary = {
        "meta": meta,
        "scenarios": {s.scenario: {
            "runs": s.runs, "completed": s.completed, "survived": s.survived, "corrupted": s.corrupt,
            "wire_mib": {"median": round(s.wire_bytes.median / MiB, 1), "min": round(s.wire_bytes.low / MiB, 1),
                         "max": round(s.wire_bytes.high / MiB, 1)},
            "total_time_ms": {"median": s.total_time_ms.median, "min": s.total_time_ms.low,
                              "max": s.total_time_ms.high},
            "downtime_ms": {"median": s.downtime_ms.median, "min": s.downtime_ms.low, "max": s.downtime_ms.high},
            "guest_cpu_share": {"median": s.guest_cpu_share.median, "min": s.guest_cpu_share.low,
                                "max": s.guest_cpu_share.high},
            "dirty_syncs_median": s.dirty_sync_count.median,
        } for s in ordered},
        "goals": goal,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
