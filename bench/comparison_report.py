"""The migration comparison's outputs, all rendered from one JSON document:
docs/comparison.json (the document), docs/comparison.md, docs/comparison.png.

bench/migration_comparison.py builds the document from its runs
(:func:`document`); the Markdown and the chart read nothing else, so a dry
run (synthetic runs) exercises exactly what a real campaign writes.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fphint_lab.vm.scenarios import SCENARIOS, RunResult

MiB = 1 << 20
SCHEMA = 1
#: The full campaign (issue 13).
REGENERATE = "sudo .venv/bin/python bench/migration_comparison.py --runs 3 --sizes 1,4,8 --busy"

#: Published figures the 8 GiB setup reproduces (a guest that filled ~6 GiB
#: and freed it, migrated plainly and with free pages skipped).
ANCHORS: dict[str, Any] = {
    "guest_gib": 8,
    "filled_gib": 6,
    "plain": {"wire_gb": 8.1, "total_s": 7.4},
    "free_pages_skipped": {"wire_gb": 0.36, "total_s": 0.55},
}


def _stats(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 1), "min": round(min(values), 1), "max": round(max(values), 1)}


def run_record(r: RunResult) -> dict[str, Any]:
    """One migration, as the document keeps it (the collector's coverage
    block passed through when its report has one)."""
    rec: dict[str, Any] = {
        "run": r.run,
        "ok": r.ok,
        "survived": r.survived,
        "corrupted": any("verification failed" in p for p in r.problems),
        "completed": bool(r.qemu_transferred),
        "wire_mib": round(r.wire_bytes / MiB, 1),
        "qemu_mib": round(r.qemu_transferred / MiB, 1),
        "total_ms": r.total_time_ms,
        "downtime_ms": r.downtime_ms,
        "wall_s": r.wall_s,
        "syncs": r.dirty_sync_count,
        "normal_pages": r.normal_pages,
        "zero_pages": r.duplicate_pages,
        "guest_cpu_share": r.guest_cpu_share,
        "guest_used_mib": r.guest_used_mib,
        "agent_source": r.agent_source,
        "problems": r.problems,
    }
    report = r.report or {}
    for key in ("coverage", "timing"):  # the collector's own blocks, as it reported them
        if key in report:
            rec[key] = report[key]
    for key in ("pages_rewritten", "hint_pages"):
        if key in report:
            rec[key] = report[key]
    return rec


def scenario_record(name: str, results: Sequence[RunResult]) -> dict[str, Any]:
    """Per-run records and medians (over completed migrations) of one scenario."""
    sc = SCENARIOS[name]
    runs = [run_record(r) for r in results]
    done = [r for r in runs if r["completed"]]
    out: dict[str, Any] = {
        "name": name,
        "label": sc.label,
        "note": sc.note,
        "kernel_args": list(sc.kernel_args),
        "balloon": sc.balloon,
        "runs": runs,
        "completed": len(done),
        "survived": sum(r["survived"] for r in runs),
        "corrupted": sum(r["corrupted"] for r in runs),
    }
    for key in ("wire_mib", "total_ms", "downtime_ms", "guest_cpu_share", "syncs"):
        out[key] = _stats([float(r[key]) for r in done if key != "guest_cpu_share" or r["survived"]])
    return out


def goals(scenarios: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The issue's goals on one group's medians: fphint's wire bytes at most
    1.05x init_on_free's and below balloon hinting (both init_on_alloc) and
    free-page reporting; its downtime at most plain's; its total time below
    every peer; no corruption and no crash anywhere."""
    f = scenarios.get("fphint")
    if f is None or not f["completed"]:
        return {"evaluated": False}

    def med(s: Mapping[str, Any], key: str) -> float | None:
        v = s.get(key)
        return float(v["median"]) if v and s["completed"] and v["median"] else None

    def ratios(key: str) -> dict[str, float]:
        fv = med(f, key)
        out = {}
        for name, s in scenarios.items():
            other = med(s, key)
            if name != "fphint" and fv is not None and other:
                out[name] = round(fv / other, 3)
        return out

    wire, time_, down = ratios("wire_mib"), ratios("total_ms"), ratios("downtime_ms")
    peers = [n for n in time_ if not n.startswith("fphint")]
    balloons = [n for n in ("balloon_hint", "balloon_hint_ioa0", "balloon_report") if n in wire]
    checks = {
        "wire_within_1.05x_init_on_free": wire["init_on_free"] <= 1.05 if "init_on_free" in wire else None,
        "wire_below_balloon_and_reporting": all(wire[n] < 1 for n in balloons) if balloons else None,
        "downtime_at_most_plain": down["plain"] <= 1 if "plain" in down else None,
        "time_below_every_peer": all(time_[n] < 1 for n in peers) if peers else None,
        "no_corruption": all(s["corrupted"] == 0 for s in scenarios.values()),
        "no_crash": all(s["survived"] == len(s["runs"]) for s in scenarios.values()),
    }
    return {
        "evaluated": True,
        "checks": checks,
        "wire_ratio_to": wire,
        "time_ratio_to": time_,
        "downtime_ratio_to": down,
    }


def group_record(group: Mapping[str, Any], results: Mapping[str, Sequence[RunResult]]) -> dict[str, Any]:
    scenarios = {name: scenario_record(name, rs) for name, rs in results.items()}
    return {**group, "scenarios": list(scenarios.values()), "goals": goals(scenarios)}


def document(meta: Mapping[str, Any], groups: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {"schema": SCHEMA, **meta, "anchors": ANCHORS, "groups": list(groups)}


# Section: Markdown


def _cell(stats: Mapping[str, float] | None, digits: int = 0, scale: float = 1.0) -> str:
    if not stats:
        return "-"
    m, lo, hi = (round(stats[k] / scale, digits) for k in ("median", "min", "max"))
    f = f"{{:.{digits}f}}"
    return f.format(m) if lo == hi else f"{f.format(m)} ({f.format(lo)}–{f.format(hi)})"


def group_table(g: Mapping[str, Any]) -> str:
    rows = [
        "| scenario | runs | wire MiB | total time ms | downtime ms | guest CPU busy % | syncs | survived "
        "| corrupted |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in g["scenarios"]:
        rows.append(
            f"| {s['label']} | {s['completed']}/{len(s['runs'])} | {_cell(s['wire_mib'], 1)} "
            f"| {_cell(s['total_ms'])} | {_cell(s['downtime_ms'])} | {_cell(s['guest_cpu_share'], 0, 0.01)} "
            f"| {_cell(s['syncs'])} | {s['survived']}/{len(s['runs'])} | {s['corrupted']} |"
        )
    return "\n".join(rows)


def _anchor_lines(g: Mapping[str, Any]) -> list[str]:
    if g["guest_mib"] != ANCHORS["guest_gib"] * 1024:
        return []
    a = ANCHORS
    by = {s["name"]: s for s in g["scenarios"]}
    lines = [
        f"Published anchor for this setup ({a['guest_gib']} GiB guest that filled ~{a['filled_gib']} GiB and "
        f"freed it): plain {a['plain']['wire_gb']} GB in {a['plain']['total_s']} s, free pages skipped "
        f"{a['free_pages_skipped']['wire_gb']} GB in {a['free_pages_skipped']['total_s']} s. Here:"
    ]
    for name in ("plain", "fphint", "init_on_free", "balloon_report"):
        s = by.get(name)
        if s and s["wire_mib"] and s["total_ms"]:
            lines.append(
                f"{s['label']} {s['wire_mib']['median'] * MiB / 1e9:.2f} GB in {s['total_ms']['median'] / 1000:.2f} s;"
            )
    return [" ".join(lines), ""]


#: The destination's RAM (migration_comparison.py --destination-ram): what each choice means.
DESTINATION_RAM = {
    "anon": "anonymous (memory-backend-ram)",
    "shm": "a shared tmpfs file (memory-backend-file in /dev/shm, share=on)",
}


def destination_ram(doc: Mapping[str, Any]) -> str:
    """How the destination held its RAM (documents before the option: the lab's shared file)."""
    ram = doc.get("destination_ram") or {"how": DESTINATION_RAM["shm"]}
    return f"destination RAM {ram['how']}"


def markdown(doc: Mapping[str, Any], png_name: str | None) -> str:
    acc = doc["accelerator"]
    lines = ["# Migration comparison: fphint against QEMU's own ways to skip free memory", ""]
    if doc.get("dry_run"):
        lines += ["**DRY RUN: synthetic numbers, no guest was booted** (bench/migration_comparison.py --dry-run).", ""]
    lines += [
        f"Generated by `bench/migration_comparison.py` on {doc['date']} ({doc['command']}): QEMU "
        f"{doc['qemu']['version']}, accelerator **{acc['label']}** ({acc['how']}: {acc['reason']}), 1 vCPU; link "
        f"{doc['link']['mbit']:.0f} Mbit/s through a rate-limited relay in front of the destination; QEMU's "
        f"bandwidth limit off; {destination_ram(doc)}. {doc['runs_per_scenario']} runs per scenario, chained on one boot where the guest "
        "survived. Cells: median (min–max). The same figures, per run, with the collector's coverage block where "
        "its report has one: [comparison.json](comparison.json).",
        "",
        "*Wire MiB* is counted in the relay (source → destination); *guest CPU* is the guest's busy share of its "
        "one vCPU from its /proc/stat over the migration; *survived*: the destination guest ran the same boot with "
        "a clean kernel log; *corrupted*: the workload found bytes that were not what it wrote. Every scenario "
        "migrates with QEMU's `return-path` on (fph-collector migrate needs it), so *total time* and *downtime*, "
        "from the source's query-migrate, end when the destination has loaded the last byte.",
        "",
        f"Regenerate: `{REGENERATE}` as root (`--plan` prints the campaign and its estimated time first; every "
        'option in docs/e2e.md, "The benchmark and the demo"). The accelerator is chosen by vmimage.accel (KVM '
        "where a probe guest runs on it, else TCG; `--accel` or `$FPH_ACCEL` force one).",
        "",
    ]
    if png_name:
        lines += [f"![comparison chart]({png_name})", ""]
    for g in doc["groups"]:
        lines += [
            f"## {g['title']}",
            "",
            f"Workload before each migration: {g['workload_desc']}.",
            "",
            group_table(g),
            "",
        ]
        lines += _anchor_lines(g)
        goal = g["goals"]
        if goal.get("evaluated"):
            lines += [
                "Goals (medians): "
                + "; ".join(
                    f"{k} **{'met' if v else ('n/a' if v is None else 'NOT met')}**" for k, v in goal["checks"].items()
                )
                + ".",
                "",
                f"fphint / other, wire bytes: {goal['wire_ratio_to']}; total time: "
                f"{goal['time_ratio_to']}; downtime: {goal['downtime_ratio_to']}.",
                "",
            ]
    lines += ["## Scenarios", ""]
    seen: set[str] = set()
    for g in doc["groups"]:
        for s in g["scenarios"]:
            if s["name"] not in seen:
                seen.add(s["name"])
                lines.append(
                    f"* **{s['label']}**: {s['note']}; kernel args `{' '.join(s['kernel_args']) or '-'}`, "
                    f"balloon `{s['balloon']}`."
                )
    lines += [
        "",
        "## Per run",
        "",
        "| group | scenario | run | wire MiB | QEMU MiB | normal | zero | syncs | total ms | down ms | wall s "
        "| guest CPU % | ok | problems |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for g in doc["groups"]:
        for s in g["scenarios"]:
            for r in s["runs"]:
                probs = "; ".join(p.replace("|", "/").replace("\n", " ")[:160] for p in r["problems"])
                lines.append(
                    f"| {g['key']} | {s['name']} | {r['run']} | {r['wire_mib']:.1f} | {r['qemu_mib']:.1f} "
                    f"| {r['normal_pages']} | {r['zero_pages']} | {r['syncs']} | {r['total_ms']} "
                    f"| {r['downtime_ms']} | {r['wall_s']:.2f} | {r['guest_cpu_share'] * 100:.0f} "
                    f"| {'yes' if r['ok'] else 'NO'} | {probs} |"
                )
    return "\n".join(lines) + "\n"


# Section: the chart


def chart(doc: Mapping[str, Any], path: Path) -> None:
    """One row of panels (wire, total time, downtime) per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = doc["groups"]
    fig, axes = plt.subplots(len(groups), 3, figsize=(15, 4.6 * len(groups)), squeeze=False)
    panels = (
        ("bytes on the wire", "wire_mib", "MiB"),
        ("total migration time", "total_ms", "ms"),
        ("downtime", "downtime_ms", "ms"),
    )
    for row, g in zip(axes, groups):
        ss = g["scenarios"]
        labels = [s["label"].replace(", ", ",\n") for s in ss]
        for ax, (what, key, unit) in zip(row, panels):
            st = [s[key] or {"median": 0.0, "min": 0.0, "max": 0.0} for s in ss]
            med = [x["median"] for x in st]
            err = [[max(0.0, x["median"] - x["min"]) for x in st], [max(0.0, x["max"] - x["median"]) for x in st]]
            colors = [
                "#d62728"
                if s["survived"] < len(s["runs"]) or s["corrupted"]
                else ("#2ca02c" if s["name"].startswith("fphint") else "#4c72b0")
                for s in ss
            ]
            ax.bar(range(len(ss)), med, yerr=err, capsize=4, color=colors)
            ax.set_xticks(range(len(ss)), labels, rotation=35, ha="right", fontsize=8)
            ax.set_title(f"{g['title']}: {what} ({unit})", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
    acc = doc["accelerator"]["label"]
    fig.suptitle(
        f"QEMU {doc['qemu']['version']}, {acc}, {doc['link']['mbit']:.0f} Mbit/s link, "
        f"{doc['runs_per_scenario']} runs per scenario (median, min-max)"
        + (" - DRY RUN, synthetic" if doc.get("dry_run") else "")
        + "\nred: a guest crashed or its memory was corrupted in some run",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
