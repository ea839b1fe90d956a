"""The BTF reader and the struct page layout / PageBuddy encoding choice.

Against this kernel's BTF (with bpftool as the independent reader), and
against synthetic BTF shaped like the 6.1, 6.11 and 6.12 kernels we cannot
boot here.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from typing import Any

import pytest

from guest_agent.sources.ebpf.btf import VMLINUX, Btf, BtfError, Kind
from guest_agent.sources.ebpf.layout import BuddyEncoding, PageLayoutError, choose_encoding, page_layout
from guest_agent.sources.ebpf.program import tracepoint_problems
from tests.ebpf_btf_builder import BtfBuilder, kernel_btf

needs_btf = pytest.mark.skipif(not os.path.exists(VMLINUX), reason="kernel has no BTF")
needs_bpftool = pytest.mark.skipif(shutil.which("bpftool") is None, reason="bpftool not installed")

LEGACY = BuddyEncoding(0xF0000080, 0xF0000000, "")
PGTY = BuddyEncoding(0xFF000000, 0xF0000000, "")


@pytest.fixture(scope="module")
def bpftool_dump() -> str:
    return subprocess.run(
        ["bpftool", "btf", "dump", "file", VMLINUX], check=True, capture_output=True, text=True
    ).stdout


def _bpftool_type(dump: str, kind: str, name: str) -> str:
    """The dump lines of one named type (header and members)."""
    m = re.search(rf"^\[\d+\] {kind} '{re.escape(name)}'.*?(?=^\[)", dump, re.M | re.S)
    assert m, f"bpftool shows no {kind} {name}"
    return m.group(0)


# -- this kernel ------------------------------------------------------------------


@needs_btf
@needs_bpftool
def test_struct_page_matches_bpftool(bpftool_dump: str) -> None:
    btf = Btf.load()
    page = btf.get(Kind.STRUCT, "page")
    header = _bpftool_type(bpftool_dump, "STRUCT", "page").splitlines()[0]
    assert f"size={btf.size(page)} " in header + " "
    # bpftool lists top-level members with bit offsets: flags at 0, the
    # refcount directly (not nested), so compare those two exactly.
    body = _bpftool_type(bpftool_dump, "STRUCT", "page")
    m = re.search(r"'_refcount' type_id=\d+ bits_offset=(\d+)", body)
    assert m, body
    refcount_bits = int(m.group(1))
    assert btf.byte_offset("page", "_refcount") * 8 == refcount_bits
    # Nested members agree with the C dump bpftool renders.
    assert btf.byte_offset("page", "flags") == 0


@needs_btf
@needs_bpftool
def test_enum_and_free_area_match_bpftool(bpftool_dump: str) -> None:
    btf = Btf.load()
    values = btf.enum("pagetype")
    if values is None:
        assert "ENUM 'pagetype'" not in bpftool_dump
    else:
        body = _bpftool_type(bpftool_dump, "ENUM", "pagetype")
        theirs = {n: int(v) for n, v in re.findall(r"'(\w+)' val=(-?\d+)", body)}
        assert values == theirs
    zone = btf.get(Kind.STRUCT, "zone")
    arr = btf.member(zone, "free_area").type_id
    m = re.search(rf"^\[{arr}\] ARRAY .* nr_elems=(\d+)", bpftool_dump, re.M)
    assert m and btf.array_len(arr) == int(m.group(1))


@needs_btf
def test_layout_of_this_kernel_is_consistent() -> None:
    btf = Btf.load()
    lay = page_layout(btf, os.uname().release)
    # page_type and _mapcount share a union; private is a long, refcount an int.
    assert lay.off_page_type == btf.byte_offset("page", "_mapcount")
    assert lay.off_private % 8 == 0 and lay.off_refcount % 4 == 0
    assert 6 <= lay.max_order <= 15
    problems, _missing = tracepoint_problems(btf)
    assert problems == []


# -- synthetic kernels -------------------------------------------------------------------


def test_linux_6_1_layout_uses_legacy_inverted_buddy() -> None:
    btf = Btf(kernel_btf(enum_pagetype=None))
    lay = page_layout(btf, "6.1.0-56-amd64")
    assert (lay.sizeof_page, lay.off_page_type, lay.off_private, lay.off_refcount) == (64, 48, 40, 52)
    assert lay.max_order == 10
    assert (lay.encoding.mask, lay.encoding.value) == (0xF0000080, 0xF0000000)
    assert "6.1-6.10" in lay.encoding.source
    # 6.1 page_type values: buddy clears PG_buddy in the -1 "no type" value.
    assert lay.encoding.is_buddy(0xFFFFFF7F)
    for other in (0xFFFFFFFF, 0x0, 0x5, 0xFFFFFDFF, 0xFFFFFEFF):  # none, mapcounts, table, offline
        assert not lay.encoding.is_buddy(other)


def test_linux_6_12_layout_uses_top_byte() -> None:
    values = {"PGTY_buddy": 0xF0, "PGTY_offline": 0xF1, "PGTY_table": 0xF2, "PGTY_slab": 0xF5}
    lay = page_layout(Btf(kernel_btf(enum_pagetype=values)), "6.12.0-1-amd64")
    assert (lay.encoding.mask, lay.encoding.value) == (0xFF000000, 0xF0000000)
    assert lay.encoding.is_buddy(0xF0000000)
    for other in (0xF5000000, 0xF2000000, 0xFFFFFFFF, 0x0, 0x1):
        assert not lay.encoding.is_buddy(other)


def test_linux_6_11_enum_is_read_from_btf() -> None:
    values = {
        "PG_buddy": 0x40000000,
        "PG_offline": 0x20000000,
        "PAGE_TYPE_BASE": 0x80000000,
        "PAGE_MAPCOUNT_RESERVE": ~0xFFFF,
    }
    enc = choose_encoding(Btf(kernel_btf(enum_pagetype=values)), "6.11.5")
    assert (enc.mask, enc.value) == (0xC0000000, 0x80000000)
    assert enc.is_buddy(0xBFFFFFFF) and not enc.is_buddy(0xFFFFFFFF) and not enc.is_buddy(0x3)


def test_release_decides_when_btf_has_no_enum() -> None:
    btf = Btf(kernel_btf(enum_pagetype=None))
    assert choose_encoding(btf, "6.11.0").mask == 0xC0000000
    assert choose_encoding(btf, "6.10.3").mask == 0xF0000080
    assert choose_encoding(btf, "5.15.0-91-generic").mask == 0xF0000080
    late = choose_encoding(btf, "6.18.44-fc")
    assert (late.mask, late.value) == (0xFF000000, 0xF0000000) and "assumed" in late.source


def test_max_order_follows_free_area_length() -> None:
    lay = page_layout(Btf(kernel_btf(enum_pagetype=None, nr_orders=13)), "6.1.0")
    assert lay.max_order == 12


def test_mapcount_used_when_page_type_has_another_name() -> None:
    lay = page_layout(Btf(kernel_btf(enum_pagetype=None, type_member="_page_type_old")), "6.1.0")
    assert lay.off_page_type == 48


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"off_type": 50}, "page_type at offset 50"),
        ({"off_refcount": 62}, "_refcount at offset 62"),
        ({"nr_orders": 1}, "max order 0"),
    ],
)
def test_bad_layouts_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(PageLayoutError, match=message):
        page_layout(Btf(kernel_btf(enum_pagetype=None, **kwargs)), "6.1.0")


def test_missing_struct_page_is_named() -> None:
    b = BtfBuilder()
    b.int_("int", 4)
    with pytest.raises(PageLayoutError, match="no struct 'page'"):
        page_layout(Btf(b.build()), "6.1.0")


def test_ambiguous_member_is_refused() -> None:
    b = BtfBuilder()
    u64 = b.int_("long", 8)
    inner = b.struct("", 8, [("private", u64, 0)])
    b.struct("page", 16, [("private", u64, 0), ("", inner, 8)])
    btf = Btf(b.build())
    with pytest.raises(BtfError, match="ambiguous"):
        btf.member(btf.get(Kind.STRUCT, "page"), "private")


def test_tracepoint_prototypes_are_checked() -> None:
    assert tracepoint_problems(Btf(kernel_btf(enum_pagetype=None))) == (
        [],
        ["mm_compaction_fast_isolate_freepages: not in BTF"],
    )
    problems, _ = tracepoint_problems(Btf(kernel_btf(enum_pagetype=None, tracepoints=False)))
    assert any(p.startswith("mm_page_alloc: not in BTF") for p in problems)


def test_wrong_tracepoint_prototype_is_refused() -> None:
    b = BtfBuilder()
    u32 = b.int_("unsigned int", 4)
    void_ptr = b.ptr(0)
    b.typedef("btf_trace_mm_page_alloc", b.ptr(b.func_proto([void_ptr, u32, u32])))
    problems, _ = tracepoint_problems(Btf(b.build()))
    assert any("mm_page_alloc(unsigned int, unsigned int) does not start with" in p for p in problems)


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"", "shorter than its header"),
        (struct.pack("<HBBIIIII", 0x9FEB, 1, 0, 24, 0, 0, 0, 0), "bad BTF magic"),
        (struct.pack("<HBBIIIII", 0xEB9F, 2, 0, 24, 0, 0, 0, 1) + b"\0", "unsupported BTF version"),
        (struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, 100, 100, 1) + b"\0", "run past the end"),
        (
            struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, 12, 12, 1) + struct.pack("<III", 0, 31 << 24, 0) + b"\0",
            "unknown BTF kind",
        ),
        (
            struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, 12, 12, 1) + struct.pack("<III", 0, (4 << 24) | 1, 8) + b"\0",
            "runs past the type section",
        ),
    ],
)
def test_malformed_btf_is_refused(blob: bytes, message: str) -> None:
    with pytest.raises(BtfError, match=message):
        Btf(blob)
