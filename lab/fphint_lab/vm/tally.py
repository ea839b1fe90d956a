"""One line per migration checked under churn, and per fault survived, so
that docs/reliability.md's figures are counted from the runs themselves
(scripts/reliability_tally.py sums them), not by hand.

Each record is printed as ``fphint-migration {json}`` or ``fphint-fault
{json}`` (pytest shows it with ``-s`` or in a failure's captured output),
appended to the file named by ``$FPHINT_TALLY`` when that is set, and
returned so a test can also attach it as a junit property
(``record_property("fphint_migration", json)``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

ENV = "FPHINT_TALLY"
MIGRATION = "fphint-migration"
FAULT = "fphint-fault"


def record(kind: str, entry: Mapping[str, Any]) -> str:
    """Emit one record (``kind`` is MIGRATION or FAULT); returns its JSON."""
    text = json.dumps(dict(entry), sort_keys=True)
    print(f"{kind} {text}", flush=True)
    path = os.environ.get(ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{kind} {text}\n")
    return text


def migration(
    test: str, *, corrupted_pages: int, ram_compared: bool, workload_ok: bool, verified_bytes: int, **extra: Any
) -> str:
    """A migration that completed under churn and was checked: RAM files
    compared page by page (with the witness) and/or the workload verified."""
    return record(
        MIGRATION,
        {
            "test": test,
            "corrupted_pages": corrupted_pages,
            "ram_compared": ram_compared,
            "workload_ok": workload_ok,
            "verified_bytes": verified_bytes,
            **extra,
        },
    )


def parse(lines: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
    """Records found in text (log lines, tally files): {kind: [entry, ...]}."""
    found: dict[str, list[dict[str, Any]]] = {MIGRATION: [], FAULT: []}
    for line in lines:
        for kind in (MIGRATION, FAULT):
            marker = f"{kind} "
            i = line.find(marker)
            if i >= 0 and line[i + len(marker) :].lstrip().startswith("{"):
                try:
                    found[kind].append(json.loads(line[i + len(marker) :]))
                except ValueError:
                    pass
    return found
