"""Parse QEMU's ``info mtree -D`` and find which guest-physical bytes are RAM.

The non-flat tree shows the alias structure (``ram-below-4g @pc.ram ...``)
that the flat view hides behind holes, and ``-D`` also prints disabled
regions: PAM, SMRAM and TSEG windows that are off now may be switched on by
the guest later, so RAM they could cover is treated as covered (see
:func:`map_ram`). The text format is the same in QEMU 7.2 and 10.x
(``mtree_print_mr`` in softmmu/memory.c, system/memory.c).

The text comes from QEMU, which runs guest-influenced code, so both steps are
bounded: the input's size, line length and nesting are capped, alias targets
may nest only :data:`_MAX_ALIAS_DEPTH` deep, the walk recurses at most
:data:`MAX_WALK_DEPTH` frames, and the work of :func:`map_ram` (regions
visited, siblings compared, pieces made) may not exceed :data:`WORK_PER_REGION`
per printed region. Anything beyond ends as :class:`MtreeError`, so the time
taken is linear in the input and no other exception escapes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import grpc

from host_collector.errors import CollectorError
from host_collector.layout import RamRange

_MAX_ALIAS_DEPTH = 16
_INDENT = 2
#: Bounds on the text (a real ``info mtree -D`` is tens of KiB, lines under
#: 200 characters, regions nested under 10 deep).
MAX_MTREE_BYTES = 4 << 20
MAX_LINE = 4096
MAX_LEVEL = 64
#: Bounds on :func:`map_ram`: recursion frames, and units of work per region.
MAX_WALK_DEPTH = 200
WORK_PER_REGION = 256
_WORK_BASE = 100_000

_LINE = re.compile(
    r"^(?P<indent> *)(?P<start>[0-9a-f]{16})-(?P<end>[0-9a-f]{16}) "
    r"\(prio (?P<prio>-?\d{1,10}), (?P<type>[a-z/-]+)\): (?P<rest>.*?)(?P<disabled> \[disabled\])?$"
)
_SPAN = re.compile(r"^(?P<tstart>[0-9a-f]{16})-(?P<tend>[0-9a-f]{16})$")
_HEAD = re.compile(r"^(?P<kind>address-space|memory-region): (?P<name>.+)$")


class MtreeError(CollectorError):
    """``info mtree`` text that does not describe a usable memory tree."""

    default_status = grpc.StatusCode.FAILED_PRECONDITION


@dataclass
class Region:
    """One printed MemoryRegion. ``start``/``end`` are absolute in its section, end exclusive."""

    start: int
    end: int
    prio: int
    kind: str  # "ram", "rom", "romd", "ramd" or "i/o"
    nonvolatile: bool
    name: str
    enabled: bool
    alias_of: str | None = None
    alias_offset: int = 0
    children: list[Region] = field(default_factory=list)
    line: int = 0

    def overlaps(self, other: Region) -> bool:
        return self.start < other.end and other.start < self.end


@dataclass
class Section:
    """A tree printed under one or more ``address-space:``/``memory-region:`` headers."""

    heads: list[tuple[str, str]]
    root: Region
    text: str


def parse_mtree(text: str) -> list[Section]:
    """Split ``info mtree [-D]`` output into sections of region trees.

    :raise MtreeError: on a line that is neither a header, a region nor blank,
        or on a region indented deeper than a parent allows.
    """
    if len(text) > MAX_MTREE_BYTES:
        raise MtreeError(f"info mtree output of {len(text)} characters (limit {MAX_MTREE_BYTES})")
    sections: list[Section] = []
    heads: list[tuple[str, str]] = []
    stack: list[Region] = []
    body: list[str] = []

    def finish() -> None:
        if heads and stack:
            sections.append(Section(list(heads), stack[0], "\n".join(body)))

    for no, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip()
        if not line:
            continue
        if len(line) > MAX_LINE:
            raise MtreeError(f"line {no}: longer than {MAX_LINE} characters")
        head = _HEAD.match(line)
        if head:
            if stack:  # a new header after a tree starts a new section
                finish()
                heads.clear()
                stack.clear()
                body.clear()
            heads.append((head["kind"], head["name"]))
            continue
        if "[DETECTED OVERFLOW!]" in line:
            raise MtreeError(f"line {no}: QEMU reports an overflowing region: {line.strip()}")
        m = _LINE.match(line)
        if not m:
            raise MtreeError(f"line {no}: not an mtree region line: {line.strip()!r}")
        if not heads:
            raise MtreeError(f"line {no}: region before any address-space/memory-region header")
        region = _region(m, no)
        level = len(m["indent"]) // _INDENT
        if len(m["indent"]) % _INDENT or level < 1:
            raise MtreeError(f"line {no}: unexpected indentation")
        if level > MAX_LEVEL:
            raise MtreeError(f"line {no}: regions nested deeper than {MAX_LEVEL}")
        if not stack:
            if level != 1:
                raise MtreeError(f"line {no}: section root at level {level}")
            stack.append(region)
        else:
            if level < 2 or level > len(stack) + 1:
                raise MtreeError(
                    f"line {no}: region at level {level} has no parent "
                    "(use 'info mtree -D': disabled parents are not printed otherwise)"
                )
            del stack[level - 1 :]
            stack[-1].children.append(region)
            stack.append(region)
        body.append(line.strip())
    finish()
    return sections


def _region(m: re.Match[str], no: int) -> Region:
    start, last = int(m["start"], 16), int(m["end"], 16)
    if last < start:
        raise MtreeError(f"line {no}: end {last:#x} before start {start:#x}")
    kind = m["type"]
    nonvolatile = kind.startswith("nv-")
    if nonvolatile:
        kind = kind[3:]
    rest = m["rest"]
    r = Region(start, last + 1, int(m["prio"]), kind, nonvolatile, rest, m["disabled"] is None, line=no)
    if rest.startswith("alias "):
        name, target, tstart, tlast = _alias(rest, no)
        if tlast - tstart != last - start:
            raise MtreeError(f"line {no}: alias size differs from its target span")
        r.name, r.alias_of, r.alias_offset = name, target, tstart
    return r


def _alias(rest: str, no: int) -> tuple[str, str, int, int]:
    """``alias NAME @TARGET START-END``: the name ends at the first `` @``, the
    target at the last space (QEMU prints names unquoted). Split, not a
    backtracking regex, so a line costs time linear in its length."""
    head, sep, span = rest[len("alias ") :].rpartition(" ")
    name, at, target = head.partition(" @")
    m = _SPAN.match(span)
    if not (sep and at and m):
        raise MtreeError(f"line {no}: malformed alias: {rest[:200]!r}")
    return name, target, int(m["tstart"], 16), int(m["tend"], 16)


#: ``size`` guest-physical bytes at ``gpa`` backed by RAM region ``block`` at
#: ``offset``: the registry's own range type, before any validation.
Piece = RamRange


@dataclass(frozen=True)
class Hidden:
    """Guest-physical bytes [gpa, end) where region ``by`` may cover RAM (now or after a switch)."""

    gpa: int
    end: int
    by: str


@dataclass
class RamMap:
    """What the system tree maps: all RAM (``mapped``), what stays uncovered (``visible``)."""

    mapped: list[Piece]
    visible: list[Piece]
    hidden: list[Hidden]
    system: Region


def find_system(sections: list[Section]) -> Region:
    """The root of the CPU's view of memory: ``address-space: memory``."""
    for s in sections:
        if ("address-space", "memory") in s.heads:
            return s.root
    for s in sections:
        if ("memory-region", "system") in s.heads:
            return s.root
    raise MtreeError("no 'address-space: memory' in info mtree output")


def map_ram(sections: list[Section]) -> RamMap:
    """Resolve every enabled RAM region reachable from the system root through aliases.

    A child's bytes are taken as *hidden* wherever a sibling of the same or a
    higher priority overlaps it, enabled or not: QEMU renders higher
    priorities first, equal priorities in an order the text does not show,
    and a disabled sibling (PAM, SMRAM) may be enabled by the guest at any
    time. RAM regions with subregions are hidden under all of them.
    """
    targets = _alias_targets(sections)
    system = find_system(sections)
    result = RamMap([], [], [], system)
    regions = sum(_count(s.root) for s in sections)
    budget = _Budget(_WORK_BASE + WORK_PER_REGION * regions)
    _walk(system, 0, system.start, system.end, targets, result, 0, result.visible, budget, 0)
    return result


def _count(root: Region) -> int:
    n, todo = 0, [root]
    while todo:
        r = todo.pop()
        n += 1
        todo.extend(r.children)
    return n


class _Budget:
    """Units of work :func:`map_ram` may still spend (aliases fanning out
    into the same targets over and over would otherwise take exponential time)."""

    def __init__(self, units: int) -> None:
        self.left = units

    def spend(self, units: int) -> None:
        self.left -= units
        if self.left < 0:
            raise MtreeError("memory tree too complex to resolve (aliases or overlaps fan out)")


def _alias_targets(sections: list[Section]) -> dict[str, Region | None]:
    """memory-region sections by name; None marks a name printed twice with different trees."""
    out: dict[str, Region | None] = {}
    texts: dict[str, str] = {}
    for s in sections:
        for kind, name in s.heads:
            if kind != "memory-region":
                continue
            if name in texts and texts[name] != s.text:
                out[name] = None
            elif name not in texts:
                texts[name] = s.text
                out[name] = s.root
    return out


def _walk(
    r: Region,
    shift: int,
    lo: int,
    hi: int,
    targets: dict[str, Region | None],
    out: RamMap,
    depth: int,
    visible: list[Piece],
    budget: _Budget,
    frames: int,
) -> None:
    """Collect RAM of ``r`` within printed window [lo, hi); GPA = printed + shift."""
    if frames >= MAX_WALK_DEPTH:
        raise MtreeError(f"line {r.line}: regions and aliases nested deeper than {MAX_WALK_DEPTH}")
    budget.spend(1 + len(r.children))
    if not r.enabled:
        return
    lo, hi = max(lo, r.start), min(hi, r.end)
    if lo >= hi:
        return
    if r.alias_of is not None:
        if depth >= _MAX_ALIAS_DEPTH:
            raise MtreeError(f"line {r.line}: aliases nested deeper than {_MAX_ALIAS_DEPTH}")
        if r.alias_of not in targets:
            raise MtreeError(f"line {r.line}: alias {r.name!r} targets {r.alias_of!r}, which is not printed")
        target = targets[r.alias_of]
        if target is None:
            raise MtreeError(f"alias target {r.alias_of!r} names two different regions; cannot resolve")
        delta = target.start + r.alias_offset - r.start
        _walk(target, shift - delta, lo + delta, hi + delta, targets, out, depth + 1, visible, budget, frames + 1)
        return
    for child in r.children:
        budget.spend(len(r.children))
        shadows = [
            (max(s.start, child.start, lo), min(s.end, child.end, hi), s.name)
            for s in r.children
            if s is not child and s.prio >= child.prio and s.overlaps(child)
        ]
        shadows = [(a, b, n) for a, b, n in shadows if a < b]
        if not shadows:
            _walk(child, shift, lo, hi, targets, out, depth, visible, budget, frames + 1)
            continue
        inner: list[Piece] = []
        _walk(child, shift, lo, hi, targets, out, depth, inner, budget, frames + 1)
        budget.spend(len(inner) * len(shadows))
        gpa_shadows = [(a + shift, b + shift) for a, b, _ in shadows]
        for piece in inner:
            for a, b, name in shadows:
                if a + shift < piece.end and piece.gpa < b + shift:
                    out.hidden.append(Hidden(max(a + shift, piece.gpa), min(b + shift, piece.end), name))
            visible.extend(subtract(piece, gpa_shadows))
    if r.kind == "ram" and not r.nonvolatile:
        piece = Piece(lo + shift, hi - lo, r.name, lo - r.start)
        out.mapped.append(piece)
        budget.spend(len(r.children))
        covered = [(c.start + shift, c.end + shift) for c in r.children]
        for c in r.children:
            if c.start + shift < piece.end and piece.gpa < c.end + shift:
                out.hidden.append(Hidden(max(c.start + shift, piece.gpa), min(c.end + shift, piece.end), c.name))
        visible.extend(subtract(piece, covered))


def subtract(piece: Piece, holes: Iterable[tuple[int, int]]) -> Iterator[Piece]:
    """``piece`` minus the GPA intervals ``holes``."""
    pos = piece.gpa
    for a, b in sorted(holes):
        a, b = max(a, piece.gpa), min(b, piece.end)
        if a >= b:
            continue
        if a > pos:
            yield Piece(pos, a - pos, piece.block, piece.offset + pos - piece.gpa)
        pos = max(pos, b)
    if pos < piece.end:
        yield Piece(pos, piece.end - pos, piece.block, piece.offset + pos - piece.gpa)
