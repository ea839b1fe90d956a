"""A small reader for the kernel's BTF (``/sys/kernel/btf/vmlinux``).

The scanner must not take struct layouts from kernel headers: the headers bcc
compiles against may belong to another kernel (shared/reference/ebpf.md §3).
BTF describes the running kernel itself, so sizes, member offsets, enum values
and tracepoint prototypes are read from it. The format is documented in the
kernel's Documentation/bpf/btf.rst; only what the scanner needs is decoded.

One pass records where each type's record starts; names are looked up by
their offset in the string section, so no string is decoded unless asked for.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from ...errors import AgentError

VMLINUX = "/sys/kernel/btf/vmlinux"
MAGIC = 0xEB9F
_HEADER = struct.Struct("<HBBIIIII")
_TYPE = struct.Struct("<III")
_U32 = struct.Struct("<I")


class BtfError(AgentError):
    """Malformed BTF, or a type the caller needs is missing."""


class Kind(enum.IntEnum):
    INT = 1
    PTR = 2
    ARRAY = 3
    STRUCT = 4
    UNION = 5
    ENUM = 6
    FWD = 7
    TYPEDEF = 8
    VOLATILE = 9
    CONST = 10
    RESTRICT = 11
    FUNC = 12
    FUNC_PROTO = 13
    VAR = 14
    DATASEC = 15
    FLOAT = 16
    DECL_TAG = 17
    TYPE_TAG = 18
    ENUM64 = 19


#: Bytes that follow the common 12-byte record: (fixed, per vlen entry).
_EXTRA = {
    Kind.INT: (4, 0),
    Kind.PTR: (0, 0),
    Kind.ARRAY: (12, 0),
    Kind.STRUCT: (0, 12),
    Kind.UNION: (0, 12),
    Kind.ENUM: (0, 8),
    Kind.FWD: (0, 0),
    Kind.TYPEDEF: (0, 0),
    Kind.VOLATILE: (0, 0),
    Kind.CONST: (0, 0),
    Kind.RESTRICT: (0, 0),
    Kind.FUNC: (0, 0),
    Kind.FUNC_PROTO: (0, 8),
    Kind.VAR: (4, 0),
    Kind.DATASEC: (0, 12),
    Kind.FLOAT: (0, 0),
    Kind.DECL_TAG: (4, 0),
    Kind.TYPE_TAG: (0, 0),
    Kind.ENUM64: (0, 12),
}
_MODIFIERS = (Kind.TYPEDEF, Kind.VOLATILE, Kind.CONST, Kind.RESTRICT, Kind.TYPE_TAG)


@dataclass(frozen=True)
class Member:
    name: str
    type_id: int
    #: Offset in bits from the start of the outermost struct.
    bit_offset: int


class Btf:
    """Types of one BTF blob, looked up by kind and name."""

    def __init__(self, data: bytes) -> None:
        if len(data) < _HEADER.size:
            raise BtfError("BTF blob is shorter than its header")
        magic, version, _flags, hdr_len, type_off, type_len, str_off, str_len = _HEADER.unpack_from(data, 0)
        if magic != MAGIC:
            raise BtfError(f"bad BTF magic {magic:#x} (big-endian BTF is not supported)")
        if version != 1:
            raise BtfError(f"unsupported BTF version {version}")
        t0, s0 = hdr_len + type_off, hdr_len + str_off
        if t0 + type_len > len(data) or s0 + str_len > len(data):
            raise BtfError("BTF sections run past the end of the blob")
        self._data = data
        self._strings = data[s0 : s0 + str_len]
        #: Record start of type id i at _starts[i]; id 0 is void.
        self._starts = [0]
        pos, end = t0, t0 + type_len
        while pos < end:
            if pos + _TYPE.size > end:
                raise BtfError(f"truncated type record at byte {pos}")
            info = _U32.unpack_from(data, pos + 4)[0]
            try:
                fixed, each = _EXTRA[Kind((info >> 24) & 0x1F)]
            except ValueError:
                raise BtfError(f"unknown BTF kind {(info >> 24) & 0x1F} at byte {pos}") from None
            self._starts.append(pos)
            pos += _TYPE.size + fixed + each * (info & 0xFFFF)
        if pos != end:
            raise BtfError("last type record runs past the type section")

    @classmethod
    def load(cls, path: str = VMLINUX) -> Btf:
        with open(path, "rb") as f:
            return cls(f.read())

    def __len__(self) -> int:
        return len(self._starts)

    # -- raw records ----------------------------------------------------------

    def _record(self, tid: int) -> tuple[Kind, int, int, bool, int]:
        """(kind, name_off, vlen, kind_flag, size_or_type) of type ``tid``."""
        if not 0 < tid < len(self._starts):
            raise BtfError(f"type id {tid} out of range")
        name_off, info, size_or_type = _TYPE.unpack_from(self._data, self._starts[tid])
        return Kind((info >> 24) & 0x1F), name_off, info & 0xFFFF, bool(info >> 31), size_or_type

    def _extra(self, tid: int) -> int:
        return self._starts[tid] + _TYPE.size

    def _str(self, off: int) -> str:
        end = self._strings.find(b"\0", off)
        if off >= len(self._strings) or end < 0:
            raise BtfError(f"string offset {off} out of range")
        return self._strings[off:end].decode("utf-8", "replace")

    def _str_offsets(self, name: str) -> set[int]:
        """Offsets in the string section where ``name`` starts."""
        needle = name.encode()
        found: set[int] = set()
        i = self._strings.find(b"\0" + needle + b"\0")
        while i >= 0:
            found.add(i + 1)
            i = self._strings.find(b"\0" + needle + b"\0", i + 1)
        if self._strings.startswith(needle + b"\0"):
            found.add(0)
        return found

    # -- lookups ---------------------------------------------------------------

    def kind(self, tid: int) -> Kind:
        return self._record(tid)[0]

    def name(self, tid: int) -> str:
        return self._str(self._record(tid)[1])

    def find(self, kind: Kind, name: str) -> int | None:
        """The first type of ``kind`` called ``name``, or None."""
        offs = self._str_offsets(name)
        if not offs:
            return None
        for tid in range(1, len(self._starts)):
            name_off, info = struct.unpack_from("<II", self._data, self._starts[tid])
            if name_off in offs and (info >> 24) & 0x1F == kind:
                return tid
        return None

    def get(self, kind: Kind, name: str) -> int:
        tid = self.find(kind, name)
        if tid is None:
            raise BtfError(f"BTF has no {kind.name.lower()} {name!r}")
        return tid

    def size(self, tid: int) -> int:
        kind, _, _, _, size = self._record(tid)
        if kind in (Kind.INT, Kind.STRUCT, Kind.UNION, Kind.ENUM, Kind.ENUM64, Kind.FLOAT):
            return size
        if kind == Kind.PTR:
            return 8
        if kind in _MODIFIERS:
            return self.size(size)
        if kind == Kind.ARRAY:
            elem, _index, nelems = struct.unpack_from("<III", self._data, self._extra(tid))
            return self.size(elem) * int(nelems)
        raise BtfError(f"type {tid} ({kind.name}) has no size")

    def strip(self, tid: int) -> int:
        """Follow typedefs and qualifiers to the underlying type."""
        for _ in range(64):
            if tid == 0:
                return 0
            kind, _, _, _, target = self._record(tid)
            if kind not in _MODIFIERS:
                return tid
            tid = target
        raise BtfError("typedef chain too long")

    def members(self, tid: int) -> list[Member]:
        """Direct members of a struct or union (bit offsets relative to it)."""
        kind, _, vlen, kind_flag, _ = self._record(tid)
        if kind not in (Kind.STRUCT, Kind.UNION):
            raise BtfError(f"type {tid} is a {kind.name}, not a struct or union")
        out = []
        base = self._extra(tid)
        for i in range(vlen):
            name_off, mtype, offset = struct.unpack_from("<III", self._data, base + 12 * i)
            bit_offset = offset & 0xFFFFFF if kind_flag else offset
            out.append(Member(self._str(name_off), mtype, bit_offset))
        return out

    def member(self, struct_id: int, name: str) -> Member:
        """A member by name, searching anonymous structs and unions inside.

        :raise BtfError: when absent, or present at two different offsets.
        """
        found = self._find_member(struct_id, name, 0)
        if not found:
            raise BtfError(f"{self.name(struct_id) or 'anonymous struct'} has no member {name!r}")
        if len({m.bit_offset for m in found}) > 1:
            raise BtfError(f"member {name!r} is ambiguous: found at several offsets")
        return found[0]

    def _find_member(self, struct_id: int, name: str, base: int) -> list[Member]:
        found = []
        for m in self.members(struct_id):
            if m.name == name:
                found.append(Member(m.name, m.type_id, base + m.bit_offset))
            elif not m.name:
                inner = self.strip(m.type_id)
                if inner and self.kind(inner) in (Kind.STRUCT, Kind.UNION):
                    found += self._find_member(inner, name, base + m.bit_offset)
        return found

    def byte_offset(self, struct_name: str, member: str) -> int:
        m = self.member(self.get(Kind.STRUCT, struct_name), member)
        if m.bit_offset % 8:
            raise BtfError(f"{struct_name}.{member} is a bitfield")
        return m.bit_offset // 8

    def array_len(self, tid: int) -> int:
        tid = self.strip(tid)
        if self.kind(tid) != Kind.ARRAY:
            raise BtfError(f"type {tid} is not an array")
        return int(struct.unpack_from("<I", self._data, self._extra(tid) + 8)[0])

    def enumerators(self, tid: int) -> dict[str, int]:
        kind, _, vlen, kind_flag, _ = self._record(tid)
        base = self._extra(tid)
        out: dict[str, int] = {}
        if kind == Kind.ENUM:
            fmt = "<Ii" if kind_flag else "<II"
            for i in range(vlen):
                name_off, val = struct.unpack_from(fmt, self._data, base + 8 * i)
                out[self._str(name_off)] = val
        elif kind == Kind.ENUM64:
            for i in range(vlen):
                name_off, lo, hi = struct.unpack_from("<III", self._data, base + 12 * i)
                out[self._str(name_off)] = (hi << 32) | lo
        else:
            raise BtfError(f"type {tid} is a {kind.name}, not an enum")
        return out

    def enum(self, name: str) -> dict[str, int] | None:
        """Enumerators of the enum called ``name``, or None if BTF lacks it."""
        tid = self.find(Kind.ENUM, name)
        if tid is None:
            tid = self.find(Kind.ENUM64, name)
        return None if tid is None else self.enumerators(tid)

    def func_proto_params(self, tid: int) -> list[int]:
        """Parameter type ids of a FUNC_PROTO (reached through typedefs/pointers)."""
        for _ in range(8):
            tid = self.strip(tid)
            kind, _, _, _, target = self._record(tid)
            if kind == Kind.FUNC_PROTO:
                break
            if kind != Kind.PTR:
                raise BtfError(f"type {tid} is not a function prototype")
            tid = target
        else:
            raise BtfError("pointer chain too long")
        _, _, vlen, _, _ = self._record(tid)
        base = self._extra(tid)
        return [struct.unpack_from("<II", self._data, base + 8 * i)[1] for i in range(vlen)]

    def describe(self, tid: int) -> str:
        """A short C-like spelling of a type, for error messages and checks."""
        tid = self.strip(tid)
        if tid == 0:
            return "void"
        kind, _, _, _, target = self._record(tid)
        if kind == Kind.PTR:
            return self.describe(target) + " *"
        prefix = {Kind.STRUCT: "struct ", Kind.UNION: "union ", Kind.ENUM: "enum "}.get(kind, "")
        return prefix + (self.name(tid) or f"<anon {kind.name.lower()}>")
