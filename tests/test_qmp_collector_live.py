"""QMP pieces with the real collector and a real agent: layout in, epochs opened by MIGRATION_PASS, hints out.

A paused QEMU 7.2 source migrates through a counting relay (the proxy's
place) to a paused destination. Its layout is learnt over QMP and handed to
the collector (no layout written by hand); an in-process agent answers every
hint request with a fixed set of guest-physical ranges; the gate opens the
epochs. Records judged during the first pass must see exactly those pages as
free, in the RAMBlock the layout names.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from fphint import addresses
from fphint_lab.collector_harness import FixedSource, running_agent, running_collector, token, wait_attached
from host_collector.config import CollectorConfig, Limits, VmEntry
from host_collector.qmp.preflight import check_migration_safety
from host_collector.qmp.ram_layout import read_layout
from host_collector.rewrite.epoch_gate import EpochGate
from host_collector.rewrite.ledger import EpochOracle

from .qmp_launcher import qemu
from .test_qmp_migration_live import RAM_MIB, Relay, fill_pattern, wait_status

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

VM = "vm1"
HINTED = [(0x100_0000, 64 * 4096), (0x200_0000 + 8 * 4096, 4 * 4096)]  # guest-physical byte ranges


def args(ram: Path) -> list[str]:
    return [
        "-machine", "pc,memory-backend=mem", "-m", f"{RAM_MIB}M",
        "-object", f"memory-backend-file,id=mem,size={RAM_MIB}M,mem-path={ram},share=on",
    ]  # fmt: skip


def test_learnt_layout_real_collector_and_agent_hints_through_the_gate() -> None:
    async def run() -> None:
        tag = uuid.uuid4().hex[:8]
        src_ram, dst_ram = Path(f"/dev/shm/fph-qmp-src-{tag}"), Path(f"/dev/shm/fph-qmp-dst-{tag}")
        fill_pattern(src_ram)
        cfg = CollectorConfig(
            listen=(addresses.parse("tcp:127.0.0.1:0"),),
            limits=Limits(retained_epochs=64),
            vms=(VmEntry(VM, token(VM)),),  # no layout: QMP provides it
        )
        try:
            async with (
                qemu(["-S", *args(src_ram)], name="src") as s,
                qemu(["-S", "-incoming", "defer", *args(dst_ram)], name="dst") as d,
                running_collector(cfg) as srv,
            ):
                src, dst = await s.qmp(), await d.qmp()
                coll = srv.collector
                layout = await read_layout(src)
                coll.set_layout(VM, layout)
                assert coll.layout(VM) == layout and set(layout.blocks) == {"mem"}

                async with running_agent(srv, VM, FixedSource(HINTED)):
                    await wait_attached(srv, VM)
                    report = await check_migration_safety(src, dst)
                    assert report.safe, report.summary()
                    await dst.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
                    port = int((await dst.execute("query-migrate"))["socket-address"][0]["port"])
                    gate = EpochGate(src, coll, VM, poll_interval_s=0.02, poll_timeout_s=5, hint_deadline_s=10)
                    relay = Relay(("127.0.0.1", port), gate.received)
                    relay_port = await relay.start()
                    await src.execute("migrate-set-parameters", {"max-bandwidth": 48 << 20})
                    await gate.start()
                    hinted = {(a + i) // 4096 for a, n in HINTED for i in range(0, n, 4096)}
                    probe = hinted | {0, 0x100_0000 // 4096 - 1, 0x100_0000 // 4096 + 64, 0x200_0000 // 4096}
                    seen: list[tuple[int, tuple[int, ...], set[int], bool]] = []

                    def judge() -> None:  # what the proxy does when decided_through grows
                        x = gate.decided_through()
                        o = gate.oracle_for(x)
                        if isinstance(o, EpochOracle) and x < 1 << 62:
                            free = {p for p in probe if o.is_free("mem", p)}
                            seen.append((x, o.syncs, free, o.is_free("pc.ram", 0x100_0000 // 4096)))

                    gate.add_listener(judge)
                    await src.execute("migrate", {"uri": f"tcp:127.0.0.1:{relay_port}"})
                    await wait_status(src, {"completed"}, 60)
                    await asyncio.wait_for(relay.done.wait(), 30)

                    assert gate.failure is None, gate.failure
                    st = gate.stats()
                    opened = list(coll.vms[VM].epochs.values())  # released ones are gone
                    assert st.passes >= 2 and len(opened) + st.epochs_released == st.epochs_opened == st.passes
                    answered = [e for e in opened if e.free_pages() == sum(n for _, n in HINTED) // 4096]
                    assert answered, [e.stats() for e in opened]
                    # windows judged once the agent had answered saw exactly the hinted pages
                    assert any(free == hinted for _, _, free, _ in seen), seen
                    assert all(free <= hinted for _, _, free, _ in seen)
                    assert not any(wrong_block for *_, wrong_block in seen)  # the layout's block, not a guess
                    await gate.stop()
                    await relay.close()
        finally:
            src_ram.unlink(missing_ok=True)
            dst_ram.unlink(missing_ok=True)

    asyncio.run(asyncio.wait_for(run(), 120))
