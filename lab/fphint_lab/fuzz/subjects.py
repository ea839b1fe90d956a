"""Everything the fuzz targets test, imported in one place.

The parsers move between packages from time to time; only this module names
where they live.
"""

from __future__ import annotations

from fphint.ranges import RangeError
from fphint.ranges import decode as decode_ranges
from fphint.v1.hints_pb2 import ReportChunk
from host_collector.hintcheck import HintViolation, LayoutIndex, ReportDecoder
from host_collector.layout import RamLayout, RamRange
from host_collector.proxy.migration_proxy import MigrationProxy
from host_collector.proxy.results import ProxyOutcome as Outcome
from host_collector.qmp.mtree import MtreeError, map_ram, parse_mtree
from host_collector.rewrite.gate import PageOracle, RewriteGate
from host_collector.stream.parser import StreamParser, accelerator
from host_collector.stream.wire import Phase

__all__ = [
    "HintViolation",
    "LayoutIndex",
    "MigrationProxy",
    "MtreeError",
    "Outcome",
    "PageOracle",
    "Phase",
    "RamLayout",
    "RamRange",
    "RangeError",
    "ReportChunk",
    "ReportDecoder",
    "RewriteGate",
    "StreamParser",
    "accelerator",
    "decode_ranges",
    "map_ram",
    "parse_mtree",
]
