"""Capture what read_memory_facts() sees, for the offline layout tests.

    .venv/bin/python -m tests.qmp_capture 72            # the system QEMU (7.2)
    FPH_QEMU=/path/qemu-system-x86_64 FPH_QEMU_DATA=/path/share/qemu \
        .venv/bin/python -m tests.qmp_capture 100       # e.g. 10.0 from bookworm-backports

(from the repository's top directory, as the test helpers it uses are tests.*).

Writes tests/data/qmp/<tag>-<case>.json.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from pathlib import Path

from host_collector.qmp.ram_layout import read_memory_facts

from .qmp_expected import CASES
from .qmp_launcher import qemu


async def main(tag: str) -> None:
    out = Path(__file__).parent / "data" / "qmp"
    out.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        async with qemu(["-S", *case.args], name="capture") as q:
            qmp = await q.qmp()
            facts = await read_memory_facts(qmp)
            version = await qmp.execute("query-version")
        record = dataclasses.asdict(facts) | {"version": version, "args": list(case.args)}
        (out / f"{tag}-{case.name}.json").write_text(json.dumps(record, indent=1) + "\n")
        print(tag, case.name, "ok")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
