"""Parse QEMU's RAMBlock table (``x-query-ramblock`` / HMP ``info ramblock``).

The migration stream names blocks by idstr and checks offsets against
``used_length``, so these two columns are what the layout needs. 7.2 prints
``Block Name, PSize, Offset, Used, Total``; 10.x appends ``HVA`` and ``RO``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import grpc

from host_collector.errors import CollectorError

_ROW = re.compile(
    r"^\s*(?P<name>\S+)\s+(?P<psize>\d{1,9})\s+(?P<unit>[KMGT]?i?B)\s+"
    r"0x(?P<offset>[0-9a-fA-F]+)\s+0x(?P<used>[0-9a-fA-F]+)\s+0x(?P<total>[0-9a-fA-F]+)(?:\s.*)?$"
)
_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


class RamBlockError(CollectorError):
    """A RAMBlock table that cannot be read."""

    default_status = grpc.StatusCode.FAILED_PRECONDITION


@dataclass(frozen=True)
class RamBlockInfo:
    name: str
    page_size: int
    used_length: int
    max_length: int


def parse_ramblocks(text: str) -> dict[str, RamBlockInfo]:
    """idstr -> block, from the table text.

    :raise RamBlockError: no header, an unreadable row, or a name seen twice.
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines or "Block Name" not in lines[0] or "Used" not in lines[0]:
        raise RamBlockError("RAMBlock table has no 'Block Name ... Used' header")
    blocks: dict[str, RamBlockInfo] = {}
    for ln in lines[1:]:
        m = _ROW.match(ln)
        if not m:
            raise RamBlockError(f"unreadable RAMBlock row: {ln.strip()!r}")
        unit = _UNITS.get(m["unit"])
        if unit is None:
            raise RamBlockError(f"unknown page-size unit in {ln.strip()!r}")
        name = m["name"]
        if name in blocks:
            raise RamBlockError(f"RAMBlock {name!r} listed twice")
        blocks[name] = RamBlockInfo(name, int(m["psize"]) * unit, int(m["used"], 16), int(m["total"], 16))
    return blocks
