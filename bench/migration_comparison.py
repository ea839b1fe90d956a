#!/usr/bin/env python3
"""Live migration of a churning guest over one emulated 1 Gbit/s link:
plain QEMU, init_on_free=1, QEMU's virtio-balloon free-page hinting (default
init_on_alloc and init_on_alloc=0), free-page reporting, and fphint; at one or
more guest sizes, and optionally under the busy-guest workload.

Every scenario crosses the same rate-limited relay (fphint_lab/linkrelay.py) in
front of the destination, where the bytes on the wire are counted; QEMU's own
bandwidth limit is off. Before each migration the guest fills and frees memory
(garbage in free memory: 512 MiB of a 1 GiB guest, 3/4 of larger ones, so an
8 GiB guest fills 6 GiB as in the published setup) and runs a light
allocate/write/verify/free loop that keeps going during the migration, or with
--busy the busy guest (fphint_lab/guest/busy.py: its vCPU saturated by
anonymous and tmpfs memory churn, page-cache drops and forks). After each
migration the destination guest must still run the same boot with a clean
kernel log, and the workload must verify every byte it wrote.

A *group* is one guest size and workload; each scenario of a group boots one
guest and migrates it --runs times in a chain (a failed or crashed run costs
a fresh boot). Sizes of 8 GiB and more run only --big-scenarios. Before a
pair is booted the host must hold both RAMs and the QEMUs: the campaign
refuses at the start when a size cannot fit. Destinations run on anonymous
RAM, as deployments do (--destination-ram shm: the lab's tmpfs file, where
every ZERO record costs the destination a page allocation and the downtime
of every zero-heavy scenario grows; the first guest of a chain keeps its
RAM file either way).

Writes docs/comparison.json (accelerator, QEMU, link, per group and scenario
every run and the medians, with the collector's coverage block where its
report has one), docs/comparison.md and docs/comparison.png when the
campaign covers every required scenario at 1 GiB (else --out DIR, or --json/
--md/--png), and prints one JSON object on its last line. --plan prints the
campaign and its estimated time; --dry-run runs it with synthetic numbers and
no guest (to check the outputs).

Needs root (VMs) and matplotlib for the chart.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import comparison_report as report

from fphint_lab.linkrelay import GIGABIT
from fphint_lab.vm.fphint_daemon import FphintMigrator
from fphint_lab.vm.scenarios import (
    SCENARIOS,
    MiB,
    Migrator,
    PlainMigrator,
    RunResult,
    Workload,
    meminfo_mib,
    pair_fits,
    run_chain,
    vm_session,
)
from vmimage.accel import MODES, Accel, AccelError
from vmimage.qemu import default_binary, qemu_version

ROOT = Path(__file__).resolve().parent.parent
LOG = logging.getLogger("bench.migration_comparison")
ORDER = ("plain", "init_on_free", "balloon_hint", "balloon_hint_ioa0", "balloon_report", "fphint", "fphint_kpageflags")
#: The scenarios the issue's table needs (the kpageflags variant is extra).
REQUIRED = ORDER[:6]
#: Opt-in rows (issue 13 item 5), never in the default campaign: clean page
#: cache dropped before the migration, fphint against init_on_free.
OPT_IN = ("init_on_free_reclaim", "fphint_reclaim")
#: Sizes from this many GiB on run only the big scenarios by default.
BIG_GIB = 8
BIG_SCENARIOS = ("plain", "init_on_free", "balloon_report", "fphint")


@dataclass(frozen=True)
class Group:
    """One guest size and workload, and the scenarios run at it."""

    guest_mib: int
    workload: Workload
    scenarios: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.guest_mib // 1024}gib-{self.workload.name}"

    @property
    def title(self) -> str:
        what = "busy guest" if self.workload.busy else "churn workload"
        return f"{self.guest_mib // 1024} GiB guest, {what}"

    def record(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "guest_mib": self.guest_mib,
            "workload": self.workload.name,
            "fill_mib": self.workload.fill_mib,
            "workload_desc": self.workload.describe(),
        }


def default_fill(guest_mib: int) -> int:
    """Garbage left in free memory: half of a 1 GiB guest (the agent and the
    churn need the rest), 3/4 of larger ones (8 GiB: 6 GiB, the published setup)."""
    return 512 if guest_mib <= 1024 else guest_mib * 3 // 4


def campaign(
    sizes: Sequence[int], names: Sequence[str], big: Sequence[str], *, fill_mib: int | None, busy: bool, busy_only: bool
) -> list[Group]:
    groups = []
    if not busy_only:
        for gib in sizes:
            chosen = tuple(n for n in names if gib < BIG_GIB or n in big)
            if chosen:
                groups.append(Group(gib * 1024, Workload(fill_mib=fill_mib or default_fill(gib * 1024)), chosen))
    if busy or busy_only:
        groups.append(Group(1024, Workload(fill_mib=fill_mib or default_fill(1024), busy=True), tuple(names)))
    return groups


# Section: the plan


def estimate_chain_s(group: Group, scenario: str, runs: int, link_mbit: float, kvm: bool) -> float:
    """Rough seconds for one chain, calibrated on the 2-core host under TCG
    (one run: 1 GiB plain 1.4 min, fphint 3.1, busy plain 3.0, busy fphint
    4.5; 4 GiB plain 2.7): a boot ~25 s, the agent's first attach ~110 s
    (its BPF loader), a fill+verify ~30 MiB/s, the busy workload's start and
    check ~100 s."""
    gib = group.guest_mib / 1024
    w = group.workload
    fill_rate = 400.0 if kvm else 30.0
    boot = 25 + 2 * gib + (0 if kvm else 5 * gib if scenario == "init_on_free" else 0)
    if SCENARIOS[scenario].fphint:
        boot += 15 if kvm else 110
    sent = w.fill_mib + 250 if scenario == "plain" else 0.4 * w.fill_mib + 250
    per_run = (
        w.fill_mib / fill_rate
        + w.settle_s
        + (30 if w.busy else 3)
        + sent / (link_mbit / 8) * 1.3
        + 4
        + (70 if w.busy else 10)
        + 5
    )
    return boot + runs * per_run


def plan_lines(
    groups: Sequence[Group], runs: int, link_mbit: float, kvm: bool, shared_destination_ram: bool = False
) -> tuple[list[str], float]:
    lines, total = [], 0.0
    for g in groups:
        secs = [estimate_chain_s(g, n, runs, link_mbit, kvm) for n in g.scenarios]
        total += sum(secs)
        fits = pair_fits(g.guest_mib, shared_destination_ram=shared_destination_ram)
        lines.append(
            f"{g.title}: {len(g.scenarios)} scenarios x {runs} runs, {g.workload.describe()}; "
            f"~{sum(secs) / 60:.0f} min" + (f"  [CANNOT RUN HERE NOW: {fits}]" if fits else "")
        )
        lines += [f"    {n:<18} ~{s / 60:4.1f} min" for n, s in zip(g.scenarios, secs)]
    return lines, total


# Section: running


class Progress:
    """One line per chain with the elapsed time and the estimate left."""

    def __init__(self, chains: list[tuple[Group, str, float]]) -> None:
        self.chains = chains
        self.started = time.monotonic()
        self.done_s = 0.0
        self.index = 0

    def begin(self, group: Group, scenario: str) -> None:
        est = next(s for g, n, s in self.chains if g == group and n == scenario)
        left = sum(s for _, _, s in self.chains[self.index :])
        elapsed = time.monotonic() - self.started
        self.index += 1
        print(
            f"[{self.index}/{len(self.chains)}] {group.title}, {scenario}: ~{est / 60:.1f} min "
            f"(elapsed {elapsed / 60:.1f} min, ~{left / 60:.0f} min left)",
            flush=True,
        )


def show(r: RunResult) -> None:
    print(
        f"    {r.scenario:<18} run {r.run}: wire {r.wire_bytes / MiB:7.1f} MiB, total {r.total_time_ms:6d} ms, "
        f"down {r.downtime_ms:5d} ms, syncs {r.dirty_sync_count}, guest CPU {r.guest_cpu_share * 100:3.0f}%, "
        f"{'ok' if r.ok else 'PROBLEMS: ' + '; '.join(r.problems)[:400]}",
        flush=True,
    )


ChainRunner = Callable[[Group, str], list[RunResult]]


def real_runner(factory: Any, runs: int, link_mbit: float) -> ChainRunner:
    def run(group: Group, name: str) -> list[RunResult]:
        scenario = SCENARIOS[name]
        migrator: Migrator = FphintMigrator(factory) if scenario.fphint else PlainMigrator()
        try:
            return run_chain(
                factory,
                scenario,
                runs,
                migrator,
                workload=group.workload,
                link_rate_bps=link_mbit * 1e6,
                guest_fields=getattr(migrator, "guest_fields", None),
                on_result=show,
                mem_mib=group.guest_mib,
                label=f"{group.key}-{name}",
                after_boot=getattr(migrator, "wait_ready", None),
            )
        finally:
            close = getattr(migrator, "close", None)
            if close:
                close()

    return run


def dry_runner(runs: int, qemu: str, accel: Accel) -> ChainRunner:
    """Synthetic runs (no guest): plausible, deterministic numbers, so the
    outputs can be checked without booting anything."""
    share = {
        "plain": 1.0,
        "init_on_free": 0.25,
        "balloon_hint": 0.4,
        "balloon_hint_ioa0": 0.35,
        "balloon_report": 0.3,
        "fphint": 0.32,
        "fphint_kpageflags": 0.33,
        "init_on_free_reclaim": 0.2,
        "fphint_reclaim": 0.25,
    }

    def run(group: Group, name: str) -> list[RunResult]:
        out = []
        for i in range(runs):
            wire = int((group.workload.fill_mib * share[name] + 200 + 3 * i) * MiB)
            r = RunResult(
                name,
                i,
                qemu,
                accel=accel.label,
                guest_mib=group.guest_mib,
                workload=group.workload.name,
                ok=True,
                survived=True,
                wire_bytes=wire,
                qemu_transferred=wire,
                normal_pages=wire // 4096,
                dirty_sync_count=4,
                total_time_ms=int(wire / MiB * 8.4),
                downtime_ms=300 + 10 * i,
                wall_s=wire / MiB * 0.0085,
                guest_cpu_share=0.6,
                churn_iterations=10,
            )
            if SCENARIOS[name].fphint:
                r.report = {
                    "coverage": {
                        "synthetic": True,
                        "epochs": [
                            {"epoch": 1, "reported_free_pages": 100000, "sent_after_report": 90000, "rewritten": 88000}
                        ],
                    }
                }
            show(r)
            out.append(r)
        return out

    return run


def run_campaign(groups: Sequence[Group], runner: ChainRunner, progress: Progress) -> list[dict[str, Any]]:
    out = []
    for g in groups:
        results: dict[str, list[RunResult]] = {}
        for name in g.scenarios:
            progress.begin(g, name)
            results[name] = runner(g, name)
        out.append(report.group_record(g.record(), results))
    return out


# Section: outputs


def summary_line(doc: dict[str, Any], written: dict[str, str]) -> dict[str, Any]:
    """The last line: medians and goals per group, where the files went."""
    return {
        "accelerator": doc["accelerator"]["label"],
        "qemu": doc["qemu"]["version"],
        "dry_run": doc["dry_run"],
        "seconds": doc["seconds"],
        "written": written,
        "groups": {
            g["key"]: {
                "scenarios": {
                    s["name"]: {
                        "completed": s["completed"],
                        "survived": s["survived"],
                        "corrupted": s["corrupted"],
                        **{k: (s[k] or {}).get("median") for k in ("wire_mib", "total_ms", "downtime_ms")},
                    }
                    for s in g["scenarios"]
                },
                "goals": g["goals"].get("checks", {}),
            }
            for g in doc["groups"]
        },
    }


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes wants GiB as integers, e.g. 1,4,8: {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--sizes wants positive GiB, e.g. 1,4,8: {text!r}")
    return sizes


def names_of(text: str, what: str, ap: argparse.ArgumentParser) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown {what} {unknown}; known: {', '.join(ORDER + OPT_IN)}")
    return [n for n in ORDER + OPT_IN if n in names]


def make_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="migrations per scenario and group (default 3)")
    ap.add_argument("--sizes", type=parse_sizes, default=[1], help="guest sizes in GiB, e.g. 1,4,8 (default 1)")
    ap.add_argument(
        "--scenarios",
        default=",".join(ORDER),
        help=f"comma-separated, from {', '.join(ORDER)} (default: all of these), and the opt-in {', '.join(OPT_IN)}",
    )
    ap.add_argument(
        "--big-scenarios",
        default=",".join(BIG_SCENARIOS),
        help=f"the scenarios run at {BIG_GIB} GiB and more (default {','.join(BIG_SCENARIOS)})",
    )
    ap.add_argument("--busy", action="store_true", help="also run every scenario under the busy guest at 1 GiB")
    ap.add_argument("--busy-only", action="store_true", help="only the busy-guest group")
    ap.add_argument(
        "--fill-mib",
        type=int,
        help="garbage per migration at every size (default: 512 MiB at 1 GiB, 3/4 of the guest above)",
    )
    ap.add_argument("--link-mbit", type=float, default=GIGABIT / 1e6)
    ap.add_argument(
        "--destination-ram",
        choices=report.DESTINATION_RAM,
        default="anon",
        help="the destination's RAM: anon (memory-backend-ram, as deployments run; default) or shm (the lab's "
        "shared tmpfs file, where each ZERO record costs a page allocation)",
    )
    ap.add_argument("--accel", choices=MODES, help="kvm, tcg or auto (default: $FPH_ACCEL, else auto)")
    ap.add_argument("--out", type=Path, help="write comparison.json/.md/.png into this directory")
    ap.add_argument("--json", type=Path, help="the JSON document (default docs/comparison.json on a full run)")
    ap.add_argument("--md", type=Path, help="Markdown (default docs/comparison.md on a full run)")
    ap.add_argument("--png", type=Path, help="chart (default docs/comparison.png on a full run)")
    ap.add_argument("--plan", action="store_true", help="print the campaign and its estimated time, run nothing")
    ap.add_argument("--dry-run", action="store_true", help="synthetic runs, no guest: checks the outputs")
    ap.add_argument("--keep", action="store_true", help="keep the VM run directory (logs)")
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def output_paths(args: argparse.Namespace, groups: Sequence[Group]) -> dict[str, Path]:
    """Where the document, Markdown and chart go (none: only the last line)."""
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        base = {k: args.out / f"comparison.{k}" for k in ("json", "md", "png")}
    elif not args.dry_run and any(
        g.guest_mib == 1024 and not g.workload.busy and set(REQUIRED) <= set(g.scenarios) for g in groups
    ):
        base = {k: ROOT / "docs" / f"comparison.{k}" for k in ("json", "md", "png")}
    else:
        base = {}
    for k in ("json", "md", "png"):
        if getattr(args, k):
            base[k] = getattr(args, k)
    return base


def main(argv: list[str] | None = None) -> int:
    ap = make_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    names = names_of(args.scenarios, "scenarios", ap)
    big = names_of(args.big_scenarios, "big scenarios", ap)
    groups = campaign(args.sizes, names, big, fill_mib=args.fill_mib, busy=args.busy, busy_only=args.busy_only)
    if not groups:
        ap.error("nothing to run: no scenario is left for these sizes (see --big-scenarios)")
    kvm_guess = (args.accel or os.environ.get("FPH_ACCEL", "")) == "kvm"
    shared_dst = args.destination_ram == "shm"
    lines, total = plan_lines(groups, args.runs, args.link_mbit, kvm_guess, shared_dst)
    if args.plan:
        print(
            f"campaign: {len(groups)} group(s), {sum(len(g.scenarios) for g in groups)} chains, "
            f"{args.runs} run(s) each; estimated {total / 60:.0f} min under "
            f"{'KVM' if kvm_guess else 'TCG'} on a 2-core host"
        )
        print("\n".join(lines))
        return 0
    if not args.dry_run:
        if os.geteuid() != 0:
            print("migration_comparison.py: run as root (QEMU guests, the image build)", file=sys.stderr)
            return 2
        refused = [
            f"{g.title}: {why}" for g in groups if (why := pair_fits(g.guest_mib, shared_destination_ram=shared_dst))
        ]
        if refused:
            print(
                "migration_comparison.py: refusing, a guest pair cannot fit on this host now:\n  "
                + "\n  ".join(refused),
                file=sys.stderr,
            )
            return 2
    paths = output_paths(args, groups)
    print(f"campaign: {len(groups)} group(s), estimated {total / 60:.0f} min", flush=True)
    progress = Progress(
        [(g, n, estimate_chain_s(g, n, args.runs, args.link_mbit, kvm_guess)) for g in groups for n in g.scenarios]
    )
    binary = default_binary()
    started = time.monotonic()
    try:
        if args.dry_run:
            accel = Accel("tcg", None, "fixed", "dry run: no guest was started")
            groups_done = run_campaign(groups, dry_runner(args.runs, qemu_version(binary), accel), progress)
        else:
            with vm_session(
                "bench-comparison", keep=args.keep, accel=args.accel, shared_destination_ram=shared_dst
            ) as factory:
                accel = factory.accel
                print(f"accelerator: {accel.describe()}", flush=True)
                groups_done = run_campaign(groups, real_runner(factory, args.runs, args.link_mbit), progress)
    except AccelError as exc:
        print(f"migration_comparison.py: error: {exc}", file=sys.stderr)
        return 2
    meta = {
        "generated_by": "bench/migration_comparison.py",
        "date": datetime.date.today().isoformat(),
        "command": shlex.join(["bench/migration_comparison.py", *(argv if argv is not None else sys.argv[1:])]),
        "dry_run": bool(args.dry_run),
        "seconds": round(time.monotonic() - started),
        "accelerator": {**accel.as_dict(), "label": accel.label},
        "qemu": {"version": qemu_version(binary), "binary": binary},
        "link": {
            "mbit": args.link_mbit,
            "how": "rate-limited relay in front of the destination; QEMU's "
            "bandwidth limit off; avail-switchover-bandwidth set to the link's rate",
        },
        "destination_ram": {"kind": args.destination_ram, "how": report.DESTINATION_RAM[args.destination_ram]},
        "host": {"cpus": os.cpu_count(), "mem_mib": round(meminfo_mib().get("MemTotal", 0))},
        "runs_per_scenario": args.runs,
    }
    doc = report.document(meta, groups_done)
    for g in doc["groups"]:
        print(f"\n## {g['title']}\n{report.group_table(g)}")
    written: dict[str, str] = {}
    if "png" in paths:
        report.chart(doc, paths["png"])
        written["png"] = str(paths["png"])
    if "json" in paths:
        paths["json"].write_text(json.dumps(doc, indent=1) + "\n")
        written["json"] = str(paths["json"])
    if "md" in paths:
        png = paths.get("png")
        rel = os.path.relpath(png, paths["md"].parent) if png else None
        paths["md"].write_text(report.markdown(doc, rel))
        written["md"] = str(paths["md"])
    print(json.dumps(summary_line(doc, written)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
