"""Reproduce QEMU < 9.0 losing guest writes during a TCG live migration (docs/qmp.md).

    .venv/bin/python -m tests.qmp_tcg_lost_writes [runs]
    FPH_QEMU=/path/to/10.0/qemu-system-x86_64 FPH_QEMU_DATA=... .venv/bin/python -m tests.qmp_tcg_lost_writes

A 30-byte real-mode "BIOS" rewrites 448 KiB of low RAM forever (no invlpg,
unlike the gate test's dirtier); the source migrates directly to a paused
destination with a 1 ms downtime limit. After completion the source is
stopped, so both RAM files must be equal; the script prints how many 4 KiB
pages differ. 7.2.22 here: often 96-112; 10.0.2: always 0. Not a test: the
loss is intermittent, and it is QEMU's bug, not ours; pre-flight refuses a
running TCG guest on QEMU < 9.0 because of it.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

from .qmp_launcher import qemu
from .test_qmp_migration_live import fill_pattern, ram_args, wait_status

PLAIN_DIRTIER = bytes.fromhex("fa31dbba00108ec231ff89d8b90080f3ab81c2001081fa008072eb43ebe5")


async def once() -> int:
    tag = uuid.uuid4().hex[:8]
    src, dst, bios = (Path(f"/dev/shm/fph-qmp-{k}-{tag}") for k in ("src", "dst", "bios"))
    fill_pattern(src)
    img = bytearray(b"\xf4" * 65536)
    img[: len(PLAIN_DIRTIER)] = PLAIN_DIRTIER
    img[0xFFF0:0xFFF3] = bytes.fromhex("e90d00")
    bios.write_bytes(img)
    try:
        async with (
            qemu(ram_args(src, bios), name="lw-src") as s,
            qemu(["-S", "-incoming", "defer", *ram_args(dst, bios)], name="lw-dst") as d,
        ):
            sq, dq = await s.qmp(), await d.qmp()
            await dq.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            port = (await dq.execute("query-migrate"))["socket-address"][0]["port"]
            await sq.execute("migrate-set-parameters", {"max-bandwidth": 48 << 20, "downtime-limit": 1})
            await sq.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            info = await wait_status(sq, {"completed"}, 120)
            await wait_status(dq, {"completed"}, 30)
            a, b = src.read_bytes(), dst.read_bytes()
            lost = sum(1 for i in range(0, len(a), 4096) if a[i : i + 4096] != b[i : i + 4096])
            print(f"syncs {info['ram']['dirty-sync-count']}, pages differing {lost}")
            return lost
    finally:
        for p in (src, dst, bios):
            p.unlink(missing_ok=True)


async def main(runs: int) -> None:
    results = [await once() for _ in range(runs)]
    print(f"runs with lost writes: {sum(1 for r in results if r)} of {runs}")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3))
