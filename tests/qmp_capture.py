"""Capture what read_memory_facts() sees, for the offline layout tests.

    .venv/bin/python tests/qmp_capture.py 72            # the system QEMU (7.2)
    FPH_QEMU=/path/qemu-system-x86_64 FPH_QEMU_DATA=/path/share/qemu \
        .venv/bin/python tests/qmp_capture.py 100       # e.g. 10.0 from bookworm-backports

Writes tests/data/qmp/<tag>-<case>.json.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

from qmp_expected import CASES  # noqa: E402
from qmp_launcher import qemu  # noqa: E402

from host_collector.qmp.ram_layout import read_memory_facts  # noqa: E402


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
