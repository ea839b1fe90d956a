"""Machine configurations for the layout tests and the layouts QEMU's rules give for them.

The expected ranges are worked out by hand from hw/i386/pc_piix.c, pc_q35.c
and pc.c (qemu-stream.md section 10.3), not from our parser: below-4G RAM is
min(RAM, 3 GiB) on pc (when RAM >= 3.5 GiB) and 2 GiB on q35 (when RAM >=
2.75 GiB); the rest sits at 4 GiB. The legacy VGA/PAM window 0xa0000-0xfffff
is never hinted; on q35 neither are the SMBASE window 0x30000-0x4ffff nor the
top 16 MiB of low RAM (TSEG, extended-tseg-mbytes=16).
"""

from __future__ import annotations

from dataclasses import dataclass

from host_collector.layout import RamRange

K, M, G = 1 << 10, 1 << 20, 1 << 30
TSEG = 16 * M


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]
    ranges: tuple[RamRange, ...]
    blocks: dict[str, int]


def _pc_low(block: str, low: int) -> tuple[RamRange, ...]:
    return (RamRange(0, 0xA0000, block, 0), RamRange(0x100000, low - 0x100000, block, 0x100000))


def _q35_low(block: str, low: int) -> tuple[RamRange, ...]:
    return (
        RamRange(0, 0x30000, block, 0),
        RamRange(0x50000, 0x50000, block, 0x50000),
        RamRange(0x100000, low - TSEG - 0x100000, block, 0x100000),
    )


CASES = (
    Case("pc-1g", ("-machine", "pc", "-m", "1G"), _pc_low("pc.ram", 1 * G), {"pc.ram": 1 * G}),
    Case(
        "pc-4g",
        ("-machine", "pc", "-m", "4G"),
        (*_pc_low("pc.ram", 3 * G), RamRange(4 * G, 1 * G, "pc.ram", 3 * G)),
        {"pc.ram": 4 * G},
    ),
    Case("q35-1g", ("-machine", "q35", "-m", "1G"), _q35_low("pc.ram", 1 * G), {"pc.ram": 1 * G}),
    Case(
        "q35-5g",
        ("-machine", "q35", "-m", "5G"),
        (*_q35_low("pc.ram", 2 * G), RamRange(4 * G, 3 * G, "pc.ram", 2 * G)),
        {"pc.ram": 5 * G},
    ),
    Case(
        "pc-membackend",
        ("-machine", "pc,memory-backend=mem0", "-m", "1G", "-object", "memory-backend-ram,id=mem0,size=1G"),
        _pc_low("mem0", 1 * G),
        {"mem0": 1 * G},
    ),
    Case(
        "q35-numa",
        (
            "-machine",
            "q35",
            "-m",
            "4G",
            "-smp",
            "2",
            "-object",
            "memory-backend-ram,id=m0,size=2G",
            "-object",
            "memory-backend-ram,id=m1,size=2G",
            "-numa",
            "node,nodeid=0,memdev=m0,cpus=0",
            "-numa",
            "node,nodeid=1,memdev=m1,cpus=1",
        ),
        (*_q35_low("m0", 2 * G), RamRange(4 * G, 2 * G, "m1", 0)),
        {"m0": 2 * G, "m1": 2 * G},
    ),
    Case(
        "pc-dimm",
        (
            "-machine",
            "pc",
            "-m",
            "1G,slots=2,maxmem=4G",
            "-object",
            "memory-backend-ram,id=hp1,size=1G",
            "-device",
            "pc-dimm,id=dimm1,memdev=hp1",
        ),
        (*_pc_low("pc.ram", 1 * G), RamRange(4 * G, 1 * G, "hp1", 0)),
        {"pc.ram": 1 * G, "hp1": 1 * G},
    ),
)

BY_NAME = {c.name: c for c in CASES}
