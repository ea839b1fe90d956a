"""Where the scanner looks in ``struct page``, and how PageBuddy is spelled.

Everything comes from the running kernel's BTF. PageBuddy is a value in the
``page_type`` word (a union with ``_mapcount``) and its encoding changed twice
(shared/reference/ebpf.md §1.1); all three are a mask/value test:

* 6.12+: ``enum pagetype`` has ``PGTY_buddy`` (0xf0); the type is the top byte:
  ``(page_type & 0xff000000) == PGTY_buddy << 24``.
* 6.11: ``enum pagetype`` has ``PG_buddy`` = 0x40000000 and ``PAGE_TYPE_BASE`` =
  0x80000000, inverted sense: ``(page_type & (BASE | PG_buddy)) == BASE``.
* 6.1 … 6.10: plain ``#define``s, not in BTF: BASE 0xf0000000, PG_buddy 0x80,
  same inverted test (6.1 include/linux/page-flags.h).

Where BTF cannot tell (no enum), the kernel release decides, and the self-test
against /proc/kpageflags has the last word either way.

The order of a free block is ``page->private`` of its head page
(``set_buddy_order``); the largest order is ``len(zone.free_area) - 1`` (the
array is ``MAX_ORDER`` long in 6.1 and ``NR_PAGE_ORDERS`` long since 6.8).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...errors import AgentError
from .btf import Btf, BtfError, Kind

LEGACY_BASE = 0xF0000000
LEGACY_PG_BUDDY = 0x00000080
V611_BASE = 0x80000000
V611_PG_BUDDY = 0x40000000
PGTY_BUDDY_DEFAULT = 0xF0


class PageLayoutError(AgentError):
    """The kernel's BTF lacks something the scanner needs (in struct page, mostly)."""


@dataclass(frozen=True)
class BuddyEncoding:
    """PageBuddy(page) is ``page_type & mask == value``."""

    mask: int
    value: int
    #: Which rule chose it, for logs and the attach facts.
    source: str

    def is_buddy(self, page_type: int) -> bool:
        return page_type & self.mask == self.value


@dataclass(frozen=True)
class PageLayout:
    sizeof_page: int
    off_page_type: int
    off_private: int
    off_refcount: int
    #: Largest buddy order (10 on x86_64).
    max_order: int
    encoding: BuddyEncoding


def release_version(release: str) -> tuple[int, int]:
    """(major, minor) of a ``uname -r`` string such as ``6.1.0-56-amd64``."""
    m = re.match(r"(\d+)\.(\d+)", release)
    if not m:
        raise PageLayoutError(f"cannot read a kernel version from {release!r}")
    return int(m.group(1)), int(m.group(2))


def choose_encoding(btf: Btf, release: str) -> BuddyEncoding:
    """Pick the PageBuddy test for this kernel (see the module docstring)."""
    for enum_name in ("pagetype", "page_type"):
        values = btf.enum(enum_name)
        if not values:
            continue
        if "PGTY_buddy" in values:
            v = values["PGTY_buddy"]
            if not 0 < v <= 0xFF:
                raise PageLayoutError(f"enum {enum_name}: PGTY_buddy={v:#x} is not a byte")
            return BuddyEncoding(0xFF000000, v << 24, f"BTF enum {enum_name}: PGTY_buddy={v:#x}")
        if "PG_buddy" in values and "PAGE_TYPE_BASE" in values:
            base, bit = values["PAGE_TYPE_BASE"] & 0xFFFFFFFF, values["PG_buddy"] & 0xFFFFFFFF
            if not base or not bit or base & bit:
                raise PageLayoutError(f"enum {enum_name}: odd PAGE_TYPE_BASE/PG_buddy {base:#x}/{bit:#x}")
            return BuddyEncoding(base | bit, base, f"BTF enum {enum_name}: PAGE_TYPE_BASE={base:#x} PG_buddy={bit:#x}")
    version = release_version(release)
    if version == (6, 11):
        return BuddyEncoding(V611_BASE | V611_PG_BUDDY, V611_BASE, f"release {release}: 6.11 inverted PG_buddy")
    if version < (6, 12):
        return BuddyEncoding(
            LEGACY_BASE | LEGACY_PG_BUDDY,
            LEGACY_BASE,
            f"release {release}, no enum pagetype in BTF: 6.1-6.10 inverted PG_buddy",
        )
    return BuddyEncoding(
        0xFF000000,
        PGTY_BUDDY_DEFAULT << 24,
        f"release {release}, no enum pagetype in BTF: assumed PGTY_buddy=0xf0",
    )


def page_layout(btf: Btf, release: str) -> PageLayout:
    """Read the struct page layout the scanner needs from BTF.

    :raise PageLayoutError: naming what is missing.
    """
    try:
        page = btf.get(Kind.STRUCT, "page")
        try:
            off_type = btf.member(page, "page_type").bit_offset // 8
        except BtfError:
            off_type = btf.member(page, "_mapcount").bit_offset // 8
        off_private = btf.member(page, "private").bit_offset // 8
        off_refcount = btf.member(page, "_refcount").bit_offset // 8
        sizeof_page = btf.size(page)
        zone = btf.get(Kind.STRUCT, "zone")
        max_order = btf.array_len(btf.member(zone, "free_area").type_id) - 1
    except BtfError as e:
        raise PageLayoutError(f"BTF: {e}") from e
    for what, off, size in (
        ("page_type", off_type, 4),
        ("private", off_private, 8),
        ("_refcount", off_refcount, 4),
    ):
        if off % size or off + size > sizeof_page:
            raise PageLayoutError(f"struct page.{what} at offset {off} does not fit a {size}-byte read")
    if not 0 < max_order <= 15:
        raise PageLayoutError(f"zone.free_area implies max order {max_order}; expected 1..15")
    return PageLayout(
        sizeof_page=sizeof_page,
        off_page_type=off_type,
        off_private=off_private,
        off_refcount=off_refcount,
        max_order=max_order,
        encoding=choose_encoding(btf, release),
    )
