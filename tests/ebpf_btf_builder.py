"""Write small BTF blobs for tests: the layouts of kernels we cannot boot here.

Only the kinds the scanner reads are supported. Follows the format in the
kernel's Documentation/bpf/btf.rst (little-endian).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from guest_agent.sources.ebpf.btf import MAGIC, Kind


@dataclass
class BtfBuilder:
    _types: list[bytes] = field(default_factory=list)
    _strings: bytearray = field(default_factory=lambda: bytearray(b"\0"))

    def _name(self, name: str) -> int:
        if not name:
            return 0
        off = len(self._strings)
        self._strings += name.encode() + b"\0"
        return off

    def _add(self, name: str, kind: Kind, vlen: int, size_or_type: int, extra: bytes = b"") -> int:
        info = (int(kind) << 24) | vlen
        self._types.append(struct.pack("<III", self._name(name), info, size_or_type) + extra)
        return len(self._types)

    def int_(self, name: str, size: int) -> int:
        return self._add(name, Kind.INT, 0, size, struct.pack("<I", size * 8))

    def ptr(self, target: int) -> int:
        return self._add("", Kind.PTR, 0, target)

    def typedef(self, name: str, target: int) -> int:
        return self._add(name, Kind.TYPEDEF, 0, target)

    def array(self, elem: int, index: int, nelems: int) -> int:
        return self._add("", Kind.ARRAY, 0, 0, struct.pack("<III", elem, index, nelems))

    def struct(self, name: str, size: int, members: list[tuple[str, int, int]], union: bool = False) -> int:
        """members: (name, type id, byte offset)."""
        body = b"".join(struct.pack("<III", self._name(n), t, off * 8) for n, t, off in members)
        return self._add(name, Kind.UNION if union else Kind.STRUCT, len(members), size, body)

    def forward_struct(self) -> int:
        """Reserve an id for a struct defined later (for self-references)."""
        self._types.append(b"")
        return len(self._types)

    def define(self, tid: int, name: str, size: int, members: list[tuple[str, int, int]]) -> None:
        body = b"".join(struct.pack("<III", self._name(n), t, off * 8) for n, t, off in members)
        info = (int(Kind.STRUCT) << 24) | len(members)
        self._types[tid - 1] = struct.pack("<III", self._name(name), info, size) + body

    def enum(self, name: str, values: dict[str, int]) -> int:
        body = b"".join(struct.pack("<II", self._name(n), v & 0xFFFFFFFF) for n, v in values.items())
        return self._add(name, Kind.ENUM, len(values), 4, body)

    def func_proto(self, params: list[int]) -> int:
        body = b"".join(struct.pack("<II", 0, p) for p in params)
        return self._add("", Kind.FUNC_PROTO, len(params), 0, body)

    def build(self) -> bytes:
        types = b"".join(self._types)
        hdr_len = 24
        header = struct.pack("<HBBIIIII", MAGIC, 1, 0, hdr_len, 0, len(types), len(types), len(self._strings))
        return header + types + bytes(self._strings)


def kernel_btf(
    *,
    enum_pagetype: dict[str, int] | None,
    sizeof_page: int = 64,
    off_type: int = 48,
    off_private: int = 40,
    off_refcount: int = 52,
    nr_orders: int = 11,
    type_member: str = "page_type",
    tracepoints: bool = True,
) -> bytes:
    """BTF shaped like a real kernel's, as far as the scanner looks.

    ``struct page`` nests ``private`` in an anonymous struct inside an
    anonymous union and ``page_type`` in another anonymous union, as in
    include/linux/mm_types.h of 6.1 and 6.12.
    """
    b = BtfBuilder()
    u32 = b.int_("unsigned int", 4)
    u64 = b.int_("long unsigned int", 8)
    s32 = b.int_("int", 4)
    void_ptr = b.ptr(0)
    page = b.forward_struct()
    page_ptr = b.ptr(page)
    lru = b.struct("list_head", 16, [("next", void_ptr, 0), ("prev", void_ptr, 8)])
    inner = b.struct(
        "",
        off_private,
        [("lru", lru, 0), ("mapping", void_ptr, 16), ("index", u64, 24), ("private", u64, off_private - 8)],
    )
    first_union = b.struct("", off_private, [("", inner, 0), ("compound_head", u64, 0)], union=True)
    type_union = b.struct("", 4, [("_mapcount", s32, 0), (type_member, u32, 0)], union=True)
    atomic = b.struct("", 4, [("counter", s32, 0)])
    atomic_t = b.typedef("atomic_t", atomic)
    members = [("flags", u64, 0), ("", first_union, 8), ("", type_union, off_type)]
    members.append(("_refcount", atomic_t, off_refcount))
    if type_member != "page_type":
        members = [m for m in members if m[0] != "page_type"]
    b.define(page, "page", sizeof_page, members)
    free_area = b.struct("free_area", 88, [("nr_free", u64, 80)])
    areas = b.array(free_area, u32, nr_orders)
    b.struct("zone", 1600, [("flags", u64, 0), ("free_area", areas, 256)])
    if enum_pagetype is not None:
        b.enum("pagetype", enum_pagetype)
    if tracepoints:
        for tp, params in {
            "mm_page_alloc": [void_ptr, page_ptr, u32, u32, s32],
            "mm_page_alloc_zone_locked": [void_ptr, page_ptr, u32, s32, s32],
            "mm_page_alloc_extfrag": [void_ptr, page_ptr, s32, s32, s32, s32],
            "mm_page_free": [void_ptr, page_ptr, u32],
            "mm_compaction_isolate_freepages": [void_ptr, u64, u64, u64, u64],
            "test_pages_isolated": [void_ptr, u64, u64, u64],
        }.items():
            b.typedef("btf_trace_" + tp, b.ptr(b.func_proto(params)))
    return b.build()
