"""Layout learning, offline: captured QEMU 7.2 / 10.0 output and hand-made trees.

The captures (tests/data/qmp, made by tests/qmp_capture.py) must give exactly
the layouts QEMU's split rules predict (tests/qmp_expected.py); the synthetic
trees pin down alias resolution, priorities and every cross-check error.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from host_collector.layout import LayoutError, RamRange
from host_collector.qmp.mtree import MtreeError, map_ram, parse_mtree
from host_collector.qmp.ram_layout import MemoryFacts, build_layout
from host_collector.qmp.ramblock import RamBlockError, parse_ramblocks

from .qmp_expected import BY_NAME, G, M

DATA = Path(__file__).parent / "data" / "qmp"
CAPTURES = sorted(DATA.glob("*.json"))


def load(path: Path) -> tuple[MemoryFacts, dict[str, Any]]:
    raw = json.loads(path.read_text())
    names = {f.name for f in dataclasses.fields(MemoryFacts)}
    return MemoryFacts(**{k: v for k, v in raw.items() if k in names}), raw


def test_captures_cover_both_versions() -> None:
    tags = {p.name.split("-", 1)[0] for p in CAPTURES}
    assert {"72", "100"} <= tags
    assert len(CAPTURES) == 2 * len(BY_NAME)


@pytest.mark.parametrize("path", CAPTURES, ids=[p.stem for p in CAPTURES])
def test_captured_layout_matches_qemu_rules(path: Path) -> None:
    facts, _raw = load(path)
    case = BY_NAME[path.stem.split("-", 1)[1]]
    learned = build_layout(facts)
    assert learned.layout.ranges == case.ranges
    assert dict(learned.layout.blocks) == case.blocks
    assert learned.base_memory + learned.plugged_memory == sum(case.blocks.values())
    excluded = {(e.gpa, e.size) for e in learned.excluded}
    assert (0xA0000, 0x60000) in excluded
    if "q35" in case.name:
        assert (0x30000, 0x20000) in excluded
        low = min(r.end for r in case.ranges if r.gpa < 4 * G and r.end > 0x100000)
        assert (low, 16 * M) in excluded


def test_hmp_text_uses_crlf() -> None:
    """human-monitor-command output ends lines with CRLF; the parser must not care."""
    facts, _ = load(DATA / "72-pc-1g.json")
    assert "\r\n" in facts.mtree


# ---- hand-made trees --------------------------------------------------------

RAMBLOCKS = """\
              Block Name    PSize              Offset               Used              Total
                  pc.ram    4 KiB  0x0000000000000000 0x0000000080000000 0x0000000080000000
                 pc.bios    4 KiB  0x0000000080000000 0x0000000000040000 0x0000000000040000
"""


def tree(*system_children: str, extra: str = "", ram: str = "pc.ram") -> str:
    body = "\n".join("    " + c for c in system_children)
    return (
        "address-space: memory\n"
        "  0000000000000000-ffffffffffffffff (prio 0, i/o): system\n"
        f"{body}\n\n"
        f"memory-region: {ram}\n"
        "  0000000000000000-000000007fffffff (prio 0, ram): pc.ram\n\n" + extra
    )


LOW = "0000000000000000-000000003fffffff (prio 0, ram): alias ram-below-4g @pc.ram 0000000000000000-000000003fffffff"
HIGH = "0000000100000000-000000013fffffff (prio 0, ram): alias ram-above-4g @pc.ram 0000000040000000-000000007fffffff"


def facts(
    mtree: str,
    *,
    base: int = 2 * G,
    devices: list[dict[str, Any]] | None = None,
    plugged: int = 0,
    ramblocks: str = RAMBLOCKS,
    memdevs: tuple[str, ...] = ("pc.ram",),
) -> MemoryFacts:
    return MemoryFacts(
        mtree=mtree,
        ramblocks=ramblocks,
        memdevs=[{"id": m} for m in memdevs],
        memory_devices=devices or [],
        size_summary={"base-memory": base, "plugged-memory": plugged},
    )


def test_split_alias_resolves_to_block_offsets() -> None:
    layout = build_layout(facts(tree(LOW, HIGH))).layout
    assert layout.ranges == (RamRange(0, 1 * G, "pc.ram", 0), RamRange(4 * G, 1 * G, "pc.ram", 1 * G))
    assert layout.split(4 * G, 4 * G + 8192) == [("pc.ram", 1 * G // 4096, 2)]


def test_missing_above_4g_alias_is_caught_by_coverage_and_summary() -> None:
    """Planted fault: drop the above-4G alias; the layout must not quietly shrink."""
    with pytest.raises(LayoutError, match=r"offsets from 0x40000000 are not mapped"):
        build_layout(facts(tree(LOW)))


def test_base_memory_mismatch_is_an_error() -> None:
    with pytest.raises(LayoutError, match="base-memory"):
        build_layout(facts(tree(LOW, HIGH), base=3 * G))


def test_higher_or_equal_priority_siblings_hide_ram_even_when_disabled() -> None:
    layout = build_layout(
        facts(
            tree(
                LOW,
                HIGH,
                "00000000000a0000-00000000000bffff (prio 1, i/o): vga-lowmem [disabled]",
                "0000000000200000-0000000000200fff (prio 0, i/o): same-prio-device",
                "0000000000300000-0000000000300fff (prio -1, i/o): lower-prio-device",
                "0000000000400000-00000000004007ff (prio 5, i/o): half-page",
            )
        )
    ).layout
    holes = [(0xA0000, 0xC0000), (0x200000, 0x201000), (0x400000, 0x401000)]
    for a, b in holes:
        assert layout.split(a, b) is None
        assert layout.split(a - 4096, a) is not None
    assert layout.split(0x300000, 0x301000) == [("pc.ram", 0x300, 1)]


def test_disabled_alias_maps_nothing_but_still_hides() -> None:
    layout = build_layout(
        facts(
            tree(
                LOW,
                HIGH,
                "00000000feda0000-00000000fedbffff (prio 1, ram): alias smram-open-high "
                "@pc.ram 00000000000a0000-00000000000bffff [disabled]",
            )
        )
    ).layout
    assert layout.find(0xFEDA0000) is None
    assert layout.ram_bytes == 2 * G


def test_numa_container_alias_and_nested_offsets() -> None:
    mtree = (
        "address-space: memory\n"
        "  0000000000000000-ffffffffffffffff (prio 0, i/o): system\n"
        "    0000000000000000-000000007fffffff (prio 0, i/o): alias ram-below-4g @pc.ram 0000000000000000-000000007fffffff\n"
        "    0000000100000000-000000013fffffff (prio 0, i/o): alias ram-above-4g @pc.ram 0000000080000000-00000000bfffffff\n\n"
        "memory-region: pc.ram\n"
        "  0000000000000000-00000000bfffffff (prio 0, i/o): pc.ram\n"
        "    0000000000000000-000000003fffffff (prio 0, ram): m0\n"
        "    0000000040000000-00000000bfffffff (prio 0, ram): m1\n"
    )
    blocks = (
        "Block Name PSize Offset Used Total\n"
        "m0 4 KiB 0x0 0x40000000 0x40000000\n"
        "m1 4 KiB 0x40000000 0x80000000 0x80000000\n"
    )
    layout = build_layout(facts(mtree, base=3 * G, ramblocks=blocks, memdevs=("m0", "m1"))).layout
    assert layout.ranges == (
        RamRange(0, 1 * G, "m0", 0),
        RamRange(1 * G, 1 * G, "m1", 0),
        RamRange(4 * G, 1 * G, "m1", 1 * G),
    )


def test_alias_target_section_starting_above_zero() -> None:
    """Alias offsets count from the target region's own start (pc.bios prints at 0xfffc0000)."""
    mtree = tree(
        LOW,
        HIGH,
        "00000000000e0000-00000000000fffff (prio 1, rom): alias isa-bios @pc.bios 0000000000020000-000000000003ffff",
        extra="memory-region: pc.bios\n  00000000fffc0000-00000000ffffffff (prio 0, rom): pc.bios\n",
    )
    sections = parse_mtree(mtree)
    ram = map_ram(sections)
    assert all(p.block == "pc.ram" for p in ram.mapped)  # a ROM is never RAM


def test_ram_region_with_subregion_is_hidden_under_it() -> None:
    mtree = tree(LOW, HIGH, ram="pc.ram").replace(
        "  0000000000000000-000000007fffffff (prio 0, ram): pc.ram\n",
        "  0000000000000000-000000007fffffff (prio 0, ram): pc.ram\n"
        "    0000000000001000-0000000000001fff (prio 0, i/o): trap\n",
    )
    layout = build_layout(facts(mtree)).layout
    assert layout.split(0x1000, 0x2000) is None
    assert layout.split(0, 0x1000) == [("pc.ram", 0, 1)]


def test_device_ram_and_unknown_regions_are_left_out() -> None:
    mtree = tree(LOW, HIGH, "00000000fd000000-00000000fdffffff (prio 1, ram): vga.vram")
    blocks = RAMBLOCKS + "   0000:00:02.0/vga.vram    4 KiB  0x0 0x1000000 0x1000000\n"
    learned = build_layout(facts(mtree, ramblocks=blocks))
    assert learned.layout.find(0xFD000000) is None
    assert any("vga.vram" in n for n in learned.notes)


def test_dimm_checked_against_query_memory_devices() -> None:
    dimm = (
        "0000000140000000-000000017fffffff (prio 0, i/o): device-memory\n"
        "      0000000140000000-000000017fffffff (prio 0, ram): hp1"
    )
    blocks = RAMBLOCKS + "hp1 4 KiB 0x0 0x40000000 0x40000000\n"
    data: dict[str, Any] = {"memdev": "/objects/hp1", "addr": 5 * G, "size": 1 * G}
    dev: dict[str, Any] = {"type": "dimm", "data": data}
    layout = build_layout(
        facts(tree(LOW, HIGH, dimm), ramblocks=blocks, devices=[dev], plugged=1 * G, memdevs=("pc.ram", "hp1"))
    ).layout
    assert layout.find(5 * G) == RamRange(5 * G, 1 * G, "hp1", 0)
    wrong = dict(dev, data=dict(data, addr=6 * G))
    with pytest.raises(LayoutError, match="pc-dimm with memdev 'hp1'"):
        build_layout(
            facts(tree(LOW, HIGH, dimm), ramblocks=blocks, devices=[wrong], plugged=1 * G, memdevs=("pc.ram", "hp1"))
        )
    with pytest.raises(LayoutError, match="plugged-memory"):
        build_layout(
            facts(tree(LOW, HIGH, dimm), ramblocks=blocks, devices=[dev], plugged=0, memdevs=("pc.ram", "hp1"))
        )


def test_other_memory_devices_are_not_hinted() -> None:
    vmem = (
        "0000000140000000-000000017fffffff (prio 0, i/o): device-memory\n"
        "      0000000140000000-000000017fffffff (prio 0, ram): vm0"
    )
    blocks = RAMBLOCKS + "vm0 4 KiB 0x0 0x40000000 0x40000000\n"
    dev = {"type": "virtio-mem", "data": {"memdev": "/objects/vm0", "memaddr": 5 * G, "size": 256 * M}}
    learned = build_layout(
        facts(tree(LOW, HIGH, vmem), ramblocks=blocks, devices=[dev], plugged=256 * M, memdevs=("pc.ram", "vm0"))
    )
    assert learned.layout.find(5 * G) is None
    assert "vm0" not in learned.layout.blocks
    assert any("virtio-mem" in n for n in learned.notes)


def test_same_block_mapped_twice_is_an_error() -> None:
    twice = "0000000200000000-000000020fffffff (prio 0, ram): alias again @pc.ram 0000000000000000-000000000fffffff"
    with pytest.raises(LayoutError, match="mapped at both"):
        build_layout(facts(tree(LOW, HIGH, twice)))


def test_identical_duplicate_alias_target_is_accepted() -> None:
    mtree = tree(LOW, HIGH) + "memory-region: pc.ram\n  0000000000000000-000000007fffffff (prio 0, ram): pc.ram\n"
    assert build_layout(facts(mtree)).layout.ram_bytes == 2 * G


def test_ambiguous_alias_target_is_an_error() -> None:
    mtree = tree(LOW, HIGH) + ("memory-region: pc.ram\n  0000000000000000-000000007fffffff (prio 0, ram): other\n")
    with pytest.raises(LayoutError, match="two different regions"):
        build_layout(facts(mtree))


def test_tseg_window_uses_the_blackhole_end() -> None:
    mtree = tree(LOW, HIGH, "0000000040000000-0000000040000000 (prio 1, i/o): tseg-blackhole [disabled]")
    f = dataclasses.replace(facts(mtree), tseg_max=16 * M)
    learned = build_layout(f)
    assert learned.layout.find(1 * G - 16 * M) is None
    assert learned.layout.find(1 * G - 16 * M - 4096) is not None
    assert learned.layout.ram_bytes == 2 * G - 16 * M


@pytest.mark.parametrize(
    "text, message",
    [
        ("address-space: memory\n      0000000000000000-ffffffffffffffff (prio 0, i/o): system\n", "level 3"),
        (
            "address-space: memory\n  0000000000000000-ffffffffffffffff (prio 0, i/o): system\n"
            "      0000000000000000-0000000000000fff (prio 0, ram): orphan\n",
            "has no parent",
        ),
        (
            "address-space: memory\n  [DETECTED OVERFLOW!] 0000000000000000-0000000000000fff (prio 0, i/o): x\n",
            "overflowing",
        ),
        ("address-space: memory\n  00000000-0fff (prio 0, i/o): short\n", "not an mtree region line"),
        ("  0000000000000000-0000000000000fff (prio 0, i/o): x\n", "before any"),
        ("address-space: memory\n  0000000000001000-0000000000000fff (prio 0, i/o): x\n", "before start"),
    ],
)
def test_malformed_mtree_is_rejected(text: str, message: str) -> None:
    with pytest.raises(MtreeError, match=message):
        parse_mtree(text)


def test_alias_to_unprinted_target_is_an_error() -> None:
    mtree = (
        "address-space: memory\n  0000000000000000-ffffffffffffffff (prio 0, i/o): system\n"
        "    0000000000000000-000000003fffffff (prio 0, ram): alias lost @nowhere "
        "0000000000000000-000000003fffffff\n"
    )
    with pytest.raises(MtreeError, match="not printed"):
        map_ram(parse_mtree(mtree))


def test_ramblock_table_both_formats() -> None:
    v72 = parse_ramblocks(RAMBLOCKS)
    assert v72["pc.ram"].used_length == 2 * G and v72["pc.bios"].page_size == 4096
    v10 = parse_ramblocks(
        "              Block Name    PSize              Offset               Used              Total"
        "                HVA  RO\n"
        "                      m0    2 MiB  0x0000000000000000 0x0000000080000000 0x0000000080000000"
        " 0x00007ff5bbe00000  rw\n"
    )
    assert v10["m0"].page_size == 2 * M and v10["m0"].used_length == 2 * G
    with pytest.raises(RamBlockError, match="listed twice"):
        parse_ramblocks(RAMBLOCKS + "pc.ram 4 KiB 0x0 0x1000 0x1000\n")
    with pytest.raises(RamBlockError, match="header"):
        parse_ramblocks("pc.ram 4 KiB 0x0 0x1000 0x1000\n")
