"""Layout learning against a real QEMU (-S, no guest): pc and q35, the 4G split, memdevs, a DIMM."""

from __future__ import annotations

import asyncio

import pytest

from host_collector.qmp.ram_layout import learn_layout, read_layout

from .qmp_expected import CASES, Case
from .qmp_launcher import qemu

pytestmark = pytest.mark.qemu


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_layout_from_real_qemu(case: Case) -> None:
    async def run() -> None:
        async with qemu(["-S", *case.args], name=case.name) as q:
            qmp = await q.qmp()
            learned = await learn_layout(qmp)
            assert learned.layout.ranges == case.ranges
            assert dict(learned.layout.blocks) == case.blocks
            assert learned.base_memory + learned.plugged_memory == sum(case.blocks.values())
            assert await read_layout(qmp) == learned.layout

    asyncio.run(run())
