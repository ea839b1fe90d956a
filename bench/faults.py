#!/usr/bin/env python3
"""The whole fault-injection matrix (fphint_lab/faults.py): every kind of
fault in every phase of a migration, each followed by a clean fphint
migration of the same guest, on one guest boot (rebooted only if a case
leaves it hurt). Root, QEMU 10; run it under the shared lock:

    flock /tmp/fphint-heavy.lock .venv/bin/python bench/faults.py [--cases daemon_killed@setup,...]

~25 cases, about 20 min. Each case's line goes to stderr as it ends; the
last line of stdout is one JSON object: per case (kind, phase aimed at and
observed, the source's outcome, where the guest ended, problems), totals per
kind and phase, and the migrations checked under churn with their corrupted
pages (the tally records, also appended to $FPHINT_TALLY when set).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from fphint_lab import faults
from fphint_lab.vm import tally
from fphint_lab.vm.fault_rig import FaultRig
from fphint_lab.vm.scenarios import vm_session


def parse_cases(text: str) -> list[tuple[faults.Kind, faults.Phase]]:
    if not text:
        return list(faults.CASES)
    out = []
    for item in text.split(","):
        kind, _, phase = item.strip().partition("@")
        case = (faults.Kind(kind), faults.Phase(phase))
        if case not in faults.CASES:
            raise SystemExit(f"not a case of the matrix: {item}")
        out.append(case)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cases",
        default="",
        help="comma-separated KIND@PHASE (default: all "
        f"{len(faults.CASES)}), e.g. {faults.CASES[0][0].value}@{faults.CASES[0][1].value}",
    )
    ap.add_argument("--mem-mib", type=int, default=768)
    ap.add_argument(
        "--budget-min",
        type=float,
        default=0.0,
        help="start no new case after this many minutes (0: no limit); the cases left are listed as skipped",
    )
    args = ap.parse_args()
    cases = parse_cases(args.cases)
    if args.budget_min < 0:
        ap.error("--budget-min must be >= 0")
    t0 = time.monotonic()
    results: list[dict[str, Any]] = []
    skipped: list[str] = []
    with vm_session("faults") as factory:
        rig = FaultRig(factory, mem_mib=args.mem_mib).start()
        try:
            for i, (kind, phase) in enumerate(cases):
                elapsed = time.monotonic() - t0
                if args.budget_min and elapsed > args.budget_min * 60:
                    skipped = [f"{k.value}@{p.value}" for k, p in cases[i:]]
                    print(f"budget of {args.budget_min:g} min spent: {len(skipped)} cases skipped", file=sys.stderr)
                    break
                print(f"[{i + 1}/{len(cases)}] {kind.value}@{phase.value} ({elapsed / 60:.1f} min)", file=sys.stderr)
                try:
                    res = rig.run_case(kind, phase, test="bench/faults.py")
                    results.append(res.as_dict())
                except Exception as exc:  # one broken case must not hide the others
                    results.append(
                        {
                            "kind": kind.value,
                            "aimed": phase.value,
                            "survived": False,
                            "problems": [f"{type(exc).__name__}: {exc}"],
                        }
                    )
                    rig.vm = None if rig.vm is None or not rig.vm.is_running() else rig.vm
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
        finally:
            rig.close()
    migrations = [json.loads(m) for r in results for m in r.get("migrations", [])]
    per: dict[str, dict[str, int]] = {}
    for r in results:
        key = f"{r['kind']}@{r['aimed']}"
        per[key] = {"injected": 1, "survived": int(bool(r.get("survived")))}
    print(
        json.dumps(
            {
                "wall_s": round(time.monotonic() - t0, 1),
                "cases": len(results),
                "survived": sum(bool(r.get("survived")) for r in results),
                "per_case": per,
                "migrations_checked": len(migrations),
                "corrupted_pages": sum(int(m["corrupted_pages"]) for m in migrations),
                "ram_compared": sum(bool(m["ram_compared"]) for m in migrations),
                "skipped": skipped,
                "results": results,
                "tally_kinds": [tally.MIGRATION, tally.FAULT],
            }
        )
    )


if __name__ == "__main__":
    main()
