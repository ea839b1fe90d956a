#!/usr/bin/env python3
"""Sums the reliability records of test and benchmark runs for docs/reliability.md.

Reads any mix of junit XML files (pytest --junitxml: the ``fphint_migration``
properties) and text files ($FPHINT_TALLY files, saved pytest -s output,
bench/faults.py's stderr: lines ``fphint-migration {...}`` / ``fphint-fault
{...}``), and prints one JSON object: migrations checked under churn, how
many with a page-by-page RAM comparison, corrupted pages, bytes the workload
verified, and faults injected and survived per kind and phase. Give each
run once (its $FPHINT_TALLY file *or* its junit XML): the same record in both
would be counted twice. With ``--markdown`` it prints instead the tables of
docs/reliability.md (faults survived/injected by kind x phase, migrations by
test module).

    FPHINT_TALLY=/tmp/tally.jsonl make test
    .venv/bin/python scripts/reliability_tally.py [--markdown] /tmp/tally.jsonl
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from fphint_lab.faults import Kind, Phase
from fphint_lab.vm import tally


def records(path: Path) -> dict[str, list[dict[str, Any]]]:
    text = path.read_text(errors="replace")
    if text.lstrip().startswith("<"):
        found: dict[str, list[dict[str, Any]]] = {tally.MIGRATION: [], tally.FAULT: []}
        for prop in ET.fromstring(text).iter("property"):
            if prop.get("name") == "fphint_migration":
                found[tally.MIGRATION].append(json.loads(prop.get("value") or "{}"))
        return found
    return tally.parse(text.splitlines())


def markdown(migrations: list[dict[str, Any]], faults: list[dict[str, Any]]) -> str:
    """docs/reliability.md's tables: survived/injected per kind and phase; migrations per module."""
    kinds = [k.value for k in Kind]
    phases = [p.value for p in Phase]
    cell: dict[tuple[str, str], list[int]] = {}
    for f in faults:
        slot = cell.setdefault((str(f.get("kind")), str(f.get("aimed"))), [0, 0])
        slot[0] += int(bool(f.get("survived")))
        slot[1] += 1
    lines = ["| fault \\ phase | " + " | ".join(phases) + " | total |", "|---" * (len(phases) + 2) + "|"]
    for k in kinds:
        row = [f"{cell[(k, p)][0]}/{cell[(k, p)][1]}" if (k, p) in cell else "–" for p in phases]
        done = sum(cell.get((k, p), [0, 0])[0] for p in phases)
        total = sum(cell.get((k, p), [0, 0])[1] for p in phases)
        lines.append(f"| {k} | " + " | ".join(row) + f" | {done}/{total} |")
    lines += [
        "",
        "| test module | migrations checked | RAM compared page by page | corrupted pages |",
        "|---|---|---|---|",
    ]
    per: dict[str, list[int]] = {}
    for m in migrations:
        module = str(m.get("test", "?")).split("::")[0]
        slot = per.setdefault(module, [0, 0, 0])
        slot[0] += 1
        slot[1] += int(bool(m.get("ram_compared")))
        slot[2] += int(m.get("corrupted_pages", 0))
    for module, (n, compared, bad) in sorted(per.items()):
        lines.append(f"| {module} | {n} | {compared} | {bad} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    as_markdown = "--markdown" in argv
    argv = [a for a in argv if a != "--markdown"]
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    migrations: list[dict[str, Any]] = []
    faults: list[dict[str, Any]] = []
    for name in argv:
        found = records(Path(name))
        migrations += found[tally.MIGRATION]
        faults += found[tally.FAULT]
    if as_markdown:
        print(markdown(migrations, faults))
        return 0
    per: dict[str, dict[str, int]] = {}
    for f in faults:
        key = f"{f.get('kind')}@{f.get('aimed')}"
        slot = per.setdefault(key, {"injected": 0, "survived": 0})
        slot["injected"] += 1
        slot["survived"] += int(bool(f.get("survived")))
    print(
        json.dumps(
            {
                "migrations_checked": len(migrations),
                "ram_compared": sum(bool(m.get("ram_compared")) for m in migrations),
                "workload_ok": sum(bool(m.get("workload_ok")) for m in migrations),
                "corrupted_pages": sum(int(m.get("corrupted_pages", 0)) for m in migrations),
                "verified_mib": round(sum(int(m.get("verified_bytes", 0)) for m in migrations) / (1 << 20)),
                "faults_injected": len(faults),
                "faults_survived": sum(bool(f.get("survived")) for f in faults),
                "per_case": dict(sorted(per.items())),
            },
            sort_keys=True,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
