"""Learn a VM's guest RAM layout over QMP, so nobody writes one by hand.

Sources: ``info mtree -D`` for guest-physical -> (MemoryRegion, offset)
through aliases, ``query-memdev`` for which regions are memory backends (main
RAM: ``pc.ram``, ``-machine memory-backend=``, NUMA memdevs),
``query-memory-devices`` for DIMMs, the RAMBlock table for block sizes, and
``query-memory-size-summary`` as an independent check. Anything that does not
add up is an error: a wrong layout would zero pages the guest did not hint.

Deliberately left out of the layout (never hinted): bytes a PAM/SMRAM/SMBASE
window may cover, q35's TSEG (guest-OS-inaccessible SMM memory, sized by the
firmware at run time, so the largest size the chipset allows is excluded),
read-only and non-volatile memory, and memory devices other than pc-dimm.

Every input is QEMU's answer, checked for shape before use: whatever it
says, :func:`build_layout` raises only :class:`LayoutError`, in time linear
in the input (mtree.py's bounds, and at most :data:`MAX_PIECES` RAM pieces),
and the daemon runs it in a worker thread, off its event loop.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from host_collector.layout import TARGET_PAGE_SIZE, LayoutError, RamLayout, RamRange
from host_collector.qmp.mtree import Hidden, MtreeError, Piece, Region, map_ram, parse_mtree, subtract
from host_collector.qmp.ramblock import RamBlockError, RamBlockInfo, parse_ramblocks
from host_collector.qmp.session import QmpCommandError, QmpSession

MIB = 1 << 20
#: The TSEG sizes the q35 MCH offers besides extended-tseg-mbytes (1, 2, 8 MiB).
_TSEG_FIXED_MAX = 8 * MIB
_MCH_PATH = "/machine/q35/mch"
#: RAM pieces (mapped or hidden) a layout may be built from; real machines
#: have a handful mapped and about 50 hidden (PAM, SMRAM windows).
MAX_PIECES = 1024
#: Entries of query-memdev / query-memory-devices considered.
MAX_DEVICES = 1024


@dataclass(frozen=True)
class Excluded:
    """Guest-physical RAM bytes deliberately kept out of the layout, and why."""

    gpa: int
    size: int
    reason: str


@dataclass(frozen=True)
class LearnedLayout:
    layout: RamLayout
    excluded: tuple[Excluded, ...]
    notes: tuple[str, ...]
    base_memory: int
    plugged_memory: int


@dataclass(frozen=True)
class MemoryFacts:
    """Everything :func:`build_layout` needs, as QEMU returned it."""

    mtree: str
    ramblocks: str
    memdevs: Sequence[Mapping[str, Any]]
    memory_devices: Sequence[Mapping[str, Any]]
    size_summary: Mapping[str, Any]
    tseg_max: int | None = None  # bytes; None: the machine has no TSEG


async def read_memory_facts(qmp: QmpSession) -> MemoryFacts:
    """Ask QEMU (any state, ``-S`` included) for the inputs of :func:`build_layout`."""
    mtree = await qmp.hmp("info mtree -D")
    try:
        reply = await qmp.execute("x-query-ramblock")
        ramblocks = str(reply["human-readable-text"])
    except (QmpCommandError, KeyError, TypeError):
        ramblocks = await qmp.hmp("info ramblock")
    memdevs = await qmp.execute("query-memdev")
    devices = await qmp.execute("query-memory-devices")
    summary = await qmp.execute("query-memory-size-summary")
    tseg_max = None
    if _has_tseg(mtree):
        try:
            mbytes = int(await qmp.execute("qom-get", {"path": _MCH_PATH, "property": "extended-tseg-mbytes"}))
        except (QmpCommandError, ValueError, TypeError) as err:
            raise LayoutError(f"q35 TSEG present but its maximum size is unreadable: {err}") from err
        tseg_max = max(_TSEG_FIXED_MAX, mbytes * MIB)
    return MemoryFacts(mtree, ramblocks, memdevs, devices, summary, tseg_max)


async def learn_layout(qmp: QmpSession) -> LearnedLayout:
    """The layout of the VM behind ``qmp``, with what was left out and why.

    :raise LayoutError: the sources disagree or describe something unsupported.
    :raise QmpError: QEMU did not answer.
    """
    facts = await read_memory_facts(qmp)
    return await asyncio.to_thread(build_layout, facts)  # bounded, but not the event loop's business


async def read_layout(qmp: QmpSession) -> RamLayout:
    """Just the :class:`RamLayout` (for ``collector.set_layout``)."""
    return (await learn_layout(qmp)).layout


def _has_tseg(mtree: str) -> bool:
    return "): tseg-blackhole" in mtree


def build_layout(facts: MemoryFacts) -> LearnedLayout:
    """Combine what QEMU reported into a checked :class:`RamLayout` (pure; see module doc)."""
    if not isinstance(facts.mtree, str) or not isinstance(facts.ramblocks, str):
        raise LayoutError("info mtree / info ramblock did not return text")
    try:
        sections = parse_mtree(facts.mtree)
        blocks = parse_ramblocks(facts.ramblocks)
        ram = map_ram(sections)
    except (MtreeError, RamBlockError, ValueError) as err:
        raise LayoutError(str(err)) from err
    if len(ram.mapped) > MAX_PIECES or len(ram.hidden) > MAX_PIECES:
        raise LayoutError(
            f"info mtree maps {len(ram.mapped)} RAM pieces and hides {len(ram.hidden)}: "
            f"more than {MAX_PIECES}, not a machine fphint supports"
        )
    memdevs = _entries(facts.memdevs, "query-memdev")
    notes: list[str] = []
    backends = {_str(m, "id", "query-memdev") for m in memdevs}
    dimms, other_devices, plugged = _memory_devices(facts.memory_devices)
    device_blocks = set(dimms) | set(other_devices)

    main = sorted({p.block for p in ram.mapped if p.block in backends and p.block not in device_blocks})
    for name in sorted({p.block for p in ram.mapped} - set(main) - device_blocks):
        notes.append(f"RAM region {name!r} is not a memory backend (device memory); not hinted")
    for name, typ in sorted(other_devices.items()):
        notes.append(f"memory device type {typ!r} (memdev {name!r}) is not hinted")

    if not isinstance(facts.size_summary, Mapping):
        raise LayoutError(f"query-memory-size-summary returned {type(facts.size_summary).__name__}")
    base = _int(facts.size_summary, "base-memory", "query-memory-size-summary")
    plugged_reported = _int(facts.size_summary, "plugged-memory", "query-memory-size-summary")
    if not main:
        raise LayoutError("no memory backend is mapped into guest-physical memory")
    main_total = 0
    for name in main:
        info = _block(blocks, name)
        _check_covered(name, info.used_length, [p for p in ram.mapped if p.block == name])
        main_total += info.used_length
    if main_total != base:
        raise LayoutError(
            f"main RAM blocks {', '.join(main)} hold {main_total:#x} bytes "
            f"but query-memory-size-summary says base-memory {base:#x}"
        )
    if plugged != plugged_reported:
        raise LayoutError(
            f"memory devices add up to {plugged:#x} bytes "
            f"but query-memory-size-summary says plugged-memory {plugged_reported:#x}"
        )
    for name, (addr, size) in sorted(dimms.items()):
        info = _block(blocks, name)
        pieces = [p for p in ram.mapped if p.block == name]
        if info.used_length != size or pieces != [Piece(addr, size, name, 0)]:
            found = ", ".join(f"{p.gpa:#x}+{p.size:#x}@{p.offset:#x}" for p in pieces) or "nothing"
            raise LayoutError(
                f"pc-dimm with memdev {name!r} should map {addr:#x}+{size:#x} "
                f"(block {info.used_length:#x} bytes) but info mtree maps {found}"
            )

    wanted = set(main) | set(dimms)
    visible = [p for p in ram.visible if p.block in wanted]
    excluded: list[Excluded] = []
    excluded.extend(_merge_hidden(ram.hidden, ram.mapped, wanted))
    if facts.tseg_max is not None:
        tseg_end = _tseg_end(ram.system)
        window = (max(0, tseg_end - facts.tseg_max), tseg_end)
        cut: list[Piece] = []
        for p in visible:
            cut.extend(subtract(p, [window]))
        if sum(p.size for p in cut) != sum(p.size for p in visible):
            excluded.append(Excluded(window[0], window[1] - window[0], "q35 TSEG (largest size the MCH allows)"))
        visible = cut
    ranges = _pages(visible)
    _check_unique(ranges)
    layout = RamLayout(
        tuple(ranges),
        {name: _block(blocks, name).used_length for name in sorted(wanted)},
        excluded=_spans(excluded, ranges),
    )
    return LearnedLayout(layout, tuple(excluded), tuple(notes), base, plugged)


def _spans(excluded: Sequence[Excluded], mapped: Sequence[RamRange]) -> tuple[tuple[int, int], ...]:
    """Excluded bytes as merged, page-aligned spans for the RamLayout, minus
    what is mapped (a window "may cover" RAM that is also visible, e.g. a PAM
    segment the firmware switched to RAM)."""
    ps = TARGET_PAGE_SIZE
    spans = sorted((e.gpa // ps * ps, -(-(e.gpa + e.size) // ps) * ps) for e in excluded)
    merged: list[list[int]] = []
    for s, e in spans:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    out: list[tuple[int, int]] = []
    for s, e in merged:
        pieces = [(s, e)]
        for r in mapped:
            pieces = [q for a, b in pieces for q in ((a, min(b, r.gpa)), (max(a, r.end), b)) if q[0] < q[1]]
        out.extend((a, b - a) for a, b in pieces)
    return tuple(out)


def _entries(value: Any, where: str) -> list[Mapping[str, Any]]:
    """A QMP reply that must be a list of objects."""
    if not isinstance(value, Sequence) or isinstance(value, (str, bytes)):
        raise LayoutError(f"{where} returned {type(value).__name__}, not a list")
    if len(value) > MAX_DEVICES:
        raise LayoutError(f"{where} returned {len(value)} entries (limit {MAX_DEVICES})")
    for entry in value:
        if not isinstance(entry, Mapping):
            raise LayoutError(f"{where}: entry {entry!r:.200} is not an object")
    return list(value)


def _str(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise LayoutError(f"{where}: entry without a string {key!r}: {dict(obj)!r:.200}")
    return value


def _int(obj: Mapping[str, Any], key: str, where: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise LayoutError(f"{where}: {key!r} is {value!r}, not a byte count")
    return value


def _memory_devices(
    devices: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, tuple[int, int]], dict[str, str], int]:
    """(pc-dimm memdev -> (addr, size), other memdev -> type, plugged bytes in total)."""
    dimms: dict[str, tuple[int, int]] = {}
    others: dict[str, str] = {}
    plugged = 0
    for dev in _entries(devices, "query-memory-devices"):
        typ = _str(dev, "type", "query-memory-devices")
        data = dev.get("data")
        if not isinstance(data, Mapping):
            raise LayoutError(f"query-memory-devices: {typ} entry without data")
        plugged += _int(data, "size", f"query-memory-devices {typ}")
        memdev = data.get("memdev")
        if not isinstance(memdev, str):
            continue
        backend = memdev.rsplit("/", 1)[-1]
        if typ == "dimm":
            dimms[backend] = (_int(data, "addr", "query-memory-devices dimm"), _int(data, "size", "dimm"))
        else:
            others[backend] = typ
    return dimms, others, plugged


def _block(blocks: Mapping[str, RamBlockInfo], name: str) -> RamBlockInfo:
    info = blocks.get(name)
    if info is None:
        raise LayoutError(f"RAM region {name!r} has no RAMBlock of that name")
    return info


def _check_covered(name: str, used: int, pieces: list[Piece]) -> None:
    """Every byte of a main RAM block must be reachable at some guest-physical address."""
    pos = 0
    for p in sorted(pieces, key=lambda p: p.offset):
        if p.offset > pos:
            break
        pos = max(pos, p.offset + p.size)
    if pos < used:
        raise LayoutError(f"RAMBlock {name!r} ({used:#x} bytes): offsets from {pos:#x} are not mapped by any alias")


def _merge_hidden(hidden: Iterable[Hidden], mapped: list[Piece], wanted: set[str]) -> list[Excluded]:
    """Hidden spans over wanted RAM, joined where they touch, naming every covering region."""
    spans = sorted((h.gpa, h.end, h.by) for h in hidden if _over_wanted(h.gpa, h.end, mapped, wanted))
    merged: list[tuple[int, int, set[str]]] = []
    for a, b, by in spans:
        if merged and a <= merged[-1][1]:
            last = merged[-1]
            merged[-1] = (last[0], max(b, last[1]), last[2] | {by})
        else:
            merged.append((a, b, {by}))
    return [Excluded(a, b - a, "may be covered by " + ", ".join(sorted(names))) for a, b, names in merged]


def _over_wanted(a: int, b: int, mapped: list[Piece], wanted: set[str]) -> bool:
    return any(p.block in wanted and p.gpa < b and a < p.end for p in mapped)


def _tseg_end(system: Region) -> int:
    """TSEG ends where the MCH's tseg-blackhole ends (at its start when its size is 0)."""
    for child in system.children:
        if child.name == "tseg-blackhole" and child.alias_of is None:
            return child.start if child.end - child.start == 1 else child.end
    raise LayoutError("tseg-blackhole not found directly under the system region")


def _pages(pieces: list[Piece]) -> list[RamRange]:
    """Trim to whole target pages and join neighbours that continue the same block."""
    ps = TARGET_PAGE_SIZE
    out: list[RamRange] = []
    for p in sorted(pieces, key=lambda p: p.gpa):
        start = -(-p.gpa // ps) * ps
        end = p.end // ps * ps
        offset = p.offset + (start - p.gpa)
        if end <= start or offset % ps:
            continue
        prev = out[-1] if out else None
        if prev and prev.end == start and prev.block == p.block and prev.offset + prev.size == offset:
            out[-1] = RamRange(prev.gpa, prev.size + end - start, prev.block, prev.offset)
        else:
            out.append(RamRange(start, end - start, p.block, offset))
    return out


def _check_unique(ranges: list[RamRange]) -> None:
    """No block byte may appear at two guest-physical addresses."""
    by_block: dict[str, list[RamRange]] = {}
    for r in ranges:
        by_block.setdefault(r.block, []).append(r)
    for name, rs in by_block.items():
        rs.sort(key=lambda r: r.offset)
        for a, b in itertools.pairwise(rs):
            if b.offset < a.offset + a.size:
                raise LayoutError(f"RAMBlock {name!r} offset {b.offset:#x} is mapped at both {a.gpa:#x} and {b.gpa:#x}")
